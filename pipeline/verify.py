"""`kdcache verify` and `kdcache repair`: is a store whole and right, and fix only what is not.

verify reads every chunk of every array (one chunk = one block of rows, in one view for arrays with a view axis),
so crc32c mismatches, undecodable chunks, missing chunks (each array's fill value: NaN for floats, -1 or the
dtype's minimum for signed integers, the maximum for unsigned ones) and uncommitted units are each reported with the sample range they cover.
`index` and the view parameters (`aug/box`, `aug/flip`) are checked against what they must hold (the row order;
the hash of --aug-seed, sample index and view), so chunks of them swapped between files are found too; `labels`
against the data's labels of their rows, where the store's data opens here (verify never downloads it).
`--recompute N` re-runs the teacher on every view of N random samples (rows whose chunks read back intact), each
input rebuilt exactly as train-student rebuilds it (from the stored view parameters), and reports the largest
difference from what is stored, per target, against the target codec's tolerance; it also checks those samples'
stored labels against the data's labels of their index.

repair clears the commit marker of every bad unit and runs teacher-cache on the same key, which recomputes only
the units that are not committed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from pipeline import store as st
from pipeline.augment import check_replay, row_order, stored_params
from pipeline.catalog import find_cache
from pipeline.codecs import TOLERANCE, fill_value
from pipeline.errors import KDCacheError


@dataclass
class Problem:
    array: str
    block: int
    start: int
    end: int
    what: str
    view: int | None = None

    def line(self) -> str:
        where = f"chunk {self.block}" if self.view is None else f"chunk {self.block} view {self.view}"
        return f"{self.array} {where} (rows {self.start}-{self.end - 1}): {self.what}"

    def unit(self) -> tuple[int, int | None]:
        return self.block, self.view


@dataclass
class Report:
    path: str
    problems: list[Problem] = field(default_factory=list)
    complete: bool = False
    recompute: dict | None = None
    units: int = 0  # (block, view) units in the store

    def summary_lines(self, most: int = 20) -> list[str]:
        """What a person reads: each problem once, the chunks of a never-committed unit (missing because never
        written, not damaged) folded into one count line with what to run, and at most `most` lines of the rest."""
        uncommitted = {p.unit() for p in self.problems if p.array == st.COMMIT}

        def unwritten(p: Problem) -> bool:  # index and labels are written by a block's first view's unit
            return p.unit() in uncommitted or (p.view is None and (p.block, 0) in uncommitted)

        shown = [p for p in self.problems if p.array == st.COMMIT or not unwritten(p)]
        lines = [p.line() for p in shown[:most]]
        if len(shown) > most:
            lines.append(f"... and {len(shown) - most} more (--json lists every one)")
        if uncommitted:
            lines.append(f"{len(uncommitted)} of {self.units} units were never committed (a writer stopped before "
                         f"them; their chunks are not data): re-run the teacher-cache command, or `kdcache repair "
                         f"{self.path}`")
        return lines

    @property
    def ok(self) -> bool:
        rec_ok = self.recompute is None or self.recompute["ok"]
        return not self.problems and self.complete and rec_ok

    def bad_units(self) -> list[tuple[int, int | None]]:
        """(block, view) pairs to recompute; view None = every view of the block (a sample-level array is bad)."""
        return sorted({p.unit() for p in self.problems}, key=lambda u: (u[0], -1 if u[1] is None else u[1]))

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "complete": self.complete,
                "problems": [p.__dict__ | {"message": p.line()} for p in self.problems],
                "recompute": self.recompute and self.recompute | {
                    "problems": [p.__dict__ | {"message": p.line()} for p in self.recompute.get("problems", [])]}}


def _check_chunk(values: np.ndarray) -> str | None:
    fill = fill_value(values.dtype)
    if values.dtype.kind == "f":
        nan = np.isnan(values)
        if nan.all():
            return "missing (never written)"
        if nan.any():
            return f"{int(nan.sum())} NaN values"
        if np.isinf(values).any():
            return "infinite values"
    else:
        hit = values == fill
        if hit.any():
            return "missing (never written)" if hit.all() else "missing rows"
    return None


def verify_store(path: str, recompute: int = 0, seed: int = 0, moved: dict | None = None,
                 command: str = "verify") -> Report:
    """Check every chunk of a store; with `recompute`, re-run the teacher on that many samples. `moved` overrides
    where the teacher's weights or the data lie now ({"weights": FILE, "data": SPEC}) for a store made elsewhere.
    `command`: the one a store still being written should be run again when that run has ended."""
    if recompute < 0:
        raise KDCacheError(f"--recompute takes a number of samples, 0 or more (got {recompute})")
    if seed < 0:
        raise KDCacheError(f"--seed must be 0 or more (got {seed})")
    path = find_cache(path)
    weights = _given(moved).get("weights")
    if weights is not None and not os.path.isfile(weights):  # said now, not only when a sample is recomputed
        raise KDCacheError(f"--weights {weights}: no such file; give where the teacher's weights lie now")
    cache = st.open_store(path, require_complete=False)
    who = None if st.marked_complete(cache.manifest) else st.writer(path)
    if who is not None:  # its uncommitted chunks are work in progress, not damage
        raise KDCacheError(f"{path} is being written now ({who}); {command} it when that run has ended")
    group = cache.open_group()
    report = Report(path=str(path), complete=st.marked_complete(cache.manifest))
    blocks = st.block_ranges(cache.num_samples, cache.chunk_samples)
    committed = st.committed_units(group)
    report.units = int(committed.size)
    rows = row_order(cache.num_samples, cache.manifest.get("row_order", "source"))
    expected_params = stored_params(cache.manifest) if cache.views else None
    marks = _raw_markers(group) if (~committed).any() else None
    for b, v in np.argwhere(~committed):
        start, end = blocks[b]
        mark = None if marks is None else int(marks[b, v])
        what = ("not committed (writer stopped before it)" if mark in (0, None) else
                f"damaged marker (value {mark}, not the 1 a writer writes): counts as not committed")
        report.problems.append(Problem(st.COMMIT, int(b), start, end, what, int(v) if cache.views else None))
    report.problems += _stats_problems(group, committed, blocks, cache.views)
    for name, spec in cache.arrays.items():
        try:
            arr = group[name]
        except Exception as e:  # noqa: BLE001 - its folder or metadata deleted: every chunk of it is gone
            report.problems += [Problem(name, b, start, end, f"array missing ({type(e).__name__}); rebuild the "
                                        "store with teacher-cache --force") for b, (start, end) in enumerate(blocks)]
            continue
        damage = st.metadata_damage(arr, spec)
        if damage:  # its chunks would read as another shape or dtype: no chunk of it can be checked or repaired
            report.problems += [Problem(name, b, start, end, f"array damaged ({damage}); rebuild the store with "
                                        "teacher-cache --force") for b, (start, end) in enumerate(blocks)]
            continue
        for b, (start, end) in enumerate(blocks):
            for v in range(cache.views) if spec["view_axis"] else [None]:
                sel = (slice(start, end), v) if v is not None else slice(start, end)
                try:
                    values = np.asarray(arr[sel])
                    what = _check_chunk(values)
                except Exception as e:  # crc32c mismatch, truncated or undecodable chunk
                    values, what = None, ("crc32c checksum mismatch" if "checksum" in str(e).lower()
                                          else f"unreadable ({type(e).__name__})")
                if what is None and name == "index" and not np.array_equal(values, rows[start:end]):
                    what = "index does not match its rows"
                if what is None and name in ("aug/box", "aug/flip") and not np.array_equal(
                        values, expected_params(rows[start:end], v)[name]):
                    what = "not this view's parameters (those of its --aug-seed, sample index and view)"
                if what:
                    report.problems.append(Problem(name, b, start, end, what, v))
    # Labels are data: chunks of them swapped between files pass every checksum (train-student refuses them and
    # sends you here), so they are compared with the data's labels of their rows where the data opens here.
    report.problems += _label_problems(cache, report, moved, download=command == "repair")
    if recompute:  # on intact rows only: a damaged chunk is already reported, and its values mean nothing
        bad = {p.block for p in report.problems}
        intact = np.concatenate([np.arange(*blocks[b]) for b in range(len(blocks)) if b not in bad] or
                                [np.zeros(0, dtype=np.int64)])
        report.recompute = recompute_check(cache, recompute, seed, moved, among=intact)
    return report


def _raw_markers(group) -> np.ndarray | None:
    """The `_commit` markers as stored, to tell a damaged one (any value but 0 and 1) from an unwritten one; None
    when they cannot all be read (an unreadable marker is not committed, as `committed_units` says)."""
    try:
        return np.asarray(group[st.COMMIT][:])
    except Exception:  # noqa: BLE001
        return None


def _stats_problems(group, committed: np.ndarray, blocks, views: int) -> list[Problem]:
    """Each committed unit's row of `_stats` (the distortion sums the manifest is rebuilt from) must read back
    (checksummed) and be finite."""
    if not st.has_array(group, st.STATS):  # gone, or its metadata damaged: like any array missing outright
        return [Problem(st.STATS, int(b), *blocks[b], "array missing (its metadata unreadable); rebuild the store "
                        "with teacher-cache --force", int(v) if views else None) for b, v in np.argwhere(committed)]
    problems = []
    try:
        sums = np.asarray(group[st.STATS][:])
    except Exception:  # noqa: BLE001 - a damaged chunk: find which, one unit at a time
        sums = None
    for b, v in np.argwhere(committed):
        if sums is not None:
            row, what = sums[b, v], None
        else:
            try:
                row, what = np.asarray(group[st.STATS][b, v]), None
            except Exception as e:  # noqa: BLE001
                row, what = None, ("crc32c checksum mismatch" if "checksum" in str(e).lower()
                                   else f"unreadable ({type(e).__name__})")
        if what is None and not np.isfinite(row).all():
            what = "missing or non-finite distortion sums"
        if what:
            start, end = blocks[b]
            problems.append(Problem(st.STATS, int(b), start, end, what, int(v) if views else None))
    return problems


def recompute_check(cache: st.CacheStore, n: int, seed: int, moved: dict | None, among: np.ndarray) -> dict:
    """Re-run the teacher on n random stored samples (rows of `among`), every view of each; compare with what the
    store holds."""
    import torch

    from pipeline.data import data_differs
    from pipeline.models import capture
    from pipeline.teacher_cache import CacheConfig, teacher_outputs

    man = cache.manifest
    check_replay(man, cache.path)
    cfg = CacheConfig(**(_made_with(cache) | _given(moved) | {"out": cache.path, "device": "cpu"}))  # (repair's
    # --device is where it recomputes units; the check always runs on the CPU, as its tolerance assumes)
    p = _prepare(cfg)
    if p.identity["teacher"] != man["teacher"]["fingerprint"]:
        raise KDCacheError(f"teacher weights ({cfg.weights or 'default'}) are not the ones that made {cache.path} "
                           f"(fingerprint {p.identity['teacher']} vs {man['teacher']['fingerprint']}); pass "
                           "--weights FILE with the weights that made it")
    differs = data_differs(p.source, man["data"])
    if differs:
        raise KDCacheError(f"data {cfg.data} is not the data {cache.path} was made from ({differs}); pass --data "
                           "SPEC with the data that made it, or, if that data itself changed, re-run teacher-cache")
    group = cache.open_group()
    rng = np.random.default_rng(seed)
    if not len(among):
        return {"samples": 0, "views": None, "tolerance": None, "arrays": {}, "ok": False,
                "note": "no intact rows to recompute: repair the store first"}
    rows = np.sort(rng.choice(among, min(n, len(among)), replace=False))
    views = max(1, cache.views)

    def stored(name: str) -> np.ndarray:
        """The chosen rows of a stored array; with views, every view of each row, flattened to rows x views."""
        values = np.asarray(group[name].oindex[rows])
        if cache.views and cache.arrays[name]["view_axis"]:
            return values.reshape(len(rows) * views, *values.shape[2:])
        return values

    index = np.repeat(np.asarray(group["index"].oindex[rows]), views)
    box, flip = (stored("aug/box"), stored("aug/flip")) if cache.views else (None, None)
    with torch.inference_mode(), capture(p.teacher, cfg.layers, p.copy_layers) as feats:
        fresh = teacher_outputs(p, index, feats, box, flip)
    # A GPU-made cache (autocast) checked here on the CPU differs by more than fp32 rounding.
    gpu_made = str(man.get("device", "cpu")).startswith("cuda")
    diffs, problems = {}, []
    blocks = st.block_ranges(cache.num_samples, cache.chunk_samples)
    for target, t in cache.targets.items():
        codec = cache.codec(target)
        tol = max(TOLERANCE[t["codec"]["name"]], 1e-2 if gpu_made else 0.0)
        parts = {part: torch.from_numpy(stored(part)) for part in t["parts"]}
        decoded = codec.decode(target, parts).float()
        ref = fresh[target].float()
        err = codec.error(decoded, ref)
        finite = bool(torch.isfinite(decoded).all())
        diffs[target] = {"max_abs": codec.max_abs(decoded, ref),
                         "max_rel": float(err.max()) if err.numel() else 0.0, "tolerance": tol,
                         "ok": finite and bool((err <= tol).all())}
        # Which (chunk, view) units hold the entries beyond tolerance: outputs swapped between views or chunks pass
        # every checksum, and this names them for `repair --recompute N` to redo.
        n = err.shape[0]
        wrong = ~torch.isfinite(decoded.reshape(n, -1)).all(1) | (err.reshape(n, -1) > tol).any(1)
        for b, v in sorted({(int(rows[i // views]) // cache.chunk_samples, int(i % views) if cache.views else None)
                            for i in np.flatnonzero(wrong.numpy())}, key=lambda u: (u[0], u[1] or 0)):
            problems.append(Problem(target, b, *blocks[b], "the teacher recomputed on its inputs gives other "
                                    "outputs (beyond the codec's tolerance)", v))
    out = {"samples": len(rows), "views": list(range(cache.views)) if cache.views else None,
           "tolerance": max(d["tolerance"] for d in diffs.values()), "arrays": diffs,
           "ok": all(d["ok"] for d in diffs.values()), "problems": problems}
    if cache.labelled:  # labels are data, not teacher output: they must be the data's labels of the stored index
        wrong = int((np.asarray(group["labels"].oindex[rows]) != p.source.labels(index[::views])).sum())
        out["labels"] = {"checked": len(rows), "mismatches": wrong, "ok": wrong == 0}
        out["ok"] = out["ok"] and wrong == 0
    return out


def _prepare(cfg):
    """Resolve the store's teacher and data; a missing file gets the flag that says where it moved to."""
    from pipeline.teacher_cache import prepare

    try:
        return prepare(cfg)
    except KDCacheError as e:
        if "not found" not in str(e):
            raise
        raise KDCacheError(f"{e}; if the store's teacher or data moved, pass --weights FILE / --data SPEC") from None


def _made_with(cache) -> dict:
    """The teacher-cache settings the store records, which recompute and repair re-run. A store made by a kdcache
    with settings this one lacks (or a damaged manifest) is refused in one line, not a TypeError from CacheConfig."""
    from dataclasses import fields

    from pipeline.teacher_cache import CacheConfig

    config = cache.manifest.get("config")
    if not isinstance(config, dict):
        raise KDCacheError(f"{cache.path}: its manifest records no teacher-cache settings (config), so its teacher "
                           "cannot be re-run; rebuild it with `kdcache teacher-cache --force`")
    unknown = sorted(set(config) - {f.name for f in fields(CacheConfig)})
    if unknown:
        made_by = (cache.manifest.get("versions") or {}).get("kdcache", "another version")
        raise KDCacheError(f"{cache.path} was made with teacher-cache settings this kdcache does not know "
                           f"({', '.join(unknown)}); use the kdcache that made it ({made_by})")
    return config


def _given(moved: dict | None) -> dict:
    """The settings given instead of the store's own: where its data and weights lie now ({"data", "weights"}),
    and for repair the device to recompute on ({"device"}): a store made with --device cuda names a GPU that
    the machine repairing it may lack."""
    from pipeline.data import refuse_blank

    refuse_blank((moved or {}).get("weights"), "--weights", empty_too=True)
    return {k: v for k, v in (moved or {}).items() if v}


def repair_store(path: str, log=print, moved: dict | None = None, recompute: int = 0, seed: int = 0) -> Report:
    """Recompute only the bad blocks of a store, then verify it again. With `recompute`, also the units whose
    outputs `verify --recompute` (same number and seed) finds other than the teacher's. `moved`: see `_given`."""
    from pipeline.ranks import one_process_only

    path = find_cache(path)
    if _given(moved).get("device"):  # a device this machine cannot use is said now, not only when a unit needs it
        from pipeline.loops import pick_device

        pick_device(_given(moved)["device"])
    # (every rank would take the store's writer lock: all but one fail, and the store is left incomplete)
    one_process_only(f"repair runs as one process, not as {{ranks}} torchrun ranks; run `kdcache repair {path}` "
                     "without torchrun")
    report = verify_store(path, recompute=recompute, seed=seed, moved=moved, command="repair")
    if report.recompute:
        report.problems += report.recompute.get("problems", [])
    gone = sorted({p.array for p in report.problems if p.what.startswith(("array missing", "array damaged"))})
    if gone:  # repair recomputes chunks into arrays that exist; a deleted array's metadata is not a chunk
        raise KDCacheError(f"{path}: array(s) {', '.join(gone)} are missing outright (their metadata deleted or "
                           "damaged), which repair cannot recreate; rebuild the store with teacher-cache --force")
    cache = st.open_store(path, require_complete=False)
    bad = report.bad_units()  # labels that are not the data's labels of their rows included (verify_store)
    if not bad and report.complete:
        log(f"{path}: nothing to repair")
        return report
    check_replay(cache.manifest, path)  # recomputed views must match the ones already stored
    with st.writer_lock(path):  # no teacher-cache may be writing while units are un-committed and redone
        return _repair(path, cache, bad, log, moved, recompute, seed)


def _label_problems(cache, report: Report, moved: dict | None, download: bool = True) -> list[Problem]:
    """The blocks whose stored labels (those chunks that read back) are not the data's labels of their rows. Only
    the data is opened; the store's recorded data that cannot be opened here, or is not the store's, checks nothing
    (a repair with units to redo then stops on it with its own line); a --data given for it is refused instead. `download`: whether Fashion-MNIST may be fetched when it is not
    on this machine (repair needs the data anyway; verify never downloads)."""
    from pipeline.data import data_differs, find_fashion_mnist, open_source

    given = _given(moved).get("data")
    if not cache.labelled and not given:
        return []
    try:
        spec = given or _made_with(cache)["data"]
        if not download and spec.startswith("fashion-mnist") and find_fashion_mnist() is None:
            return []
        source = open_source(spec)
        differs = data_differs(source, cache.manifest["data"])
    except KDCacheError:
        if given:  # a --data the user gave that does not open was passed over: verify said OK, checking nothing
            raise
        return []
    if differs and given:  # likewise: the wrong data named is refused as recompute_check refuses it
        raise KDCacheError(f"data {given} is not the data {cache.path} was made from ({differs}); pass --data SPEC "
                           "with the data that made it, or leave --data out")
    if differs or not cache.labelled:
        return []
    group = cache.open_group()
    rows = row_order(cache.num_samples, cache.manifest.get("row_order", "source"))
    damaged = {p.block for p in report.problems if p.array == "labels"}
    problems = []
    for b, (start, end) in enumerate(st.block_ranges(cache.num_samples, cache.chunk_samples)):
        if b in damaged:
            continue
        if not np.array_equal(np.asarray(group["labels"][start:end]), source.labels(rows[start:end])):
            problems.append(Problem("labels", b, start, end, "differ from the data's labels of their index"))
    return problems


def _repair(path: str, cache, bad, log, moved: dict | None, recompute: int = 0, seed: int = 0) -> Report:
    from pipeline.teacher_cache import CacheConfig, refuse_gpu_units_in_cpu_store, run_teacher_cache

    cfg = CacheConfig(**(_made_with(cache) | {"out": str(path), "force": False} | _given(moved)))
    # Teacher, data and key first: a repair that cannot run (weights or data moved, or changed) must fail before it
    # touches the store, not leave a complete store marked incomplete.
    p = _prepare(cfg)
    if p.key != cache.manifest.get("key"):
        raise KDCacheError(f"{path} was made from other data or another teacher than {cfg.data} and {cfg.weights} "
                           "(the cache key differs); pass --data SPEC / --weights FILE with the ones that made it")
    refuse_gpu_units_in_cpu_store(path, cache.manifest, p.device)  # before any marker is cleared
    # A sample-level array (index, labels) is written by its block's first unit alone (view 0): only that unit is
    # redone, not every view of the block.
    bad = sorted({(b, 0 if v is None and cache.views else v) for b, v in bad},
                 key=lambda u: (u[0], -1 if u[1] is None else u[1]))
    group = st.open_group(path, "r+")
    manifest = dict(group.attrs[st.MANIFEST_KEY])
    for b, v in bad:  # a folder in a chunk's place stops the writer: say so before the store is touched
        for view in range(max(1, cache.views)) if v is None else [v]:
            st.refuse_folders(group, b, view, [n for n, spec in cache.arrays.items() if spec["view_axis"] or view == 0])
    group.attrs[st.MANIFEST_KEY] = dict(manifest, complete=False)  # before any marker is cleared
    if st.has_array(group, st.COMMIT):  # without it teacher-cache recreates the store: no marker can be trusted
        for b, v in bad:
            # un-commit: teacher-cache recomputes exactly these units (every view when a sample-level array is bad)
            if v is None:
                group[st.COMMIT][b, :] = 0
            else:
                group[st.COMMIT][b, v] = 0
    names = [str(b) if v is None or not cache.views else f"{b}/view {v}" for b, v in bad]
    log(f"{path}: recomputing {len(bad)} bad chunk(s): {', '.join(names) or 'none (completing)'}")
    run_teacher_cache(cfg, log=log)
    return verify_store(path, recompute=recompute, seed=seed, moved=moved)  # checked as it was found
