"""`kdcache eval`: a trained model's accuracy on any labelled data (a student's `student.pt`, a teacher's weights).

A run directory's `student.pt` records what is needed to score it anywhere: its architecture, the input transform
it was trained on (the cache's) and the class names in its output order. Test labels are matched to those names,
as the student stage does (`data.class_map`), so a test folder lacking a class cannot shift every later label.
A bare state_dict (e.g. torchvision weights) needs `--model` and gets the data's default transform unless
`--image-size` / `--channels` / `--normalize` say otherwise.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data import class_map, open_source, plain_fields, resolve_transform
from pipeline.errors import KDCacheError, first_line
from pipeline.loops import pick_device, source_batches
from pipeline.models import check_logits, classifier_width, load_checkpoint, load_model


@dataclass
class EvalConfig:
    weights: str                         # student.pt, a teacher's .pt, or a bare state_dict
    data: str = "fashion-mnist:test"     # labelled data spec
    model: str | None = None             # architecture (default: the one the weights file records)
    image_size: int | None = None        # override the recorded transform, as teacher-cache's flags do
    channels: int | None = None
    normalize: str | None = None
    batch_size: int = 512
    device: str = "auto"

    def __post_init__(self):
        plain_fields(self)


def run_eval(cfg: EvalConfig, log=print) -> dict:
    """Top-1 (and top-5 with ≥ 5 outputs) accuracy, per-class accuracy and the confusion matrix of a weights file
    on labelled data, its labels in the model's class order."""
    if cfg.batch_size < 1:
        raise KDCacheError(f"--batch-size must be at least 1 (got {cfg.batch_size})")
    if not str(cfg.weights).strip():  # pathlib reads "" as the current folder
        raise KDCacheError("the weights path is empty; pass a weights file, e.g. a run's student.pt")
    ckpt = load_checkpoint(Path(cfg.weights))
    meta = ckpt.get("meta", {})
    meta = meta if isinstance(meta, dict) else {}
    spec = cfg.model or meta.get("arch")
    if not spec:
        raise KDCacheError(f"{cfg.weights} does not record its architecture; pass --model (e.g. default-student, "
                           "torchvision:resnet18, module:function)")
    source = open_source(cfg.data)
    if not source.labelled:
        raise KDCacheError(f"{cfg.data} has no labels to score against; pass labelled data (class sub-folders)")
    classes = meta.get("classes") or (meta.get("data") or {}).get("classes")  # student.pt / a teacher's file
    lut = class_map(source, classes, flag="--data")
    # Without a record, the output count is read off the weights (as teacher-cache does on unlabelled data): built
    # with the data's class count, a model of 10 outputs could not be scored on data holding 3 of its classes, which
    # the confusion below allows for (label i is output i). The data's count when the weights do not say.
    num_classes = len(classes) if classes else (classifier_width(ckpt["state_dict"]) or source.num_classes)
    tf = resolve_transform(source, meta, cfg.image_size, cfg.channels, cfg.normalize)
    device = pick_device(cfg.device)
    model, _ = load_model(spec, Path(cfg.weights), num_classes, tf.channels, tf.size,
                          fix="check --model, and --image-size / --channels if given (the input size can set a "
                              "layer's size)")
    model.to(device)
    names = list(classes) if classes else list(source.classes)
    k = len(names)
    confusion = None  # rows: true class, columns: predicted output (a teacher may have more outputs than classes)
    top5 = 0
    with torch.inference_mode():
        for _idx, x, y in source_batches(source, tf, cfg.batch_size):
            y = torch.from_numpy(lut)[y] if lut is not None else y
            try:
                out = model(x.to(device))
            except Exception as e:  # noqa: BLE001 - a user model on the wrong input
                raise KDCacheError(f"{spec} fails on input {tuple(x.shape[1:])} ({type(e).__name__}: "
                                   f"{first_line(e)}); set --image-size / --channels to what it expects") from None
            check_logits(spec, out)  # a tuple is no input problem: named as such, not as one --image-size can fix
            out = out.float().cpu()
            if out.ndim != 2 or out.shape[1] < k:
                raise KDCacheError(f"{spec} gives outputs of shape {tuple(out.shape[1:])} per sample, but the labels "
                                   f"have {k} classes; check --model and --data")
            if confusion is None:  # extra outputs (classes the data lacks) can be predicted, and are then wrong
                confusion = np.zeros((k, out.shape[1]), dtype=np.int64)
            np.add.at(confusion, (y.numpy(), out.argmax(1).numpy()), 1)
            if out.shape[1] >= 5:
                top5 += (out.topk(5, dim=1).indices == y[:, None]).any(1).sum().item()
    n = int(confusion.sum())
    per_class = {c: (float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None)
                 for i, c in enumerate(names)}
    result = {"weights": cfg.weights, "model": spec, "data": cfg.data, "samples": n,
              "top1": float(np.trace(confusion) / n), "top5": top5 / n if confusion.shape[1] >= 5 else None,
              "per_class": per_class, "confusion": confusion.tolist(), "classes": names,
              "transform": tf.to_dict(), "config": asdict(cfg)}
    log(f"{spec} on {cfg.data}: top-1 {result['top1']:.4f}"
        + (f"  top-5 {result['top5']:.4f}" if result["top5"] is not None else "") + f"  ({n:,} samples)")
    return result


def dumps(result: dict) -> str:
    return json.dumps(result, indent=2)
