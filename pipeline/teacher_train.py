"""Train the default teacher (`make teacher`): a small ResNet-style CNN on Fashion-MNIST.

No weights can be downloaded, so the pipeline trains its own teacher once and saves it to
data/teachers/default.pt with the transform it was trained with; teacher-cache reuses that transform.
`kdcache teacher --arch SPEC --data SPEC --out FILE` trains any other the same way (its architecture, class names
and transform are recorded in FILE, and its metadata beside it as <stem>.json).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.data import (check_input_flags, class_map, data_root, default_transform, local_output, open_source,
                           parse_normalize, plain_fields, refuse_one_class)
from pipeline.errors import KDCacheError, first_line
from pipeline.loops import (batch_bounds, check_writable, cosine_lr, evaluate, pick_device, random_crop_flip,
                            save_whole, sgd, source_batches, training_checks, write_text_whole)
from pipeline.models import (build_model, check_logits, fingerprint_module, forward_failed,
                             forward_in_training_mode, refuse_untrainable)
from pipeline.store import refuse_inside_store


@dataclass
class TeacherTrainConfig:
    data: str = "fashion-mnist:train"
    test_data: str | None = None          # default: the data's own test split
    arch: str = "default-teacher"
    epochs: int = 14
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "auto"
    out: str | None = None                 # default: data/teachers/default.pt
    image_size: int | None = None          # resize the inputs (default: the data's own size)
    channels: int | None = None            # 1 or 3 (default: the data's own; an image folder's first image's)
    normalize: str | None = None           # "imagenet" or "MEAN/STD" (default: the data's own statistics)
    overwrite: bool = False                # replace an existing --out (else refused: caches key on its weights)

    def __post_init__(self):
        plain_fields(self)


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that would lose something, before the training: a folder, a name whose metadata sidecar
    (<stem>.json) is the weights file itself, an existing teacher, or an existing <stem>.json of no teacher. Every
    cache made from a teacher keys on its weights' fingerprint and records its path; replaced, verify --recompute
    and repair of those caches fail."""
    if out.is_dir():
        raise KDCacheError(f"--out {out} is a folder; give the weights file's name, e.g. {out / 'teacher.pt'}")
    refuse_inside_store(out, "teacher", out.parent)  # the weights every cache of it keys on
    if out.suffix.lower() == ".json":
        raise KDCacheError(f"--out {out} ends in .json, the name of the metadata written beside the weights "
                           f"(<stem>.json), which would overwrite them; use e.g. {out.with_suffix('.pt')}")
    if out.exists() and not overwrite:
        raise KDCacheError(f"--out {out} already exists, and caches made from it key on its weights (a new teacher "
                           "there leaves them unverifiable and unrepairable); choose another --out, or pass "
                           "--overwrite to replace it")
    sidecar = out.with_suffix(".json")
    if sidecar.exists() and not (out.exists() and overwrite):
        # --overwrite replaces a teacher and its own metadata; a .json of that name with no weights beside it is
        # someone else's file, and is not written over.
        raise KDCacheError(f"--out {out} would write its metadata to {sidecar}, which already exists; move that "
                           "file away or choose another --out")
    check_writable(out.parent, "--out")


def probe(model: nn.Module, name: str, x: torch.Tensor, num_classes: int) -> None:
    """One forward in training mode (as the training runs it) on a tiny batch: a model that fails on this input
    or returns no (batch, classes) scores is refused in one line before any training, not with a traceback at its
    first step. Leaves the model and the random numbers as they were (BatchNorm statistics, dropout draws)."""
    try:
        out = forward_in_training_mode(model, x)
    except Exception as e:  # noqa: BLE001 - the user's model, e.g. a 3-channel torchvision model on grey data
        raise forward_failed(name, x, e) from None
    check_logits(name, out)
    if out.shape[1] != num_classes:
        raise KDCacheError(f"{name} returns {out.shape[1]} class scores per sample, but the data has {num_classes} "
                           f"classes; build it with num_classes={num_classes} (a module:function is passed "
                           "num_classes= when it accepts it)")
    refuse_untrainable(model, name)


def refuse_diverged(model: nn.Module, loss_sum: float, epoch: int, lr: float) -> None:
    """Stop a diverged run before it saves anything: a teacher of NaN weights would cache NaN targets. The last
    step's update is in no loss yet, so the weights are checked too."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if not math.isfinite(loss_sum) or bad:
        what = f"the loss became {loss_sum}" if not math.isfinite(loss_sum) else f"weight {bad[0]} became non-finite"
        raise KDCacheError(f"training diverged in epoch {epoch + 1}: {what}; lower --lr (now {lr}); nothing was "
                           "saved")


def run_teacher_train(cfg: TeacherTrainConfig, log=print) -> dict:
    from pipeline.ranks import one_process_only

    one_process_only("kdcache teacher trains in one process, not {ranks} torchrun ranks; run it without torchrun")
    for ok, msg in training_checks(cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.seed):
        if not ok:
            raise KDCacheError(msg)
    check_input_flags(cfg.image_size, cfg.channels)
    if cfg.normalize is not None:
        parse_normalize(cfg.normalize, cfg.channels)  # its syntax, before any data is opened
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(local_output(cfg.out, "--out")) if cfg.out else data_root() / "teachers" / "default.pt"
    check_out(out, cfg.overwrite)  # before the training, not after it
    src = open_source(cfg.data)
    refuse_one_class(src)
    if src.empty_classes:  # kept (README: they hold the later classes' numbers), but said: e.g. a docs/ folder
        log(f"note: class folder(s) {', '.join(src.empty_classes[:5])} hold no images; each still takes a class "
            "number and a teacher output no image trains: remove such folders from the data unless meant")
    if not src.labelled:
        raise KDCacheError(f"{cfg.data} has no labels, and training a teacher needs them; use labelled data "
                           "(imagefolder:DIR with one sub-folder per class)")
    held_out = cfg.test_data or src.test_spec()
    test = open_source(held_out or cfg.data)  # without a test split, accuracy on the training data (said so)
    if not test.labelled:  # else found only after the training, when scoring it
        raise KDCacheError(f"test data {held_out} has no labels; pass a labelled --test-data (imagefolder:DIR with "
                           "one sub-folder per class)")
    test_labels = class_map(test, src.classes)
    tf = default_transform(src, cfg.image_size, cfg.channels)
    if cfg.normalize is not None:  # recorded in the transform below: teacher-cache and eval feed it the same
        tf.mean, tf.std = parse_normalize(cfg.normalize, tf.channels)
    model = build_model(cfg.arch, src.num_classes, tf.channels, tf.size).to(device)
    probe(model, f"teacher {cfg.arch}", src.load(np.arange(min(2, src.num_samples)), tf).to(device), src.num_classes)
    opt = sgd(model.parameters(), cfg.lr, cfg.weight_decay)  # after the probe: a lazy module has its weights now
    steps_per_epoch = len(batch_bounds(src.num_samples, cfg.batch_size))
    total, step = cfg.epochs * steps_per_epoch, 0
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    acc = 0.0
    for epoch in range(cfg.epochs):
        model.train()
        losses = torch.zeros((), device=device)  # summed on the device: no .item() wait per step
        for _idx, x, y in source_batches(src, tf, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch):
            cosine_lr(opt, cfg.lr, step, total, warmup=steps_per_epoch // 2)
            x = random_crop_flip(x, gen)
            try:
                logits = model(x.to(device))
            except ValueError as e:  # BatchNorm on one sample (--batch-size 1): the 2-sample probe cannot see it
                raise KDCacheError(f"teacher {cfg.arch} fails on a training batch of {len(x)} ({first_line(e)}); "
                                   "choose a larger --batch-size") from None
            loss = nn.functional.cross_entropy(logits, y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses += loss.detach() * len(x)  # the epoch's loss is the mean over its samples, as a student's
            step += 1
        refuse_diverged(model, float(losses), epoch, cfg.lr)
        acc = evaluate(model, test, tf, device, test_labels)
        # the epoch's mean loss, as train-student logs it: the last batch's alone was one batch's noise
        log(f"teacher epoch {epoch + 1}/{cfg.epochs}  loss {float(losses) / src.num_samples:.4f}  "
            f"{'test' if held_out else 'train'} acc {acc:.4f}  "
            f"({time.time() - t0:.0f}s)")
    model.cpu()
    meta = {"arch": cfg.arch, "num_classes": src.num_classes, "in_channels": tf.channels,
            "transform": tf.to_dict(), "data": src.describe(), "test_data": held_out,
            # without a test split it is accuracy on the training data, and named so
            ("test_accuracy" if held_out else "train_accuracy"): acc,
            "train_seconds": time.time() - t0, "config": asdict(cfg), "fingerprint": fingerprint_module(model)}
    # The metadata is written whole under a temporary name before the weights, and renamed only once they are
    # saved: written after them, a cut in between (Ctrl-C, a full disk) left the metadata of the teacher --overwrite
    # replaced beside the new weights (another fingerprint, another accuracy, which results reads).
    sidecar = out.with_suffix(".json")
    pending = sidecar.with_name(sidecar.name + ".new")
    write_text_whole(pending, json.dumps(meta, indent=2), "re-run `kdcache teacher`")
    try:
        save_whole({"state_dict": model.state_dict(), "meta": meta}, out, "re-run `kdcache teacher`")
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    pending.replace(sidecar)
    log(f"teacher {'test' if held_out else 'train (no test split)'} accuracy {acc:.4f}; saved {out}")
    baseline = no_better_than(acc, test, test_labels, src.classes)
    if baseline:
        log(f"note: {baseline}: this teacher has learned nothing worth distilling; train it longer (--epochs) or "
            f"with another --lr (now {cfg.lr})")
    return meta | {"path": str(out)}


def no_better_than(acc: float, test, label_map: np.ndarray | None, classes: list[str]) -> str | None:
    """What a constant guess scores when `acc` does not beat it (a rate so high training never settles, too few
    epochs): always answering the most frequent class of the data it was scored on (the test data, or without a test
    split the training data). Such a teacher is saved (its caller asked for it), but said to be worthless before
    hours of caching and distilling from it. None when the teacher beats it."""
    labels = test.labels(np.arange(test.num_samples))
    if label_map is not None:
        labels = label_map[labels]
    counts = np.bincount(labels, minlength=len(classes))
    top = int(counts.argmax())
    share = counts[top] / max(1, len(labels))
    if acc > share or acc >= 1:  # every sample right is never "nothing learned" (a test set of one class has share 1)
        return None
    return (f"its accuracy {acc:.4f} is no better than always answering '{classes[top]}' ({share:.4f} of the "
            "evaluated samples)")
