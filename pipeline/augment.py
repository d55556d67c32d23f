"""Augmented views for consistent teaching: a declarative policy, parameters per (seed, sample, view), exact replay.

Beyer et al. (2022): the teacher and the student must see the same view. teacher-cache draws K views per sample,
stores each view's parameters explicitly (`aug/box`, `aug/flip`) next to the teacher's outputs for that view, and
train-student rebuilds exactly that input from the stored parameters.

Policy spec (comma-separated; canonical form recorded in the manifest and part of the cache key):

    crop=LO-HI     random-resized crop: box area a fraction in [LO, HI] of the image (torchvision's sampler:
                   10 tries, then a centre crop), aspect ratio in `ratio`
    ratio=LO-HI    aspect-ratio range of the crop (default 0.75-1.3333)
    translate=P    shift the box by up to P native pixels each way (outside the image reads as 0)
    flip           horizontal flip with probability 1/2
    plain0         view 0 is the un-augmented input
    none           no augmentation (a fixed cache)

Parameters: `box` = (top, left, height, width) in native pixels (int32) and `flip` in {0, 1}. They come from
splitmix64 of (seed, sample index, view, draw): no RNG state, so they depend on nothing else: not on rank, worker
count, batch size, chunk order or start epoch. Replay is `apply_views` (version `REPLAY_VERSION`, recorded in the
manifest): a pure shift (box size = output size) is an exact integer gather; a whole-image box at another size is
the plain input's resize; any other box is cut out (0 outside the image) and resized by torchvision's roi_align
(bilinear, several samples per output pixel when shrinking, clamped to the box). Each output pixel depends only on
its own image and box, so a view is bitwise the same on the CPU whatever batch, worker or run it is rebuilt in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import KDCacheError

_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Counter-based hash: the same input always gives the same 64 bits, in any order, on any worker or rank."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hash_uniform(*keys) -> np.ndarray:
    """Uniform floats in [0, 1) from a tuple of broadcastable integer keys (chained splitmix64)."""
    h = np.zeros((), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in keys:
            h = splitmix64(h ^ (np.asarray(k).astype(np.int64).astype(np.uint64) & _M))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def row_order(num_samples: int, order: str, seed: int = 0) -> np.ndarray:
    """The source index stored at each row of a store: `source` keeps the data's order; `shuffled` (the default)
    is a fixed permutation, so every chunk is a random sample of the data even when the source is sorted (an image
    folder is sorted by class) and chunk-level shuffling in the student stage still gives mixed batches. Sorting
    splitmix64 keys makes it a pure function of (seed, N), the same on every rank, resume and numpy version."""
    if order == "source":
        return np.arange(num_samples, dtype=np.int64)
    if order != "shuffled":
        raise KDCacheError(f"unknown --row-order '{order}'; use shuffled or source")
    keys = splitmix64(np.arange(num_samples, dtype=np.uint64) ^ (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)))
    return np.argsort(keys, kind="stable").astype(np.int64)


def _spec_number(text: str, part: str, spec: str) -> float:
    """A policy number as the canonical spec writes it (6 significant digits, `:g`), so that spec and policy are one
    to one and two policies never share a spec (a cache key) while sampling different views. The default ratio's
    bound 4/3, which the spec writes as 1.33333, reads back as 4/3."""
    v = float(text)
    if f"{v:g}" == f"{4 / 3:g}":
        return 4 / 3
    if math.isfinite(v) and float(f"{v:g}") != v:
        raise KDCacheError(f"'{part}' in --augment '{spec}' has more than 6 significant digits; round it "
                           f"(e.g. {v:g})")
    return v


@dataclass(frozen=True)
class AugmentPolicy:
    crop: tuple[float, float] | None = None
    ratio: tuple[float, float] = (0.75, 4 / 3)
    translate: int = 0
    flip: bool = False
    plain0: bool = False

    @property
    def identity(self) -> bool:
        return self.crop is None and self.translate == 0 and not self.flip

    @classmethod
    def parse(cls, spec: str | None) -> "AugmentPolicy":
        if spec is None or spec.strip() in ("", "none"):
            return cls()
        kw: dict = {}
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            key, _, val = part.partition("=")
            if key in kw:
                raise KDCacheError(f"'{key}' appears twice in --augment '{spec}'; give each part once")
            try:
                if key in ("crop", "ratio"):
                    lo, hi = (_spec_number(v, part, spec) for v in val.split("-"))
                    if not (0 < lo <= hi < math.inf) or (key == "crop" and hi > 1):
                        raise ValueError
                    kw[key] = (lo, hi)
                elif key == "translate":
                    kw[key] = int(val)
                    if kw[key] < 0:
                        raise ValueError
                elif key in ("flip", "plain0") and not val:
                    kw[key] = True
                else:
                    raise KeyError(key)
            except (ValueError, KeyError):
                raise KDCacheError(f"bad augmentation '{part}' in '{spec}'; use comma-separated crop=LO-HI, "
                                   "ratio=LO-HI, translate=PIXELS, flip, plain0 (e.g. crop=0.5-1,flip) or none"
                                   ) from None
        if kw.get("plain0") and not ({"crop", "translate", "flip"} & set(kw)):
            raise KDCacheError(f"plain0 in '{spec}' only keeps view 0 plain, and nothing augments the others; add "
                               "crop=LO-HI, translate=PIXELS or flip (or use --augment none)")
        if "ratio" in kw and "crop" not in kw:  # the aspect ratio belongs to the random-resized crop
            raise KDCacheError(f"ratio=LO-HI in '{spec}' shapes the random crop, which needs crop=LO-HI too "
                               "(e.g. crop=0.5-1,ratio=0.75-1.33)")
        return cls(**kw)

    def spec(self) -> str:
        """Canonical spec string: equal policies give equal strings (part of the cache key)."""
        if self.identity:
            return "none"
        parts = []
        if self.crop:
            parts += [f"crop={self.crop[0]:g}-{self.crop[1]:g}", f"ratio={self.ratio[0]:g}-{self.ratio[1]:g}"]
        if self.translate:
            parts.append(f"translate={self.translate}")
        if self.flip:
            parts.append("flip")
        if self.plain0:
            parts.append("plain0")
        return ",".join(parts)

    def to_dict(self) -> dict:
        return asdict(self) | {"spec": self.spec()}

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentPolicy":
        return cls(crop=tuple(d["crop"]) if d.get("crop") else None, ratio=tuple(d["ratio"]),
                   translate=int(d["translate"]), flip=bool(d["flip"]), plain0=bool(d["plain0"]))


CROP_TRIES = 10


def _crops(policy: AugmentPolicy, seed: int, idx: np.ndarray, v: np.ndarray, native_hw: tuple[int, int]):
    """Random-resized-crop boxes (top, left, h, w), each (n, V), and `found` (n, V): False where none of the
    CROP_TRIES draws fit the image and torchvision's fallback (a centre crop) was taken instead."""
    H, W = native_hw
    t = np.arange(CROP_TRIES)[None, None, :]
    u = [hash_uniform(seed, idx[..., None], v[..., None], t, d) for d in range(4)]
    area = H * W * (policy.crop[0] + u[0] * (policy.crop[1] - policy.crop[0]))
    logr = np.log(policy.ratio[0]) + u[1] * (np.log(policy.ratio[1]) - np.log(policy.ratio[0]))
    aspect = np.exp(logr)
    cw = np.round(np.sqrt(area * aspect)).astype(np.int64)
    ch = np.round(np.sqrt(area / aspect)).astype(np.int64)
    ok = (cw > 0) & (cw <= W) & (ch > 0) & (ch <= H)
    first = np.argmax(ok, axis=-1)[..., None]
    found = ok.any(-1)
    ch_, cw_ = np.take_along_axis(ch, first, -1)[..., 0], np.take_along_axis(cw, first, -1)[..., 0]
    ut, ul = np.take_along_axis(u[2], first, -1)[..., 0], np.take_along_axis(u[3], first, -1)[..., 0]
    ct = np.floor(ut * (H - ch_ + 1)).astype(np.int64)
    cl = np.floor(ul * (W - cw_ + 1)).astype(np.int64)
    # torchvision's fallback: a centre crop with the aspect ratio clamped to the range.
    in_ratio = W / H
    if in_ratio < policy.ratio[0]:
        fw, fh = W, max(1, int(round(W / policy.ratio[0])))
    elif in_ratio > policy.ratio[1]:
        fh, fw = H, max(1, int(round(H * policy.ratio[1])))
    else:
        fw, fh = W, H
    h, w = np.where(found, ch_, fh), np.where(found, cw_, fw)
    top, left = np.where(found, ct, (H - fh) // 2), np.where(found, cl, (W - fw) // 2)
    return top, left, h, w, found


def sample_params(policy: AugmentPolicy, seed: int, index: np.ndarray, views: np.ndarray | int,
                  native_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (n, V, 4) int32 and flips (n, V) uint8 for samples `index` and view numbers `views` (or range(V)).

    Vectorised, and a pure function of (policy, seed, index, view): the same pair gives the same view anywhere.
    """
    H, W = native_hw
    idx = np.asarray(index, dtype=np.int64)[:, None]
    v = np.arange(views) if np.isscalar(views) else np.asarray(views, dtype=np.int64)
    v = v[None, :] if v.ndim == 1 else v
    n, nv = idx.shape[0], v.shape[1]
    top = np.zeros((n, nv), np.int64)
    left = np.zeros((n, nv), np.int64)
    h = np.full((n, nv), H, np.int64)
    w = np.full((n, nv), W, np.int64)
    if policy.crop:
        top, left, h, w, _ = _crops(policy, seed, idx, v, native_hw)
    if policy.translate:
        P = policy.translate
        top = top + np.floor(hash_uniform(seed, idx, v, 101) * (2 * P + 1)).astype(np.int64) - P
        left = left + np.floor(hash_uniform(seed, idx, v, 102) * (2 * P + 1)).astype(np.int64) - P
    flip = (hash_uniform(seed, idx, v, 103) < 0.5) if policy.flip else np.zeros((n, nv), bool)
    if policy.plain0:
        plain = np.broadcast_to(v == 0, (n, nv))
        top, left = np.where(plain, 0, top), np.where(plain, 0, left)
        h, w = np.where(plain, H, h), np.where(plain, W, w)
        flip = np.where(plain, False, flip)
    box = np.stack([top, left, h, w], axis=-1).astype(np.int32)
    return box, flip.astype(np.uint8)


def stored_params(manifest: dict):
    """What a view store's `aug/box` and `aug/flip` must hold, as a function (index, view) -> {name: values}: they
    are a pure function of (--aug-seed, sample index, view), so a chunk swapped with another view's or block's
    (every checksum passes) is found without the teacher, and repair writes them back as they were."""
    views = manifest["views"]
    policy, seed = AugmentPolicy.from_dict(views["augment"]), int(views["seed"])
    native_hw = tuple(manifest["data"]["native_shape"][1:])

    def expected(index: np.ndarray, view: int) -> dict[str, np.ndarray]:
        box, flip = sample_params(policy, seed, index, [view], native_hw)
        return {"aug/box": box[:, 0], "aug/flip": flip[:, 0]}

    return expected


MAX_VIEWS = 1024  # FKD stores hundreds of crops per image; beyond this the per-view commit markers dominate


def check_crop_fallback(policy: AugmentPolicy, seed: int, native_hw: tuple[int, int], numbers: np.ndarray,
                        probe: int = 512) -> None:
    """Refuse crops that mostly take torchvision's fixed centre crop outside the crop range, from the first `probe`
    samples' views numbered `numbers` (a view cache's own, or a few fresh ones)."""
    if not policy.crop:
        return
    H, W = native_hw
    spec = policy.spec()
    probe = min(probe, max(16, 2**16 // len(numbers)))  # the crop draws take ~160 B per (sample, view, try)
    lo, hi = policy.crop
    *_, ch, cw, found = _crops(policy, seed, np.arange(probe)[:, None], numbers[None, :], native_hw)
    frac = (ch * cw / (H * W))[~found]
    # torchvision's rule when no draw fits: a centre crop. Harmless when that crop is what the range asks for
    # (a near-whole-image range); otherwise the manifest would record a policy the teacher did not see.
    off_range = (frac < lo - 0.05) | (frac > hi + 0.05)
    if off_range.sum() > 0.1 * found.size:
        raise KDCacheError(
            f"--augment '{spec}': on {H}x{W} images {1 - found.mean():.0%} of crops fit no draw of the crop and "
            f"ratio ranges and fall back to a fixed centre crop (area {frac[off_range].mean():.2f} of the image, "
            f"outside {lo:g}-{hi:g}); "
            + ("raise the crop range (such crops round to nothing)" if frac[off_range].mean() > hi
               else "widen ratio= or lower the crop range"))


def check_policy(policy: AugmentPolicy, seed: int, native_hw: tuple[int, int], views: int | None = None,
                 probe: int = 512, crop_fallback: bool = True) -> None:
    """Refuse a policy that cannot teach what it claims, from the parameters of the first `probe` samples (the same
    pure function every view is made with): views that lie entirely off the image (a translation larger than the
    crops), and with `views` (a view cache) views that are all the same input, or a single view that is the plain
    input (`plain0`): a cache of the teacher on identical inputs K times over, or of no augmentation at all.
    `crop_fallback`: also refuse crops that mostly take torchvision's fixed centre crop outside the crop range (a
    check newer than some stores: a store made before it is still verified, repaired and resumed)."""
    if policy.identity:
        return
    H, W = native_hw
    spec = policy.spec()
    if views == 1 and policy.plain0:
        raise KDCacheError(f"--views 1 with plain0 caches only the plain input (view 0 is it); use --views 2 or "
                           f"more, or drop plain0 from --augment '{spec}'")
    # a view cache's own view numbers; for online KD's fresh views, a few others (not view 0, which plain0 fixes)
    numbers = np.arange(views) if views else np.arange(1, 9)
    probe = min(probe, max(16, 2**16 // len(numbers)))  # the crop draws take ~160 B per (sample, view, try)
    if crop_fallback:
        check_crop_fallback(policy, seed, native_hw, numbers, probe)
    box, flip = sample_params(policy, seed, np.arange(probe), numbers, native_hw)
    top, left, h, w = (box[..., i].astype(np.int64) for i in range(4))
    off = (top >= H) | (left >= W) | (top + h <= 0) | (left + w <= 0)
    if off.any():
        raise KDCacheError(f"--augment '{spec}' puts {off.mean():.0%} of views entirely off the {H}x{W} images (a "
                           "translation larger than the crop); use a smaller translate or larger crops")
    if views and views > 1 and (box == box[:, :1]).all() and (flip == flip[:, :1]).all():
        # crops that never fit their ranges are all one centre crop: name that reason, whatever `crop_fallback` says
        # (this policy is refused either way), rather than advise a wider crop range that cannot help a ratio range
        check_crop_fallback(policy, seed, native_hw, numbers, probe)
        raise KDCacheError(f"--augment '{spec}' makes every view of a sample the same input on {H}x{W} images (e.g. "
                           "crop=1-1 keeps the whole image); widen the crop range or add flip / translate")


# How views are rebuilt from their parameters; recorded with every view cache and part of its key. A store made by
# another replay would pair inputs with targets computed on slightly different pixels, so it is refused.
# 1: roi_align on a zero ring around the image (edges of boxes touching the image blended with black).
# 2: a box is cut out of the image (0 outside it) and resampled clamped to its own edges; a full-image box is resized
#    exactly as a plain input is (`resize`), so view 0 of `plain0` is the plain input.
REPLAY_VERSION = 2


def check_replay(manifest: dict, path: str) -> None:
    """Refuse a view cache whose views this kdcache would rebuild differently from what its teacher saw."""
    views = manifest.get("views")
    have = int(views.get("replay", 1)) if views else REPLAY_VERSION
    if have != REPLAY_VERSION:
        raise KDCacheError(f"{path} holds views rebuilt by view replay {have}; this kdcache rebuilds views with "
                           f"replay {REPLAY_VERSION}, so inputs would not match their targets: re-run teacher-cache "
                           "with the same flags (a new cache key)")


def resize(images: torch.Tensor, out_hw: list[int] | tuple[int, int]) -> torch.Tensor:
    """uint8 (n, C, H, W) -> uint8 (n, C, h, w): bilinear, antialiased when shrinking (torchvision's Resize)."""
    if tuple(images.shape[-2:]) == (int(out_hw[0]), int(out_hw[1])):
        return images
    x = F.interpolate(images.float(), size=(int(out_hw[0]), int(out_hw[1])), mode="bilinear", antialias=True,
                      align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _gather_box(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """images[i, :, rows[i], cols[i]] for (n, C, H, W) images and per-sample (n, r) rows, (n, c) columns; positions
    outside the image read 0 (an exact integer gather)."""
    n, c, H, W = images.shape
    rv, cv = (rows >= 0) & (rows < H), (cols >= 0) & (cols < W)
    g = images[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
               rows.clamp(0, H - 1)[:, None, :, None], cols.clamp(0, W - 1)[:, None, None, :]]
    return g * (rv[:, None, :, None] & cv[:, None, None, :]).to(images.dtype)


def apply_views(images: torch.Tensor, box: np.ndarray, flip: np.ndarray, out_hw: list[int] | tuple[int, int]
                ) -> torch.Tensor:
    """Rebuild views: uint8 (n, C, H, W) native images, boxes (n, 4), flips (n,) -> uint8 (n, C, h, w).

    - box size = output size (a pure shift): an exact integer gather, 0 outside the image;
    - box = the whole image at another size: `resize`, the plain input's resize;
    - any other box (a crop, or a shifted box at another size): cut out of the image, 0 outside it, and resampled
      by torchvision's roi_align (aligned=True, adaptive sampling: several bilinear samples per output pixel when
      shrinking, so area-like averaging, no aliasing). roi_align would read past the box's edge by up to half a
      pixel; the box is cut out with a one-pixel ring repeating its edge, so samples clamp to the box as
      torchvision's resized_crop does (and a box at the image edge is not blended with black).
    Each output depends only on its own image and parameters, so it is bitwise the same in any batch, worker or run.
    """
    n, c, H, W = images.shape
    oh, ow = int(out_hw[0]), int(out_hw[1])
    box = torch.from_numpy(np.asarray(box, dtype=np.int64).reshape(n, 4))
    flip_t = torch.from_numpy(np.asarray(flip).reshape(n).astype(bool))
    shift = (box[:, 2] == oh) & (box[:, 3] == ow)
    whole = ~shift & (box == torch.tensor([0, 0, H, W])).all(1)
    out = torch.empty((n, c, oh, ow), dtype=torch.uint8)
    if shift.any():
        s = shift.nonzero()[:, 0]
        out[s] = _gather_box(images[s], box[s, 0, None] + torch.arange(oh), box[s, 1, None] + torch.arange(ow))
    if whole.any():
        s = whole.nonzero()[:, 0]
        out[s] = resize(images[s], (oh, ow))
    rest = (~shift & ~whole).nonzero()[:, 0]
    if len(rest):
        from torchvision.ops import roi_align

        b = box[rest]
        # The crop with its ring, box-relative: canvas position j holds box row clamp(j - 1, 0, h - 1). Only
        # positions up to h + 1 are ever read for a box of height h, so the canvas's size (the batch's largest
        # box) never changes a sample's arithmetic.
        hc, wc = int(b[:, 2].max()) + 2, int(b[:, 3].max()) + 2
        rows = b[:, 0, None] + torch.minimum((torch.arange(hc) - 1).clamp(min=0), b[:, 2, None] - 1)
        cols = b[:, 1, None] + torch.minimum((torch.arange(wc) - 1).clamp(min=0), b[:, 3, None] - 1)
        canvas = _gather_box(images[rest], rows, cols).float()
        ones = torch.ones(len(rest))
        rois = torch.stack([torch.arange(len(rest)).float(), ones, ones, b[:, 3] + 1.0, b[:, 2] + 1.0], 1)
        r = roi_align(canvas, rois, (oh, ow), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        out[rest] = r.round_().clamp_(0, 255).to(torch.uint8)
    if flip_t.any():
        out[flip_t] = out[flip_t].flip(-1)
    return out


def select_view(policy: str, seed: int, epoch: int, block: int, views: int) -> int:
    """The view a student reads for the samples of `block` in `epoch`.

    `cycle`: every sample sees each of its K views once per K epochs, starting at a per-block offset;
    `random`: a fresh uniform pick each epoch. The pick's number is shared by the samples of one chunk (their
    parameters are independent draws, so this is a per-sample pick in distribution) so that a block reads exactly
    one chunk per array instead of all K.
    """
    if policy == "cycle":
        offset = int(math.floor(float(hash_uniform(seed, block, 7)) * views))
        return (epoch + offset) % views
    if policy == "random":
        return int(math.floor(float(hash_uniform(seed, epoch, block, 11)) * views))
    raise KDCacheError(f"unknown --view-policy '{policy}'; use cycle or random")
