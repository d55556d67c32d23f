"""How a teacher output (a *target*) is stored: its codec turns a float tensor into one or more stored arrays.

A target keeps one name everywhere (`logits`, `features/layer3`: hook key = loss input); its codec decides the
stored arrays ("parts") behind that name:

| codec                | parts (per sample)                                    | decode                                   |
| -------------------- | ----------------------------------------------------- | ---------------------------------------- |
| `float16`, `float32` | `<name>` in that dtype                                | cast                                     |
| `bfloat16`           | `<name>` as uint16 holding the bf16 bit pattern       | reinterpret the bits as bf16, cast       |
| `int8` (features)    | `<name>` int8, `<name>.scale` float32 per channel     | q * scale                                |
| `topk` (logits)      | `<name>.topk_values`, `<name>.topk_indices`, `<name>.tail` | top-k logits kept, tail spread evenly |

bfloat16 is not a Zarr dtype, so its bits are stored faithfully as uint16 (lossless round trip; the manifest's
codec says so, and a plain Zarr reader sees uint16). int8 uses one scale per sample and channel (the first axis of
a (C, H, W) map; a vector or a 1x1 map has one scale per sample), `scale = absmax / 127`, values rounded and clamped to [-127, 127]: never
wrapping, and -128 stays free as the "never written" fill. Top-k keeps the k largest raw logits and the softmax
mass (T = 1) of the rest; decoding gives the other C - k classes one equal logit that restores exactly that tail
mass, so KD at any temperature sees the teacher's top-k and a flat tail.

Encoding and decoding are torch ops: on a GPU the teacher stage encodes on the device (int8 crosses to the host at
a quarter of float32's bytes) and the student stage decodes there. `distortion` measures what a lossy codec costs,
per sample, on the teacher stage's own outputs; the manifest records the means.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import KDCacheError

FLOATS = {"float16": torch.float16, "float32": torch.float32}
# Largest recompute error accepted by `verify --recompute`, relative to max(1, |value|) (int8: to the channel's
# absmax). fp16 rounds at 2^-11 and bf16 at 2^-8 relative; the margin covers a GPU-made cache checked on a CPU.
TOLERANCE = {"float16": 1e-2, "float32": 1e-4, "bfloat16": 3e-2, "int8": 2e-2, "topk": 1e-2}


class Codec:
    name = "?"

    def config(self) -> dict:
        return {"name": self.name}

    def parts(self, target: str, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
        """Stored arrays behind `target`: name -> (per-sample shape, numpy dtype name)."""
        raise NotImplementedError

    def encode(self, target: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """(n, *shape) float -> parts, each (n, *part_shape) in the part's dtype (same device)."""
        raise NotImplementedError

    def decode(self, target: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Parts -> float32 (n, *shape)."""
        raise NotImplementedError

    def error(self, decoded: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        """Per-element error of stored (decoded) values against a fresh float32 computation, as TOLERANCE means."""
        return (decoded - fresh).abs() / fresh.abs().clamp_min(1.0)

    def max_abs(self, decoded: torch.Tensor, fresh: torch.Tensor) -> float:
        """The largest absolute difference between the values the codec keeps and a fresh computation."""
        return float((decoded - fresh).abs().max()) if fresh.numel() else 0.0


class FloatCodec(Codec):
    def __init__(self, dtype: str):
        self.name = dtype

    def parts(self, target, shape):
        return {target: (tuple(shape), self.name)}

    def encode(self, target, t):
        return {target: t.to(FLOATS[self.name])}

    def decode(self, target, parts):
        return parts[target].float()


class BFloat16Codec(Codec):
    name = "bfloat16"

    def parts(self, target, shape):
        return {target: (tuple(shape), "uint16")}

    def encode(self, target, t):
        return {target: t.to(torch.bfloat16).view(torch.int16)}  # numpy side: the same bits as uint16

    def decode(self, target, parts):
        bits = parts[target]
        if bits.dtype != torch.int16:
            bits = bits.view(torch.int16) if bits.element_size() == 2 else bits.to(torch.int16)
        return bits.view(torch.bfloat16).float()


def _scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One scale per channel of a map; one per sample for a vector or a 1x1 map (a scale per value saves nothing)."""
    return (shape[0],) if len(shape) >= 2 and math.prod(shape[1:]) > 1 else (1,)


class Int8Codec(Codec):
    name = "int8"

    def config(self):
        return {"name": self.name, "scale": "channel"}

    def parts(self, target, shape):
        return {target: (tuple(shape), "int8"), f"{target}.scale": (_scale_shape(tuple(shape)), "float32")}

    def encode(self, target, t):
        t = t.float()
        n, shape = t.shape[0], tuple(t.shape[1:])
        flat = t.reshape(n, *_scale_shape(shape), -1)
        scale = flat.abs().amax(-1) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = (flat / scale[..., None]).round_().clamp_(-127, 127).to(torch.int8)
        return {target: q.reshape(n, *shape), f"{target}.scale": scale}

    def decode(self, target, parts):
        q = parts[target]
        n, shape = q.shape[0], tuple(q.shape[1:])
        scale = parts[f"{target}.scale"].float()
        return (q.reshape(n, *_scale_shape(shape), -1).float() * scale[..., None]).reshape(n, *shape)

    def error(self, decoded, fresh):
        n, shape = fresh.shape[0], tuple(fresh.shape[1:])
        amax = fresh.reshape(n, *_scale_shape(shape), -1).abs().amax(-1, keepdim=True).clamp_min(1e-12)
        err = (decoded - fresh).abs().reshape(n, *_scale_shape(shape), -1) / amax
        return err.reshape(n, *shape)


class TopKCodec(Codec):
    name = "topk"

    # How the tail mass is computed, part of the codec's config and so of the cache key: 2 sums the other logits'
    # mass (see `encode`); stores of tail 1 (recorded without the field) hold tails rounded to float32's resolution
    # of the total, and a new key makes them no cache hit for a new run.
    TAIL = 2

    def __init__(self, k: int, dtype: str = "float16", classes: int | None = None, tail: int = TAIL):
        self.k, self.dtype, self.classes, self.tail = int(k), dtype, classes, tail

    def config(self):
        return {"name": self.name, "k": self.k, "dtype": self.dtype} | ({"tail": self.tail} if self.tail > 1 else {})

    def _index_dtype(self, classes: int) -> str:
        return "int16" if classes < 2 ** 15 else "int32"

    def parts(self, target, shape):
        if len(shape) != 1:
            raise KDCacheError(f"--logits-topk applies to (C,) logits; '{target}' has shape {shape}")
        if not 0 < self.k < shape[0]:
            raise KDCacheError(f"--logits-topk {self.k} must be 0 (every logit) or from 1 to the class count - 1 "
                               f"({shape[0] - 1})")
        return {f"{target}.topk_values": ((self.k,), self.dtype),
                f"{target}.topk_indices": ((self.k,), self._index_dtype(shape[0])),
                f"{target}.tail": ((), "float32")}

    def encode(self, target, t):
        t = t.float()
        values, indices = t.topk(self.k, dim=1)
        # The softmax mass outside the top k, at T = 1, from the other logits themselves: accurate relative to
        # itself. 1 - exp(lse(top k) - lse(all)) would round to float32's resolution of lse(all) (~2e-6 at logits
        # near 20): a confident teacher's tail of 1e-8 came out 0, and its flat tail at T = 4 lost nearly all its
        # mass (KL 2.7 instead of 0.006).
        rest = t.scatter(1, indices, -math.inf)
        tail = torch.exp(torch.logsumexp(rest, 1) - torch.logsumexp(t, 1))
        idx_dtype = torch.int16 if self._index_dtype(t.shape[1]) == "int16" else torch.int32
        return {f"{target}.topk_values": values.to(FLOATS[self.dtype]),
                f"{target}.topk_indices": indices.to(idx_dtype), f"{target}.tail": tail}

    def decode(self, target, parts):
        values = parts[f"{target}.topk_values"].float()
        indices = parts[f"{target}.topk_indices"].long()
        tail = parts[f"{target}.tail"].float().clamp(1e-30, 1 - 1e-7)
        c = self.classes
        # The C - k other classes share one logit z with (C - k) e^z / (sum_topk e^v + (C - k) e^z) = tail.
        z = torch.log(tail) - torch.log1p(-tail) + torch.logsumexp(values, 1) - math.log(c - self.k)
        out = z[:, None].expand(-1, c).clone()
        return out.scatter_(1, indices, values)

    def error(self, decoded, fresh):
        # The kept logits against the fresh ones; the tail as the mass it restores.
        k_idx = fresh.topk(self.k, dim=1).indices
        kept = (decoded.gather(1, k_idx) - fresh.gather(1, k_idx)).abs() / fresh.gather(1, k_idx).abs().clamp_min(1)
        p_dec, p_fresh = F.softmax(decoded, 1), F.softmax(fresh, 1)
        tail_err = (1 - p_dec.gather(1, k_idx).sum(1) - (1 - p_fresh.gather(1, k_idx).sum(1))).abs()
        return torch.cat([kept, tail_err[:, None]], 1)

    def max_abs(self, decoded, fresh):
        # Over the kept logits: the other classes share one logit by design, far from each of theirs.
        k_idx = fresh.topk(self.k, dim=1).indices
        return super().max_abs(decoded.gather(1, k_idx), fresh.gather(1, k_idx))


def make_codec(config: dict, shape: tuple[int, ...] | None = None) -> Codec:
    name = config["name"]
    if name in FLOATS:
        return FloatCodec(name)
    if name == "bfloat16":
        return BFloat16Codec()
    if name == "int8":
        return Int8Codec()
    if name == "topk":
        return TopKCodec(config["k"], config.get("dtype", "float16"), shape[0] if shape else None,
                         config.get("tail", 1))
    raise KDCacheError(f"unknown codec '{name}' in the store; this kdcache knows float16, float32, bfloat16, "
                       "int8 and topk")


def choose(target: str, dtype: str, feature_codec: str, logits_topk: int) -> dict:
    """The codec config of one target from the teacher-cache flags."""
    if dtype not in (*FLOATS, "bfloat16"):
        raise KDCacheError(f"unknown --dtype '{dtype}'; use float16, float32 or bfloat16")
    if target == "logits":
        return TopKCodec(logits_topk, dtype if dtype in FLOATS else "float16").config() if logits_topk \
            else {"name": dtype}
    if feature_codec not in ("float", "int8"):
        raise KDCacheError(f"unknown --feature-codec '{feature_codec}'; use float (the --dtype) or int8")
    return {"name": "int8", "scale": "channel"} if feature_codec == "int8" else {"name": dtype}


def distortion(target: str, ref: torch.Tensor, decoded: torch.Tensor) -> dict[str, torch.Tensor]:
    """What storing costs, per sample: logits -> KL(full || stored) at T=1 and T=4 and top-1 agreement;
    features -> relative L2 error and cosine similarity. `ref` is the teacher's own output, in float32."""
    ref, decoded = ref.float().flatten(1), decoded.float().flatten(1)
    if target == "logits":
        # In float64 (a (n, C) matrix: cheap anywhere). float32's log_softmax rounds at ~1e-7 of each logit, so a
        # float16 or bfloat16 store's KL (~1e-10 .. 1e-8) came out as that noise, up to 300x too large, and its
        # T = 4 value above its T = 1 one.
        ref, decoded = ref.double(), decoded.double()
        out = {}
        for T in (1, 4):
            lp, lq = F.log_softmax(ref / T, 1), F.log_softmax(decoded / T, 1)
            out[f"kl_t{T}"] = (lp.exp() * (lp - lq)).sum(1).clamp_min(0)
        # the stored top-1 is one of the teacher's top classes: with a tie (two equal top logits) torch.topk and
        # argmax may each pick another of them, which counted an exact store as disagreeing
        picked = ref.gather(1, decoded.argmax(1, keepdim=True)).squeeze(1)
        out["top1_agreement"] = (picked == ref.max(1).values).float()
        return out
    norm = ref.norm(dim=1)
    cos = F.cosine_similarity(ref, decoded, dim=1, eps=1e-12).clamp(-1.0, 1.0)  # no 1 + 1e-9 rounding
    # A sample whose output is all zeros and stored so (a dead ReLU map; int8 keeps zeros exactly) is no loss:
    # cosine_similarity calls two zero vectors 0, which pulled an exact store's mean below 1.
    both_zero = (norm == 0) & (decoded.norm(dim=1) == 0)
    return {"rel_err": (ref - decoded).norm(dim=1) / norm.clamp_min(1e-12),
            "cosine": torch.where(both_zero, torch.ones_like(cos), cos)}


def fill_value(dtype: str):
    """The value a never-written chunk reads as; no codec ever produces it."""
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return float("nan")
    if dt == np.uint16:
        return 0xFFFF       # a bf16 NaN bit pattern; encode refuses non-finite outputs
    if dt == np.uint8:
        return 255
    return int(np.iinfo(dt).min) if dt in (np.int8, np.int32) else -1


def is_missing(values: np.ndarray, fill) -> bool:
    if isinstance(fill, float) and math.isnan(fill):
        return bool(np.isnan(values).any())
    return bool((values == fill).any())
