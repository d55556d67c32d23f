"""Distillation losses, one per file, and the registry the student stage builds them from.

`--loss kd=1,fitnets=1,rkd=1` names entries of LOSSES with their weights (see `parse_loss_spec`).
"""

from __future__ import annotations

import math

from pipeline.errors import KDCacheError
from pipeline.losses.base import Batch, DistillLoss
from pipeline.losses.ce import CrossEntropy
from pipeline.losses.fitnets import FitNets
from pipeline.losses.kd import KD
from pipeline.losses.rkd import RKD

LOSSES: dict[str, type[DistillLoss]] = {"ce": CrossEntropy, "kd": KD, "fitnets": FitNets, "rkd": RKD}

__all__ = ["LOSSES", "Batch", "DistillLoss", "parse_loss_spec"]


def parse_loss_spec(spec: str) -> dict[str, float]:
    """'kd=1,rkd=0.5' -> {'kd': 1.0, 'rkd': 0.5}; a bare name has weight 1; weights of 0 are kept (the student
    stage leaves those losses out: `train_student.loss_weights`)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, w = (x.strip() for x in part.partition("="))
        if name not in LOSSES:
            raise KDCacheError(f"unknown loss '{name}' in --loss; choose from {', '.join(LOSSES)}")
        if name in out:
            raise KDCacheError(f"loss '{name}' appears twice in --loss; give each loss once")
        if eq and not w:  # `kd=`: a weight left out (often a shell variable that expanded to nothing), not 1
            raise KDCacheError(f"loss '{name}' in --loss has '=' but no weight; write e.g. {name}=1, or {name} alone "
                               "for weight 1")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            weight = float("nan")
        if not math.isfinite(weight) or weight < 0:
            raise KDCacheError(f"bad weight '{w}' for loss '{name}'; use a finite number >= 0, e.g. {name}=1.0")
        out[name] = weight
    if not out:
        raise KDCacheError("--loss is empty; e.g. --loss kd=1 or --loss kd=1,rkd=1")
    if not any(out.values()):
        raise KDCacheError(f"every weight in --loss {spec} is 0; nothing would be trained: give one a weight > 0")
    return out
