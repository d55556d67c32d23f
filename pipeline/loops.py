"""Small training helpers shared by the teacher trainer and the student stage (batches, evaluation, optimiser)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.data import Source, Transform
from pipeline.errors import KDCacheError, first_line


def check_writable(folder: Path, flag: str) -> None:
    """Fail before hours of training, not after: `folder` must be creatable and writable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".kdcache-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise KDCacheError(f"cannot write into {folder} ({e.strerror or type(e).__name__}); choose another "
                           f"{flag}") from None


# More epochs than any run finishes. Not only absurd: train-student sums every epoch's batch count for its schedule
# before the first epoch (about 30 us each), so --epochs 10**12 hung there without a word.
MAX_EPOCHS = 100_000
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# Loader processes (--workers) and writer threads (--writers): far beyond any machine's cores, short of a typo's
# count (--workers 10**12 hung starting processes).
MAX_PROCESSES = 256


def too_many_workers(workers: int) -> str:
    """The one line for a --workers above MAX_PROCESSES (train-student, bench)."""
    return (f"--workers {workers} is more loader processes than a machine runs well (at most {MAX_PROCESSES}); use "
            "about as many as the CPU cores that the training leaves free")


def training_checks(epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int
                    ) -> list[tuple[bool, str]]:
    """(ok, message) for the numbers every training run takes (the teacher's and a student's), checked before any
    data is opened: a NaN learning rate trains nonsense, a negative seed fails in numpy's generator after setup."""
    return [(math.isfinite(lr), f"--lr must be a finite number (got {lr})"),
            (math.isfinite(weight_decay), f"--weight-decay must be a finite number (got {weight_decay})"),
            (0 <= seed < 2**32, f"--seed must be 0 or more, below 2**32 (got {seed})"),
            (epochs >= 1, f"--epochs must be at least 1 (got {epochs})"),
            (epochs <= MAX_EPOCHS, f"--epochs must be at most {MAX_EPOCHS} (got {epochs})"),
            (batch_size >= 1, f"--batch-size must be at least 1 (got {batch_size})"),
            (lr > 0, f"--lr must be positive (got {lr})"),
            (weight_decay >= 0, f"--weight-decay must be 0 or more (got {weight_decay})")] + [
        # finite in Python but not in float32 (1e300): the optimizer's first step raised a RuntimeError traceback
        (not math.isfinite(v) or v <= FLOAT32_MAX, f"{flag} must be at most {FLOAT32_MAX:.2g}, float32's largest "
                                                   f"number, in which the weights are updated (got {v})")
        for flag, v in (("--lr", lr), ("--weight-decay", weight_decay))]


def write_whole(path: Path, write, then: str, errors: tuple = (OSError,)) -> None:
    """`write(tmp)` to a temporary name, then rename: a kill or a full disk never leaves a truncated file under the
    real name, nor a half-written one under the temporary name. `errors` (a full disk) become one line ending in
    `then`, what to do once space is freed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        tmp.replace(path)
    except errors as e:
        tmp.unlink(missing_ok=True)
        raise KDCacheError(f"cannot write {path} ({first_line(e)}); is the disk full? free space, then {then}") from None
    except BaseException:  # Ctrl-C mid-write: no half-written file left behind under the temporary name either
        tmp.unlink(missing_ok=True)
        raise


def save_whole(obj, path: Path, then: str) -> None:
    """torch.save, written whole (`write_whole`). torch reports a full disk as a RuntimeError from its zip writer,
    not an OSError."""
    write_whole(path, lambda tmp: torch.save(obj, tmp), then, (OSError, RuntimeError))


def write_text_whole(path: Path, text: str, then: str) -> None:
    """A text file, written whole (`write_whole`)."""
    write_whole(path, lambda tmp: tmp.write_text(text), then)


def pick_device(requested: str = "auto") -> torch.device:
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N; refused with one line when unusable."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise KDCacheError(f"unknown --device '{requested}'; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise KDCacheError(f"--device {requested} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise KDCacheError(f"--device {requested}: this machine has {count} CUDA device(s); "
                               "use --device cpu (or auto)")
    return device


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, end) of each batch over n rows. A last batch of a single row joins the one before it: BatchNorm
    cannot train on one sample (torch raises for a 1x1 map), and a one-sample step is mostly noise."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if batch_size > 1 and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def source_batches(source: Source, tf: Transform, batch_size: int, shuffle: bool = False, seed: int = 0,
                   epoch: int = 0):
    """Yield (idx, x, y) over a whole source. Sources load a batch at once, so this stays vectorised."""
    order = np.arange(source.num_samples)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(source.num_samples)
    for s, e in batch_bounds(len(order), batch_size):
        idx = order[s:e]
        y = source.labels(idx)
        yield idx, source.load(idx, tf), (torch.from_numpy(y) if y is not None else None)


@torch.inference_mode()
def evaluate(model: nn.Module, source: Source, tf: Transform, device: torch.device,
             label_map: np.ndarray | None = None, batch_size: int = 512) -> float:
    """Top-1 accuracy on a labelled source (its labels translated by `label_map`, see `data.class_map`)."""
    was_training = model.training
    model.eval()
    correct = 0
    lut = torch.from_numpy(label_map) if label_map is not None else None
    try:
        for _idx, x, y in source_batches(source, tf, batch_size):
            y = lut[y] if lut is not None else y
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    finally:  # a caller that catches an error here (a notebook, a retry) gets its model back in the mode it gave
        model.train(was_training)
    return correct / source.num_samples


def to_device_ahead(batches, device: torch.device):
    """The batches with their tensors on `device`. On a GPU, batch k+1 is copied on a side stream while batch k's
    step runs (the loader hands out pinned host memory, so the copies are asynchronous); on the compute stream those
    copies would stall every step (~38 MB of 224x224 uint8 images per batch of 256). The CPU gets its batches
    unchanged."""
    if device.type != "cuda":
        yield from batches
        return
    copies = torch.cuda.Stream(device)

    def send(batch):
        with torch.cuda.stream(copies):
            return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()}

    it = iter(batches)
    ahead = next(it, None)
    ahead = send(ahead) if ahead is not None else None
    while ahead is not None:
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(copies)  # this batch's copies are done before its step reads them
        batch = ahead
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                v.record_stream(compute)  # made on the copy stream, used (and freed) on the compute stream
        yield batch  # its step is queued on the GPU when the loop asks for the next batch: copy that one meanwhile
        ahead = next(it, None)
        ahead = send(ahead) if ahead is not None else None


def sgd(params, lr: float, weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)


def adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS = {"sgd": sgd, "adamw": adamw}  # SGD with Nesterov momentum 0.9 (the papers' CNN recipes), or AdamW


def cosine_lr(opt: torch.optim.Optimizer, base_lr: float, step: int, total: int, warmup: int = 0) -> None:
    """Linear warm-up then cosine decay to zero, set per step."""
    if step < warmup:
        lr = base_lr * (step + 1) / warmup
    else:
        lr = 0.5 * base_lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for g in opt.param_groups:
        g["lr"] = lr


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Batch augmentation for teacher training: random translation by up to `pad` pixels and horizontal flip."""
    n, _c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="constant", value=float(x.min()))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(-1, x.shape[1], -1, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(-1, x.shape[1], h, -1)
    out = out.gather(3, cols)
    f = torch.rand(n, generator=gen) < 0.5
    out[f] = out[f].flip(-1)
    return out
