"""Stage 1 (`make teacher-cache`): run the teacher once over a dataset and write its outputs to a Zarr v3 store.

    run_teacher_cache(CacheConfig(...)) -> path of the complete store

What it does, in order:
1. resolve the data, the teacher (weights fingerprinted) and the transform the teacher was trained with;
2. probe one batch to learn the output shapes and validate the layer names;
3. derive the cache key from everything that determines the content; a complete store with that key is a cache hit
   (nothing is computed), an incomplete one is resumed (committed blocks are skipped);
4. run the teacher block by block (inference mode, autocast on GPU) and hand each finished block to a pool of
   writer threads: zstd compression releases the GIL, so compression and disk writes overlap the next forward;
5. set `complete` only after the last block is committed, then print the store's path.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import store as st
from pipeline.data import Transform, data_root, default_transform, open_source
from pipeline.errors import KDCacheError
from pipeline.loops import pick_device
from pipeline.models import capture, fingerprint_module, load_teacher, resolve_modules


@dataclass
class CacheConfig:
    data: str = "fashion-mnist:train"
    teacher: str = "default-teacher"
    weights: str | None = None            # default-teacher: data/teachers/default.pt
    layers: list[str] = field(default_factory=list)
    dtype: str = "float16"                # of logits and features; float32 keeps them exact
    out: str | None = None                # explicit store path; default <cache_dir>/<key>.zarr
    cache_dir: str | None = None          # default data/cache
    chunk_samples: int = 1024             # rows per chunk = the unit of commit
    batch_size: int = 256
    compression_level: int = 1            # zstd 1: on float16 features ~5x faster than 3 at the same ratio
    image_size: int | None = None         # resize for the teacher (default: teacher's training size, else native)
    channels: int | None = None
    limit: int | None = None              # cache only the first N samples (quick runs)
    device: str = "auto"
    writers: int = 0                      # writer threads; 0 = min(8, CPU cores)
    force: bool = False                   # rebuild even when a complete cache with this key exists


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _resolve_transform(cfg: CacheConfig, source, teacher_meta: dict) -> Transform:
    if "transform" in teacher_meta and cfg.image_size is None and cfg.channels is None:
        return Transform.from_dict(teacher_meta["transform"])  # the input the teacher was trained on
    return default_transform(source, cfg.image_size, cfg.channels)


def _progress(total: int, done: int):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    prog = Progress(TextColumn("[bold]teacher-cache"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]:>8} samples/s"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=False)
    task = prog.add_task("cache", total=total, completed=done, rate="-")
    return prog, task


@dataclass
class Prepared:
    """Everything resolved before a single sample is cached (shared by teacher-cache, plan, verify and repair)."""

    cfg: CacheConfig
    source: object
    teacher: torch.nn.Module
    teacher_meta: dict
    transform: Transform
    device: torch.device
    num_samples: int
    shapes: dict[str, tuple[int, ...]]
    identity: dict
    key: str
    path: Path
    arrays: dict[str, tuple[tuple[int, ...], str]]

    def manifest(self) -> dict:
        cfg = self.cfg
        return {"key": self.key, "identity": self.identity, "created": st.now(),
                "teacher": {"spec": cfg.teacher, "weights": cfg.weights, "fingerprint": self.identity["teacher"],
                            "arch": self.teacher_meta.get("arch", cfg.teacher)},
                "data": self.source.describe() | {"num_samples": self.num_samples, "limit": cfg.limit},
                "transform": self.transform.to_dict(), "layers": list(cfg.layers), "dtype": cfg.dtype,
                "codecs": self.identity["codecs"], "chunk_samples": cfg.chunk_samples, "versions": st.versions(),
                "device": str(self.device), "config": asdict(cfg)}


def prepare(cfg: CacheConfig) -> Prepared:
    """Resolve data, teacher, transform and layers, probe the output shapes, and derive the cache key."""
    if cfg.dtype not in st.DTYPES:
        raise KDCacheError(f"unknown --dtype '{cfg.dtype}'; use {' or '.join(st.DTYPES)}")
    if cfg.chunk_samples <= 0 or cfg.batch_size <= 0:
        raise KDCacheError("--chunk-samples and --batch-size must be positive")
    device = pick_device(cfg.device)
    source = open_source(cfg.data)
    n = min(source.num_samples, cfg.limit) if cfg.limit else source.num_samples
    probe_tf = default_transform(source, cfg.image_size, cfg.channels)
    teacher, meta = load_teacher(cfg.teacher, Path(cfg.weights) if cfg.weights else None,
                                 source.num_classes or 1000, probe_tf.channels, probe_tf.size[0])
    tf = _resolve_transform(cfg, source, meta)
    resolve_modules(teacher, cfg.layers)  # unknown names fail here, before anything is written
    teacher_fp = fingerprint_module(teacher)
    teacher = teacher.to(device)

    # Probe one tiny batch: output shapes decide the arrays' shapes.
    with torch.inference_mode(), capture(teacher, cfg.layers) as feats:
        logits = teacher(source.load(np.arange(min(2, n)), tf).to(device))
        shapes = {"logits": tuple(logits.shape[1:])}
        shapes.update({st.feature_array(k): tuple(v.shape[1:]) for k, v in feats.items()})

    identity = {"teacher": teacher_fp, "data": source.fingerprint(), "samples": n, "transform": tf.to_dict(),
                "layers": sorted(cfg.layers), "dtype": cfg.dtype, "codecs": st.codecs_config(cfg.compression_level),
                "chunk_samples": cfg.chunk_samples, "format": st.FORMAT_VERSION}
    key = cache_key(identity)
    path = Path(cfg.out) if cfg.out else Path(cfg.cache_dir or data_root() / "cache") / f"{key}.zarr"
    arrays = {"index": ((n,), "int64"), "logits": ((n, *shapes["logits"]), cfg.dtype)}
    if source.labelled:
        arrays["labels"] = ((n,), "int64")
    arrays.update({k: ((n, *s), cfg.dtype) for k, s in shapes.items() if k != "logits"})
    return Prepared(cfg, source, teacher, meta, tf, device, n, shapes, identity, key, path, arrays)


def run_teacher_cache(cfg: CacheConfig, log=print) -> str:
    p = prepare(cfg)
    group = _open_existing(p.path, p.key, cfg, log)
    if group is not None and group.attrs[st.MANIFEST_KEY].get("complete"):
        log(f"cache hit: {p.path} (key {p.key}) is complete; nothing to compute (--force rebuilds)")
        return str(p.path)
    if group is None:
        p.path.parent.mkdir(parents=True, exist_ok=True)
        group = st.create_store(p.path, p.manifest(), p.arrays, cfg.chunk_samples)

    n = p.num_samples
    blocks = st.block_ranges(n, cfg.chunk_samples)
    done = st.committed_blocks(group)
    todo = [b for b in range(len(blocks)) if not done[b]]
    already = sum(blocks[b][1] - blocks[b][0] for b in range(len(blocks)) if done[b])
    if already:
        log(f"resuming {p.path}: {already}/{n} samples already cached, {n - already} to go")
    t0 = time.time()
    fill_blocks(group, p, blocks, todo, already)
    seconds = time.time() - t0
    st.mark_complete(group, {"stats": {"seconds": round(seconds, 3), "samples_computed": n - already,
                                       "samples_per_s": round((n - already) / max(seconds, 1e-9), 1)}})
    return str(p.path)


def _open_existing(path: Path, key: str, cfg: CacheConfig, log):
    """The group at `path` if it is this very cache (same key) and fully created; None if nothing to reuse."""
    if not path.exists():
        return None
    try:
        import zarr

        group = zarr.open_group(str(path), mode="r+", zarr_format=3)
        manifest = dict(group.attrs.get(st.MANIFEST_KEY) or {})
    except Exception:
        group, manifest = None, {}
    if cfg.force:
        log(f"--force: rebuilding {path}")
        return None
    if manifest.get("key") == key and manifest.get("format_version") == st.FORMAT_VERSION:
        if st.COMMIT in group:  # created last: its presence means every array exists
            return group
        log(f"{path}: its creation was interrupted before any data; creating it again")
        return None
    if group is not None and not manifest and not list(group.keys()):
        return None  # an empty group: our own creation, interrupted before the manifest
    raise KDCacheError(f"{path} holds a different cache (key {manifest.get('key')}, wanted {key}); "
                       "choose another --out or pass --force to overwrite it")


def _load_input(p: Prepared, idx: np.ndarray) -> torch.Tensor:
    raw = p.source.load_raw(idx, p.transform)
    return raw.pin_memory() if p.device.type == "cuda" else raw


def teacher_outputs_async(p: Prepared, idx: np.ndarray, feats: dict, loader: ThreadPoolExecutor | None = None):
    """Queue the teacher on samples `idx`; return host tensors and a CUDA event that fires when they are filled.

    On a GPU nothing here waits for the device: forwards are queued, outputs stay on the device until one
    non-blocking copy per array into pinned host memory, and the writer thread waits on the event. So loading the
    next block's inputs on the CPU overlaps with this block's compute and copies. Hooks must be attached.
    """
    cfg, names = p.cfg, [st.feature_array(layer) for layer in p.cfg.layers]
    out_dtype = torch.float16 if cfg.dtype == "float16" else torch.float32
    cuda = p.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else torch.autocast("cpu", enabled=False)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ["logits", *names]}
    batches = [idx[s:s + cfg.batch_size] for s in range(0, len(idx), cfg.batch_size)]
    # Input loading (decode, resize, pin) runs in loader threads ahead of the forwards; torch releases the GIL.
    inputs = ([loader.submit(_load_input, p, b) for b in batches] if loader is not None else None)
    for i, b in enumerate(batches):
        raw = inputs[i].result() if inputs is not None else _load_input(p, b)
        # uint8 crosses to the device (4x fewer bytes than float32); normalisation happens there.
        x = p.transform(raw.to(p.device, non_blocking=True))
        with autocast:
            logits = p.teacher(x)
        parts["logits"].append(logits.to(out_dtype))
        for layer, name in zip(cfg.layers, names):
            parts[name].append(feats[layer].to(out_dtype))
    out = {k: torch.cat(v) for k, v in parts.items()}
    if not cuda:
        return out, None
    host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in out.items()}
    for k, v in out.items():
        host[k].copy_(v, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def teacher_outputs(p: Prepared, idx: np.ndarray, feats: dict) -> dict[str, np.ndarray]:
    """Synchronous `teacher_outputs_async`: numpy arrays in the store dtype."""
    host, event = teacher_outputs_async(p, idx, feats)
    if event is not None:
        event.synchronize()
    return {k: v.numpy() for k, v in host.items()}


def _write_when_ready(group, block: int, start: int, out: dict, host: dict, event) -> None:
    """Writer-thread side: wait for the block's copies, check it, write it whole, commit it."""
    if event is not None:
        event.synchronize()
    out.update({k: v.numpy() for k, v in host.items()})
    logits = out["logits"]
    if not np.isfinite(logits).all():
        end = start + len(logits)
        raise KDCacheError(f"teacher produced non-finite logits in samples {start}-{end - 1}; "
                           "use --dtype float32 or check the teacher's weights")
    st.write_block(group, block, start, out)


def fill_blocks(group, p: Prepared, blocks, todo, already):
    cfg, source, n = p.cfg, p.source, p.num_samples
    prog, task = _progress(n, already)
    pending = set()
    writers = cfg.writers or min(8, os.cpu_count() or 2)
    max_pending = max(2, 2 * writers)  # bounded: host memory stays flat however large the dataset
    t0, computed = time.time(), 0
    with prog, ThreadPoolExecutor(writers) as pool, ThreadPoolExecutor(2) as loader, torch.inference_mode(), \
            capture(p.teacher, cfg.layers) as feats:
        for b in todo:
            start, end = blocks[b]
            idx = np.arange(start, end)
            out = {"index": idx.astype(np.int64)}
            if source.labelled:
                out["labels"] = source.labels(idx).astype(np.int64)
            host, event = teacher_outputs_async(p, idx, feats, loader)
            pending.add(pool.submit(_write_when_ready, group, b, start, out, host, event))
            if len(pending) >= max_pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    f.result()  # re-raise a writer's error here
            computed += end - start
            prog.update(task, advance=end - start, rate=f"{computed / max(time.time() - t0, 1e-9):,.0f}")
        for f in pending:
            f.result()
