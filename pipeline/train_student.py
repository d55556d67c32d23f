"""Stage 2 (`make train-student`): train a student from a cache, never building the teacher.

    run_train_student(StudentConfig(cache=...)) -> summary dict

1. open the store read-only (complete, known format) and rebuild the data source and transform it records;
2. build the losses from `--loss`, collect the targets they declare, and refuse a store lacking any of them;
3. stream (inputs, stored targets) with `CacheStream` through DataLoader workers; with augmented views, each sample
   comes as the view the store holds targets for, rebuilt from its stored parameters;
4. `fit`: decode the targets on the device with their codecs and train; evaluate on the test split each epoch;
   write config.json, metrics.jsonl, student.pt and summary.json into the run directory; return the summary.

This module never imports the teacher loader: the teacher's outputs come from the store only. (`fit` is also
used by online.py, the teacher-in-the-loop reference, with targets computed on the fly.)
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from pipeline.augment import AugmentPolicy, check_replay
from pipeline.catalog import find_cache
from pipeline.data import (Source, Transform, class_map, class_note, data_differs, data_root, local_output, open_source,
                           plain_fields, teacher_label_map)
from pipeline.errors import KDCacheError, first_line
from pipeline.losses import LOSSES, Batch, parse_loss_spec
from pipeline.loops import (MAX_PROCESSES, OPTIMIZERS, cosine_lr, evaluate, pick_device, save_whole,
                            to_device_ahead, too_many_workers, training_checks, write_text_whole)
from pipeline.ranks import Ranks
from pipeline.models import (StopForward, build_model, capture, check_outputs, fingerprint_module, first_misfit,
                             forward_in_training_mode, refuse_untrainable, resolve_modules, stop_after)
from pipeline.reader import CacheStream, SingleRowsJoined, check_rows, make_loader, stop_workers
from pipeline.store import exclusive, is_url, open_store, refuse_inside_store, versions


@dataclass
class StudentConfig:
    cache: str = ""
    student: str = "default-student"
    loss: str = "kd=1"
    temperature: float = 4.0
    alpha: float = 0.1                     # weight of the hard-label term inside KD
    no_labels: bool = False                # ignore labels even when the store has them
    fitnets_hint: str = "layer3"           # teacher layer (cached as features/<hint>)
    fitnets_guided: str = "block2"         # student module
    fitnets_schedule: str = "two-stage"    # or "single"
    fitnets_hint_epochs: int = 2           # stage-1 epochs of the two-stage schedule
    rkd_layer: str = "avgpool"             # teacher layer (cached as features/<layer>)
    rkd_student_layer: str = "embed"
    rkd_distance_weight: float = 25.0
    rkd_angle_weight: float = 50.0
    augment: str | None = None             # the views' policy this run expects; None: whatever the store holds
    view_policy: str = "cycle"             # which stored view a sample gets each epoch: cycle or random
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 5e-4
    optimizer: str = "sgd"                 # sgd (Nesterov, momentum 0.9) or adamw; cosine schedule either way
    seed: int = 0
    test_data: str | None = None           # default: the cached data's test split, when it has one
    data: str | None = None                # default: the data spec in the manifest
    workers: int = 1                       # DataLoader worker processes
    buffer_chunks: int = 0                 # chunks shuffled together; 0: as many as fit in 256 MiB per worker
    device: str = "auto"
    out: str | None = None                 # run directory; default data/runs/<time>-<loss>-s<seed>
    resume: bool = False                   # continue the run in --out from its last epoch's checkpoint.pt
    overwrite: bool = False                # replace a finished or interrupted run in --out (else refused)

    def __post_init__(self):
        plain_fields(self)


def validate(cfg: StudentConfig, weights: dict[str, float]) -> None:
    """Refuse settings that would train nonsense (a NaN loss, a stage that never runs) before anything is built."""
    finite = {"--temperature": cfg.temperature, "--alpha": cfg.alpha,
              "--rkd-distance-weight": cfg.rkd_distance_weight, "--rkd-angle-weight": cfg.rkd_angle_weight,
              **{f"--loss {k}": w for k, w in weights.items()}}
    checks = training_checks(cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.seed) + [
        (math.isfinite(v), f"{k} must be a finite number (got {v})") for k, v in finite.items()] + [
        ("rkd" not in weights or cfg.rkd_distance_weight > 0 or cfg.rkd_angle_weight > 0,
         "RKD with --rkd-distance-weight 0 and --rkd-angle-weight 0 has nothing to match; give one a weight"),
        # RKD compares samples of one batch: a pair has no distance to normalise by (mu) below 2 samples, and an
        # angle needs a triplet; below that its term is exactly 0 every step and would train nothing, silently
        ("rkd" not in weights or cfg.rkd_distance_weight == 0 or cfg.batch_size >= 2,
         f"RKD's distance term compares pairs of samples in a batch, so --batch-size {cfg.batch_size} gives it "
         "nothing; use --batch-size 2 or more"),
        ("rkd" not in weights or cfg.rkd_angle_weight == 0 or cfg.batch_size >= 3,
         f"RKD's angle term compares triplets of samples in a batch, so --batch-size {cfg.batch_size} gives it "
         "nothing; use --batch-size 3 or more, or --rkd-angle-weight 0"),
        (cfg.workers >= 0, f"--workers must be 0 (load in this process) or more (got {cfg.workers})"),
        (cfg.workers <= MAX_PROCESSES, too_many_workers(cfg.workers)),
        (cfg.buffer_chunks >= 0, f"--buffer-chunks must be 0 (automatic) or more (got {cfg.buffer_chunks})"),
        (cfg.temperature > 0, f"--temperature must be positive (got {cfg.temperature}); Hinton et al. use 1-20"),
        # KD scales its soft term by T^2 in float32: beyond that range it is 0 * inf = NaN at the first step, which
        # the run reported as a divergence to cure with a lower --lr
        (not math.isfinite(cfg.temperature) or cfg.temperature < math.sqrt(torch.finfo(torch.float32).max),
         f"--temperature {cfg.temperature} is too large: KD's T^2 scaling overflows float32; Hinton et al. use 1-20"),
        (0 <= cfg.alpha <= 1, f"--alpha is the hard-label share of KD, from 0 to 1 (got {cfg.alpha})"),
        (cfg.fitnets_hint_epochs >= 0, f"--fitnets-hint-epochs must be 0 or more (got {cfg.fitnets_hint_epochs})"),
        (cfg.rkd_distance_weight >= 0 and cfg.rkd_angle_weight >= 0, "RKD weights must be 0 or more"),
        (cfg.view_policy in ("cycle", "random"), f"unknown --view-policy '{cfg.view_policy}'; use cycle or random"),
        (cfg.optimizer in OPTIMIZERS, f"unknown --optimizer '{cfg.optimizer}'; use {' or '.join(OPTIMIZERS)}"),
        (cfg.fitnets_schedule in ("two-stage", "single"),
         f"unknown --fitnets-schedule '{cfg.fitnets_schedule}'; use two-stage or single"),
        (not cfg.resume or cfg.out, "--resume continues the run in --out DIR: name it"),
        (not (cfg.resume and cfg.overwrite), "--resume continues the run in --out, --overwrite replaces it: pick one"),
    ]
    for ok, msg in checks:
        if not ok:
            raise KDCacheError(msg)
    # The two-stage schedule takes the hint epochs out of --epochs. With FitNets alone, epochs == hint epochs is a
    # hint-only run (a hint-initialised student); with other losses named, they must get a stage to run in.
    others = [k for k in weights if k != "fitnets"]
    if "fitnets" in weights and cfg.fitnets_schedule == "two-stage" and cfg.fitnets_hint_epochs == 0:
        raise KDCacheError("--fitnets-hint-epochs 0 leaves the two-stage schedule no hint stage, so FitNets would "
                           "never be used; give it hint epochs or use --fitnets-schedule single")
    if "fitnets" in weights and cfg.fitnets_schedule == "two-stage" and (
            cfg.epochs < cfg.fitnets_hint_epochs or (others and cfg.epochs == cfg.fitnets_hint_epochs)):
        raise KDCacheError(f"--epochs {cfg.epochs} leaves no epoch for stage 2 ({','.join(others) or 'kd'}) after "
                           f"--fitnets-hint-epochs {cfg.fitnets_hint_epochs}; raise --epochs, lower "
                           "--fitnets-hint-epochs or use --fitnets-schedule single")


def build_losses(cfg: StudentConfig, weights: dict[str, float], student_shapes: dict, teacher_shapes: dict):
    opts = {
        "kd": dict(temperature=cfg.temperature, alpha=cfg.alpha),
        "fitnets": dict(hint=cfg.fitnets_hint, guided=cfg.fitnets_guided),
        "rkd": dict(layer=cfg.rkd_layer, student_layer=cfg.rkd_student_layer,
                    distance_weight=cfg.rkd_distance_weight, angle_weight=cfg.rkd_angle_weight),
    }
    return {name: LOSSES[name](**opts.get(name, {}), student_shapes=student_shapes, teacher_shapes=teacher_shapes)
            for name in weights}


def declared(weights: dict[str, float], cfg: StudentConfig) -> tuple[dict[str, str], list[str]]:
    """Targets each loss needs (name -> loss name) and the student layers to hook, from shape-free instances."""
    needs, layers = {"logits": "kd"}, []  # logits are always streamed: small, and stage 2 of FitNets uses KD
    for loss in build_losses(cfg, weights, {}, {}).values():
        needs.update({a: loss.name for a in loss.teacher_arrays()})
        layers += [x for x in loss.student_layers() if x not in layers]
    return needs, layers


def refuse_missing_labels(needs: dict[str, str], use_labels: bool, labelled: bool, what: str) -> None:
    """A loss that reads labels (ce) on data without them, or with --no-labels: refused before training (else
    cross_entropy fails on the first batch with a bare traceback)."""
    if not use_labels and "labels" in needs:
        why = "--no-labels hides them" if labelled else f"the {what} has none"
        raise KDCacheError(f"loss '{needs['labels']}' needs labels but {why}; "
                           "drop it from --loss (kd alone uses only the soft targets)")


def check_views(cfg: StudentConfig, store) -> None:
    """A run that expects augmented views must get exactly the policy the store was made with, and every view must
    be rebuilt as the teacher saw it."""
    check_replay(store.manifest, store.path)
    views = store.manifest.get("views")
    if cfg.augment is None:
        return
    wanted = AugmentPolicy.parse(cfg.augment).spec()
    have = views["augment"]["spec"] if views else "none"
    if wanted != have:
        fix = (f"re-run teacher-cache with --views K --augment {wanted}" if wanted != "none"
               else "drop --augment to read the store's views")
        raise KDCacheError(f"store {store.path} holds views augmented with '{have}' but this run asks for "
                           f"'{wanted}'; {fix}")


@dataclass
class Setup:
    """What the training loop needs, whoever supplies the teacher's targets (a store, or online.py)."""

    student: torch.nn.Module
    losses: dict
    student_layers: list[str]
    stages: list[tuple[int, dict[str, float]]]
    tf: Transform
    device: torch.device
    test: Source | None
    test_spec: str | None
    use_labels: bool
    num_classes: int
    student_shapes: dict
    test_labels: np.ndarray | None = None   # test class number -> the student's, when the two name them otherwise
    source_fingerprint: str | None = None   # of the data trained on
    classes: list[str] | None = None        # the training data's class names, in the student's output order
    cache_key: str | None = None            # the store's key: which targets a checkpoint's run trained on
    label_map: torch.Tensor | None = None   # the data's label -> the teacher's output of that class name


def setup(cfg: StudentConfig, weights: dict[str, float], source: Source, tf: Transform, num_classes: int,
          teacher_shapes: dict, use_labels: bool, teacher_classes: list[str] | None = None, log=print) -> Setup:
    """Build the student, its losses (sized from student and teacher shapes), the schedule and the test split.
    The entry points have already run `validate(cfg, weights)`. The student's outputs are named by the training
    data's classes, else (unlabelled data) by the teacher's where its weights file recorded them."""
    device = pick_device(cfg.device)
    _, student_layers = declared(weights, cfg)
    student = build_model(cfg.student, num_classes, tf.channels, tf.size)
    for layer in student_layers:  # each named with the flag that chose it
        flags = [f for used, chosen, f in (("fitnets" in weights, cfg.fitnets_guided, "--fitnets-guided"),
                                           ("rkd" in weights, cfg.rkd_student_layer, "--rkd-student-layer"))
                 if used and chosen == layer]
        resolve_modules(student, [layer], " / ".join(flags))
    probe = source.load(np.arange(min(2, source.num_samples)), tf)
    with torch.no_grad(), capture(student, student_layers) as feats:
        try:
            out = student.eval()(probe)
        except Exception as e:  # noqa: BLE001 - e.g. a 3-channel torchvision model on a grayscale cache
            # The cached input is the teacher's: re-caching with the student's --channels alone fails on the teacher
            # (a grey teacher, a 3-channel torchvision student), so the student is what to change first.
            c, h, w = probe.shape[1:]
            raise KDCacheError(f"student {cfg.student} fails on the cached input {tuple(probe.shape[1:])} "
                               f"({type(e).__name__}: {first_line(e)}); the cache holds its teacher's input, so "
                               f"give a student built for {c}-channel {h}x{w} images (a module:function gets "
                               "in_channels and image_size), or re-cache with a --channels / --image-size the "
                               "teacher accepts too") from None
    check_outputs(f"student {cfg.student}", student_layers, feats, "--fitnets-guided / --rkd-student-layer")
    # The losses take a layer's first axis as the samples: RKD would relate a sequence-first layer's positions (a
    # transformer without batch_first) instead of samples, and FitNets size its regressor from the wrong axes.
    off = [k for k, v in feats.items() if v.dim() == 0 or len(v) != len(probe)]
    if off:
        raise KDCacheError(f"module '{off[0]}' of student {cfg.student} gives shape {tuple(feats[off[0]].shape)} on "
                           f"a batch of {len(probe)}: its first axis is not the samples (e.g. a sequence-first "
                           "layer); choose another --fitnets-guided / --rkd-student-layer")
    student_shapes = {k: tuple(v.shape[1:]) for k, v in feats.items()}
    if not isinstance(out, torch.Tensor) or out.shape[1:] != (num_classes,):
        what = f"shape {tuple(out.shape[1:])}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        # num_classes fixes a classifier of another width; a tuple or a feature map is no class count's doing
        fix = (f"build it with num_classes={num_classes}" if isinstance(out, torch.Tensor) and out.ndim == 2 else
               "build it to return one (batch, classes) tensor of class scores (e.g. without auxiliary outputs)")
        raise KDCacheError(f"student {cfg.student} returns {what} per sample, but the cache's teacher has "
                           f"{num_classes} classes; {fix}")
    # Training runs the student in training mode, where some forwards return more than the class scores: probed
    # in that mode too, as `kdcache teacher` probes (on the CPU: the student is not on its device yet).
    try:
        out = forward_in_training_mode(student, probe)
    except Exception as e:  # noqa: BLE001 - the user's model
        raise KDCacheError(f"student {cfg.student} fails in training mode on the cached input "
                           f"{tuple(probe.shape[1:])} ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(out, torch.Tensor) or out.shape[1:] != (num_classes,):
        what = f"shape {tuple(out.shape[1:])}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise KDCacheError(f"student {cfg.student} returns {what} per sample in training mode (in eval mode its "
                           f"{num_classes} class scores); build it to return the class scores alone (e.g. without "
                           "auxiliary heads)")
    refuse_untrainable(student, f"student {cfg.student}")  # as `kdcache teacher` refuses one
    try:
        losses = build_losses(cfg, weights, student_shapes, teacher_shapes)
    except ValueError as e:
        raise KDCacheError(str(e)) from None
    # The schedule: FitNets' two-stage mode first trains on the hint alone (stage 1), then the other losses.
    stages = [(cfg.epochs, dict(weights))]
    if "fitnets" in weights and cfg.fitnets_schedule == "two-stage":
        rest = {k: w for k, w in weights.items() if k != "fitnets"} or {"kd": 1.0}
        if "kd" in rest and "kd" not in losses:
            losses.update(build_losses(cfg, {"kd": 1.0}, student_shapes, teacher_shapes))
        hint_epochs = cfg.fitnets_hint_epochs  # taken out of --epochs (validate: no more than --epochs)
        stages = [(hint_epochs, {"fitnets": weights["fitnets"]}), (cfg.epochs - hint_epochs, rest)]
    cuda = device.type == "cuda"
    # On a GPU: channels_last (and bf16 autocast in `fit`), as any fast training loop; on the CPU: plain float32.
    student.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format).train()
    for m in losses.values():
        m.to(device)
    test_spec = cfg.test_data or source.test_spec()
    test = open_source(test_spec) if test_spec else None
    if test is not None and not test.labelled:
        raise KDCacheError(f"test data {test_spec} has no labels; pass a labelled --test-data")
    if test is not None and test.fingerprint() == source.fingerprint() and not cfg.test_data:
        test, test_spec = None, None  # e.g. a cache of fashion-mnist:test, whose default test split is itself
    if use_labels and {"kd", "ce"} & set(weights):  # labels and teacher outputs trained side by side
        for note in class_note(source.classes, teacher_classes):
            log(note)
    classes = source.classes or teacher_classes
    lut = teacher_label_map(source.classes, teacher_classes) if use_labels else None
    if lut is not None:  # labels renumbered as the teacher's outputs: the student's outputs are the teacher's classes
        classes = teacher_classes
    # Without labels the outputs are the teacher's alone: output i is its class i, whatever position the data's
    # folders give that name (data holding some of its classes); named by the data's, test labels paired with
    # other classes' outputs. Data with names the teacher lacks keeps its own (paired by position, as labels are).
    if not use_labels and source.classes and teacher_classes and set(source.classes) <= set(teacher_classes):
        classes = teacher_classes
    # whose class names name the outputs
    owner = "the training data" if source.classes and classes is source.classes else "the teacher"
    test_labels = class_map(test, classes, owner=owner) if test is not None else None
    if test is not None and classes is None:
        log(f"note: neither the training data nor the teacher names its classes, so {test_spec}'s classes "
            f"({', '.join(test.classes[:5])}{' ...' if len(test.classes) > 5 else ''}) are taken as the teacher's "
            "outputs 0, 1, ... in that order")
    return Setup(student, losses, student_layers, stages, tf, device, test, test_spec, use_labels, num_classes,
                 student_shapes, test_labels, source.fingerprint(), classes,
                 label_map=torch.from_numpy(lut).to(device) if lut is not None else None)


def run_dir_for(cfg: StudentConfig, tag: str = "") -> Path:
    # --loss "kd = 1" is kd=1 (parse_loss_spec strips around its separators, and accepts spaces nowhere else): no
    # spaces in the name, which a shell would split
    loss = "".join(cfg.loss.split()).replace("=", "").replace(",", "+")
    return Path(cfg.out) if cfg.out else data_root() / "runs" / (
        time.strftime("%Y%m%d-%H%M%S") + f"-{tag}{loss}-s{cfg.seed}")


RUN_PLACE = ("out", "resume", "overwrite")  # where a run lies and how it was started: not what it trains
RUN_OUTPUTS = ("summary.json", "student.pt", "metrics.jsonl", "config.json", "checkpoint.pt")
CHECKPOINT = "checkpoint.pt"
# What a kill mid-write leaves beside them (write_config's and save_whole's temporary names): the run's own files,
# not someone else's (a folder holding only config.json.tmp is a run killed before its first file landed).
RUN_TEMPORARIES = tuple(f"{name}.tmp" for name in RUN_OUTPUTS)
# Settings every run's config.json records under "config" (train-student's and online KD's alike): the mark of a
# run directory. A folder whose config.json lacks them is someone else's, and no run writes into it.
RUN_MARK = ("loss", "student", "seed", "epochs")


def is_run_dir(path: Path) -> bool:
    """Whether `path` holds a kdcache run: a config.json that a run wrote (it is written before anything else)."""
    try:
        saved = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):  # none, a folder, not JSON, not text
        return False
    return isinstance(saved, dict) and isinstance(saved.get("config"), dict) and all(
        k in saved["config"] for k in RUN_MARK)


def write_config(run_dir: Path, config: dict) -> None:
    """config.json, written whole then renamed: it marks the folder as a run's (`is_run_dir`), so a kill must never
    leave it truncated, which would make the run's own folder look like someone else's."""
    tmp = run_dir / "config.json.tmp"
    try:
        tmp.write_text(json.dumps(config, indent=2, default=str))
        tmp.replace(run_dir / "config.json")
    except OSError:  # a full disk: no half-written temporary left beside the run
        tmp.unlink(missing_ok=True)
        raise


def same_run(config: dict, cache_key: str | None) -> dict:
    """A run's settings as two runs must share them to train the same student (--resume, and results' reuse of a
    finished run): where the run lies and how it was started aside, and the store by its manifest's key (its teacher,
    data, transform, views and codecs), not by the path text: one store named relatively or absolutely, or moved, is
    one store, and one rebuilt in place from another teacher is another. Nor does --data count: it only says where
    the store's data lies now (set-up refuses data other than the store's), nor, for a run from a store, --augment:
    there it only asks set-up to check the store's views policy, which the key already names (online KD's
    --augment is the augmentation it trains with, and counts)."""
    checks_only = ("augment",) if config.get("cache") else ()
    same = ({k: v for k, v in config.items() if k not in RUN_PLACE + ("cache", "data") + checks_only}
            | {"cache_key": cache_key})
    if isinstance(same.get("workers"), int):  # as the loader reads: --workers 0 is one reader, in this process
        same["workers"] = _readers(same["workers"])
    return same | {"loss": _loss_as_trained(same["loss"])} if "loss" in same else same


def _readers(workers: int) -> int:
    """The loader's readers for --workers: 0 (loading in this process) reads the batches one worker reads, in
    the same order (the streams split their work among max(1, workers) and seed what they shuffle themselves), so
    a run with either trains the same student and may resume or reuse the other's."""
    return max(1, workers)


def _loss_as_trained(loss):
    """--loss by what it trains, not its spelling: `kd` = `kd=1.0` = ` kd = 1 `, and `kd=1,rkd=0` = `kd=1`. The
    order is kept (it is the order the parts are summed in)."""
    if not isinstance(loss, str):
        return loss  # already in this form (a checkpoint's)
    try:
        return [[name, w] for name, w in parse_loss_spec(loss).items() if w > 0]
    except KDCacheError:
        return loss  # as written: it differs from any valid spec


def _comparable(cfg: StudentConfig, ranks: int, cache_key: str | None, device: torch.device) -> dict:
    """The settings a checkpoint must share with the run that resumes it (`same_run`). The loader workers and the
    ranks count too: they decide which rows make each batch and how many batches an epoch has, so another count
    would give other weights and overrun the learning-rate schedule (0 workers and 1 are one count: `_readers`).
    The device counts by the kind it resolved to, not the flag's text (--device auto is cpu on a machine without
    CUDA; bf16 autocast runs on CUDA only), nor its index (each rank has its own GPU)."""
    return same_run(asdict(cfg), cache_key) | {"ranks": ranks, "device": device.type}


def load_checkpoint_for(cfg: StudentConfig, ranks: int, cache_key: str, device: torch.device) -> dict | None:
    """The state `--resume` continues from, checked to come from a run with these very settings, on the store with
    this `cache_key`, on a `device` of the kind it was trained on."""
    if not cfg.resume:
        return None
    run_dir = Path(cfg.out)
    path = run_dir / CHECKPOINT
    if not path.is_file():
        done = (run_dir / "summary.json").is_file()
        raise KDCacheError(f"--resume: {run_dir} holds {'a finished run' if done else 'no checkpoint.pt'}; "
                           "nothing to resume (" + ("--overwrite instead of --resume starts a new run there)" if done
                                                    else "drop --resume to start a new run there)"))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise KDCacheError(f"--resume: cannot read {path} ({type(e).__name__}); use --overwrite instead of --resume "
                           "to start over") from None
    saved, now = state.get("config", {}), _comparable(cfg, ranks, cache_key, device)
    # older checkpoints recorded --data, and a cached run's --augment, too (see same_run)
    saved = {k: v for k, v in saved.items() if k != "data" and not (k == "augment" and cfg.cache)}
    if "loss" in saved:  # older checkpoints recorded --loss as written
        saved["loss"] = _loss_as_trained(saved["loss"])
    if "ranks" not in saved:  # a checkpoint from before kdcache compared these: one rank, any worker count
        saved = saved | {"ranks": 1, "workers": cfg.workers}
    if isinstance(saved.get("workers"), int):  # older checkpoints recorded --workers 0 as 0 (see same_run)
        saved["workers"] = _readers(saved["workers"])
    if "cache_key" not in saved:  # from before kdcache compared the store's key and the device used: their flags
        now = {k: v for k, v in now.items() if k != "cache_key"} | {"cache": cfg.cache, "device": cfg.device}
    if saved.get("cache_key", now.get("cache_key")) != now.get("cache_key"):
        raise KDCacheError(f"--resume: the run in {run_dir} was trained from the cache with key "
                           f"{saved['cache_key']}, but {cfg.cache} holds key {now['cache_key']} (rebuilt, e.g. from "
                           "another teacher, or another store); resume with the store it started from, or use "
                           "--overwrite instead of --resume to start over")
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differ:
        def shown(v):  # a setting's value, short enough for one line
            text = json.dumps(v, default=str)
            return text if len(text) <= 40 else text[:37] + "..."

        was = "; ".join(f"{k}: {shown(saved.get(k))} there, {shown(now.get(k))} now" for k in differ)
        raise KDCacheError(f"--resume: the run in {run_dir} was made with other settings ({was}); resume with the "
                           "same flags, or use --overwrite instead of --resume to start over")
    return state


def open_run_dir(cfg: StudentConfig, tag: str = "", resuming: bool = False) -> Path:
    """The run directory, ready for a new run. One that holds a run's work (finished, or a checkpoint to resume) is
    refused unless --overwrite; then its outputs are removed first, summary.json (the mark of a finished run) before
    anything else, so a run killed part-way never looks finished with an older run's results. Resuming keeps the
    checkpoint (and rewrites metrics.jsonl from it)."""
    run_dir = run_dir_for(cfg, tag)
    if cfg.out is None:  # a fresh name: runs started in the same second (a sweep) must not share a directory
        return _new_dir(run_dir)
    check_out(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    # config.json stays until the new run's replaces it (write_config): the folder never stops being a run's
    for name in RUN_OUTPUTS + RUN_TEMPORARIES:
        if not (resuming and name == CHECKPOINT) and name != "config.json":
            (run_dir / name).unlink(missing_ok=True)
    return run_dir


def check_out(cfg: StudentConfig) -> None:
    """Refuse an --out that is no run directory (a file, a cache store, a folder of someone else's files: a run would
    overwrite their config.json or metrics.jsonl, --overwrite delete them), or one that holds a run's work (a
    finished run, or an interrupted one's checkpoint) unless --resume or --overwrite says what to do with it: checked
    before any set-up, and again when the directory is opened."""
    if cfg.out is None:
        return
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise KDCacheError(f"--out {out} is a file, not a run directory; choose another --out")
    if (out / "zarr.json").exists():
        raise KDCacheError(f"--out {out} is a cache store; choose another --out for the run directory")
    refuse_inside_store(out, "run")
    # Hidden entries (.gitkeep, .DS_Store) are no one's work, and no run writes a hidden name.
    foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in RUN_TEMPORARIES
                     ) if out.is_dir() else []
    if foreign and not is_run_dir(out):
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise KDCacheError(f"--out {out} is not empty and holds no kdcache run ({shown}); a run writes "
                           f"{', '.join(RUN_OUTPUTS)} there, so choose a new or empty --out")
    if cfg.resume or cfg.overwrite:
        return
    held = [n for n in ("summary.json", "student.pt", CHECKPOINT) if (out / n).exists()]
    if held:
        what = "a finished run" if held[0] != CHECKPOINT else "an interrupted run's checkpoint (--resume continues it)"
        raise KDCacheError(f"--out {cfg.out} holds {what}; --overwrite replaces it, or choose another --out")


RUN_LOCK = ".lock"  # hidden: no one's work (check_out), and never removed by --overwrite


@contextmanager
def run_lock(out: Path):
    """Hold --out for this run: two train-student runs started with one --out both passed its checks and wrote over
    each other's checkpoint and metrics. The lock file lies inside the run directory; a folder made here for it is
    removed again if the run fails before writing anything into it (`exclusive` has removed the lock file it made)."""
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = out.resolve() / RUN_LOCK
    try:
        with exclusive(str(lock), lambda who: f"another train-student ({who}) is writing run directory {out}; wait "
                                              "for it to end, or choose another --out"):
            yield
    except BaseException:
        # Only the empty folder: `exclusive` has removed the lock file it made, and released it. A lock file here now
        # is another run's, which may have taken --out meanwhile (or made the lock file first and refused us):
        # removing it, and the folder, let a third run hold --out beside it.
        if made:
            try:
                out.rmdir()
            except OSError:  # not empty (another run's lock, or work), or gone
                pass
        raise


def _new_dir(base: Path) -> Path:
    """`base`, or `base-2`, `base-3`, ...: the first that this process creates itself (mkdir is atomic)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        path = base if k == 1 else base.with_name(f"{base.name}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise KDCacheError(f"cannot find a free run directory next to {base}; pass --out")


def loss_weights(cfg: StudentConfig) -> dict[str, float]:
    """--loss parsed, with the losses weighted 0 left out: they neither run (no hint stage for `fitnets=0`) nor need
    their arrays in the store. FitNets' second stage trains the other losses, KD when --loss names no other; one
    whose other losses are all weighted 0 would have nothing to train there, and is refused."""
    named = parse_loss_spec(cfg.loss)
    weights = {k: w for k, w in named.items() if w > 0}
    if cfg.fitnets_schedule == "two-stage" and set(weights) == {"fitnets"} and len(named) > 1:
        raise KDCacheError(f"--loss {cfg.loss} weights every loss but fitnets 0, so FitNets' second stage would "
                           "train nothing; give one a weight > 0, drop them (KD follows the hint stage by default), "
                           "or use --fitnets-schedule single")
    return weights


def run_train_student(cfg: StudentConfig, log=print) -> dict:
    """Train a student from a store; under torchrun, one rank per process, each reading its share of the store."""
    weights = loss_weights(cfg)
    validate(cfg, weights)
    if cfg.out == "":  # unset (`--out "$RUN"`): the default, as for teacher, teacher-cache and bench; Path("") was
        cfg = replace(cfg, out=None)  # the current folder, which the run was written into (or refused as '.')
    if cfg.out is not None:
        cfg = replace(cfg, out=local_output(cfg.out, "--out"))
    cfg = replace(cfg, cache=find_cache(cfg.cache))  # a key from `kdcache ls` names its store
    ranks, ok = Ranks.from_env(), False
    try:
        with ExitStack() as held:  # the run directory's lock, from its first check to the run's end
            summary = _train(cfg, weights, log if ranks.leader else (lambda *_: None), ranks, held)
        ok = True
        return summary
    except (KeyboardInterrupt, OSError) as e:
        _advise_without_checkpoint(e, cfg)
        raise
    finally:
        ranks.close(clean=ok)


NO_CHECKPOINT = ("re-run the same command without --resume: no epoch had finished, so there is no checkpoint to "
                 "continue from")


def _advise_without_checkpoint(e: BaseException, cfg: StudentConfig) -> None:
    """After an interrupt or a full disk the CLI advises --resume; where no checkpoint exists yet (during set-up, or
    before the first epoch ended) that would fail: say to re-run without it. `fit` decides on rank 0, which knows its
    run directory; elsewhere (set-up, other ranks) the named --out tells, and an unnamed one had no training yet."""
    if getattr(e, "kdcache_checked", False):
        return
    if cfg.out is not None:
        if not (Path(cfg.out) / CHECKPOINT).exists():
            e.kdcache_then = NO_CHECKPOINT
    elif not getattr(e, "kdcache_in_fit", False):
        e.kdcache_then = NO_CHECKPOINT


def _train(cfg: StudentConfig, weights: dict[str, float], log, ranks: Ranks, held: ExitStack) -> dict:
    # Every rank sets up; a failure on any (a bad flag, data that differs) stops all with its one line, instead of
    # leaving the others to die waiting on the first gradient all-reduce.
    store, s, stream, state, run_dir = ranks.together(_set_up, cfg, weights, log, ranks, held)
    loader = SingleRowsJoined(make_loader(stream, cfg.workers, pin_memory=s.device.type == "cuda"), cfg.batch_size)
    targets = stream.targets
    codecs = {t: store.codec(t) for t in targets}

    def decode(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        return {t: c.decode(t, {p: batch[p].to(device, non_blocking=True) for p in store.targets[t]["parts"]})
                for t, c in codecs.items()}

    def steps(epoch: int) -> int:  # the batches epoch `epoch` gives every rank
        return stream.batches_per_epoch(cfg.workers, everyone=True, epoch=epoch)

    seen, other = ranks.first_other((store.manifest["key"], store.path), by=lambda kp: kp[0])
    if other is not None:  # e.g. another store under the same path on another node: its targets, averaged in silence
        raise KDCacheError(f"the ranks read different caches: rank 0 key {seen[0][0]} at {seen[0][1]}, rank {other} "
                           f"key {seen[other][0]} at {seen[other][1]}; every rank must read the same store")
    if ranks.world > 1 and any(steps(e) == 0 for e in range(cfg.epochs)):
        raise KDCacheError(f"{ranks.world} ranks x {max(1, cfg.workers)} loader workers share the store's "
                           f"{len(stream.blocks)} chunk(s), so some rank gets none; use fewer --workers or ranks, or "
                           "a cache with more chunks (a smaller teacher-cache --chunk-samples)")

    return fit(cfg, s, loader, stream.set_epoch, steps, decode, run_dir, log,
               extra={"cache": store.path, "ranks": ranks.world}, ranks=ranks, state=state)


def _set_up(cfg: StudentConfig, weights: dict[str, float], log, ranks: Ranks, held: ExitStack):
    """Open and check the store and data, build the student and its losses, the stream, the run directory (rank 0,
    which holds its lock in `held`)."""
    if ranks.leader:
        check_out(cfg)  # before the store, the data and the student: a refusal that needs none of them
        if cfg.out is not None:  # (a fresh directory, --out unset, is made by this process alone: _new_dir)
            held.enter_context(run_lock(Path(cfg.out)))
            check_out(cfg)  # again, now that no other run can change it
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    store = open_store(cfg.cache)
    man = store.manifest
    check_views(cfg, store)

    use_labels = store.labelled and not cfg.no_labels
    needs, _ = declared(weights, cfg)
    refuse_missing_labels(needs, use_labels, store.labelled, "cached data")
    store.require(needs)

    kind, _, folder = man["data"]["spec"].partition(":")
    if cfg.data is None and kind == "imagefolder" and not Path(folder).is_dir():  # ImageFolder's error names no flag
        raise KDCacheError(f"cache {store.path} was made from {man['data']['spec']}, which is no longer there; if the "
                           "data moved, pass --data imagefolder:DIR with where it lies now (checked to be the same "
                           "images)")
    source = open_source(cfg.data or man["data"]["spec"])
    differs = data_differs(source, man["data"])
    if differs:
        raise KDCacheError(f"data {source.spec} differs from what cache {store.path} was made from ({differs}); "
                           "re-run teacher-cache on this data")
    check_rows(store, source, use_labels)
    if source.fingerprint() != man["data"]["fingerprint"]:
        n = man["data"]["num_samples"]
        held = (f"its first {n} images, the ones the store holds (--limit {n}), are the same files and bytes"
                if source.num_samples > n else "the same files and bytes")
        log(f"note: {source.spec} is not exactly the data cache {store.path} was made from (other file times"
            f"{' or images added since' if source.num_samples > n else ''}), but {held}")
    tf = Transform.from_dict(man["transform"])
    teacher_shapes = {k: tuple(v["shape"]) for k, v in store.targets.items()}
    device = ranks.device(pick_device(cfg.device))  # one GPU per rank (LOCAL_RANK) before the student is built
    state = load_checkpoint_for(cfg, ranks.world, man["key"], device)  # every rank reads it (a shared run directory)
    s = setup(cfg, weights, source, tf, store.targets["logits"]["shape"][0], teacher_shapes, use_labels,
              man["teacher"].get("classes"), log if ranks.leader else lambda *_: None)
    s.cache_key = man["key"]

    targets = sorted(t for t in needs if t != "labels")
    stream = CacheStream(store, source, targets, cfg.batch_size, use_labels=use_labels,
                         buffer_chunks=cfg.buffer_chunks, seed=cfg.seed, view_policy=cfg.view_policy,
                         rank=ranks.rank, world=ranks.world)
    run_dir = open_run_dir(cfg, resuming=state is not None) if ranks.leader else None  # rank 0 writes the run
    resolved = {"config": asdict(cfg), "loss_weights": weights, "use_labels": use_labels, "device": str(s.device),
                "cache": {"path": store.path if is_url(store.path) else os.path.abspath(store.path),
                          "key": man.get("key"), "teacher": man["teacher"],
                          "data": {k: man["data"][k] for k in ("spec", "fingerprint", "num_samples")},
                          "views": man.get("views"), "targets": store.targets},
                "reader": {"buffer_chunks": stream.buffer_chunks, "streamed_arrays": stream.arrays,
                           # what a buffer holds at most: a worker's share of the store's chunks can be fewer
                           "buffer_chunks_used": min(stream.buffer_chunks, -(-len(stream.blocks) // (
                               max(1, cfg.workers) * ranks.world)))},
                "transform": tf.to_dict(), "test_data": s.test_spec, "student_shapes": s.student_shapes,
                "ranks": ranks.world, "versions": versions(),
                # on the CPU another thread count sums in another order: other weights, bit for bit
                "threads": torch.get_num_threads()}
    if run_dir is not None:
        write_config(run_dir, resolved)
        if cfg.out is None:  # named here: say where, so an interrupted run can be resumed
            log(f"run directory: {run_dir}")
    return store, s, stream, state, run_dir


def fit(cfg: StudentConfig, s: Setup, loader: Iterable[dict], set_epoch: Callable[[int], None],
        steps: Callable[[int], int], targets: Callable[[dict, torch.device], dict[str, torch.Tensor]],
        run_dir: Path | None, log, extra: dict, ranks: Ranks | None = None, state: dict | None = None) -> dict:
    """The training loop: batches of uint8 inputs (+ labels), teacher targets from `targets(batch, device)`.

    `steps(epoch)` is the number of batches epoch `epoch` delivers: it can differ between epochs (each loader worker
    ends with its own partial batch), so a stage's cosine schedule spans the sum over its own epochs and ends at 0.
    With several ranks (torchrun), each reads its own share of the store and takes `steps(epoch)` steps an epoch (the
    fewest any rank has batches for, so every rank takes part in every gradient average); gradients of the student
    and of the losses' own parts (FitNets' regressor) are averaged over ranks before each step, so every rank holds
    the same weights. Rank 0 alone evaluates and writes the run directory (`run_dir` is None elsewhere).

    After every epoch rank 0 writes checkpoint.pt (student, the losses' parts, optimizer, schedule position, metrics
    so far); `state` (a loaded checkpoint) continues from there: the same batches, schedule and optimizer state as
    an uninterrupted run, so on the CPU the same weights come out."""
    try:
        return _fit(cfg, s, loader, set_epoch, steps, targets, run_dir, log, extra, ranks, state)
    except (KeyboardInterrupt, OSError) as e:
        e.kdcache_in_fit = True
        if run_dir is not None:  # rank 0: its run directory says whether the CLI's --resume advice can work
            e.kdcache_checked = True
            if not (run_dir / CHECKPOINT).exists():
                e.kdcache_then = NO_CHECKPOINT
        raise
    finally:  # the loader's workers, not left to its garbage collection: see stop_workers
        stop_workers(loader)


def _fit(cfg, s, loader, set_epoch, steps, targets, run_dir, log, extra, ranks, state) -> dict:
    ranks = ranks or Ranks()
    student, losses, tf, device = s.student, s.losses, s.tf, s.device
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    if state is not None:
        try:  # the settings matched (load_checkpoint_for), but a module:function's code may have changed since
            student.load_state_dict(state["student"])
            for k, m in losses.items():
                m.load_state_dict(state["losses"][k])
        except (RuntimeError, KeyError) as e:
            raise KDCacheError(f"--resume: the checkpoint in {run_dir or cfg.out} does not fit student {cfg.student} "
                               f"as it is built now ({first_misfit(e)}); resume with the code it started with, or "
                               "use --overwrite instead of --resume to start over") from None
        # each rank its own numbers (its dropout masks drew as many as its own batches asked for); a checkpoint
        # from before kdcache kept them per rank has rank 0's alone
        mine = (state.get("rngs") or [])[ranks.rank:ranks.rank + 1]
        rng, cuda_rng = mine[0] if mine else (state.get("rng"), state.get("cuda_rng"))
        if rng is not None:
            torch.set_rng_state(rng)
        if cuda and isinstance(cuda_rng, torch.Tensor):  # this process's device
            torch.cuda.set_rng_state(cuda_rng, device)
    every = list(student.parameters()) + [p for m in losses.values() for p in m.parameters()]
    ranks.broadcast(every)  # one starting point on every rank
    metrics_path = run_dir / "metrics.jsonl" if run_dir is not None else None
    history = list(state["history"]) if state is not None else []
    if metrics_path is not None:  # the epochs the checkpoint holds (a row written after it is redone)
        metrics_path.write_text("".join(json.dumps(row) + "\n" for row in history))
    t_start, test_acc = time.time(), (history[-1]["test_acc"] if history else None)
    # a resumed run's time includes the epochs before the interruption (the checkpoint keeps their seconds)
    t_start -= float((state or {}).get("seconds", 0.0))
    epoch = int(state["epoch"]) if state is not None else 0
    if state is not None:
        log(f"resuming {run_dir or cfg.out} after epoch {epoch}/{cfg.epochs}")
        was = state.get("threads")
        if s.device.type == "cpu" and was is not None and was != torch.get_num_threads():
            # not refused (the run is as valid), but it will not be bit-for-bit the uninterrupted run
            log(f"note: the run began with {was} CPU threads and resumes with {torch.get_num_threads()}; sums "
                "then add in another order, so its weights will differ slightly from an uninterrupted run's "
                f"(OMP_NUM_THREADS={was} resumes it exactly)")
    if s.test is not None and s.test.fingerprint() == s.source_fingerprint:
        log(f"note: --test-data {s.test_spec} is the data the student trains on; its accuracy is no test")
    trained = [active for n, active in s.stages if n > 0]  # a hint-only two-stage run has an empty second stage
    last = trained[-1] if trained else s.stages[-1][1]
    if not any(w > 0 and losses[k].trains_logits for k, w in last.items()):
        log(f"note: no loss of the {'last stage' if len(trained) > 1 else 'run'} ({','.join(last)}) trains the "
            "student's classifier, so its accuracy is not that of a distilled student; add kd=1 or ce=1 for that")
    stage_start = 0
    for stage, (n_epochs, active) in enumerate(s.stages):
        first, stage_start = stage_start, stage_start + max(0, n_epochs)
        if n_epochs <= 0 or epoch >= stage_start:
            continue  # no epochs, or all of them in the checkpoint
        params = list(student.parameters()) + [p for k in active for p in losses[k].parameters()]
        # params the stage's losses do not reach get no grad, so neither optimizer touches them (no decay either)
        opt = OPTIMIZERS[cfg.optimizer](params, cfg.lr, cfg.weight_decay)
        total = sum(steps(e) for e in range(first, stage_start))
        step = 0
        if state is not None and epoch > first:  # resumed inside this stage: its optimizer and schedule go on
            opt.load_state_dict(state["opt"])
            step = int(state["step"])
        # FitNets alone (the hint stage) needs the student only up to its guided layer: the forward stops there
        cut = cfg.fitnets_guided if set(active) == {"fitnets"} else None
        for _ in range(stage_start - epoch):
            set_epoch(epoch)
            sums, seen, correct, t0 = {}, 0, 0, time.time()
            cap = steps(epoch) if ranks.world > 1 else None
            for i, batch in enumerate(to_device_ahead(loader, device)):
                if cap is not None and i >= cap:
                    break  # this rank's surplus batch(es): the other ranks have none to average with
                cosine_lr(opt, cfg.lr, step, total)
                x = tf(batch["x"].to(device, non_blocking=True))
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                labels = batch["labels"].to(device, non_blocking=True) if s.use_labels else None
                if labels is not None and s.label_map is not None:
                    labels = s.label_map[labels]
                teacher = targets(batch, device)
                with capture(student, s.student_layers) as sfeats, stop_after(student, cut), autocast:
                    try:
                        logits = student(x)
                    except StopForward:
                        logits = None
                    except ValueError as e:  # BatchNorm on a 1x1 map of a single sample: a worker with one row
                        raise KDCacheError(f"student {cfg.student} fails on a training batch of {len(x)} "
                                           f"({first_line(e)}); choose another --batch-size or --workers"
                                           ) from None
                # Losses in float32 (soft targets at high T and RKD's normalisations are precision-sensitive).
                b = Batch(student_logits=None if logits is None else logits.float(),
                          student_feats={k: v.float() for k, v in sfeats.items()},
                          teacher=teacher, labels=labels)
                parts = {}
                for name, w in active.items():
                    parts.update({k: w * v for k, v in losses[name](b).items()})
                loss = sum(parts.values())
                if not loss.requires_grad:  # a forward that detaches its output from the weights: backward would raise
                    raise KDCacheError(f"the loss ({','.join(active)}) does not depend on any trainable parameter of "
                                       f"student {cfg.student} (its forward detaches them, e.g. under torch.no_grad); "
                                       "nothing would be trained")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                ranks.average_gradients(params)
                opt.step()
                step += 1
                n = len(x)
                seen += n
                # Sums stay on the device until the epoch ends: an .item() per step would wait for the GPU each step.
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v.detach() * n
                if labels is not None and logits is not None:
                    correct += (logits.argmax(1) == labels).sum()
            sums, seen, correct = ranks.sum_numbers(sums, seen, correct)  # over every rank's samples
            if not seen:
                raise KDCacheError(f"epoch {epoch + 1} gave no batch; check --batch-size and the data")
            sums, correct = {k: float(v) for k, v in sums.items()}, int(correct)
            bad = [k for k, v in sums.items() if not math.isfinite(v)]
            if bad:  # no student.pt or summary.json: a diverged run must not look finished
                raise KDCacheError(f"training diverged in epoch {epoch + 1}: {', '.join(bad)} became "
                                   f"{sums[bad[0]]}; lower --lr (now {cfg.lr}) or the loss weights")
            dt = time.time() - t0
            test_acc = (evaluate(student, s.test, tf, device, s.test_labels)
                        if s.test is not None and ranks.leader else None)
            row = {"epoch": epoch + 1, "stage": stage + 1 if len(s.stages) > 1 else 1,
                   "losses": {k: v / seen for k, v in sums.items()},
                   "loss": sum(sums.values()) / seen,
                   "train_acc": correct / seen if s.use_labels and cut is None else None,
                   "test_acc": test_acc, "samples": seen, "samples_per_s": seen / dt, "seconds": dt}
            history.append(row)
            if metrics_path is not None:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            # every rank's RNG state (all ranks take part; rank 0 keeps them): ranks whose batches differ in size
            # have drawn different counts of dropout numbers, so each resumes with its own
            rngs = ranks.gather((torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None))
            if run_dir is not None:  # written whole, then renamed: a kill leaves the previous epoch's checkpoint
                save_whole({"epoch": epoch + 1, "stage": stage, "step": step, "student": student.state_dict(),
                            "losses": {k: m.state_dict() for k, m in losses.items()}, "opt": opt.state_dict(),
                            "history": history, "config": _comparable(cfg, ranks.world, s.cache_key, device),
                            "seconds": time.time() - t_start,
                            # dropout and other random layers go on with the numbers they would have drawn
                            "rng": torch.get_rng_state(),
                            "cuda_rng": torch.cuda.get_rng_state(device) if cuda else None,
                            "rngs": rngs, "threads": torch.get_num_threads()}, run_dir / CHECKPOINT,
                           f"re-run with --resume --out {run_dir} (the previous epoch's checkpoint is kept)" if epoch
                           else "re-run the same command without --resume (no epoch had finished before this one)")
            acc_txt = f"test acc {test_acc:.4f}" if test_acc is not None else "no test split"
            if cut is not None:  # the forward stopped at the guided layer: the classifier has not trained yet
                acc_txt += " (hint stage: layers after the guided one untrained)"
            log(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.4f}  {acc_txt}  "
                f"{row['samples_per_s']:,.0f} samples/s")
            epoch += 1

    params_fp = fingerprint_module(student, params_only=True)  # equal on every rank: gradients were averaged
    if run_dir is None:  # ranks other than 0: their weights are rank 0's
        return {"run_dir": None, "test_acc": None, "epochs": epoch, "loss": cfg.loss, "rank": ranks.rank,
                "params_fingerprint": params_fp}
    save_whole({"state_dict": student.cpu().state_dict(), "meta": {
        "arch": cfg.student, "num_classes": s.num_classes, "in_channels": tf.channels, "transform": tf.to_dict(),
        "classes": s.classes}}, run_dir / "student.pt",
        f"re-run with --resume --out {run_dir} (the last epoch's checkpoint is kept)")
    summary = {"run_dir": str(run_dir), "test_acc": test_acc, "epochs": epoch, "loss": cfg.loss,
               "seconds": time.time() - t_start,
               "samples_per_s": float(np.mean([h["samples_per_s"] for h in history])) if history else None,
               "seed": cfg.seed, "params_fingerprint": params_fp, **extra}
    # written whole, as the other outputs: a truncated summary.json (a full disk) would mark the run finished
    write_text_whole(run_dir / "summary.json", json.dumps(summary, indent=2),
                     f"re-run with --resume --out {run_dir} (the last epoch's checkpoint is kept)")
    (run_dir / CHECKPOINT).unlink(missing_ok=True)  # finished: student.pt is the result
    if test_acc is not None:
        log(f"student test accuracy {test_acc:.4f}  (run: {run_dir})")
    else:
        log(f"student trained (no labelled test split); run: {run_dir}")
    return summary
