"""`kdcache ls`, `kdcache inspect` and `kdcache plan`: what caches exist, what is inside one, what one would cost."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from pipeline import store as st
from pipeline.data import data_root
from pipeline.errors import KDCacheError


def disk_bytes(path) -> int:
    """Bytes stored under a local folder or an fsspec URL (0 where nothing is)."""
    if st.is_url(path):
        fs, root = st.filesystem(str(path))
        with st.reaching(path):
            return int(fs.du(root)) if fs.exists(root) else 0
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total


def _cache_paths(cache_dir: str | None) -> list[str]:
    """The .zarr folders in a cache folder (local or an fsspec URL), sorted; [] for the default before any cache."""
    if cache_dir and st.is_url(cache_dir):
        fs, root = st.filesystem(cache_dir)
        with st.reaching(cache_dir):
            if not fs.isdir(root):
                raise KDCacheError(f"--cache-dir {cache_dir} is not a folder; give the folder that holds the .zarr "
                                   "caches")
            if fs.exists(f"{root.rstrip('/')}/zarr.json"):  # as for a path: else "no caches in" a store
                raise KDCacheError(f"--cache-dir {cache_dir} is a cache store, not a folder of caches; `kdcache "
                                   f"inspect {cache_dir}` shows it")
            names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
        return [st.join(cache_dir, n) for n in names if n.endswith(".zarr")]
    root = Path(cache_dir) if cache_dir else data_root() / "cache"
    if cache_dir and not root.is_dir():
        raise KDCacheError(f"--cache-dir {cache_dir} is not a folder; give the folder that holds the .zarr caches")
    if cache_dir and (root / "zarr.json").exists():  # else "no caches in" a folder that is one
        raise KDCacheError(f"--cache-dir {cache_dir} is a cache store, not a folder of caches; `kdcache inspect "
                           f"{cache_dir}` shows it, `kdcache ls --cache-dir {root.resolve().parent}` lists its folder")
    return [str(p) for p in sorted(root.glob("*.zarr"))] if root.is_dir() else []


def find_cache(arg: str) -> str:
    """The store an argument names: a path or URL as given, or, where nothing lies at that path, a cache key (or its
    first 4+ hex digits, as `kdcache ls` lists them) of a store in the default cache folder (`<key>.zarr`; a store
    made with --out is named by its path). A prefix several keys share is refused, listing them."""
    arg = str(arg)
    # "" is the current folder to pathlib: it was "error:  is not a kdcache Zarr v3 store", naming nothing
    if not arg.strip() and not os.path.lexists(arg):
        raise KDCacheError("the store path is empty; pass the .zarr folder teacher-cache printed, or its key from "
                           "`kdcache ls`")
    if st.is_url(arg) or os.path.lexists(arg) or not (4 <= len(arg) <= 16 and set(arg) <= set("0123456789abcdef")):
        return arg
    hits = [p for p in _cache_paths(None) if Path(p).name.startswith(arg)]
    if len(hits) > 1:
        keys = ", ".join(Path(p).stem for p in hits[:4]) + (f" and {len(hits) - 4} more" if len(hits) > 4 else "")
        raise KDCacheError(f"{arg} begins {len(hits)} cache keys in {Path(hits[0]).parent} ({keys}); give more of "
                           "the key")
    return hits[0] if hits else arg  # nothing: opening it says there is no cache there


def list_caches(cache_dir: str | None = None) -> list[dict]:
    out = []
    for p in _cache_paths(cache_dir):
        try:
            cache = st.open_store(p, require_complete=False)
            man = cache.manifest
            # An array deleted outright (its metadata gone) under a store marked complete: ls only reads metadata,
            # so it names what is missing rather than read chunks (`verify` does that).
            group = cache.open_group()
            missing = [a for a in st.stored_arrays(man) if not st.has_array(group, a)]  # `in` raises on bad metadata
        except KDCacheError as e:
            out.append({"path": p, "error": str(e)})
            continue
        out.append({"path": p, "key": man.get("key"), "teacher": man["teacher"]["spec"],
                    "teacher_fingerprint": man["teacher"]["fingerprint"],
                    "teacher_top1": (man["teacher"].get("accuracy") or {}).get("top1"), "data": man["data"]["spec"],
                    "samples": man["data"]["num_samples"], "views": (man.get("views") or {}).get("count", 0),
                    "targets": {t: v["codec"]["name"] for t, v in man.get("targets", {}).items()},
                    "arrays": sorted(man["arrays"]),
                    "bytes": disk_bytes(p), "complete": st.marked_complete(man) and not missing,
                    "missing_arrays": missing, "created": man.get("created")})
    return out


def _fill_shown(value):
    """An array's fill value as its metadata says (JSON has no NaN: non-finite floats as text). What the metadata
    says, not what kdcache writes, so a hand-edited fill shows (verify reports it as damage)."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value).replace("nan", "NaN")
    return value


def inspect_cache(path: str) -> dict:
    path = find_cache(path)  # a key names its store: the sizes below are that store's, not of a path named by the key
    cache = st.open_store(path, require_complete=False)
    group = cache.open_group()
    n = cache.num_samples
    arrays = {}
    for name, meta in cache.arrays.items():
        try:
            arr = group[name]
        except Exception:  # noqa: BLE001 - deleted or its metadata damaged: say so (verify reports its chunks)
            arrays[name] = {"shape": meta["shape"], "dtype": meta["dtype"], "missing": True}
            continue
        raw = int(np.prod(meta["shape"])) * np.dtype(meta["dtype"]).itemsize
        stored = disk_bytes(st.join(path, f"{name}/c"))  # chunk data only, not the array metadata
        arrays[name] = {"shape": meta["shape"], "dtype": meta["dtype"], "chunks": list(arr.chunks),
                        "fill": _fill_shown(arr.metadata.fill_value),
                        "codecs": [type(c).__name__ for c in arr.metadata.codecs], "stored_bytes": stored,
                        "raw_bytes": raw, "compression_ratio": round(raw / stored, 3) if stored else None,
                        "bytes_per_sample": round(stored / max(n, 1), 1)}
    return {"path": str(path), "manifest": cache.manifest, "arrays": arrays, "bytes": disk_bytes(path)}


def plan_cache(cfg) -> dict:
    """Run the teacher on one batch (one view), encode and compress it with the store's codecs in memory,
    extrapolate to the dataset and its views."""
    import torch
    import zarr

    from pipeline.augment import sample_params
    from pipeline.models import capture
    from pipeline.teacher_cache import prepare, teacher_outputs

    p = prepare(cfg)
    k = min(cfg.batch_size, p.num_samples)
    idx = p.rows[:k]
    box = flip = None
    if p.views:
        box, flip = (a[:, 0] for a in sample_params(p.policy, cfg.aug_seed, idx, [min(1, p.views - 1)],
                                                     tuple(p.source.native_shape[1:])))
    with torch.inference_mode(), capture(p.teacher, cfg.layers, p.copy_layers) as feats:
        fresh = teacher_outputs(p, idx, feats, box, flip)
    out = {"index": idx.astype(np.int64)}
    if p.source.labelled:
        out["labels"] = p.source.labels(idx)
    if p.views:
        out.update({"aug/box": box, "aug/flip": flip})
    for t, codec in p.codecs.items():
        for part, v in codec.encode(t, fresh[t]).items():
            a = v.numpy()
            want = np.dtype(p.arrays[part]["dtype"])
            out[part] = a.view(want) if a.dtype != want else a
    compressors = st._compressors(p.identity["codecs"])
    per_array = {}
    with tempfile.TemporaryDirectory() as tmp:  # the real codecs on a real folder: what the disk will hold
        probe = zarr.open_group(tmp, mode="w", zarr_format=3)
        for name, values in out.items():
            a = probe.create_array(name.replace("/", "_"), shape=values.shape, dtype=values.dtype,
                                   chunks=(min(cfg.chunk_samples, k), *values.shape[1:]), compressors=compressors)
            a[:] = values
            stored = disk_bytes(Path(tmp) / name.replace("/", "_") / "c")
            per_view = max(1, p.views) if p.arrays[name]["view_axis"] else 1
            per_array[name] = {"shape": p.arrays[name]["shape"], "dtype": str(values.dtype),
                               "raw_bytes_per_sample": int(values[0].nbytes) * per_view,
                               "bytes_per_sample": round(stored / k * per_view, 1)}
        # What the store holds besides samples: the manifest and every array's metadata, and per unit (a block of
        # rows in one view) its commit marker and its row of distortion sums. Small, but most of a small cache.
        units = (len(st.block_ranges(p.num_samples, p.cfg.chunk_samples)), p.units_per_block)
        skeleton = Path(tmp) / "store"
        group = st.create_store(skeleton, p.manifest(content=False), p.arrays, units, p.stat_columns)
        metadata = disk_bytes(skeleton)
        group[st.COMMIT][0, 0] = 1
        if p.stat_columns:
            group[st.STATS][0, 0] = np.zeros(len(p.stat_columns))
        overhead = metadata + (disk_bytes(skeleton) - metadata) * units[0] * units[1]
    per_sample = sum(a["bytes_per_sample"] for a in per_array.values())
    return {"key": p.key, "path": str(p.path), "samples": p.num_samples, "views": p.views, "probe_samples": k,
            "arrays": per_array, "bytes_per_sample": round(per_sample, 1), "overhead_bytes": overhead,
            "total_bytes": int(per_sample * p.num_samples) + overhead}


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
