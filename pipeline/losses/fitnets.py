"""FitNets: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015).

A convolutional regressor r maps the student's guided layer v (n, c_s, h_s, w_s) to the shape of the teacher's hint
u (n, c_t, h_t, w_t), and the loss is the mean squared error between u and r(v). (The paper writes 1/2 ||u - r(v)||^2
summed; the mean over elements keeps the weight independent of the hint's size.)

The regressor is a 3x3 convolution c_s -> c_t (padding 1: spatial size kept). When the spatial sizes differ, the
student map is first resized to (h_t, w_t): adaptive average pooling when larger, bilinear upsampling when smaller.
Hints that are vectors (n, d) use a linear regressor; a 1x1 map (n, c, 1, 1), such as a pooled layer, counts as
the vector (n, c) when the other side is a vector.

Schedule (chosen in the student stage): `two-stage` trains the student up to the guided layer plus r on this loss
alone for the hint epochs, then the whole student with the other losses (the paper); `single` adds this loss with
its weight throughout.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from pipeline.losses.base import Batch, DistillLoss
from pipeline.store import feature_array


def _vector_of(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(c, 1, 1) -> (c,): a pooled map holds one value per channel, as a vector does."""
    return shape[:1] if len(shape) == 3 and tuple(shape[1:]) == (1, 1) else shape


def make_regressor(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """Shapes exclude the batch axis: (c, h, w) maps or (d,) vectors; a 1x1 map beside a vector is a vector."""
    if (len(student_shape) == 1) != (len(teacher_shape) == 1):
        student_shape, teacher_shape = _vector_of(tuple(student_shape)), _vector_of(tuple(teacher_shape))
    if len(student_shape) == 3 and len(teacher_shape) == 3:
        return nn.Conv2d(student_shape[0], teacher_shape[0], kernel_size=3, padding=1)
    if len(student_shape) == 1 and len(teacher_shape) == 1:
        return nn.Linear(student_shape[0], teacher_shape[0])
    raise ValueError(f"FitNets needs two feature maps (C,H,W) or two vectors (D,); got student {student_shape} "
                     f"and teacher {teacher_shape}; choose a --fitnets-guided layer of the same kind as "
                     "--fitnets-hint")


class FitNets(DistillLoss):
    name = "fitnets"

    def __init__(self, hint: str = "layer3", guided: str = "block2", student_shapes=None, teacher_shapes=None, **_):
        super().__init__()
        self.hint, self.guided = hint, guided
        self.hint_array = feature_array(hint)
        self.teacher_shape = tuple(teacher_shapes[self.hint_array]) if teacher_shapes else None
        self.regressor = make_regressor(tuple(student_shapes[guided]), self.teacher_shape) if student_shapes else None

    def teacher_arrays(self):
        return [self.hint_array]

    def student_layers(self):
        return [self.guided]

    def project(self, v):
        """r(v) with the teacher hint's shape (a vector, for a linear regressor)."""
        if isinstance(self.regressor, nn.Linear):
            return self.regressor(v.flatten(1))
        if v.dim() == 4:
            th, tw = self.teacher_shape[1:]
            if v.shape[-2:] != (th, tw):
                if v.shape[-2] >= th and v.shape[-1] >= tw:
                    v = F.adaptive_avg_pool2d(v, (th, tw))
                else:
                    v = F.interpolate(v, size=(th, tw), mode="bilinear", align_corners=False)
        return self.regressor(v)

    def forward(self, batch: Batch):
        u = batch.teacher[self.hint_array]
        r = self.project(batch.student_feats[self.guided])
        return {"fitnets": F.mse_loss(r, u.flatten(1) if r.dim() == 2 else u)}
