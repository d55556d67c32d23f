"""Stage 1 (`make teacher-cache`): run the teacher once over a dataset and write its outputs to a Zarr v3 store.

    run_teacher_cache(CacheConfig(...)) -> path of the complete store

What it does, in order:
1. resolve the data, the teacher (weights fingerprinted), the transform the teacher was trained with, the
   augmentation policy and the codec of every target;
2. probe one batch to learn the output shapes and validate the layer names;
3. derive the cache key from everything that determines the content; a complete store with that key is a cache hit
   (nothing is computed), an incomplete one is resumed (committed units are skipped);
4. run the teacher unit by unit (one block of rows in one view; inference mode, autocast on GPU), encode each
   target with its codec on the device and measure what the codec costs, and hand the finished unit to a pool of
   writer threads: zstd compression releases the GIL, so compression and disk writes overlap the next forward;
5. set `complete` only after the last unit is committed, then print the store's path.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from pipeline import codecs as cd
from pipeline import store as st
from pipeline.augment import (MAX_VIEWS, REPLAY_VERSION, AugmentPolicy, check_crop_fallback, check_policy, row_order,
                              sample_params)
from pipeline.data import (Transform, absolute_spec, check_input_flags, class_note, data_differs, data_root,
                           default_transform, open_source, parse_normalize, plain_fields, refuse_blank,
                           refuse_one_class, resolve_transform, teacher_label_map)
from pipeline.errors import KDCacheError
from pipeline.loops import MAX_PROCESSES, pick_device
from pipeline.models import (capture, check_logits, check_outputs, default_teacher_weights, fingerprint_module,
                             forward_failed, load_teacher, probe_forward, resolve_modules, teacher_classes)
from pipeline.ranks import Ranks


@dataclass
class CacheConfig:
    data: str = "fashion-mnist:train"
    teacher: str = "default-teacher"
    weights: str | None = None            # default-teacher: data/teachers/default.pt
    layers: list[str] = field(default_factory=list)
    dtype: str = "float16"                # of logits and features: float16, float32 (exact) or bfloat16
    feature_codec: str = "float"          # "float" (= dtype) or "int8" (a scale per sample and channel)
    logits_topk: int = 0                  # 0: full logits; k: top-k logits + tail mass (large label spaces)
    views: int = 1                        # augmented views per sample (with `augment`)
    augment: str | None = None            # augmentation policy (augment.py); None: the plain input, no view axis
    aug_seed: int = 0                     # base seed of the views' parameters
    row_order: str = "shuffled"           # rows hold the samples in a fixed permutation ("source": data order)
    out: str | None = None                # explicit store path; default <cache_dir>/<key>.zarr
    cache_dir: str | None = None          # default data/cache
    chunk_samples: int = 1024             # rows per chunk = the unit of commit (per view)
    batch_size: int = 256
    compression_level: int = 1            # zstd 1: on float16 features ~2x faster than 3, ratio 1.76 vs 1.79
    image_size: int | None = None         # resize for the teacher (default: teacher's training size, else native)
    channels: int | None = None
    num_classes: int | None = None        # the teacher's outputs (default: its weights file's meta, else the data's
                                          # classes, else read off its weights' last 2-D weight: the classifier)
    normalize: str | None = None          # "imagenet" or "MEAN/STD" (default: the teacher's recorded transform,
                                          # else 0.5/0.5 or the dataset's own statistics)
    limit: int | None = None              # cache only the first N samples (quick runs)
    device: str = "auto"
    writers: int = 0                      # writer threads; 0 = CPU cores - 3, from 2 to 16
    force: bool = False                   # rebuild even when a complete cache with this key exists

    def __post_init__(self):
        plain_fields(self)  # also one layer named without a list


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _progress(total: int, done: int, unit: str, show: bool = True):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    prog = Progress(TextColumn("[bold]teacher-cache"), BarColumn(), MofNCompleteColumn(),
                    TextColumn(f"{{task.fields[rate]:>8}} {unit}/s"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=False,
                    disable=not show)
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
    policy: AugmentPolicy
    views: int                               # K with a view axis, 0 for a plain (fixed) cache
    device: torch.device
    num_samples: int
    targets: dict[str, dict]                 # target -> {shape, codec, parts}
    codecs: dict[str, cd.Codec]
    identity: dict
    key: str
    path: str                                # a local path or an fsspec URL
    arrays: dict[str, dict]                  # stored array -> spec (store.array_spec)
    stat_columns: list[str]
    rows: np.ndarray                         # source index stored at each row
    hit: bool = False                        # a complete store with this key exists (prepare(hit_check=True))
    copy_layers: set | None = None           # hooked outputs a later in-place op changes (None: copy every one)
    notes: tuple[str, ...] = ()              # said once before computing

    @property
    def units_per_block(self) -> int:
        return max(1, self.views)

    def chunk_bytes(self) -> dict[str, int]:
        """Uncompressed bytes of one chunk (one unit's rows, one view) of each stored array."""
        return {name: self.cfg.chunk_samples * int(np.prod(a["shape"][1 + bool(self.views and a["view_axis"]):])) *
                np.dtype(a["dtype"]).itemsize for name, a in self.arrays.items()}

    def manifest(self, content: bool = True) -> dict:
        """The manifest a new store starts with. `content=False` (plan, which only sizes it) puts the data's quick
        fingerprint, of the same length, where the content fingerprint goes: that one reads every image file."""
        cfg = self.cfg
        views = ({"count": self.views, "augment": self.policy.to_dict(), "seed": cfg.aug_seed,
                  "replay": REPLAY_VERSION} if self.views else None)
        return {"key": self.key, "identity": self.identity, "created": st.now(),
                "teacher": {"spec": cfg.teacher, "weights": cfg.weights, "fingerprint": self.identity["teacher"],
                            "arch": self.teacher_meta.get("arch", cfg.teacher),
                            # its class names where its weights file records them: an unlabelled cache's students
                            # are scored by these names
                            "classes": teacher_classes(self.teacher_meta)},
                "data": self.source.describe() | {"num_samples": self.num_samples, "limit": cfg.limit,
                                                  "content_fingerprint": self.source.content_fingerprint(
                                                      self.num_samples) if content else self.source.fingerprint()},
                "transform": self.transform.to_dict(), "views": views, "row_order": cfg.row_order,
                "layers": list(cfg.layers),
                "dtype": cfg.dtype, "targets": self.targets, "codecs": self.identity["codecs"],
                "chunk_samples": cfg.chunk_samples, "versions": st.versions(), "device": str(self.device),
                "config": asdict(cfg)}

    def input(self, idx: np.ndarray, box: np.ndarray | None = None, flip: np.ndarray | None = None) -> torch.Tensor:
        """uint8 teacher input for samples `idx` (one view's `box`/`flip` per sample when the cache has views)."""
        if box is None:
            return self.source.load_raw(idx, self.transform)
        return self.source.load_view(idx, self.transform, box, flip)


def prepare(cfg: CacheConfig, ranks: Ranks | None = None, hit_check: bool = False) -> Prepared:
    """Resolve data, teacher, transform, views, layers and codecs, probe the output shapes, derive the cache key."""
    # Local files by absolute path in the manifest: verify, repair and train-student find them from any working
    # directory (the key does not depend on where they lie: it hashes the weights and the data's fingerprint).
    refuse_blank(cfg.weights, "--weights", empty_too=True)
    weights = cfg.weights or (str(default_teacher_weights()) if cfg.teacher == "default-teacher" else None)
    layers = list(dict.fromkeys(cfg.layers))  # `--layer x --layer x` is one layer, one cache
    cfg = replace(cfg, data=absolute_spec(cfg.data), weights=os.path.abspath(weights) if weights else None,
                  layers=layers)
    cd.choose("features", cfg.dtype, cfg.feature_codec, 0)  # a bad --feature-codec is refused with no --layer too
    codec_cfgs = {"logits": cd.choose("logits", cfg.dtype, cfg.feature_codec, cfg.logits_topk)}
    codec_cfgs.update({st.feature_array(layer): cd.choose("features", cfg.dtype, cfg.feature_codec, 0)
                       for layer in cfg.layers})
    refuse_blank(cfg.out, "--out")
    refuse_blank(cfg.cache_dir, "--cache-dir")
    if cfg.chunk_samples <= 0 or cfg.batch_size <= 0:
        raise KDCacheError("--chunk-samples and --batch-size must be positive")
    if cfg.limit is not None and cfg.limit <= 0:
        raise KDCacheError(f"--limit must be positive (got {cfg.limit}); leave it out to cache every sample")
    check_input_flags(cfg.image_size, cfg.channels)
    if not 0 <= cfg.aug_seed < 2**63:
        raise KDCacheError(f"--aug-seed must be from 0 to 2**63-1 (got {cfg.aug_seed})")
    if cfg.num_classes is not None and cfg.num_classes < 1:
        raise KDCacheError(f"--num-classes must be at least 1 (got {cfg.num_classes}); leave it out to read it off "
                           "the teacher's weights")
    if not 0 <= cfg.writers <= MAX_PROCESSES:  # threads, each holding whole units: a typo of many digits is no plan
        raise KDCacheError(f"--writers must be 0 (automatic) to {MAX_PROCESSES} (got {cfg.writers})")
    if not -7 <= cfg.compression_level <= 22:
        raise KDCacheError(f"--compression-level must be a zstd level from -7 to 22 (got {cfg.compression_level})")
    if cfg.normalize is not None:
        parse_normalize(cfg.normalize, cfg.channels)  # its syntax, before any data is opened
    policy = AugmentPolicy.parse(cfg.augment)
    if not 1 <= cfg.views <= MAX_VIEWS:
        raise KDCacheError(f"--views must be from 1 to {MAX_VIEWS} (got {cfg.views})")
    if cfg.views > 1 and policy.identity:
        given = (f"--augment {cfg.augment} changes no input, so its views" if cfg.augment and cfg.augment.strip()
                 else "un-augmented views")  # e.g. translate=0: a policy given, but one that does nothing
        raise KDCacheError(f"--views {cfg.views} needs --augment POLICY (e.g. --augment crop=0.5-1,flip): "
                           f"{given} would all be the same input")
    views = 0 if policy.identity else cfg.views
    device = (ranks or Ranks()).device(pick_device(cfg.device))
    source = open_source(cfg.data)
    refuse_one_class(source)
    n = min(source.num_samples, cfg.limit) if cfg.limit else source.num_samples
    if policy.translate and policy.translate >= min(source.native_shape[1:]):
        raise KDCacheError(f"--augment translate={policy.translate} moves views off the {source.native_shape[1]}x"
                           f"{source.native_shape[2]} images entirely; use fewer pixels than the image's side")
    check_policy(policy, cfg.aug_seed, tuple(source.native_shape[1:]), views, crop_fallback=False)
    # A chunk longer than the data holds only fill: clamp (the key sees the clamped value, so it is one cache).
    cfg = replace(cfg, chunk_samples=min(cfg.chunk_samples, n))
    probe_tf = default_transform(source, cfg.image_size, cfg.channels)
    teacher, meta = load_teacher(cfg.teacher, Path(cfg.weights) if cfg.weights else None,
                                 cfg.num_classes or source.num_classes, probe_tf.channels, probe_tf.size,
                                 recorded_size=cfg.image_size is None, data=cfg.data)
    if cfg.num_classes and meta.get("num_classes") and int(meta["num_classes"]) != cfg.num_classes:
        raise KDCacheError(f"--num-classes {cfg.num_classes}, but the teacher's weights file records "
                           f"{meta['num_classes']} outputs; drop --num-classes")
    tf = resolve_transform(source, meta, cfg.image_size, cfg.channels, cfg.normalize)
    resolve_modules(teacher, cfg.layers, "--layer")  # unknown names fail here, before anything is written
    teacher_fp = fingerprint_module(teacher)
    # On a GPU, channels_last: convolutions run in the tensor cores' native layout (as any fast inference loop).
    teacher = teacher.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)

    # The weights' hash alone is not the teacher: two architectures (or forwards) can share one state_dict.
    identity = {"teacher": teacher_fp, "architecture": cfg.teacher, "data": source.fingerprint(), "samples": n,
                "transform": tf.to_dict(),
                "views": ({"count": views, "augment": policy.spec(), "seed": cfg.aug_seed, "replay": REPLAY_VERSION}
                          if views else None),
                "row_order": cfg.row_order, "layers": sorted(cfg.layers),
                "targets": {t: c for t, c in sorted(codec_cfgs.items())},
                "codecs": st.codecs_config(cfg.compression_level), "chunk_samples": cfg.chunk_samples,
                "format": st.FORMAT_VERSION}
    key = cache_key(identity)
    folder = cfg.cache_dir or data_root() / "cache"
    local = st.local_path(cfg.out or folder)  # a file:// URL names a folder on this disk too
    flag, parent = ("--out", Path(local or ".").parent) if cfg.out else ("--cache-dir", Path(local or "."))
    if local is not None and parent.is_file():  # else plan would name a store it can never write
        raise KDCacheError(f"{flag}: {parent} is a file, not a folder; choose another {flag}")
    if cfg.out and local is not None and Path(local).is_file():  # ... and plan named it as the store's path
        raise KDCacheError(f"{cfg.out} exists and is a file, not a cache folder; choose another --out")
    # the folder --out lies in: of `--out .` that is `..` (Path(".").parent is `.`, the store itself)
    here = None if local is None else Path(os.path.normpath(os.path.join(local or ".", os.pardir))) if cfg.out \
        else Path(local)
    inside = None if here is None else st.enclosing_store(here)
    if inside is not None and (here / "zarr.json").exists():
        # a store nested in another: that one's --force or repair would delete it with its own folder
        raise KDCacheError(f"{flag}: {here} is a Zarr store (or a group in one), not a folder of caches; choose "
                           f"another {flag}, e.g. the folder that holds it")
    if inside is not None:  # ... as deeper inside it
        raise KDCacheError(f"{flag}: {here} is inside the Zarr store {inside}, whose --force rebuild would delete "
                           f"it; choose another {flag} outside that store")
    path = cfg.out or st.join(folder, f"{key}.zarr")
    if cfg.out:  # the named store may hold this very cache under an older or a copy's key (resume, repair, verify)
        identity, key = _adopt(path, identity, key, source, cfg.teacher)
    elif not st.is_complete(path, key):  # a store made before the key named the architecture is still this cache
        legacy = {k: v for k, v in identity.items() if k != "architecture"}
        older = st.join(folder, f"{cache_key(legacy)}.zarr")
        adopted = _adopt(older, identity, key, source, cfg.teacher)
        if adopted[1] != key:
            path, (identity, key) = older, adopted
    if views and (cfg.force or not _holds(path, key)):  # a new store: the check newer than some stores applies too
        check_crop_fallback(policy, cfg.aug_seed, tuple(source.native_shape[1:]), np.arange(views))

    if hit_check and not cfg.force and st.is_complete(path, key):
        # A cache hit needs no output shapes, so the teacher is loaded (for its fingerprint) but never run.
        return Prepared(cfg, source, teacher, meta, tf, policy, views, device, n, {}, {}, identity, key, path, {}, [],
                        np.zeros(0, dtype=np.int64), hit=True)

    # Probe one tiny batch: output shapes decide the arrays' shapes.
    probe = source.load(np.arange(min(2, n)), tf)
    try:  # the same forward also finds which hooked outputs a later in-place op rewrites (copied when cached)
        logits, feats, copy_layers = probe_forward(teacher, cfg.layers, probe.to(device))
    except Exception as e:  # noqa: BLE001 - e.g. a 3-channel torchvision model on grayscale data
        raise forward_failed(f"teacher {cfg.teacher}", probe, e) from None
    check_logits(f"teacher {cfg.teacher}", logits)
    check_outputs(f"teacher {cfg.teacher}", cfg.layers, feats, "--layer")
    shapes = {"logits": tuple(logits.shape[1:])}
    shapes.update({st.feature_array(k): tuple(v.shape[1:]) for k, v in feats.items()})
    if source.num_classes and len(shapes["logits"]) == 1 and source.num_classes > shapes["logits"][0]:
        raise KDCacheError(f"{cfg.data} has {source.num_classes} classes but the teacher has {shapes['logits'][0]} "
                           "outputs; use a teacher trained on these classes")

    codecs = {t: cd.make_codec(c, shapes[t]) for t, c in codec_cfgs.items()}
    targets = {t: {"shape": list(shapes[t]), "codec": codecs[t].config(),
                   "parts": sorted(codecs[t].parts(t, shapes[t]))} for t in codec_cfgs}
    rows, view_dims = cfg.chunk_samples, (views,) if views else ()
    arrays = {"index": st.array_spec((n,), "int64", rows, False)}
    if source.labelled:
        arrays["labels"] = st.array_spec((n,), "int64", rows, False)
    if views:
        arrays["aug/box"] = st.array_spec((n, views, 4), "int32", rows, True)
        arrays["aug/flip"] = st.array_spec((n, views), "uint8", rows, True)
    for t, codec in codecs.items():
        for part, (shape, dtype) in codec.parts(t, shapes[t]).items():
            arrays[part] = st.array_spec((n, *view_dims, *shape), dtype, rows, bool(views))
    stat_columns = [f"{t}:{m}" for t in codecs for m in (*_metrics(t), "nonfinite")]
    if source.labelled:  # the teacher's own accuracy on what it was shown: a wrong transform shows up here first
        stat_columns.append(st.TEACHER_TOP1)
    return Prepared(cfg, source, teacher, meta, tf, policy, views, device, n, targets, codecs, identity, key, path,
                    arrays, stat_columns, row_order(n, cfg.row_order), copy_layers=copy_layers,
                    notes=(*class_note(source.classes, teacher_classes(meta)), *untold_transform(meta, tf, cfg),
                           *(f"note: --layer {name} returns a {what}; its first element is cached"
                             for name, what in feats.first_of.items())))


def untold_transform(meta: dict, tf, cfg: CacheConfig) -> list[str]:
    """A note when nothing says what input the teacher was trained on (a bare state_dict, a file without a recorded
    transform, no --normalize): the data's defaults are a guess, and a wrong one gives wrong targets silently on
    unlabelled data (on labelled data the teacher's top-1, which ls shows, gives it away)."""
    if "transform" in meta or cfg.normalize is not None:
        return []
    stats = "/".join(",".join(f"{v:g}" for v in vals) for vals in (tf.mean, tf.std))
    return [f"note: the teacher's weights record no input transform, so it gets the data's defaults: {tf.size[0]}x"
            f"{tf.size[1]}, {tf.channels} channel(s), normalised by {stats} (mean/std); if it was trained on other "
            "inputs, pass --image-size, --channels and --normalize as it was"]


LARGE_CHUNK_BYTES = 256 << 20


def large_chunk_note(p: Prepared) -> str | None:
    """A note when a chunk is so large that memory suffers: a writer holds whole units, and a student's loader
    worker holds two shuffle buffers of at least two chunks each. Suggests --chunk-samples for ~128 MiB chunks, in
    whole batches (a unit smaller than a batch would shrink the teacher's batches)."""
    name, size = max(p.chunk_bytes().items(), key=lambda kv: kv[1])
    if size <= LARGE_CHUNK_BYTES:
        return None
    row = size / p.cfg.chunk_samples
    batch = p.cfg.batch_size
    suggest = max(batch, int((128 << 20) // row) // batch * batch)
    return (f"note: each {name} chunk is {size / 2**20:,.0f} MiB ({p.cfg.chunk_samples} rows of {row / 1e3:,.0f} kB, "
            f"uncompressed); writers and each of a student's loader workers hold several at once: --chunk-samples "
            f"{suggest} would make them {suggest * row / 2**20:,.0f} MiB (another cache)")


def _metrics(target: str) -> tuple[str, ...]:
    return ("kl_t1", "kl_t4", "top1_agreement") if target == "logits" else ("rel_err", "cosine")


def run_teacher_cache(cfg: CacheConfig, log=print) -> str:
    """Cache the teacher's outputs; return the complete store's path. Under torchrun every rank calls this with the
    same config and fills its share of the units (ranks.py); the call returns on every rank once it is complete."""
    ranks, ok = Ranks.from_env(), False
    try:
        with ExitStack() as held:  # the store's writer lock, on rank 0, until the run ends
            path = _run(cfg, log if ranks.leader else (lambda *_: None), ranks, held)
        ok = True
        return path
    finally:
        ranks.close(clean=ok)


def _run(cfg: CacheConfig, log, ranks: Ranks, held: ExitStack) -> str:
    p = ranks.together(prepare, cfg, ranks, True)
    if len(set(ranks.gather(p.hit))) > 1:
        # Another run completed the store between the ranks' checks: a rank that returned on its hit would leave
        # the others waiting for it at the next meeting. All prepare to write; rank 0 then finds it complete (under
        # its lock) and every rank returns it as a hit.
        p = ranks.together(prepare, cfg, ranks, False)
    if not p.hit:  # about to write: every rank must compute the one cache rank 0's store is made for
        _refuse_disagreeing_ranks(p, ranks)
    if ranks.world > 1 and str(p.path).startswith("memory://"):  # the same path on every rank: all refuse it
        raise KDCacheError(f"{p.path}: a memory:// store lives in one process, so {ranks.world} ranks cannot fill "
                           "it together; use a folder or a URL every rank reaches")
    # Rank 0 alone creates or reopens the store, before anyone writes, and says which units are committed: every
    # rank derives its share from that one answer (read later, it would already include other ranks' commits).
    # None: complete already (found by prepare, or by rank 0 under its lock).
    done = None if p.hit else ranks.together(_open_or_create, p, log, held, leader_only=True)
    if done is None:
        log(f"cache hit: {p.path} (key {p.key}) is complete; nothing to compute (--force rebuilds)")
        return str(p.path)
    group = ranks.together(_open_created, p.path)
    p.stat_columns = list(group.attrs[st.MANIFEST_KEY]["stat_columns"])  # a resumed store keeps its own columns
    blocks = st.block_ranges(p.num_samples, p.cfg.chunk_samples)
    todo = ranks.share([(b, v) for b in range(len(blocks)) for v in range(p.units_per_block) if not done[b, v]])
    total = p.num_samples * p.units_per_block
    already = sum(blocks[b][1] - blocks[b][0] for b, v in np.argwhere(done))
    what = "sample-views" if p.views else "samples"
    if already:
        log(f"resuming {p.path}: {already}/{total} {what} already cached, {total - already} to go")
    if ranks.world > 1:
        log(f"{ranks.world} ranks fill {p.path}; progress shown for rank 0's share")
    for note in (*p.notes, large_chunk_note(p)):
        if note:
            log(note)
    t0 = time.time()
    try:
        where = ranks.gather(ranks.together(fill_units, group, p, blocks, todo, already, ranks.leader))
    except KDCacheError as e:
        if not str(e).startswith("cannot read image"):
            raise
        # Fixing or removing the file changes the folder's fingerprint, hence the key: this store is then no one's.
        raise KDCacheError(f"{e} (that changes the data, so the next run makes a new cache; the partial store "
                           f"{p.path} can then be deleted)") from None

    def finish():  # rank 0, once every rank's units are committed
        st.sync_store(group)  # on the disk before it is called complete; the time includes getting it there
        seconds = time.time() - t0
        st.mark_complete(group, {"stats": {
            "seconds": round(seconds, 3), "samples_computed": total - already,
            "samples_per_s": round((total - already) / max(seconds, 1e-9), 1),
            "writer_seconds": round(sum(w["writer_seconds"] for w in where), 3), "writers": where[0]["writers"],
            "ranks": ranks.world, "units_per_rank": [w["units"] for w in where]}})

    ranks.together(finish, leader_only=True)  # and no rank returns before the store is complete
    top1 = (group.attrs[st.MANIFEST_KEY]["teacher"].get("accuracy") or {}).get("top1")
    if top1 is not None:
        log(f"teacher top-1 accuracy on the cached {'views' if p.views else 'inputs'}: {100 * top1:.2f}%")
    return str(p.path)


def _refuse_disagreeing_ranks(p: Prepared, ranks: Ranks) -> None:
    """Ranks that resolved another cache key (other data or weights under the same path on another node, say) would
    each fill their share of rank 0's store with their own teacher's outputs on their own data, and the store would
    be marked complete: refuse, on every rank, before anything is written."""
    seen, other = ranks.first_other((p.key, str(p.path)))
    if other is not None:
        raise KDCacheError(f"the ranks disagree on the cache: rank 0 resolved key {seen[0][0]} at {seen[0][1]}, rank "
                           f"{other} key {seen[other][0]} at {seen[other][1]}; every rank must see the same teacher "
                           "weights and data (the same files) with the same flags")


def _open_created(path: str):
    """The store rank 0 created or reopened, opened for writing on this rank. One that cannot be opened (a rank on
    another machine that sees another disk) is an error of that rank's, in one line, not a zarr traceback."""
    try:
        return st.open_group(path, "r+")
    except KDCacheError:
        raise
    except Exception as e:  # noqa: BLE001 - GroupNotFoundError, FileNotFoundError ...
        raise KDCacheError(f"cannot open {path}, which rank 0 created ({type(e).__name__}); every rank must reach "
                           "the same store: a folder they all see, or a URL") from None


def _holds(path: str, key: str) -> bool:
    """Whether `path` holds a store (complete or not) of this cache key."""
    try:
        return st.open_store(path, require_complete=False).manifest.get("key") == key
    except KDCacheError:
        return False


def _adopt(path: str, identity: dict, key: str, source, teacher_spec: str) -> tuple[dict, str]:
    """(identity, key) of the store at `path` when it holds this very cache under another key; else the ones given.
    Two ways that happens: it was made before the key included the teacher's architecture spec (and its manifest
    names this spec), or from an image folder with the same content but other file times (a copy). Its arrays are
    then this cache's: a hit, and resuming or repairing it goes on in place."""
    try:
        man = dict(st.open_group(path, "r").attrs.get(st.MANIFEST_KEY) or {})
    except Exception:  # noqa: BLE001 - nothing (readable) there: nothing to adopt
        return identity, key
    recorded = man.get("identity")
    if not isinstance(recorded, dict) or not man.get("key") or man["key"] == key:
        return identity, key
    theirs = dict(identity)
    if "architecture" not in recorded and (man.get("teacher") or {}).get("spec") == teacher_spec:
        del theirs["architecture"]
    if (recorded.get("data") not in (None, identity["data"]) and isinstance(man.get("data"), dict)
            and cache_key(dict(theirs, data=recorded["data"])) == man["key"]
            and not data_differs(source, man["data"])):
        theirs["data"] = recorded["data"]
    return (theirs, man["key"]) if cache_key(theirs) == man["key"] else (identity, key)


def _open_or_create(p: Prepared, log, held: ExitStack) -> np.ndarray | None:
    """Rank 0, alone: None on a cache hit; else leave a store (new, or resumable) ready for the writers and return
    which (block, view) units it already holds. Takes the store's writer lock first: one run writes it at a time."""
    held.enter_context(st.writer_lock(p.path))
    group = _open_existing(p.path, p.key, p.cfg, log)
    if group is not None and st.marked_complete(group.attrs[st.MANIFEST_KEY]):
        return None
    if group is not None:  # a resume: its units join the ones another run computed
        refuse_gpu_units_in_cpu_store(p.path, group.attrs[st.MANIFEST_KEY], p.device)
    if group is None:
        _refuse_foreign(p.path)
        local, where = st.local_path(p.path), p.path  # a file:// URL names a folder on this disk too
        if local is not None:
            real, here = Path(os.path.realpath(local or ".")), os.path.realpath(os.getcwd())
            if str(real) == here or here.startswith(str(real).rstrip(os.sep) + os.sep):
                # `--out .` (or `file://`): the folder set aside would be the one this process runs in, and the
                # store would then be created under a working directory that no longer exists
                raise KDCacheError(f"--out {p.path} is the folder this command runs in (or holds it); run it from "
                                   f"the parent folder with --out {real.name or real}")
            # Through a link to a store (ln -s data/cache/<key>.zarr x.zarr) the store it points to is rebuilt, in
            # its place, and the link kept: renaming the link aside left the old store behind, and a link that
            # rmtree refuses to delete (zarr's mode "w" too: the store is made at the link's target).
            _set_aside(real)
            real.parent.mkdir(parents=True, exist_ok=True)
            if Path(local).is_symlink():
                where = str(real)
        group = st.create_store(where, p.manifest(), p.arrays,
                                (len(st.block_ranges(p.num_samples, p.cfg.chunk_samples)), p.units_per_block),
                                p.stat_columns)
    st.remove_temporaries(group)  # from a run killed mid-write; no writer runs yet
    lost = st.uncommit_lost_units(group)
    if lost:
        log(f"{p.path}: {lost} unit(s) were marked committed but their chunk files are missing; recomputing them")
    return st.committed_units(group)


def refuse_gpu_units_in_cpu_store(path: str, manifest: dict, device: torch.device) -> None:
    """A store begun on the CPU holds the teacher's float32 outputs; units computed on a GPU (float16 autocast)
    differ from them by more than `verify --recompute` allows such a store (it loosens its tolerance only for a
    store the manifest says a GPU made), so a resume or repair there would leave units that verify flags and that
    `repair --recompute` on the GPU would redo forever. The other way round is fine: CPU units are within a GPU
    store's tolerance."""
    made = str(manifest.get("device", "cpu"))
    if device.type == "cuda" and not made.startswith("cuda"):
        raise KDCacheError(f"{path} was begun on the {made}, and its missing units would be computed here on "
                           f"{device} (float16 autocast), beyond the tolerance of its CPU-made outputs; add "
                           "--device cpu, or rebuild it on the GPU with --force")


def _set_aside(path: Path) -> None:
    """Move an old store (--force, another key's, an interrupted creation) out of the way with one rename, then
    delete it. Deleting it in place could be killed half way and leave a folder that is neither the old store nor
    a new one; a rename is all or nothing, and a killed deletion leaves only a hidden `.NAME.old-PID` folder
    beside it (removed by the next run on this store)."""
    import shutil

    for stale in path.parent.glob(f".{path.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if path.exists():
        aside = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)


def _refuse_foreign(path: str) -> None:
    """Creating a store empties its folder (zarr deletes everything under it): never do that to a folder that holds
    anything but a kdcache store. One check for a local path and a URL alike (fsspec lists both)."""
    fs, root = st.filesystem(str(path))
    root = root.rstrip("/") or root
    try:
        if fs.isfile(root):
            raise KDCacheError(f"{path} exists and is a file, not a cache folder; choose another --out")
        names = [str(n).rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return
    except st.ACCESS_ERRORS as e:
        raise st.access_error(path, e) from None
    if not names:
        return
    try:
        ours = "zarr.json" in names and st.MANIFEST_KEY in json.loads(
            fs.cat_file(f"{root}/zarr.json") or b"{}").get("attributes", {})
    except (ValueError, AttributeError, OSError):
        ours = False  # unreadable metadata: not provably ours, so never emptied
    if not (ours or names == ["zarr.json"]):  # a kdcache store, or an empty group
        raise KDCacheError(st.damaged_metadata(path) or f"{path} exists and is not a kdcache store; choose another "
                           "--out (kdcache never overwrites a folder it did not create, even with --force)")


def _open_existing(path: str, key: str, cfg: CacheConfig, log):
    """The group at `path` if it is this very cache (same key) and fully created; None if nothing to reuse."""
    if not st.is_url(path) and not Path(path).exists():
        return None
    try:
        group = st.open_group(path, "r+")
        manifest = dict(group.attrs.get(st.MANIFEST_KEY) or {})
    except FileNotFoundError:
        return None
    except KDCacheError:
        raise
    except st.ACCESS_ERRORS as e:  # not "not a kdcache store": nothing is known of what it holds
        raise st.access_error(path, e) from None
    except Exception:
        group, manifest = None, {}
    if cfg.force:
        log(f"--force: rebuilding {path}")
        return None
    if manifest.get("key") == key and manifest.get("format_version") == st.FORMAT_VERSION:
        st.check_manifest(path, manifest)  # hand-edited or damaged: no hit, no resume (every reader refuses it)
        if st.has_array(group, st.COMMIT):  # created last: its presence means every array was created
            # (_stats too: created before _commit, and written by every unit; without it the writers fail)
            gone = [name for name in st.stored_arrays(manifest) if not st.has_array(group, name)]
            if gone:  # deleted since: writing chunks without the array's metadata would complete nothing
                raise KDCacheError(f"{path}: array {gone[0]} is missing outright (its metadata deleted); rebuild "
                                   "the store with --force")
            for name, spec in manifest["arrays"].items():  # its chunks would be written under other metadata
                damage = st.metadata_damage(group[name], spec)
                if damage:
                    raise KDCacheError(f"array {name} of {path}: {damage}; rebuild the store with --force")
            return group
        log(f"{path}: its creation was interrupted before any data; creating it again")
        return None
    if group is not None and not manifest and not list(group.keys()):
        return None  # an empty group: our own creation, interrupted before the manifest
    if not manifest.get("key"):
        raise KDCacheError(st.damaged_metadata(path) or f"{path} exists and is not a kdcache store; choose another "
                           "--out")
    if manifest.get("key") == key:
        raise KDCacheError(f"{path} holds this cache in store format {manifest.get('format_version')}, and this "
                           f"kdcache writes format {st.FORMAT_VERSION}; rebuild it with --force")
    raise KDCacheError(f"{path} holds a different cache (key {manifest.get('key')}, wanted {key}); "
                       "choose another --out or pass --force to overwrite it")


_LOADER = threading.local()  # each input-loader thread's own CUDA stream


def _load_input(p: Prepared, idx: np.ndarray, box, flip):
    """The uint8 input batch; on a GPU already on its way to the device: pinned, then copied on this loader
    thread's own stream (off the compute stream, which would otherwise stall ~1 ms per 38 MB batch), with the
    event that marks the copy done. Returns (tensor, event or None)."""
    raw = p.input(idx, box, flip)
    if p.device.type != "cuda":
        return raw, None
    stream = getattr(_LOADER, "stream", None)
    if stream is None:
        stream = _LOADER.stream = torch.cuda.Stream(p.device)
    with torch.cuda.stream(stream):
        x = raw.pin_memory().to(p.device, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    return x, done


def _batch_inputs(p: Prepared, idx: np.ndarray, box=None, flip=None, loader=None):
    """(batch slices, their load arguments, and with `loader` the loads already submitted to it)."""
    slices = [slice(s, s + p.cfg.batch_size) for s in range(0, len(idx), p.cfg.batch_size)]
    args = [(idx[s], None if box is None else box[s], None if flip is None else flip[s]) for s in slices]
    return slices, args, [loader.submit(_load_input, p, *a) for a in args] if loader is not None else None


def teacher_forward(p: Prepared, idx: np.ndarray, feats: dict, box=None, flip=None, loader=None, batches=None):
    """Yield (batch slice, {target: raw output on the device}) over samples `idx` (one view's box/flip each).

    With `loader` (GPU), input loading (decode, crop, resize, pin) runs in threads ahead of the forwards; torch
    releases the GIL. `batches` (from `_batch_inputs`): loads submitted earlier, while previous units computed.
    uint8 crosses to the device (4x fewer bytes than float32); normalisation happens there.
    """
    cuda = p.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else torch.autocast("cpu", enabled=False)
    slices, args, inputs = batches or _batch_inputs(p, idx, box, flip, loader)
    for i, s in enumerate(slices):
        raw, copied = inputs[i].result() if inputs is not None else _load_input(p, *args[i])
        if copied is not None:  # made on a loader's stream: the compute stream waits for it, the CPU does not
            torch.cuda.current_stream(p.device).wait_event(copied)
            raw.record_stream(torch.cuda.current_stream(p.device))
        x = p.transform(raw.to(p.device, non_blocking=True))
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = p.teacher(x)
        yield s, {"logits": logits, **{st.feature_array(layer): feats[layer] for layer in p.cfg.layers}}


def _encode(p: Prepared, outputs: dict[str, torch.Tensor], labels: torch.Tensor | None = None
            ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Encode each target with its codec (on the device) and measure the cost: (parts, per-unit stat sums), the
    last sum the teacher's correct top-1 predictions when `labels` are given."""
    parts, stats = {}, []
    for t, codec in p.codecs.items():
        ref = outputs[t].float().contiguous()  # channels_last maps on a GPU: stored (and copied out) as N, C, H, W
        enc = codec.encode(t, ref)
        parts.update(enc)
        dec = codec.decode(t, enc)
        dist = cd.distortion(t, ref, dec)
        stats += [dist[m].double().sum() for m in _metrics(t)]
        # non-finite in the teacher's output, or only once stored (a float16 overflow past 65504): refused either way
        stats.append((~torch.isfinite(ref) | ~torch.isfinite(dec)).flatten(1).any(1).double().sum())
    if labels is not None:
        stats.append((outputs["logits"].argmax(1) == labels).double().sum())
    return parts, torch.stack(stats)


def teacher_outputs_async(p: Prepared, idx: np.ndarray, feats: dict, loader: ThreadPoolExecutor | None = None,
                          box=None, flip=None, copy_stream=None, labels: np.ndarray | None = None, batches=None):
    """Queue the teacher on samples `idx`; return host parts, host stats and a CUDA event that fires when filled.

    On a GPU nothing here waits for the device: forwards and encodings are queued on the compute stream; the copies
    into pinned host memory are queued on `copy_stream` behind an event, so they overlap the next unit's forwards
    (the allocator is told the outputs are in use there until the copies finish); the writer thread waits on the
    copies' event. Loading the next unit's inputs on the CPU overlaps both. Hooks must be attached.
    """
    chunks: dict[str, list[torch.Tensor]] = {}
    stats = None
    y = torch.from_numpy(labels).to(p.device, non_blocking=True) if labels is not None else None
    for s, out in teacher_forward(p, idx, feats, box, flip, loader, batches):
        parts, st_sum = _encode(p, out, None if y is None else y[s])
        for k, v in parts.items():
            chunks.setdefault(k, []).append(v)
        stats = st_sum if stats is None else stats + st_sum
    dev = {k: torch.cat(v) for k, v in chunks.items()}
    dev[st.STATS] = stats
    if p.device.type != "cuda":
        return dev, None
    host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in dev.items()}
    stream = copy_stream or torch.cuda.current_stream()
    stream.wait_stream(torch.cuda.current_stream())   # the copies start once this unit's compute is done
    with torch.cuda.stream(stream):
        for k, v in dev.items():
            host[k].copy_(v, non_blocking=True)
            v.record_stream(stream)                    # not reused by the next forward before it is copied
        event = torch.cuda.Event()
        event.record(stream)
    return host, event


def teacher_outputs(p: Prepared, idx: np.ndarray, feats: dict, box=None, flip=None) -> dict[str, torch.Tensor]:
    """Synchronous, for verify and plan: each target's raw output as float32 on the CPU. Hooks must be attached."""
    parts: dict[str, list[torch.Tensor]] = {}
    for _s, out in teacher_forward(p, idx, feats, box, flip):
        for k, v in out.items():
            parts.setdefault(k, []).append(v.float().contiguous().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def _to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    a = t.numpy()
    want = np.dtype(dtype)
    return a.view(want) if a.dtype != want and a.dtype.itemsize == want.itemsize else a.astype(want, copy=False)


def _write_when_ready(group, p: Prepared, block: int, view: int, start: int, end: int, out: dict, host: dict,
                      event) -> float:
    """Writer-thread side: wait for the unit's copies, check it, write it whole, commit it. Returns the seconds
    this thread was busy (compression, checksums, files; not the wait for the copies)."""
    if event is not None:
        event.synchronize()
    t0 = time.perf_counter()
    stats = host.pop(st.STATS).numpy()
    for col, v in zip(p.stat_columns, stats):
        if col.endswith(":nonfinite") and v > 0:
            where = f" (view {view})" if p.views else ""
            fix = ("the forward runs under float16 autocast on a GPU: try --device cpu" if p.device.type == "cuda"
                   else "use --dtype float32 (float16 overflows past 65504)")
            raise KDCacheError(f"teacher produced non-finite {col.split(':')[0]} in rows {start}-{end - 1}"
                               f"{where}; {fix}, or check the teacher's weights")
    out.update({k: _to_numpy(v, p.arrays[k]["dtype"]) for k, v in host.items()})
    st.write_unit(group, block, view, start, out, stats)
    return time.perf_counter() - t0


def fill_units(group, p: Prepared, blocks, todo, already, show: bool = True) -> dict:
    """Compute and write every unit in `todo`. Returns where the time went: the writers' busy seconds (summed over
    threads) and the thread count, so a user can tell whether the writers or the teacher bound the stage."""
    cfg, source = p.cfg, p.source
    # this process's bar: what is already cached plus its own share (under torchrun, rank 0 shows its share only)
    total = already + sum(blocks[b][1] - blocks[b][0] for b, _ in todo)
    prog, task = _progress(total, already, "views" if p.views else "samples", show)
    pending = set()
    # zstd level 1 compresses ~140-250 MB/s of float16 feature maps per thread (measured on an H100 host's vCPUs and
    # on a 2-core machine): a 401 kB/sample hint layer at a GPU's 12k img/s would want more cores than hosts have,
    # so the writers take every core but those of the main thread and the two input loaders.
    writers = cfg.writers or max(2, min(16, (os.cpu_count() or 2) - 3))
    # Bounded: host memory stays flat however large the dataset. Units in flight hold pinned host buffers (on a GPU)
    # until written; pinning fresh memory is slow (~10 ms per 100 MB), so the bound is also in bytes (2 GiB), which
    # keeps the pinned allocator reusing the same few buffers.
    unit_bytes = sum(p.chunk_bytes().values())
    max_pending = max(2, min(2 * writers, (2 << 30) // max(1, unit_bytes)))
    native_hw = tuple(source.native_shape[1:])
    copy_stream = torch.cuda.Stream(device=p.device) if p.device.type == "cuda" else None
    t0, computed, busy = time.time(), 0, 0.0
    # On a GPU, loader threads prepare the next inputs while the device computes. On a CPU the forward already uses
    # every core, and a loader thread running torch ops gets its own OpenMP team whose idle threads spin on those
    # same cores (measured on 2 cores: 0.74-0.87 of forward speed with loader threads, 0.97-1.0 loading inline).
    loader_pool = ThreadPoolExecutor(2) if p.device.type == "cuda" else nullcontext()
    with prog, ThreadPoolExecutor(writers) as pool, loader_pool as loader, torch.inference_mode(), \
            capture(p.teacher, cfg.layers, p.copy_layers) as feats:
        named = teacher_label_map(source.classes, teacher_classes(p.teacher_meta))  # the teacher's top-1, by name

        def plan(b, v):  # one unit's rows, views and sample-level arrays; on a GPU its input loads start now
            start, end = blocks[b]
            idx = p.rows[start:end]  # the source samples this block holds
            out, box, flip = {}, None, None
            labels = source.labels(idx).astype(np.int64) if source.labelled else None
            if v == 0:  # the sample-level arrays belong to the block's first unit
                out["index"] = idx.astype(np.int64)
                if labels is not None:
                    out["labels"] = labels
            if p.views:
                box, flip = (a[:, 0] for a in sample_params(p.policy, cfg.aug_seed, idx, [v], native_hw))
                out["aug/box"], out["aug/flip"] = box, flip
            if labels is not None and named is not None:
                labels = named[labels]  # (after the stored labels above: those stay the data's own)
            return b, v, start, end, idx, out, box, flip, labels, _batch_inputs(p, idx, box, flip, loader)

        # Inputs load a few batches ahead across unit boundaries (a unit may be a single batch): the GPU never
        # waits for the next unit's first input.
        ahead = max(1, -(-4 * cfg.batch_size // max(1, cfg.chunk_samples))) if loader is not None else 0
        units, queued = iter(todo), deque()
        while True:
            while len(queued) <= ahead and (unit := next(units, None)) is not None:
                queued.append(plan(*unit))
            if not queued:
                break
            b, v, start, end, idx, out, box, flip, labels, batches = queued.popleft()
            host, event = teacher_outputs_async(p, idx, feats, loader, box, flip, copy_stream,
                                                labels if st.TEACHER_TOP1 in p.stat_columns else None, batches)
            pending.add(pool.submit(_write_when_ready, group, p, b, v, start, end, out, host, event))
            if len(pending) >= max_pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                busy += sum(f.result() for f in finished)  # re-raises a writer's error here
            computed += end - start
            prog.update(task, advance=end - start, rate=f"{computed / max(time.time() - t0, 1e-9):,.0f}")
        busy += sum(f.result() for f in pending)
    return {"writer_seconds": round(busy, 3), "writers": writers, "units": len(todo)}
