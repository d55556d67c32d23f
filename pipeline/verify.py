"""`kdcache verify` and `kdcache repair`: is a store whole and right, and fix only what is not.

verify reads every chunk of every array (one chunk = one block of rows), so crc32c mismatches, undecodable chunks,
missing chunks (floats read as the NaN fill value, integers as -1) and uncommitted blocks are each reported with the
sample range they cover. `--recompute N` re-runs the teacher on N random samples rebuilt exactly as train-student
rebuilds them and reports the largest difference from what is stored.

repair clears the commit marker of every bad block and runs teacher-cache on the same key, which recomputes only
the blocks that are not committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline import store as st
from pipeline.errors import KDCacheError

# Largest |stored - recomputed| allowed, relative to max(1, |value|): fp16 rounding is 2^-11 relative; the margin
# covers a cache made on GPU (autocast) checked on CPU.
TOLERANCE = {"float16": 1e-2, "float32": 1e-4}


@dataclass
class Problem:
    array: str
    block: int
    start: int
    end: int
    what: str

    def line(self) -> str:
        return f"{self.array} chunk {self.block} (samples {self.start}-{self.end - 1}): {self.what}"


@dataclass
class Report:
    path: str
    problems: list[Problem] = field(default_factory=list)
    complete: bool = False
    recompute: dict | None = None

    @property
    def ok(self) -> bool:
        rec_ok = self.recompute is None or self.recompute["ok"]
        return not self.problems and self.complete and rec_ok

    def bad_blocks(self) -> list[int]:
        return sorted({p.block for p in self.problems})

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "complete": self.complete,
                "problems": [p.__dict__ | {"message": p.line()} for p in self.problems], "recompute": self.recompute}


def _check_chunk(values: np.ndarray) -> str | None:
    if values.dtype.kind == "f":
        nan = np.isnan(values)
        if nan.all():
            return "missing (never written)"
        if nan.any():
            return f"{int(nan.sum())} NaN values"
        if np.isinf(values).any():
            return "infinite values"
    elif values.dtype.kind == "i" and (values == -1).any():
        return "missing (never written)" if (values == -1).all() else "missing rows"
    return None


def verify_store(path: str, recompute: int = 0, seed: int = 0) -> Report:
    cache = st.open_store(path, require_complete=False)
    group = cache.open_group()
    report = Report(path=str(path), complete=bool(cache.manifest.get("complete")))
    blocks = st.block_ranges(cache.num_samples, cache.chunk_samples)
    committed = st.committed_blocks(group)
    for b, (start, end) in enumerate(blocks):
        if not committed[b]:
            report.problems.append(Problem(st.COMMIT, b, start, end, "not committed (writer stopped before it)"))
    for name in cache.arrays:
        arr = group[name]
        for b, (start, end) in enumerate(blocks):
            try:
                what = _check_chunk(np.asarray(arr[start:end]))
            except Exception as e:  # crc32c mismatch, truncated or undecodable chunk
                what = ("crc32c checksum mismatch" if "checksum" in str(e).lower()
                        else f"unreadable ({type(e).__name__})")
            if what is None and name == "index" and not np.array_equal(arr[start:end], np.arange(start, end)):
                what = "index does not match its rows"
            if what:
                report.problems.append(Problem(name, b, start, end, what))
    if recompute:
        report.recompute = recompute_check(cache, recompute, seed)
    return report


def recompute_check(cache: st.CacheStore, n: int, seed: int = 0) -> dict:
    """Re-run the teacher on n random stored samples; compare with what the store holds."""
    import torch

    from pipeline.models import capture
    from pipeline.teacher_cache import CacheConfig, prepare, teacher_outputs

    man = cache.manifest
    cfg = CacheConfig(**(man["config"] | {"out": cache.path, "device": "cpu"}))
    p = prepare(cfg)
    if p.identity["teacher"] != man["teacher"]["fingerprint"]:
        raise KDCacheError(f"teacher weights ({cfg.weights or 'default'}) are not the ones that made {cache.path} "
                           f"(fingerprint {p.identity['teacher']} vs {man['teacher']['fingerprint']})")
    if p.identity["data"] != man["data"]["fingerprint"]:
        raise KDCacheError(f"data {cfg.data} changed since {cache.path} was made; re-run teacher-cache")
    group = cache.open_group()
    rows = np.sort(np.random.default_rng(seed).choice(cache.num_samples, min(n, cache.num_samples), replace=False))
    index = np.asarray(group["index"].oindex[rows])
    with torch.inference_mode(), capture(p.teacher, cfg.layers) as feats:
        fresh = teacher_outputs(p, index, feats)
    tol = TOLERANCE[man["dtype"]]
    diffs = {}
    for name, ref in fresh.items():
        stored = np.asarray(group[name].oindex[rows]).astype(np.float32)
        ref = ref.astype(np.float32)
        err = np.abs(stored - ref) / np.maximum(1.0, np.abs(ref))
        diffs[name] = {"max_abs": float(np.nanmax(np.abs(stored - ref))) if stored.size else 0.0,
                       "max_rel": float(np.nanmax(err)) if err.size else 0.0,
                       "ok": bool(np.isfinite(stored).all() and (err <= tol).all())}
    return {"samples": len(rows), "tolerance": tol, "arrays": diffs, "ok": all(d["ok"] for d in diffs.values())}


def repair_store(path: str, log=print) -> Report:
    """Recompute only the bad blocks of a store, then verify it again."""
    import zarr

    from pipeline.teacher_cache import CacheConfig, run_teacher_cache

    report = verify_store(path)
    bad = report.bad_blocks()
    if not bad and report.complete:
        log(f"{path}: nothing to repair")
        return report
    cache = st.open_store(path, require_complete=False)
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    for b in bad:
        group[st.COMMIT][b] = 0  # un-commit: teacher-cache recomputes exactly these blocks
    manifest = dict(group.attrs[st.MANIFEST_KEY])
    group.attrs[st.MANIFEST_KEY] = dict(manifest, complete=False)
    log(f"{path}: recomputing {len(bad)} bad chunk(s): {', '.join(map(str, bad)) or 'none (completing)'}")
    run_teacher_cache(CacheConfig(**(cache.manifest["config"] | {"out": str(path), "force": False})), log=log)
    return verify_store(path)
