"""KD: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015).

soft   = T^2 * KL( softmax(t/T) || softmax(s/T) ), averaged over the batch
          (the T^2 keeps the soft term's gradient scale independent of T, as the paper prescribes);
hard   = cross-entropy(s, y) at T = 1;
loss   = (1 - alpha) * soft + alpha * hard   when labels are present (the paper: a considerably lower hard weight),
       = soft                                 on unlabelled data or with --no-labels.

Shapes: student logits s (n, C), teacher logits t (n, C) from the store's `logits` array (raw: T is chosen here).
"""

from __future__ import annotations

import torch.nn.functional as F

from pipeline.losses.base import Batch, DistillLoss


def kd_soft(student_logits, teacher_logits, temperature: float):
    """T^2 * mean over samples of KL(p_t || p_s) with p = softmax(z / T)."""
    T = temperature
    log_ps = F.log_softmax(student_logits / T, dim=1)
    log_pt = F.log_softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * (T * T)


class KD(DistillLoss):
    name = "kd"
    trains_logits = True

    def __init__(self, temperature: float = 4.0, alpha: float = 0.1, **_):
        super().__init__()
        self.temperature, self.alpha = temperature, alpha

    def teacher_arrays(self):
        return ["logits"]

    def forward(self, batch: Batch):
        soft = kd_soft(batch.student_logits, batch.teacher["logits"], self.temperature)
        if batch.labels is None:
            return {"kd_soft": soft}
        hard = F.cross_entropy(batch.student_logits, batch.labels)
        return {"kd_soft": (1 - self.alpha) * soft, "kd_hard": self.alpha * hard}
