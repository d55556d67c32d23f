"""Codecs: each checked against an independent numpy computation, then end to end through a store."""

from __future__ import annotations

import json
from pathlib import Path
import math

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.codecs import BFloat16Codec, Int8Codec, TopKCodec, choose, distortion, make_codec
from pipeline.errors import KDCacheError
from pipeline.losses.kd import kd_soft
from pipeline.teacher_cache import CacheConfig, run_teacher_cache
from pipeline.train_student import StudentConfig, run_train_student
from tests.conftest import SYN, SYN_TEST

runner = CliRunner()


def test_int8_matches_hand_quantisation_and_never_wraps():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 4, 4)).astype(np.float32) * np.array([1, 100, 1e-3], np.float32)[None, :, None,
                                                                                                   None]
    x[0, 1, 0, 0] = 1e4       # an outlier sets its channel's scale; it maps to +127 exactly
    x[2, 2] = 0.0             # an all-zero channel
    parts = Int8Codec().encode("f", torch.from_numpy(x))
    q, scale = parts["f"].numpy(), parts["f.scale"].numpy()
    assert q.dtype == np.int8 and scale.shape == (5, 3)
    for i in range(5):
        for c in range(3):
            amax = np.abs(x[i, c]).max()
            s = amax / 127 if amax > 0 else 1.0
            assert math.isclose(scale[i, c], s, rel_tol=1e-6)
            np.testing.assert_array_equal(q[i, c], np.clip(np.round(x[i, c] / np.float32(s)), -127, 127))
    assert q[0, 1, 0, 0] == 127 and q.min() >= -127   # -128 is never produced: it marks unwritten chunks
    dec = Int8Codec().decode("f", {k: torch.from_numpy(v) for k, v in {"f": q, "f.scale": scale}.items()}).numpy()
    assert (np.abs(dec - x) <= scale[:, :, None, None] / 2 + 1e-6 * np.abs(x)).all()
    # A vector has one scale per sample.
    v = Int8Codec().encode("v", torch.tensor([[1.0, -2.0, 0.5]]))
    assert v["v.scale"].shape == (1, 1) and v["v"].tolist() == [[64, -127, 32]]
    m = Int8Codec().encode("m", torch.tensor([[[[1.0]], [[-2.0]], [[0.5]]]]))   # a (3, 1, 1) map: the same
    assert m["m.scale"].shape == (1, 1) and m["m"].flatten().tolist() == [64, -127, 32]
    # The clamp is what keeps the promise: a subnormal channel's absmax / 127 rounds to a coarser float32 scale, so
    # x / scale reaches +-186 here; unclamped, int8 would wrap it to -70 / +70 (the sign flipped).
    tiny = torch.tensor([[[[2.6e-43, -2.6e-43, 1e-43, 5e-44]]]])
    s = np.float32(np.float32(2.6e-43) / np.float32(127))
    assert abs(2.6e-43 / s) > 127.5                       # the case this checks: unclamped it would wrap
    assert Int8Codec().encode("t", tiny)["t"].flatten().tolist() == [127, -127, 71, 36]


def test_topk_keeps_top_logits_and_restores_tail_mass_exactly():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((6, 20)) * 3
    codec = TopKCodec(4, "float32", classes=20)
    parts = codec.encode("logits", torch.from_numpy(z))
    rec = codec.decode("logits", parts).double().numpy()
    for i in range(6):
        top = np.argsort(-z[i])[:4]
        p = np.exp(z[i] - z[i].max())
        p /= p.sum()
        tail = 1 - p[top].sum()
        assert math.isclose(float(parts["logits.tail"][i]), tail, rel_tol=1e-4)
        np.testing.assert_allclose(rec[i, top], z[i, top], rtol=1e-6)
        rest = np.setdiff1d(np.arange(20), top)
        assert np.ptp(rec[i, rest]) < 1e-9                # one equal logit for the other classes ...
        q = np.exp(rec[i] - rec[i].max())
        q /= q.sum()
        assert math.isclose(q[rest].sum(), tail, rel_tol=1e-4)  # ... restoring the teacher's tail mass at T=1
        np.testing.assert_allclose(q[top], p[top], rtol=1e-4)   # so the top-k probabilities are the teacher's
    # KD from top-k logits = KD against the tail-mass reconstruction, computed by hand.
    s = rng.standard_normal((6, 20))
    got = kd_soft(torch.from_numpy(s), codec.decode("logits", parts).double(), 4.0)
    hand = 0.0
    for i in range(6):
        pt = np.exp(rec[i] / 4 - (rec[i] / 4).max()); pt /= pt.sum()
        ps = np.exp(s[i] / 4 - (s[i] / 4).max()); ps /= ps.sum()
        hand += (pt * (np.log(pt) - np.log(ps))).sum()
    assert math.isclose(float(got), 16 * hand / 6, rel_tol=1e-5)
    with pytest.raises(KDCacheError, match="or from 1 to the class count - 1"):
        TopKCodec(20).parts("logits", (20,))
    # Class indices past int16's range (a 40000-class teacher) are stored exactly: as int32, never wrapped negative;
    # the stored dtype is what `parts` declares. Up to 32767 classes int16 holds every index.
    for classes, want in ((32767, np.int16), (32768, np.int32), (40000, np.int32)):
        z = torch.zeros(2, classes)
        top = torch.tensor([[classes - 1, classes - 3], [0, classes - 2]])
        z.scatter_(1, top, torch.tensor([[9.0, 8.0], [7.0, 6.0]]))
        big = TopKCodec(2, "float32", classes=classes)
        enc = big.encode("logits", z)
        assert np.dtype(big.parts("logits", (classes,))["logits.topk_indices"][1]) == want
        assert enc["logits.topk_indices"].numpy().dtype == want
        np.testing.assert_array_equal(enc["logits.topk_indices"].numpy(), top.numpy())
        rec = big.decode("logits", enc)
        assert torch.equal(rec.gather(1, top), z.gather(1, top)) and torch.equal(rec.argmax(1), top[:, 0])


def test_bfloat16_is_stored_as_its_bits():
    x = torch.tensor([[1.0, -3.14159, 1e-3, 65504.0, 1.00390625, 3e38]], dtype=torch.float32)
    bits = BFloat16Codec().encode("f", x)["f"].numpy().view(np.uint16)
    # Independent: round-to-nearest-even on the upper 16 bits of the float32 pattern.
    u = x.numpy().view(np.uint32).astype(np.uint64)
    want = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(bits, want)
    back = BFloat16Codec().decode("f", {"f": torch.from_numpy(bits)})
    assert torch.equal(back, x.to(torch.bfloat16).float())


def test_distortion_metrics_against_hand_computation():
    rng = np.random.default_rng(2)
    ref, rec = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    d = distortion("logits", torch.from_numpy(ref), torch.from_numpy(rec))
    for i in range(3):
        for T in (1, 4):
            p = np.exp(ref[i] / T) / np.exp(ref[i] / T).sum()
            q = np.exp(rec[i] / T) / np.exp(rec[i] / T).sum()
            assert math.isclose(float(d[f"kl_t{T}"][i]), (p * np.log(p / q)).sum(), rel_tol=1e-4, abs_tol=1e-7)
        assert float(d["top1_agreement"][i]) == float(ref[i].argmax() == rec[i].argmax())
    # a tie for the top: top-1 + tail keeps one of the tied classes (torch.topk on the CPU the later one, argmax
    # the first); either is the teacher's top-1, so an exact store agrees
    tied = torch.tensor([[2.0, 2.0, 1.0, 0.0], [3.0, 1.0, 3.0, 0.0]])
    codec = TopKCodec(1, "float32", 4)
    kept = codec.decode("logits", codec.encode("logits", tied))
    assert distortion("logits", tied, kept)["top1_agreement"].tolist() == [1.0, 1.0]
    other = torch.tensor([[0.0, 2.0, 1.0, 0.0], [0.0, 0.0, 5.0, 9.0]])  # picks class 1 (tied top) / 3 (not top)
    assert distortion("logits", tied, other)["top1_agreement"].tolist() == [1.0, 0.0]
    f = distortion("features/x", torch.from_numpy(ref), torch.from_numpy(rec))
    for i in range(3):
        assert math.isclose(float(f["rel_err"][i]), np.linalg.norm(ref[i] - rec[i]) / np.linalg.norm(ref[i]),
                            rel_tol=1e-5)
        cos = ref[i] @ rec[i] / np.linalg.norm(ref[i]) / np.linalg.norm(rec[i])
        assert math.isclose(float(f["cosine"][i]), cos, rel_tol=1e-5)


def test_distortion_of_a_near_lossless_store_is_not_float32_noise():
    """A float16 store's KL is ~1e-9: computed in float32 it came out as log_softmax's rounding (1e-8 .. 1e-7), its
    T = 4 value above its T = 1 one. Checked against float64 numpy on the same float32 / float16 values."""
    rng = np.random.default_rng(3)
    ref = (rng.standard_normal((64, 10)) * 3).astype(np.float32)
    rec = ref.astype(np.float16).astype(np.float32)            # what the float16 codec stores
    d = distortion("logits", torch.from_numpy(ref), torch.from_numpy(rec))
    kl = {}
    for T in (1, 4):
        r, q = ref.astype(np.float64) / T, rec.astype(np.float64) / T
        lp = r - r.max(1, keepdims=True) - np.log(np.exp(r - r.max(1, keepdims=True)).sum(1, keepdims=True))
        lq = q - q.max(1, keepdims=True) - np.log(np.exp(q - q.max(1, keepdims=True)).sum(1, keepdims=True))
        kl[T] = (np.exp(lp) * (lp - lq)).sum(1)
        np.testing.assert_allclose(d[f"kl_t{T}"].numpy(), kl[T], rtol=1e-3, atol=1e-14)
    assert float(d["kl_t4"].mean()) < float(d["kl_t1"].mean()) / 4 < 1e-7
    # An all-zero sample stored exactly (int8 keeps zeros) costs nothing: cosine 1, not cosine_similarity's 0.
    f = torch.zeros(2, 3, 4, 4)
    f[1] = torch.from_numpy(rng.standard_normal((3, 4, 4)).astype(np.float32))
    out = distortion("features/x", f, Int8Codec().decode("f", Int8Codec().encode("f", f)))
    assert float(out["cosine"][0]) == 1.0 and float(out["rel_err"][0]) == 0.0 and 0.999 < float(out["cosine"][1])


def test_codec_flags_are_checked():
    assert choose("logits", "float16", "int8", 0) == {"name": "float16"}
    assert choose("features", "float16", "int8", 5) == {"name": "int8", "scale": "channel"}
    assert choose("logits", "bfloat16", "float", 5) == {"name": "topk", "k": 5, "dtype": "float16", "tail": 2}
    # a store of the first tail formula (its config has no "tail") reads back as such: its key stays its own
    old = {"name": "topk", "k": 5, "dtype": "float16"}
    assert make_codec(old, (10,)).config() == old and make_codec(choose("logits", "float16", "float", 5)).tail == 2
    for args, msg in ((("logits", "float8", "float", 0), "--dtype"), (("features", "float16", "int4", 0),
                                                                      "--feature-codec")):
        with pytest.raises(KDCacheError, match=msg):
            choose(*args)


def test_lossy_store_end_to_end_with_measured_distortion(root, teacher_file):
    common = dict(data=SYN, weights=str(teacher_file), layers=["layer3", "avgpool"], chunk_samples=64,
                  device="cpu")
    exact = run_teacher_cache(CacheConfig(dtype="float32", **common), log=lambda *_: None)
    lossy = run_teacher_cache(CacheConfig(dtype="bfloat16", feature_codec="int8", logits_topk=2, **common),
                              log=lambda *_: None)
    ge, gl = zarr.open_group(exact, mode="r"), zarr.open_group(lossy, mode="r")
    man = gl.attrs["kdcache"]
    assert man["targets"]["logits"]["codec"] == {"name": "topk", "k": 2, "dtype": "float16", "tail": 2}
    assert man["targets"]["features/layer3"]["parts"] == ["features/layer3", "features/layer3.scale"]
    assert gl["features/layer3"].dtype == np.int8 and "logits" not in gl and gl["logits.topk_indices"].shape == (
        192, 2)
    assert man["identity"] != ge.attrs["kdcache"]["identity"]  # the codec is part of the cache's identity
    # The manifest's distortion equals what we measure ourselves between the exact and the lossy store.
    z = torch.from_numpy(ge["logits"][:].astype(np.float64))
    rec = TopKCodec(2, "float16", 4).decode("logits", {p: torch.from_numpy(gl[p][:]) for p in
                                                        man["targets"]["logits"]["parts"]}).double()
    for T in (1, 4):
        p, q = torch.softmax(z / T, 1), torch.softmax(rec / T, 1)
        kl = float((p * (p.log() - q.log())).sum(1).mean())
        assert math.isclose(man["distortion"]["logits"][f"kl_t{T}"], kl, rel_tol=2e-2, abs_tol=1e-6)
    assert man["distortion"]["logits"]["top1_agreement"] == float((z.argmax(1) == rec.argmax(1)).double().mean())
    f = ge["features/layer3"][:].reshape(192, -1).astype(np.float64)
    fq = (gl["features/layer3"][:].reshape(192, 64, -1) * gl["features/layer3.scale"][:][..., None]).reshape(192, -1)
    rel = np.linalg.norm(f - fq, axis=1) / np.linalg.norm(f, axis=1)
    assert math.isclose(man["distortion"]["features/layer3"]["rel_err"], rel.mean(), rel_tol=1e-3)
    assert 0 < rel.mean() < 0.01 and man["distortion"]["features/layer3"]["cosine"] > 0.999
    assert ge.attrs["kdcache"]["distortion"]["features/layer3"]["rel_err"] == 0.0
    # Students train from it (decoding on the fly), and verify --recompute accepts it within the codecs' tolerance.
    s = run_train_student(StudentConfig(cache=lossy, loss="kd=1,fitnets=1,rkd=1", fitnets_schedule="single",
                                        epochs=1, batch_size=32, workers=0, test_data=SYN_TEST, out="run"),
                          log=lambda *_: None)
    rows = [json.loads(x) for x in open("run/metrics.jsonl")]
    assert s["test_acc"] is not None and all(np.isfinite(v) for v in rows[0]["losses"].values())
    res = runner.invoke(app, ["verify", lossy, "--recompute", "32", "--json"])
    assert res.exit_code == 0, res.output
    checked = json.loads(res.stdout)["recompute"]["arrays"]
    assert set(checked) == {"logits", "features/layer3", "features/avgpool"}
    # top-k's max |diff| is over the kept logits (float16 rounding), not the shared logit of the other classes
    assert 0 < checked["logits"]["max_abs"] <= float(z.abs().max()) * 2 ** -11, checked["logits"]
    g = zarr.open_group(lossy, mode="r+")
    g["features/layer3"][3] = -g["features/layer3"][3]   # valid chunk, wrong values
    res = runner.invoke(app, ["verify", lossy, "--recompute", "192"])
    assert res.exit_code == 1 and "BAD  recompute features/layer3" in res.stdout


def test_a_student_trains_from_a_bfloat16_store(root, teacher_file):
    """bfloat16 targets are stored as uint16 bits: the reader's shuffle and the decode must carry them through."""
    path = run_teacher_cache(CacheConfig(data=SYN, weights=str(teacher_file), layers=["layer2"], dtype="bfloat16",
                                         chunk_samples=64, device="cpu"), log=lambda *_: None)
    out = run_train_student(StudentConfig(cache=path, loss="kd=1,fitnets=1", fitnets_hint="layer2",
                                          fitnets_guided="block1", fitnets_schedule="single", epochs=1,
                                          batch_size=32, workers=0, out="run", test_data=SYN), log=lambda *_: None)
    row = json.loads(Path("run/metrics.jsonl").read_text().splitlines()[0])
    assert out["test_acc"] is not None and all(np.isfinite(v) for v in row["losses"].values())


def test_topk_tail_of_a_confident_teacher_keeps_its_mass():
    """A teacher sure of its class (as on its own training data) leaves a tail mass far below float32's resolution of
    the total: it must still be stored to its own precision, or KD at T = 4 sees no tail at all."""
    rng = np.random.default_rng(3)
    z = rng.standard_normal((5, 100))
    z[:4, 0] += [8.0, 14.0, 18.0, 24.0]
    z[4] *= 0.1                                             # and a nearly flat teacher: almost all mass in the tail
    codec = TopKCodec(5, "float32", classes=100)
    parts = codec.encode("logits", torch.from_numpy(z).float())
    zf = z.astype(np.float32).astype(np.float64)
    rec = codec.decode("logits", parts).double().numpy()
    for i in range(5):
        rest = np.sort(zf[i])[:-5]
        e = np.exp(zf[i] - zf[i].max())
        tail = np.exp(rest - zf[i].max()).sum() / e.sum()    # 0.28 down to ~4e-9, and 0.95 for the flat one
        assert math.isclose(float(parts["logits.tail"][i]), tail, rel_tol=1e-4), (i, tail)
        # decoding restores that mass at T = 1, however small or large it is (no clamp moves it)
        q1 = np.exp(rec[i] - rec[i].max())
        q1 /= q1.sum()
        assert math.isclose(q1[np.argsort(-zf[i])[5:]].sum(), tail, rel_tol=1e-3), (i, tail)
        # ... so the KL at T = 4 between the teacher and its top-k reconstruction stays that of a flat tail
        p, q = (np.exp(a / 4 - (a / 4).max()) for a in (zf[i], rec[i]))
        p, q = p / p.sum(), q / q.sum()
        assert (p * np.log(p / q)).sum() < 0.05, i


def test_recompute_errors_against_hand_computation():
    """What `verify --recompute` compares with each codec's tolerance: int8 errors relative to their own channel's
    absmax (a small channel next to a large one is checked at its own scale), top-k errors of the kept logits plus
    the tail mass decoding restores."""
    from pipeline.codecs import TOLERANCE

    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 3, 2, 2)) * np.array([1.0, 100.0, 1e-3])[None, :, None, None]
    dec = x + rng.standard_normal(x.shape) * 1e-3
    err = Int8Codec().error(torch.from_numpy(dec), torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(err, np.abs(dec - x) / np.abs(x).max(axis=(2, 3), keepdims=True), rtol=1e-9)
    assert err[:, 2].max() > TOLERANCE["int8"] > err[:, 1].max()   # the small channel's values are off
    z = rng.standard_normal((4, 10)) * 0.5                 # tails of 0.4 to 0.6
    codec = TopKCodec(3, "float32", classes=10)
    parts = codec.encode("logits", torch.from_numpy(z).float())
    parts["logits.tail"] = parts["logits.tail"] * 0.5      # the top 3 logits intact, half the tail's mass
    err = codec.error(codec.decode("logits", parts).double(), torch.from_numpy(z)).numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = np.argsort(-z, 1)[:, :3]
    tail = 1 - np.take_along_axis(p, top, 1).sum(1)
    assert err.shape == (4, 4)
    np.testing.assert_allclose(err[:, :3], np.abs(np.take_along_axis(z.astype(np.float32), top, 1) -
                                                  np.take_along_axis(z, top, 1)) / np.maximum(
        1, np.abs(np.take_along_axis(z, top, 1))), atol=1e-12)  # float32 storage, nothing more
    np.testing.assert_allclose(err[:, 3], tail / 2, rtol=1e-5)
    assert (err[:, 3] > TOLERANCE["topk"]).all(), tail   # verify --recompute flags a store that halved the tail


def test_a_topk_outside_its_range_names_every_valid_value():
    """--logits-topk -1 was told 'must be between 1 and the class count - 1', though 0 (every logit) is valid too."""
    for k in (-1, 20, 25):
        with pytest.raises(KDCacheError, match=f"^--logits-topk {k} must be 0 \\(every logit\\) or from 1 to the "
                                               "class count - 1 \\(19\\)$"):
            TopKCodec(k, "float32", classes=20).parts("logits", (20,))
    assert set(TopKCodec(19, "float32", classes=20).parts("logits", (20,))) == {
        "logits.topk_values", "logits.topk_indices", "logits.tail"}
