"""RKD: Park, Kim, Lu & Cho, "Relational Knowledge Distillation" (CVPR 2019).

Embeddings: teacher t (n, d_t) from a cached layer, student s (n, d_s) from a student module, both flattened; the
dimensions may differ because only relations between samples are compared.

Distance-wise: psi_D(i, j) = ||e_i - e_j||_2 / mu, mu = mean of ||e_i - e_j||_2 over pairs i != j in the batch
    (teacher and student each normalised by their own mu);  L_D = Huber(psi_D^s, psi_D^t) averaged over the full
    n x n matrix (the zero diagonal included, as in the authors' reference code: (n-1)/n times the mean over pairs).
Angle-wise: for triplets (i, j, k), psi_A = <(e_i - e_j)/||e_i - e_j||, (e_k - e_j)/||e_k - e_j||>, the cosine of
    the angle at j;  L_A = Huber(psi_A^s, psi_A^t) averaged over all n^3 entries (degenerate i = j or k = j entries
    are 0 on both sides, again as in the reference code).
Huber = smooth L1 with delta 1. Weights default to the paper's 25 (distance) and 50 (angle). The teacher side gets
no gradient (it is a cached target anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.base import Batch, DistillLoss
from pipeline.store import feature_array


def pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """(n, d) -> (n, n) Euclidean distances, exact zeros on the diagonal.

    |a|^2 + |b|^2 - 2ab cancels catastrophically when the embeddings share a large offset (float32: distances of
    0.1 around a mean of 1000 come out as 0); distances do not depend on where the origin is, so centre first."""
    e = e - e.mean(0, keepdim=True)
    sq = e.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp_min(1e-12)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def distance_potential(e: torch.Tensor) -> torch.Tensor:
    """Pairwise distances divided by their mean over i != j."""
    d = pairwise_distances(e)
    n = len(e)
    mu = d.sum() / max(n * (n - 1), 1)
    return d / mu.clamp_min(1e-12)


def angle_potential(e: torch.Tensor) -> torch.Tensor:
    """(n, d) -> (n, n, n): entry [i, j, k] = cosine of the angle at j between i and k."""
    diff = F.normalize(e[:, None, :] - e[None, :, :], p=2, dim=2)   # [i, j] = unit(e_i - e_j)
    return torch.einsum("ijd,kjd->ijk", diff, diff)


def rkd_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(distance_potential(s), distance_potential(t))


def rkd_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(angle_potential(s), angle_potential(t))


class RKD(DistillLoss):
    name = "rkd"

    def __init__(self, layer: str = "avgpool", student_layer: str = "embed", distance_weight: float = 25.0,
                 angle_weight: float = 50.0, **_):
        super().__init__()
        self.layer, self.student_layer = layer, student_layer
        self.array = feature_array(layer)
        self.wd, self.wa = distance_weight, angle_weight

    def teacher_arrays(self):
        return [self.array]

    def student_layers(self):
        return [self.student_layer]

    def forward(self, batch: Batch):
        # one row per sample; reshape, not flatten(1): a layer giving one number per sample, (n,), is a 1-d
        # embedding (flatten(1) raised IndexError on it)
        s, t = batch.student_feats[self.student_layer], batch.teacher[self.array].detach()
        s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
        parts = {}
        if self.wd:
            parts["rkd_distance"] = self.wd * rkd_distance(s, t)
        if self.wa:
            parts["rkd_angle"] = self.wa * rkd_angle(s, t)
        return parts
