"""Distillation losses checked against independent hand computations.

Every reference below is written with plain Python loops / `math` / numpy on small seeded CPU tensors; none of them
calls the torch functions the implementation uses (log_softmax, kl_div, cross_entropy, smooth_l1_loss, normalize,
adaptive_avg_pool2d, interpolate, conv2d, mse_loss, ...). Most comparisons run in float64 so the tolerances can be
tight (rel 1e-5 or better) and a wrong formula cannot hide behind rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.errors import KDCacheError
from pipeline.losses import LOSSES, Batch, parse_loss_spec
from pipeline.losses.ce import CrossEntropy
from pipeline.losses.fitnets import FitNets, make_regressor
from pipeline.losses.kd import KD, kd_soft
from pipeline.losses.rkd import (RKD, angle_potential, distance_potential, pairwise_distances, rkd_angle,
                                 rkd_distance)

REL = 1e-5
DT = torch.float64


def close(a, b, rel=REL, abs_=1e-9):
    a, b = (float(x.detach()) if isinstance(x, torch.Tensor) else float(x) for x in (a, b))
    assert math.isclose(a, b, rel_tol=rel, abs_tol=abs_), f"{a!r} != {b!r} (rel {rel})"


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, scale=1.0, dtype=DT):
    return torch.randn(*shape, generator=gen(seed), dtype=dtype) * scale


# ----------------------------------------------------------------------------------------------------------------
# hand references (pure python / numpy)
# ----------------------------------------------------------------------------------------------------------------

def h_softmax(row, T=1.0):
    z = [x / T for x in row]
    m = max(z)
    ex = [math.exp(x - m) for x in z]
    s = sum(ex)
    return [e / s for e in ex]


def h_kl(p, q):
    """KL(p || q) = sum_c p_c (log p_c - log q_c)."""
    return sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q) if pc > 0)


def h_kl_batchmean(s, t, T):
    """mean over samples of KL(softmax(t/T) || softmax(s/T)), no T^2."""
    s, t = s.tolist(), t.tolist()
    return sum(h_kl(h_softmax(tr, T), h_softmax(sr, T)) for sr, tr in zip(s, t)) / len(s)


def h_ce(logits, labels):
    """mean over samples of -log softmax(z)_y."""
    logits, labels = logits.tolist(), labels.tolist()
    tot = 0.0
    for row, y in zip(logits, labels):
        m = max(row)
        lse = m + math.log(sum(math.exp(x - m) for x in row))
        tot += lse - row[y]
    return tot / len(logits)


def h_huber(a, b, delta=1.0):
    x = abs(a - b)
    return 0.5 * x * x / delta if x < delta else x - 0.5 * delta


def h_dist_matrix(e):
    e = e.tolist()
    n = len(e)
    return [[math.sqrt(sum((a - b) ** 2 for a, b in zip(e[i], e[j]))) for j in range(n)] for i in range(n)]


def h_distance_potential(e):
    d = h_dist_matrix(e)
    n = len(d)
    mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return [[d[i][j] / mu for j in range(n)] for i in range(n)]


def h_unit(v):
    nrm = math.sqrt(sum(x * x for x in v))
    return [x / nrm for x in v]


def h_angle(e, i, j, k):
    """cos of the angle at e_j between e_i and e_k (i != j, k != j)."""
    a = h_unit([x - y for x, y in zip(e[i], e[j])])
    b = h_unit([x - y for x, y in zip(e[k], e[j])])
    return sum(x * y for x, y in zip(a, b))


def h_conv3x3_pad1(x, w, b):
    """x (n, ci, h, w), w (co, ci, 3, 3), b (co,) as numpy arrays -> (n, co, h, w); cross-correlation like torch."""
    n, ci, H, W = x.shape
    co = w.shape[0]
    xp = np.zeros((n, ci, H + 2, W + 2))
    xp[:, :, 1:-1, 1:-1] = x
    out = np.zeros((n, co, H, W))
    for s in range(n):
        for o in range(co):
            for r in range(H):
                for c in range(W):
                    acc = b[o]
                    for q in range(ci):
                        for dr in range(3):
                            for dc in range(3):
                                acc += w[o, q, dr, dc] * xp[s, q, r + dr, c + dc]
                    out[s, o, r, c] = acc
    return out


def h_block_mean(x, th, tw):
    """Adaptive average pooling when the size divides evenly: mean over non-overlapping blocks."""
    n, c, H, W = x.shape
    assert H % th == 0 and W % tw == 0
    bh, bw = H // th, W // tw
    out = np.zeros((n, c, th, tw))
    for r in range(th):
        for q in range(tw):
            out[:, :, r, q] = x[:, :, r * bh:(r + 1) * bh, q * bw:(q + 1) * bw].mean(axis=(2, 3))
    return out


def h_bilinear(x, th, tw):
    """Bilinear resize with align_corners=False (half-pixel centres, source clamped at 0)."""
    n, c, H, W = x.shape

    def taps(out_size, in_size):
        res = []
        scale = in_size / out_size
        for o in range(out_size):
            src = max((o + 0.5) * scale - 0.5, 0.0)
            i0 = min(int(math.floor(src)), in_size - 1)
            i1 = min(i0 + 1, in_size - 1)
            lam = src - i0
            res.append((i0, i1, lam))
        return res

    out = np.zeros((n, c, th, tw))
    for r, (r0, r1, lr) in enumerate(taps(th, H)):
        for q, (c0, c1, lc) in enumerate(taps(tw, W)):
            out[:, :, r, q] = ((1 - lr) * ((1 - lc) * x[:, :, r0, c0] + lc * x[:, :, r0, c1])
                               + lr * ((1 - lc) * x[:, :, r1, c0] + lc * x[:, :, r1, c1]))
    return out


def h_mse(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(((a - b) ** 2).sum() / a.size)


# ----------------------------------------------------------------------------------------------------------------
# KD (Hinton et al. 2015)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_soft_matches_hand_kl_times_T_squared(T):
    s, t = randn(5, 7, seed=1, scale=2.0), randn(5, 7, seed=2, scale=3.0)
    kl = h_kl_batchmean(s, t, T)
    got = kd_soft(s, t, T)
    close(got, T * T * kl)
    # T^2 scaling: soft / unscaled KL == T^2 exactly (up to rounding)
    close(got / kl, T * T)


def test_kd_soft_direction_is_kl_teacher_to_student():
    """KL is asymmetric: the loss must be KL(p_t || p_s), not KL(p_s || p_t)."""
    s, t = randn(4, 6, seed=3, scale=2.0), randn(4, 6, seed=4, scale=2.0)
    T = 2.0
    forward = T * T * h_kl_batchmean(s, t, T)
    reverse = T * T * h_kl_batchmean(t, s, T)     # KL(p_s || p_t)
    assert abs(forward - reverse) > 1e-3          # the check below discriminates
    close(kd_soft(s, t, T), forward)


def test_kd_soft_float32_inputs():
    s, t = randn(6, 10, seed=5, dtype=torch.float32), randn(6, 10, seed=6, dtype=torch.float32)
    close(kd_soft(s, t, 4.0), 16.0 * h_kl_batchmean(s.double(), t.double(), 4.0), rel=1e-4)


@pytest.mark.parametrize("T,alpha", [(4.0, 0.1), (1.0, 0.5), (2.5, 0.0)])
def test_kd_with_labels_is_weighted_soft_plus_hard(T, alpha):
    s, t = randn(6, 5, seed=7, scale=2.0), randn(6, 5, seed=8, scale=2.0)
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    parts = KD(temperature=T, alpha=alpha)(Batch(s, {}, {"logits": t}, y))
    assert set(parts) == {"kd_soft", "kd_hard"}
    soft = T * T * h_kl_batchmean(s, t, T)
    hard = h_ce(s, y)
    close(parts["kd_soft"], (1 - alpha) * soft)
    close(parts["kd_hard"], alpha * hard, abs_=1e-12)
    close(sum(parts.values()), (1 - alpha) * soft + alpha * hard)


def test_kd_without_labels_returns_only_soft_part():
    s, t = randn(4, 5, seed=9), randn(4, 5, seed=10)
    kd = KD(temperature=3.0, alpha=0.3)
    parts = kd(Batch(s, {}, {"logits": t}, None))
    assert set(parts) == {"kd_soft"}
    close(parts["kd_soft"], 9.0 * h_kl_batchmean(s, t, 3.0))   # full soft term, not (1 - alpha) * soft
    assert kd.teacher_arrays() == ["logits"]


def test_kd_zero_when_student_equals_teacher():
    t = randn(5, 8, seed=11, scale=3.0)
    assert abs(float(kd_soft(t.clone(), t, 4.0))) < 1e-12
    parts = KD(temperature=4.0)(Batch(t.clone(), {}, {"logits": t}, None))
    assert abs(float(parts["kd_soft"])) < 1e-12


def test_kd_soft_gradient_matches_hinton_closed_form():
    """d soft / d s = T^2 * (p_s - p_t) / (T * n) = T * (p_s - p_t) / n (Hinton eq. 2 times T^2, batch mean)."""
    T, n = 4.0, 3
    s = randn(n, 4, seed=12, scale=2.0).requires_grad_(True)
    t = randn(n, 4, seed=13, scale=2.0)
    kd_soft(s, t, T).backward()
    for i, (sr, tr) in enumerate(zip(s.detach().tolist(), t.tolist())):
        ps, pt = h_softmax(sr, T), h_softmax(tr, T)
        for c in range(4):
            close(s.grad[i, c], T * (ps[c] - pt[c]) / n, abs_=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# CE
# ----------------------------------------------------------------------------------------------------------------

def test_ce_matches_hand_cross_entropy():
    s = randn(7, 4, seed=14, scale=2.0)
    y = torch.tensor([3, 0, 1, 1, 2, 0, 3])
    ce = CrossEntropy()
    parts = ce(Batch(s, {}, {}, y))
    assert set(parts) == {"ce"}
    close(parts["ce"], h_ce(s, y))
    assert ce.teacher_arrays() == ["labels"]


# ----------------------------------------------------------------------------------------------------------------
# RKD (Park et al. 2019)
# ----------------------------------------------------------------------------------------------------------------

def test_pairwise_distances_match_loops():
    e = randn(6, 5, seed=20)
    got = pairwise_distances(e)
    ref = torch.tensor(h_dist_matrix(e), dtype=DT)
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-7)
    assert torch.all(got.diagonal() == 0)        # exact zeros on the diagonal


def test_pairwise_distances_survive_a_large_shared_offset():
    torch.manual_seed(0)
    e = torch.randn(16, 32, dtype=torch.float64) * 0.01 + 1000.0   # tight cluster far from the origin
    exact = torch.cdist(e, e)                                        # float64: the reference
    got = pairwise_distances(e.float()).double()
    torch.testing.assert_close(got, exact, rtol=1e-3, atol=1e-5)


def test_distance_potential_normalised_by_mean_over_off_diagonal_pairs():
    e = randn(5, 3, seed=21, scale=4.0)
    got = distance_potential(e)
    torch.testing.assert_close(got, torch.tensor(h_distance_potential(e), dtype=DT), rtol=1e-7, atol=1e-7)
    n = len(e)
    off = got.sum() / (n * (n - 1))              # mean over i != j of the normalised distances is 1
    close(off, 1.0)


def test_rkd_distance_matches_hand_huber_over_full_matrix():
    # The implementation is F.smooth_l1_loss(distance_potential(s), distance_potential(t)) with the default
    # reduction 'mean': it averages over all n*n entries, *including* the n zero diagonal entries (which
    # contribute 0). That equals ((n - 1) / n) * the mean over the n(n-1) off-diagonal pairs; it is what the
    # authors' reference code does too. The reference below reproduces that exactly.
    n = 6
    s, t = randn(n, 4, seed=22, scale=3.0), randn(n, 9, seed=23)     # different embedding dims
    ps, pt = h_distance_potential(s), h_distance_potential(t)
    full = sum(h_huber(ps[i][j], pt[i][j]) for i in range(n) for j in range(n)) / (n * n)
    got = rkd_distance(s, t)
    close(got, full)
    pairs = sum(h_huber(ps[i][j], pt[i][j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    close(got, pairs * (n - 1) / n)


def test_rkd_distance_exercises_both_huber_branches():
    """Make some |psi_s - psi_t| > 1 so the linear branch of Huber is compared too."""
    n = 5
    s = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1], [10.0, 10.0]], dtype=DT)   # one outlier
    t = randn(n, 3, seed=24)
    ps, pt = h_distance_potential(s), h_distance_potential(t)
    diffs = [abs(ps[i][j] - pt[i][j]) for i in range(n) for j in range(n)]
    assert max(diffs) > 1.0 and min(d for d in diffs if d > 0) < 1.0
    ref = sum(h_huber(ps[i][j], pt[i][j]) for i in range(n) for j in range(n)) / (n * n)
    close(rkd_distance(s, t), ref)


@pytest.mark.parametrize("c", [0.01, 3.0, 250.0])
def test_rkd_distance_invariant_to_global_scaling_of_student(c):
    s, t = randn(7, 5, seed=25), randn(7, 8, seed=26)
    base = rkd_distance(s, t)
    assert float(base) > 1e-4
    close(rkd_distance(s * c, t), base, rel=1e-7)
    close(rkd_distance(s, t * c), base, rel=1e-7)
    # and scaling is not the same as nothing: distorting one coordinate changes the loss
    s2 = s.clone()
    s2[:, 0] *= 3.0
    assert abs(float(rkd_distance(s2, t)) - float(base)) > 1e-4


def test_rkd_distance_zero_for_scaled_copy_of_teacher():
    t = randn(6, 4, seed=27)
    assert float(rkd_distance(2.5 * t, t)) < 1e-12
    assert float(rkd_angle(2.5 * t + 1.0, t)) < 1e-12     # angles are also translation invariant


def test_angle_potential_matches_hand_cosine_at_middle_sample():
    n = 5
    e = randn(n, 3, seed=30)
    got = angle_potential(e)
    assert got.shape == (n, n, n)
    el = e.tolist()
    for i in range(n):
        for j in range(n):
            for k in range(n):
                if i != j and k != j:
                    close(got[i, j, k], h_angle(el, i, j, k), rel=1e-9, abs_=1e-12)
    # explicit geometry: right angle at the origin, 45 degrees at the other corners
    sq = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=DT)
    a = angle_potential(sq)
    close(a[1, 0, 2], 0.0, abs_=1e-12)                  # angle at e_0 between e_1 and e_2: 90 deg
    close(a[0, 1, 2], math.cos(math.pi / 4))            # angle at e_1 between e_0 and e_2: 45 deg
    close(a[0, 2, 1], math.cos(math.pi / 4))
    close(a[1, 0, 1], 1.0)                               # same vector twice: cos 0


def test_angle_potential_degenerate_entries_are_zero():
    """Where i == j or k == j the difference vector is 0; normalize() maps it to 0, so the cosine is 0."""
    n = 4
    got = angle_potential(randn(n, 3, seed=31))
    for i in range(n):
        for j in range(n):
            for k in range(n):
                if i == j or k == j:
                    assert float(got[i, j, k]) == 0.0


def test_rkd_angle_matches_hand_huber_mean():
    # F.smooth_l1_loss over the whole (n, n, n) tensor: the mean runs over all n^3 entries, the degenerate ones
    # (i == j or k == j, value 0 on both sides) included, as in the authors' reference code.
    n = 5
    s, t = randn(n, 4, seed=32), randn(n, 7, seed=33)
    sl, tl = s.tolist(), t.tolist()

    def cos_or_zero(e, i, j, k):
        return h_angle(e, i, j, k) if (i != j and k != j) else 0.0

    tot, nondeg = 0.0, 0
    for i in range(n):
        for j in range(n):
            for k in range(n):
                tot += h_huber(cos_or_zero(sl, i, j, k), cos_or_zero(tl, i, j, k))
                nondeg += (i != j and k != j)
    got = rkd_angle(s, t)
    close(got, tot / n ** 3)
    assert nondeg == n * (n - 1) ** 2
    close(got * n ** 3 / nondeg, tot / nondeg)          # rescaled: mean over non-degenerate triplets


def test_rkd_module_applies_weights_25_and_50():
    n = 6
    s_map = randn(n, 2, 2, 2, seed=40)                   # flattened to (n, 8) by the loss
    t_vec = randn(n, 5, seed=41)
    s = s_map.flatten(1)
    ps, pt = h_distance_potential(s), h_distance_potential(t_vec)
    dist = sum(h_huber(ps[i][j], pt[i][j]) for i in range(n) for j in range(n)) / n ** 2
    sl, tl = s.tolist(), t_vec.tolist()
    ang = 0.0
    for i in range(n):
        for j in range(n):
            for k in range(n):
                if i != j and k != j:
                    ang += h_huber(h_angle(sl, i, j, k), h_angle(tl, i, j, k))
    ang /= n ** 3

    rkd = RKD(layer="avgpool", student_layer="embed")
    assert rkd.teacher_arrays() == ["features/avgpool"] and rkd.student_layers() == ["embed"]
    parts = rkd(Batch(randn(n, 3, seed=42), {"embed": s_map}, {"features/avgpool": t_vec}, None))
    assert set(parts) == {"rkd_distance", "rkd_angle"}
    close(parts["rkd_distance"], 25.0 * dist)
    close(parts["rkd_angle"], 50.0 * ang)

    only_d = RKD(layer="avgpool", student_layer="embed", angle_weight=0)(
        Batch(None, {"embed": s_map}, {"features/avgpool": t_vec}, None))
    assert set(only_d) == {"rkd_distance"}
    close(only_d["rkd_distance"], 25.0 * dist)


def test_rkd_takes_a_layer_of_one_number_per_sample_as_a_1d_embedding():
    """A student (or teacher) layer giving (n,), one number per sample: distances |s_i - s_j|, as for (n, 1);
    flatten(1) raised IndexError on it."""
    n = 5
    s, t = randn(n, seed=49), randn(n, 3, seed=50)
    got = RKD()(Batch(None, {"embed": s}, {"features/avgpool": t}, None))
    want = RKD()(Batch(None, {"embed": s[:, None]}, {"features/avgpool": t}, None))
    assert set(got) == {"rkd_distance", "rkd_angle"} and float(got["rkd_distance"]) > 0
    for k in got:
        close(got[k], float(want[k]))
    ps = h_distance_potential(s[:, None])
    close(got["rkd_distance"], 25.0 * sum(h_huber(ps[i][j], h_distance_potential(t)[i][j])
                                          for i in range(n) for j in range(n)) / n ** 2)


@pytest.mark.parametrize("n", [1, 2])
def test_rkd_on_batches_of_one_and_two_is_zero_with_finite_gradients(n):
    """One sample has no pair (mu's mean over i != j is over nothing), two have a single distance that normalises
    to 1 and a single angle-free pair on both sides: nothing to transfer, so 0, and never NaN (0 / 0)."""
    s = randn(n, 4, seed=45, dtype=torch.float32).requires_grad_(True)
    t = randn(n, 6, seed=46, dtype=torch.float32)
    parts = RKD()(Batch(None, {"embed": s}, {"features/avgpool": t}, None))
    loss = sum(parts.values())
    assert torch.isfinite(loss) and abs(float(loss.detach())) < 1e-6
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert torch.equal(distance_potential(t), torch.zeros(1, 1) if n == 1 else 1 - torch.eye(2))


def test_rkd_duplicate_samples_count_as_zero_distance_pairs():
    """A sample twice in a batch (rows 1 and 3): Park et al.'s mu is the mean over every pair i != j, so the
    duplicate pair counts with distance 0 (a mean over the positive distances alone would leave it out: 18 pairs
    instead of 20 here); its distance potential is 0, and an angle with a vertex at one copy and an end at the other
    has no direction (0, as on the diagonal). Gradients stay finite."""
    n = 5
    s, t = randn(n, 4, seed=47), randn(n, 6, seed=48)
    s[3], t[3] = s[1], t[1]
    ps = h_distance_potential(s)                      # mu over all 20 ordered pairs i != j, the zero pair included
    got = distance_potential(s)
    torch.testing.assert_close(got, torch.tensor(ps, dtype=DT), rtol=1e-7, atol=1e-6)
    assert float(got[1, 3]) < 1e-6 and float(got[3, 1]) < 1e-6
    d = h_dist_matrix(s)
    positive_mu = sum(x for row in d for x in row if x > 1e-9) / (n * (n - 1) - 2)
    assert abs(float(got[0, 2]) - d[0][2] / positive_mu) > 1e-2   # the two definitions differ here
    a = angle_potential(s)
    for k in range(n):
        assert float(a[3, 1, k]) == 0.0 and float(a[k, 1, 3]) == 0.0 and float(a[1, 3, k]) == 0.0
    sg = s.clone().float().requires_grad_(True)
    loss = sum(RKD()(Batch(None, {"embed": sg}, {"features/avgpool": t.float()}, None)).values())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sg.grad).all()


def test_rkd_teacher_gets_no_gradient():
    s = randn(5, 4, seed=43).requires_grad_(True)
    t = randn(5, 6, seed=44).requires_grad_(True)
    parts = RKD()(Batch(None, {"embed": s}, {"features/avgpool": t}, None))
    sum(parts.values()).backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# FitNets (Romero et al. 2015)
# ----------------------------------------------------------------------------------------------------------------

def make_fitnets(s_shape, t_shape, seed=50):
    torch.manual_seed(seed)
    f = FitNets(hint="layer3", guided="block2", student_shapes={"block2": s_shape},
                teacher_shapes={"features/layer3": t_shape}).double()
    return f


@pytest.mark.parametrize("s_shape,t_shape,resize", [
    ((3, 4, 4), (5, 4, 4), None),         # (a) same spatial size
    ((2, 8, 8), (4, 4, 4), "pool"),       # (b) student larger -> adaptive average pooling
    ((2, 6, 4), (3, 3, 2), "pool"),       # (b') non-square
    ((3, 2, 2), (2, 4, 4), "up"),         # (c) student smaller -> bilinear upsampling
    ((2, 3, 2), (2, 6, 5), "up"),         # (c') non-integer factor
])
def test_fitnets_conv_regressor_shape_and_value(s_shape, t_shape, resize):
    n = 2
    f = make_fitnets(s_shape, t_shape)
    assert isinstance(f.regressor, torch.nn.Conv2d)
    assert f.teacher_arrays() == ["features/layer3"] and f.student_layers() == ["block2"]
    v = randn(n, *s_shape, seed=51)
    u = randn(n, *t_shape, seed=52)
    proj = f.project(v)
    assert tuple(proj.shape) == (n, *t_shape)

    x = v.numpy()
    if resize == "pool":
        x = h_block_mean(x, *t_shape[1:])
    elif resize == "up":
        x = h_bilinear(x, *t_shape[1:])
    w = f.regressor.weight.detach().numpy()
    b = f.regressor.bias.detach().numpy()
    ref_proj = h_conv3x3_pad1(x, w, b)
    np.testing.assert_allclose(proj.detach().numpy(), ref_proj, rtol=1e-9, atol=1e-12)

    parts = f(Batch(None, {"block2": v}, {"features/layer3": u}, None))
    assert set(parts) == {"fitnets"}
    close(parts["fitnets"], h_mse(u.numpy(), ref_proj))


def test_fitnets_vector_hint_uses_linear_regressor():
    n, ds, dt = 4, 6, 3
    f = make_fitnets((ds,), (dt,))
    assert isinstance(f.regressor, torch.nn.Linear)
    v, u = randn(n, ds, seed=53), randn(n, dt, seed=54)
    proj = f.project(v)
    assert tuple(proj.shape) == (n, dt)
    W = f.regressor.weight.detach().tolist()
    bias = f.regressor.bias.detach().tolist()
    vl = v.tolist()
    ref = [[bias[o] + sum(W[o][q] * vl[s][q] for q in range(ds)) for o in range(dt)] for s in range(n)]
    np.testing.assert_allclose(proj.detach().numpy(), np.array(ref), rtol=1e-9, atol=1e-12)
    parts = f(Batch(None, {"block2": v}, {"features/layer3": u}, None))
    close(parts["fitnets"], h_mse(u.numpy(), ref))


@pytest.mark.parametrize("s_shape,t_shape", [((6,), (3, 1, 1)), ((6, 1, 1), (3,))])
def test_fitnets_pooled_map_beside_a_vector_is_a_vector(s_shape, t_shape):
    """A 1x1 map (a pooled layer, e.g. the teacher's avgpool) beside a vector layer (e.g. the student's embed): a
    linear regressor on the flattened values, MSE against the flattened hint."""
    n = 4
    f = make_fitnets(s_shape, t_shape)
    assert isinstance(f.regressor, torch.nn.Linear) and f.regressor.weight.shape == (3, 6)
    v, u = randn(n, *s_shape, seed=57), randn(n, *t_shape, seed=58)
    W, bias = f.regressor.weight.detach().numpy(), f.regressor.bias.detach().numpy()
    ref = v.numpy().reshape(n, 6) @ W.T + bias
    parts = f(Batch(None, {"block2": v}, {"features/layer3": u}, None))
    close(parts["fitnets"], h_mse(u.numpy().reshape(n, 3), ref))


def test_fitnets_loss_zero_when_projection_hits_hint_and_trains_regressor():
    f = make_fitnets((2, 4, 4), (3, 4, 4))
    v = randn(2, 2, 4, 4, seed=55)
    u = f.project(v).detach()
    parts = f(Batch(None, {"block2": v}, {"features/layer3": u}, None))
    assert float(parts["fitnets"].detach()) < 1e-20
    # the regressor is a trainable part of the loss module
    u2 = randn(2, 3, 4, 4, seed=56)
    f(Batch(None, {"block2": v}, {"features/layer3": u2}, None))["fitnets"].backward()
    assert f.regressor.weight.grad is not None and f.regressor.weight.grad.abs().sum() > 0
    assert any(p is f.regressor.weight for p in f.parameters())


@pytest.mark.parametrize("s_shape,t_shape", [((3, 4, 4), (8,)), ((8,), (3, 4, 4)), ((3, 4), (3, 4, 4)),
                                             ((3, 4, 4, 1), (3, 4, 4))])
def test_make_regressor_mismatched_ranks_raise(s_shape, t_shape):
    with pytest.raises(ValueError, match="FitNets needs two feature maps .*choose a --fitnets-guided layer of the "
                                         "same kind as --fitnets-hint"):
        make_regressor(s_shape, t_shape)
    with pytest.raises(ValueError):
        FitNets(student_shapes={"block2": s_shape}, teacher_shapes={"features/layer3": t_shape})


# ----------------------------------------------------------------------------------------------------------------
# registry / --loss parsing
# ----------------------------------------------------------------------------------------------------------------

def test_registry_names():
    assert set(LOSSES) == {"ce", "kd", "fitnets", "rkd"}
    for name, cls in LOSSES.items():
        assert cls.name == name


def test_parse_loss_spec_weights():
    assert parse_loss_spec("kd=1,rkd=0.5") == {"kd": 1.0, "rkd": 0.5}
    out = parse_loss_spec("kd")
    assert out == {"kd": 1.0} and isinstance(out["kd"], float)
    assert parse_loss_spec("ce, fitnets=2.5 ,") == {"ce": 1.0, "fitnets": 2.5}
    assert parse_loss_spec("kd=1e-1") == {"kd": 0.1}


def test_parse_loss_spec_unknown_name():
    with pytest.raises(KDCacheError) as ei:
        parse_loss_spec("kd=1,attention=2")
    msg = str(ei.value)
    assert "unknown loss 'attention'" in msg
    assert all(name in msg for name in LOSSES)          # names the valid choices
    assert "\n" not in msg


def test_parse_loss_spec_bad_weight():
    with pytest.raises(KDCacheError) as ei:
        parse_loss_spec("kd=one")
    msg = str(ei.value)
    assert "bad weight 'one'" in msg and "'kd'" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("spec", ["kd=", "kd=1,rkd =", "ce= "])
def test_parse_loss_spec_equals_without_weight(spec):
    """`kd=` is a weight left out (`--loss kd=$W` with W unset), not the bare name's weight 1."""
    with pytest.raises(KDCacheError, match="has '=' but no weight"):
        parse_loss_spec(spec)


@pytest.mark.parametrize("spec", ["", ",", " , "])
def test_parse_loss_spec_empty(spec):
    with pytest.raises(KDCacheError, match="empty"):
        parse_loss_spec(spec)


def test_zero_weights_are_left_out_of_training():
    """A loss weighted 0 neither runs (no FitNets hint stage) nor demands its arrays; all zero is refused, and so
    is a two-stage FitNets whose second stage would train nothing."""
    from pipeline.train_student import StudentConfig, loss_weights

    assert parse_loss_spec("kd=1,fitnets=0") == {"kd": 1.0, "fitnets": 0.0}
    assert loss_weights(StudentConfig(cache="-", loss="kd=1,fitnets=0,rkd=0.0")) == {"kd": 1.0}
    assert loss_weights(StudentConfig(cache="-", loss="fitnets=1")) == {"fitnets": 1.0}  # then KD, by default
    assert loss_weights(StudentConfig(cache="-", loss="fitnets=1,kd=0", fitnets_schedule="single")) == {
        "fitnets": 1.0}
    with pytest.raises(KDCacheError, match="second stage would train nothing"):
        loss_weights(StudentConfig(cache="-", loss="fitnets=1,kd=0"))
    with pytest.raises(KDCacheError, match="every weight in --loss kd=0,ce=0 is 0"):
        parse_loss_spec("kd=0,ce=0")
