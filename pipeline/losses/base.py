"""What every distillation loss declares and receives.

A loss is an nn.Module (it may own trainable parts, like FitNets' regressor) that declares:
- `teacher_arrays()`: the store arrays it reads (`logits`, `features/<module.path>`, `labels`); the student stage
  checks the store for them before training and refuses with a one-line error naming the missing array;
- `student_layers()`: the student modules (dotted paths) whose outputs it needs, captured with forward hooks;
- `trains_logits`: whether it reaches the student's logits (a run whose last stage has none trains only features,
  and says so: its test accuracy measures an untrained classifier).
`forward(batch)` gets a `Batch` and returns a dict of named, already-weighted parts; their sum is the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Batch:
    student_logits: torch.Tensor | None          # (n, C); None in FitNets' hint stage (the forward stops early)
    student_feats: dict[str, torch.Tensor]       # module path -> output, e.g. "block2": (n, c, h, w)
    teacher: dict[str, torch.Tensor]             # array name -> float32 target, e.g. "logits": (n, C)
    labels: torch.Tensor | None                  # (n,) int64, None on unlabelled data or with --no-labels


class DistillLoss(nn.Module):
    name = "?"
    trains_logits = False

    def teacher_arrays(self) -> list[str]:
        return []

    def student_layers(self) -> list[str]:
        return []

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError
