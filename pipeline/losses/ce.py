"""Cross-entropy with the hard labels: the 'student from labels only' baseline and the task term of RKD runs."""

from __future__ import annotations

import torch.nn.functional as F

from pipeline.losses.base import Batch, DistillLoss


class CrossEntropy(DistillLoss):
    name = "ce"
    trains_logits = True

    def __init__(self, **_):
        super().__init__()

    def teacher_arrays(self):
        return ["labels"]

    def forward(self, batch: Batch):
        return {"ce": F.cross_entropy(batch.student_logits, batch.labels)}
