"""Consistent teaching: K augmented views per sample, their parameters stored, and the exact input replayed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from pipeline import store as st
from pipeline.augment import AugmentPolicy, apply_views, sample_params, select_view
from pipeline.cli import app
from pipeline.data import Transform, open_source
from pipeline.errors import KDCacheError
from pipeline.models import load_teacher
from pipeline.reader import CacheStream, make_loader, worker_init
from pipeline.teacher_cache import CacheConfig, run_teacher_cache
from pipeline.train_student import StudentConfig, run_train_student
from tests.conftest import SYN, SYN_TEST

runner = CliRunner()
POLICY = "crop=0.4-1,translate=2,flip,plain0"


def _cache(teacher_file, **kw):
    kw.setdefault("layers", ["layer3"])
    kw.setdefault("views", 4)
    kw.setdefault("augment", POLICY)
    return run_teacher_cache(CacheConfig(data=SYN, weights=str(teacher_file), chunk_samples=64, batch_size=32,
                                         device="cpu", **kw), log=lambda *_: None)


def _interrupted_cache(monkeypatch, fail_at: int, teacher_file, **kw):
    """A teacher-cache run whose disk fills on its `fail_at`-th unit: the units before it stay committed."""
    real, calls = st.write_unit, {"n": 0}

    def dies(*args, **k):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(28, "No space left on device")
        return real(*args, **k)

    with monkeypatch.context() as m:
        m.setattr(st, "write_unit", dies)
        with pytest.raises(OSError):
            _cache(teacher_file, writers=1, **kw)


# ------------------------------------------------------------------------------------------------ parameters
def test_params_depend_only_on_seed_sample_and_view():
    pol = AugmentPolicy.parse(POLICY)
    box, flip = sample_params(pol, 3, np.arange(50), 6, (16, 16))
    assert box.shape == (50, 6, 4) and flip.shape == (50, 6) and box.dtype == np.int32
    # Any subset, order or view list gives the same parameters for the same (sample, view).
    idx, views = np.array([41, 7, 7, 0]), np.array([5, 2])
    b2, f2 = sample_params(pol, 3, idx, views, (16, 16))
    np.testing.assert_array_equal(b2, box[idx][:, views])
    np.testing.assert_array_equal(f2, flip[idx][:, views])
    # plain0: view 0 is the whole image, unflipped; the others differ; another seed gives other views.
    assert (box[:, 0] == [0, 0, 16, 16]).all() and not flip[:, 0].any()
    assert len({tuple(b) for b in box[:, 1:].reshape(-1, 4)}) > 100
    b3, _ = sample_params(pol, 4, np.arange(50), 6, (16, 16))
    assert not np.array_equal(b3[:, 1:], box[:, 1:])
    # The boxes obey the policy: area fraction within [0.4, 1] before translation, shift within 2 pixels.
    area = box[:, 1:, 2] * box[:, 1:, 3] / 256
    assert area.min() >= 0.4 - 0.1 and area.max() <= 1.0 and 0.3 < flip[:, 1:].mean() < 0.7
    # Each parameter is a draw of its own: crops alone change with the seed (above, translate and flip could hide
    # it), and a translation's two shifts are independent, not one draw used twice.
    c0, _ = sample_params(AugmentPolicy.parse("crop=0.3-1"), 0, np.arange(200), 2, (32, 32))
    c1, _ = sample_params(AugmentPolicy.parse("crop=0.3-1"), 1, np.arange(200), 2, (32, 32))
    assert (c0 != c1).any(-1).mean() > 0.9
    shifts, _ = sample_params(AugmentPolicy.parse("translate=3"), 0, np.arange(2000), 1, (16, 16))
    dy, dx = shifts[:, 0, 0], shifts[:, 0, 1]
    assert set(dy) == set(dx) == set(range(-3, 4)) and (dy == dx).mean() < 0.2  # 1/7 when independent
    assert abs(np.corrcoef(dy, dx)[0, 1]) < 0.1
    # On a large image (fine rounding), where every draw fits: the area fraction is uniform over the crop range
    # (square crops always fit), and the aspect ratio log-uniform over the ratio range (small crops always fit).
    box, _ = sample_params(AugmentPolicy.parse("crop=0.4-1,ratio=1-1"), 0, np.arange(4000), 1, (400, 400))
    area = box[:, 0, 2].astype(float) * box[:, 0, 3] / 400 ** 2
    assert np.quantile(area, 0.05) < 0.45 and np.quantile(area, 0.95) > 0.95 and abs(area.mean() - 0.7) < 0.02
    box, _ = sample_params(AugmentPolicy.parse("crop=0.1-0.2,ratio=0.5-2"), 0, np.arange(4000), 1, (400, 400))
    log_aspect = np.log(box[:, 0, 3] / box[:, 0, 2])
    assert np.quantile(log_aspect, 0.05) < np.log(0.55) and np.quantile(log_aspect, 0.95) > np.log(1.8)
    assert abs(np.median(log_aspect)) < 0.05 and 0.099 <= (box[:, 0, 2] * box[:, 0, 3] / 400 ** 2).min()  # rounding
    # A crop's position is uniform over every place it fits, both edges included (torchvision: randint(0, H - h + 1)):
    # 4x4 crops of an 8x8 image (area 1/4, square) start at rows and columns 0..4, each about 1/5 of the time.
    box, _ = sample_params(AugmentPolicy.parse("crop=0.25-0.25,ratio=1-1"), 0, np.arange(2000), 2, (8, 8))
    assert (box[..., 2:] == 4).all()
    for pos in (box[..., 0].ravel(), box[..., 1].ravel()):
        assert pos.min() == 0 and pos.max() == 4
        assert (np.abs(np.bincount(pos, minlength=5) / pos.size - 0.2) < 0.03).all(), np.bincount(pos)
    # Each of the 10 tries is a fresh draw (torchvision's rule): with crop=0.5-1,ratio=0.5-2 on a square image a
    # single draw fits less than half the time (Monte Carlo below), yet only (1 - p)^10 of the crops, about 0.2%,
    # fall back to the centre crop (here the whole image).
    rng = np.random.default_rng(0)
    area, r = 64 * 64 * rng.uniform(0.5, 1, 10**6), np.exp(rng.uniform(np.log(0.5), np.log(2), 10**6))
    fit = ((np.round(np.sqrt(area * r)) <= 64) & (np.round(np.sqrt(area / r)) <= 64)).mean()
    assert 0.4 < fit < 0.5
    box, _ = sample_params(AugmentPolicy.parse("crop=0.5-1,ratio=0.5-2"), 0, np.arange(4000), 2, (64, 64))
    assert (box == [0, 0, 64, 64]).all(-1).mean() < 0.01


def test_policy_parsing_and_errors():
    p = AugmentPolicy.parse("flip, crop=0.5-1")
    assert p.spec() == "crop=0.5-1,ratio=0.75-1.33333,flip" and AugmentPolicy.parse(p.spec()).spec() == p.spec()
    assert AugmentPolicy.parse("none").identity and AugmentPolicy.parse(None).spec() == "none"
    # The spec (part of the cache key) is one to one with the policy: every part and number reads back as it was, and
    # policies that sample other views never share a spec.
    specs = ["crop=0.3-0.9,ratio=0.5-2,translate=3,flip,plain0", "translate=1", "translate=4", "translate=4,flip",
             "crop=0.5-1", "crop=0.6-1", "crop=0.5-1,ratio=0.5-2", "crop=0.5-1,flip", "flip", "flip,translate=2,plain0"]
    policies = [AugmentPolicy.parse(s) for s in specs]
    assert all(AugmentPolicy.parse(p.spec()) == p for p in policies)
    assert len({p.spec() for p in policies}) == len({p for p in policies}) == len(specs)
    for bad in ("crop=2-3", "rotate=5", "translate=-1", "flip=1", "crop=0.5", "crop=0.5-1,ratio=0.5-inf"):
        with pytest.raises(KDCacheError, match="bad augmentation"):
            AugmentPolicy.parse(bad)
    # spec and policy are one to one: a repeat, or a number the spec would round, is refused, never merged
    with pytest.raises(KDCacheError, match="plain0 in 'plain0' only keeps view 0 plain"):
        AugmentPolicy.parse("plain0")  # accepted before, and silently cached no views at all
    with pytest.raises(KDCacheError, match="'crop' appears twice"):
        AugmentPolicy.parse("crop=0.5-1,crop=0.9-1")
    with pytest.raises(KDCacheError, match="more than 6 significant digits"):
        AugmentPolicy.parse("crop=0.5000004-1")
    assert AugmentPolicy.parse("crop=0.5-1,ratio=0.75-1.33333") == AugmentPolicy.parse("crop=0.5-1")  # 4/3


def test_policies_that_cannot_teach_are_refused(root, teacher_file):
    """Views all alike, a single plain view, views entirely off the image, absurd K: one line each, no store."""
    from pipeline.online import OnlineConfig, run_online_kd

    base = ["teacher-cache", "--data", SYN, "--weights", str(teacher_file)]
    for args, needle in [
        (["--views", "4", "--augment", "crop=1-1"], "makes every view of a sample the same input on 16x16 images"),
        (["--views", "1", "--augment", "translate=2,flip,plain0"], "--views 1 with plain0 caches only the plain"),
        (["--views", "2", "--augment", "crop=0.1-0.2,translate=12"], "of views entirely off the 16x16 images"),
        (["--views", "2000", "--augment", "flip"], "--views must be from 1 to 1024"),
        # crops that never fit their ranges: torchvision's fixed centre crop, not the policy the manifest would name
        (["--views", "4", "--augment", "crop=0.9-1,ratio=3-4,flip"],
         "100% of crops fit no draw of the crop and ratio ranges and fall back to a fixed centre crop (area 0.31"),
        (["--views", "4", "--augment", "crop=0.001-0.001,flip"], "raise the crop range"),
        # the same without flip: every view is that one centre crop, and the fallback is the reason to name (not
        # "widen the crop range", which cannot help a ratio range that never fits)
        (["--views", "4", "--augment", "crop=0.9-1,ratio=3-4"], "fall back to a fixed centre crop (area 0.31"),
    ]:
        res = runner.invoke(app, base + args)
        assert res.exit_code == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, \
            (args, res.output)
    assert not list(root.rglob("*.zarr"))  # refused before any store was created
    with pytest.raises(KDCacheError, match="entirely off the 16x16 images"):
        run_online_kd(OnlineConfig(data=SYN, weights=str(teacher_file), augment="crop=0.1-0.2,translate=12",
                                   epochs=1, workers=0), log=lambda *_: None)
    with pytest.raises(KDCacheError, match="--aug-seed must be from 0 to 2\\*\\*63-1"):  # as teacher-cache says
        run_online_kd(OnlineConfig(data=SYN, weights=str(teacher_file), augment="flip", aug_seed=-1, epochs=1,
                                   workers=0), log=lambda *_: None)
    with pytest.raises(KDCacheError, match="online KD runs the teacher on fresh views and reads no cache"):
        run_online_kd(OnlineConfig(cache="some.zarr", data=SYN, weights=str(teacher_file)), log=lambda *_: None)
    # A near-whole-image range whose misfits fall back to the whole image is what it asks for: allowed
    from pipeline.augment import check_policy
    check_policy(AugmentPolicy.parse("crop=0.99-1"), 0, (224, 224), 4)
    # K = 1 of a real augmentation is one augmented view per sample: allowed
    assert run_teacher_cache(CacheConfig(data=SYN, weights=str(teacher_file), views=1, augment="flip"),
                             log=lambda *_: None)


def test_apply_views_against_independent_computation():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 2, 12, 10), dtype=np.uint8)
    # Pure shifts (box size = output size): zero-padded integer translation, then an optional mirror.
    box = np.array([[-2, 3, 12, 10], [0, 0, 12, 10], [4, -1, 12, 10]])
    flip = np.array([1, 0, 0])
    got = apply_views(torch.from_numpy(imgs), box, flip, (12, 10)).numpy()
    for i in range(3):
        padded = np.zeros((2, 40, 40), np.uint8)
        padded[:, 14:26, 15:25] = imgs[i]
        want = padded[:, 14 + box[i, 0]:26 + box[i, 0], 15 + box[i, 1]:25 + box[i, 1]]
        np.testing.assert_array_equal(got[i], want[:, :, ::-1] if flip[i] else want)
    # A box twice the output size: each output pixel is the mean of its 2x2 block (rounded half to even).
    box = np.array([[2, 2, 8, 6], [0, 4, 12, 6]])
    got = apply_views(torch.from_numpy(imgs[:2]), box, np.array([0, 1]), (box[0, 2] // 2, box[0, 3] // 2)).numpy()
    t, l, h, w = box[0]
    want = imgs[0, :, t:t + h, l:l + w].astype(np.float64).reshape(2, h // 2, 2, w // 2, 2).mean((2, 4))
    np.testing.assert_array_equal(got[0], np.round(want).astype(np.uint8))
    # The second box is 12x6 -> 4x3: three rows per output row, two columns; flipped.
    t, l, h, w = box[1]
    want = imgs[1, :, t:t + h, l:l + w].astype(np.float64).reshape(2, 4, 3, 3, 2).mean((2, 4))[:, :, ::-1]
    np.testing.assert_allclose(got[1], np.round(want), atol=1)  # bilinear at exact pixel centres: equal +- rounding


def test_crops_clamp_to_their_box_and_read_zero_outside_the_image():
    flat = torch.full((4, 1, 12, 10), 200, dtype=torch.uint8)
    # Boxes touching the image's edges, upscaled and downscaled: a flat image stays flat (no black blended in).
    box = np.array([[0, 0, 8, 6], [4, 4, 8, 6], [0, 0, 12, 7], [5, 0, 7, 10]])
    got = apply_views(flat, box, np.zeros(4), (11, 9))
    assert (got == 200).all()
    # A box hanging 4 rows above the image: rows that map there are 0, rows inside are the image's value.
    got = apply_views(flat[:1], np.array([[-4, 0, 8, 10]]), np.zeros(1), (16, 10))[0, 0]
    assert (got[:7] == 0).all() and (got[9:] == 200).all() and (got[7:9] > 0).all() and (got[7:9] < 200).all()


def test_plain_view_is_the_plain_input_at_any_size():
    src = open_source("synthetic:20:1x16x16:4")
    idx = np.arange(20)
    box, flip = sample_params(AugmentPolicy.parse("plain0,crop=0.5-1,flip"), 0, idx, 3, (16, 16))
    for size in ([16, 16], [24, 24], [12, 12]):
        tf = Transform(size=size, channels=1)
        assert torch.equal(src.load_view(idx, tf, box[:, 0], flip[:, 0]), src.load_raw(idx, tf)), size
        flipped = np.ones(20, np.uint8)
        assert torch.equal(src.load_view(idx, tf, box[:, 0], flipped), src.load_raw(idx, tf).flip(-1)), size


def test_a_view_cache_from_another_replay_is_refused(root, teacher_file):
    path = _cache(teacher_file, layers=[])
    g = zarr.open_group(path, mode="r+")
    man = dict(g.attrs["kdcache"])
    g.attrs["kdcache"] = man | {"views": man["views"] | {"replay": 1}}
    cfg = StudentConfig(cache=path, epochs=1, workers=0, test_data=None)
    with pytest.raises(KDCacheError, match="view replay 1"):
        run_train_student(cfg, log=lambda *_: None)
    res = runner.invoke(app, ["verify", path, "--recompute", "2"])
    assert res.exit_code != 0 and "view replay 1" in res.output
    # A store from before the replay was recorded (no field) was made by replay 1: refused as such, not taken as ours
    g.attrs["kdcache"] = man | {"views": {k: v for k, v in man["views"].items() if k != "replay"}}
    with pytest.raises(KDCacheError, match="view replay 1"):
        run_train_student(cfg, log=lambda *_: None)


def test_a_view_store_whose_manifest_views_were_edited_is_refused_in_one_line(root, teacher_file):
    """The views' record hand-edited: a seed or policy of the wrong kind failed verify, train-student and repair
    with KeyError/ValueError/AttributeError tracebacks, a count unlike the arrays' view axis with an IndexError
    mid-epoch, and views: null trained on view 0 of a view store. Each is refused like any malformed field."""
    path = _cache(teacher_file, layers=[])
    g = zarr.open_group(path, mode="r+")
    man = dict(g.attrs["kdcache"])
    for views, says in ((man["views"] | {"seed": "x"}, "has a malformed views"),
                        ({k: v for k, v in man["views"].items() if k != "seed"}, "has a malformed views"),
                        (man["views"] | {"augment": "junk"}, "has a malformed views"),
                        (man["views"] | {"count": 3}, "view count (3) is not the view axis"),
                        (None, "view count (no views) is not the view axis")):
        g.attrs["kdcache"] = man | {"views": views}
        _one_line_each(path, says)
    # the data's native shape, in which the views' boxes are drawn: KeyError / ValueError tracebacks
    for data in ({k: v for k, v in man["data"].items() if k != "native_shape"}, man["data"] | {"native_shape": "x"}):
        g.attrs["kdcache"] = man | {"data": data}
        _one_line_each(path, "has a malformed data")


def _one_line_each(path, says):
    for args in (["verify", path], ["repair", path], ["train-student", "--cache", path, "--workers", "0"]):
        res = runner.invoke(app, args)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and says in lines[0], (args, res.exception, lines)


def test_rebuilt_view_is_independent_of_its_batch():
    rng = np.random.default_rng(1)
    imgs = torch.from_numpy(rng.integers(0, 256, (40, 1, 16, 16), dtype=np.uint8))
    box, flip = sample_params(AugmentPolicy.parse(POLICY), 0, np.arange(40), [2], (16, 16))
    whole = apply_views(imgs, box[:, 0], flip[:, 0], (16, 16))
    one_by_one = torch.cat([apply_views(imgs[i:i + 1], box[i:i + 1, 0], flip[i:i + 1, 0], (16, 16))
                            for i in range(40)])
    assert torch.equal(whole, one_by_one)


def test_view_selection_cycles_through_every_view():
    for block in range(5):
        picks = [select_view("cycle", 0, e, block, 4) for e in range(8)]
        assert sorted(picks[:4]) == [0, 1, 2, 3] and picks[:4] == picks[4:]
    rand = [select_view("random", 0, e, 0, 4) for e in range(200)]
    assert set(rand) == {0, 1, 2, 3} and rand == [select_view("random", 0, e, 0, 4) for e in range(200)]
    # Within one epoch the blocks read different views: the pick is per block (a per-sample pick in distribution),
    # not one view for the whole epoch. Over 400 blocks each of the 4 views is picked about 100 times, by either
    # policy, in every epoch; and two epochs' random picks are independent (agree on about 1/4 of the blocks).
    blocks = range(400)
    for policy in ("cycle", "random"):
        for e in (0, 1, 5):
            counts = np.bincount([select_view(policy, 0, e, b, 4) for b in blocks], minlength=4)
            assert counts.min() > 60, (policy, e, counts)
    r0, r1 = ([select_view("random", 0, e, b, 4) for b in blocks] for e in (0, 1))
    assert 0.15 < np.mean(np.equal(r0, r1)) < 0.35
    # --seed reaches the pick: another seed, other views for the same (epoch, block)
    for policy in ("cycle", "random"):
        assert np.mean([select_view(policy, 0, 3, b, 4) == select_view(policy, 1, 3, b, 4) for b in blocks]) < 0.4
    with pytest.raises(KDCacheError, match="view-policy"):
        select_view("round-robin", 0, 0, 0, 4)


# ------------------------------------------------------------------------------------------------ the store
def test_view_store_layout_and_stored_outputs_match_the_teacher(root, teacher_file):
    path = _cache(teacher_file)
    g = zarr.open_group(path, mode="r")
    man = g.attrs["kdcache"]
    assert man["views"]["count"] == 4 and man["views"]["augment"]["spec"] == AugmentPolicy.parse(POLICY).spec()
    assert g["logits"].shape == (192, 4, 4) and g["logits"].chunks == (64, 1, 4)
    assert g["features/layer3"].shape == (192, 4, 64, 4, 4) and g["aug/box"].shape == (192, 4, 4)
    assert g["index"].shape == (192,) and g["labels"].shape == (192,)
    # The stored parameters are the policy's, for (seed 0, sample, view); rows hold the samples in `index` order.
    index = g["index"][:]
    box, flip = sample_params(AugmentPolicy.parse(POLICY), 0, index, 4, (16, 16))
    np.testing.assert_array_equal(g["aug/box"][:], box)
    np.testing.assert_array_equal(g["aug/flip"][:], flip)
    # --aug-seed reaches the views: another seed's store holds that seed's parameters
    other = zarr.open_group(_cache(teacher_file, layers=[], aug_seed=7), mode="r")
    box7, flip7 = sample_params(AugmentPolicy.parse(POLICY), 7, other["index"][:], 4, (16, 16))
    np.testing.assert_array_equal(other["aug/box"][:], box7)
    np.testing.assert_array_equal(other["aug/flip"][:], flip7)
    assert not np.array_equal(box7[:, 1:], sample_params(AugmentPolicy.parse(POLICY), 0, other["index"][:], 4,
                                                         (16, 16))[0][:, 1:])
    # Random (sample, view) pairs: the teacher on an independently rebuilt input gives the stored outputs.
    teacher, _ = load_teacher("default-teacher", teacher_file, 4, 1, 16)
    src, tf = open_source(SYN), Transform.from_dict(man["transform"])
    rng = np.random.default_rng(0)
    rows, views = rng.choice(192, 12, replace=False), rng.integers(0, 4, 12)
    for r, v in zip(rows, views):
        t, l, h, w = box[r, v]
        img = src._load(index[r:r + 1])[0].float()
        canvas = torch.zeros(1, 1, h, w)
        y0, y1, x0, x1 = max(t, 0), min(t + h, 16), max(l, 0), min(l + w, 16)
        canvas[0, :, y0 - t:y1 - t, x0 - l:x1 - l] = img[:, y0:y1, x0:x1]
        x = canvas if (h, w) == (16, 16) else torch.nn.functional.interpolate(canvas, size=(16, 16),
                                                                               mode="bilinear", antialias=True)
        x = x.round().clamp(0, 255)
        if flip[r, v]:
            x = x.flip(-1)
        with torch.no_grad():
            ref = teacher(tf(x.to(torch.uint8)))[0]
        stored = torch.from_numpy(g["logits"][r, v].astype(np.float32))
        # interpolation differs from roi_align by at most a grey level here and there: logits agree closely
        assert torch.allclose(stored, ref, atol=0.05, rtol=0.05), (r, v, stored, ref)
    # The manifest's means run over every (sample, view) pair: 192 x 4 of them, not 192.
    logits, labels = g["logits"][:].astype(np.float32), g["labels"][:]
    top1 = float((logits.argmax(-1) == labels[:, None]).mean())  # float16 ties aside, the teacher's own argmax
    assert man["teacher"]["accuracy"]["top1"] == pytest.approx(top1, abs=2 / 768)
    d = man["distortion"]
    assert 0.999 < d["features/layer3"]["cosine"] <= 1 and 0 < d["features/layer3"]["rel_err"] < 1e-3
    assert d["logits"]["top1_agreement"] == pytest.approx(1.0, abs=2 / 768) and 0 <= d["logits"]["kl_t1"] < 1e-5
    res = runner.invoke(app, ["verify", path, "--recompute", "24", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["recompute"]["ok"] and rep["recompute"]["views"] == [0, 1, 2, 3]


def test_verify_recompute_catches_a_tampered_view(root, teacher_file):
    path = _cache(teacher_file, layers=[], dtype="float32")  # exact: a random teacher's logits barely move
    g = zarr.open_group(path, mode="r+")
    logits = g["logits"][:]
    g["logits"][:, 1], g["logits"][:, 2] = logits[:, 2], logits[:, 1]  # views 1 and 2 swapped: every chunk valid
    assert runner.invoke(app, ["verify", path]).exit_code == 0  # checksums cannot tell
    # Two samples are enough: every view of each is recomputed, views 1 and 2 among them.
    res = runner.invoke(app, ["verify", path, "--recompute", "2"])
    assert res.exit_code == 1 and "BAD  recompute logits" in res.stdout
    # Every sample recomputed names every unit that holds another view's outputs; repair --recompute redoes just
    # those, and the store ends bitwise as it was made.
    res = runner.invoke(app, ["verify", path, "--recompute", "192", "--json"])
    found = {(p["array"], p["block"], p["view"]) for p in json.loads(res.stdout)["recompute"]["problems"]}
    assert res.exit_code == 1 and found == {("logits", b, v) for b in range(3) for v in (1, 2)}, found
    assert "BAD  recompute logits chunk 2 view 1 (rows 128-191)" in runner.invoke(
        app, ["verify", path, "--recompute", "192"]).stdout
    res = runner.invoke(app, ["repair", path, "--recompute", "192"])
    assert res.exit_code == 0 and "recomputing 6 bad chunk(s): 0/view 1, 0/view 2, 1/view 1" in res.stderr, \
        res.output
    np.testing.assert_array_equal(zarr.open_group(path, mode="r")["logits"][:], logits)


def test_view_parameters_swapped_between_chunks_are_found_without_the_teacher_and_repaired(root, teacher_file):
    """`aug/box` and `aug/flip` are a pure function of (--aug-seed, sample index, view): a chunk holding another
    view's or block's parameters (every checksum passes) is named by plain verify and repair rewrites it, instead of
    the student rebuilding inputs that do not match their targets."""
    path = _cache(teacher_file, layers=[])
    g = zarr.open_group(path, mode="r+")
    before = {n: np.asarray(g[n][:]) for n in ("logits", "aug/box", "aug/flip")}
    root_ = root / path
    for name, (a, b) in {"aug/box": (("1", "1", "0"), ("1", "2", "0")), "aug/flip": (("2", "3"), ("0", "3"))}.items():
        fa, fb = root_ / name / "c" / Path(*a), root_ / name / "c" / Path(*b)
        raw_a, raw_b = fa.read_bytes(), fb.read_bytes()
        fa.write_bytes(raw_b), fb.write_bytes(raw_a)
    res = runner.invoke(app, ["verify", path, "--json"])
    assert res.exit_code == 1, res.output
    bad = {(p["array"], p["block"], p["view"]) for p in json.loads(res.stdout)["problems"]}
    assert bad == {("aug/box", 1, 1), ("aug/box", 1, 2), ("aug/flip", 2, 3), ("aug/flip", 0, 3)}
    assert "aug/box chunk 1 view 2 (rows 64-127): not this view's parameters" in runner.invoke(
        app, ["verify", path]).stdout
    # train-student refuses it in one line (each view's chunk is checked as it is read), not a run on wrong inputs
    train = ["train-student", "--cache", path, "--epochs", "4", "--workers", "0", "--out", "run", "--test-data",
             SYN_TEST]
    res = runner.invoke(app, train)
    lines = [x for x in res.stderr.strip().splitlines() if not x.startswith("note: ") and "━" not in x]
    assert res.exit_code == 2 and len(lines) == 1 and "are not this view's parameters; run `kdcache verify`" in \
        lines[0], res.output[-600:]
    res = runner.invoke(app, ["repair", path])
    assert res.exit_code == 0 and "recomputing 4 bad chunk(s): 0/view 3, 1/view 1, 1/view 2, 2/view 3" in res.stderr
    assert runner.invoke(app, train + ["--overwrite"]).exit_code == 0
    g = zarr.open_group(path, mode="r")
    for n, v in before.items():
        np.testing.assert_array_equal(g[n][:], v, err_msg=n)


def test_flipped_byte_in_a_view_chunk_is_named_and_repaired(root, teacher_file):
    path = _cache(teacher_file)
    before = {n: np.asarray(zarr.open_group(path, mode="r")[n][:]) for n in ("logits", "features/layer3", "aug/box")}
    f = next(p for p in sorted((root / path / "features" / "layer3" / "c").rglob("*")) if p.is_file()
             and p.relative_to(root / path / "features" / "layer3" / "c").parts[:2] == ("1", "2"))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    res = runner.invoke(app, ["verify", path])
    assert res.exit_code == 1
    assert "features/layer3 chunk 1 view 2 (rows 64-127): crc32c checksum mismatch" in res.stdout
    res = runner.invoke(app, ["repair", path])
    assert res.exit_code == 0 and "recomputing 1 bad chunk(s): 1/view 2" in res.stderr
    g = zarr.open_group(path, mode="r")
    for n, v in before.items():
        np.testing.assert_array_equal(g[n][:], v)


def test_repair_of_an_index_or_labels_chunk_redoes_view_0_alone(root, teacher_file):
    """index and labels are written by a block's first unit (view 0): repair redoes that unit, not all K views."""
    path = _cache(teacher_file, layers=[])
    g = zarr.open_group(path, mode="r")
    before = {n: np.asarray(g[n][:]) for n in ("index", "labels", "logits", "aug/box", "aug/flip")}
    (root / path / "labels" / "c" / "1").unlink()
    f = root / path / "index" / "c" / "2"
    f.write_bytes(f.read_bytes()[:-3])
    res = runner.invoke(app, ["repair", path])
    assert res.exit_code == 0 and "recomputing 2 bad chunk(s): 1/view 0, 2/view 0" in res.stderr, res.output
    assert "640/768 sample-views already cached" in res.stderr, res.stderr
    g = zarr.open_group(path, mode="r")
    for n, v in before.items():
        np.testing.assert_array_equal(g[n][:], v, err_msg=n)


def test_train_student_names_the_damaged_chunk_of_an_array_it_holds_in_memory(root, teacher_file):
    """Small arrays (logits here) are read whole when the stream opens: a chunk failing its checksum is named with
    its own rows and view, as verify names it, not as the whole array's rows."""
    path = _cache(teacher_file, layers=[])
    f = root / path / "logits" / "c" / "1" / "2" / "0"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    res = runner.invoke(app, ["train-student", "--cache", path, "--epochs", "1", "--workers", "0", "--out", "run",
                              "--test-data", SYN_TEST])
    lines = [x for x in res.stderr.strip().splitlines() if not x.startswith("note: ") and "━" not in x]
    assert res.exit_code == 2 and len(lines) == 1, res.output[-600:]
    assert "cannot read logits rows 64-127 (view 2) from" in lines[0], lines[0]


def _epoch(path, workers, batch_size, epoch=0):
    store = st.open_store(path)
    stream = CacheStream(store, open_source(SYN), ["logits", "features/layer3"], batch_size, use_labels=True,
                         seed=0)
    stream.set_epoch(epoch)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=worker_init)
    rows = {}
    for b in loader:
        for i, idx in enumerate(b["index"].tolist()):
            assert idx not in rows  # every sample once per epoch
            rows[idx] = (int(b["view"][i]), b["x"][i].clone(), b["logits"][i].clone(), b["features/layer3"][i].clone())
    assert sorted(rows) == list(range(192))
    return rows


def test_rebuilt_inputs_bitwise_identical_across_workers_batch_sizes_and_resume(root, teacher_file, monkeypatch):
    path = _cache(teacher_file)
    a = _epoch(path, 0, 32)
    b = _epoch(path, 2, 50)
    for idx in a:
        assert a[idx][0] == b[idx][0] and torch.equal(a[idx][1], b[idx][1]), idx
        assert torch.equal(a[idx][2], b[idx][2]) and torch.equal(a[idx][3], b[idx][3])
    # The targets are the stored ones of the picked view; over 4 epochs each sample meets all 4 views (cycle).
    g = zarr.open_group(path, mode="r")
    src, tf = open_source(SYN), Transform.from_dict(g.attrs["kdcache"]["transform"])
    row_of = np.argsort(g["index"][:])  # sample index -> its row in the store
    for idx, (v, x, logits, hint) in list(a.items())[:20]:
        r = row_of[idx]
        np.testing.assert_array_equal(logits.numpy(), g["logits"][r, v])
        np.testing.assert_array_equal(hint.numpy(), g["features/layer3"][r, v])  # the hint of the same view
        # ... and the input is that view's: rebuilt from its stored parameters, not another view's
        want = apply_views(src._load(np.array([idx])), g["aug/box"][r:r + 1, v], g["aug/flip"][r:r + 1, v],
                           tf.size)[0]
        assert torch.equal(x, want), (idx, v)
    # ... through the persistent-worker loader training uses, with set_epoch between epochs
    stream = CacheStream(st.open_store(path), open_source(SYN), ["logits"], 64, use_labels=True, seed=0)
    loader = make_loader(stream, 1)
    seen = {i: set() for i in a}
    for e in range(4):
        stream.set_epoch(e)
        for b in loader:
            for i, v in zip(b["index"].tolist(), b["view"].tolist()):
                seen[i].add(v)
    assert all(s == {0, 1, 2, 3} for s in seen.values())
    # --view-policy random reaches the stream: each block's view is select_view's random pick for that epoch.
    stream = CacheStream(st.open_store(path), open_source(SYN), ["logits"], 64, use_labels=True, seed=0,
                         view_policy="random")
    picked = {}
    for e in range(6):
        stream.set_epoch(e)
        for b in DataLoader(stream, batch_size=None, num_workers=0):
            for i, v in zip(b["index"].tolist(), b["view"].tolist()):
                block = int(row_of[i]) // 64
                assert v == select_view("random", 0, e, block, 4), (e, i)
                picked.setdefault(block, []).append(v)
    assert any(len(set(vs)) > 1 and vs != sorted(vs) for vs in picked.values())  # not cycle's order
    # A run interrupted after 3 units and resumed: same parameters, same targets, same rebuilt inputs.
    _interrupted_cache(monkeypatch, 4, teacher_file, out="resumed.zarr")
    resumed = _cache(teacher_file, out="resumed.zarr")
    ga, gb = zarr.open_group(path, mode="r"), zarr.open_group(resumed, mode="r")
    for name in ("aug/box", "aug/flip", "logits", "features/layer3", "index", "labels"):
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)
    c = _epoch(resumed, 0, 32)
    assert all(torch.equal(a[i][1], c[i][1]) for i in a)


# ------------------------------------------------------------------------------------------------ the student
def test_student_trains_on_views_and_refuses_another_policy(root, teacher_file, monkeypatch):
    path = _cache(teacher_file)
    s = run_train_student(StudentConfig(cache=path, loss="kd=1,fitnets=1", fitnets_schedule="single", epochs=2,
                                        batch_size=32, workers=0, test_data=SYN_TEST, augment=POLICY, out="run",
                                        view_policy="random"), log=lambda *_: None)
    assert 0 <= s["test_acc"] <= 1
    cfg = json.loads(open("run/config.json").read())
    assert cfg["cache"]["views"]["count"] == 4
    res = runner.invoke(app, ["train-student", "--cache", path, "--augment", "flip", "--workers", "0"])
    assert res.exit_code == 2
    line = res.stderr.strip().splitlines()
    assert len(line) == 1 and "holds views augmented with" in line[0] and "asks for 'flip'" in line[0]
    fixed = _cache(teacher_file, views=1, augment=None)
    with pytest.raises(KDCacheError, match="holds views augmented with 'none'.*--views K --augment"):
        run_train_student(StudentConfig(cache=fixed, augment="flip", workers=0, out="run2"))
    with pytest.raises(KDCacheError, match="needs --augment POLICY .*: un-augmented views would all be the same"):
        _cache(teacher_file, views=4, augment=None)
    # a policy that moves nothing is named as such, not as a missing one
    with pytest.raises(KDCacheError, match="needs --augment POLICY .*: --augment translate=0 changes no input, so "
                                           "its views would all be the same input$"):
        _cache(teacher_file, views=4, augment="translate=0")
    # --augment from a store only checks the store's policy (its key names it): a run started with it resumes
    # without it, and the other way round
    import pipeline.train_student as ts

    real = ts.save_whole

    def stop_after_checkpoint(obj, at, then):
        real(obj, at, then)
        if at.name == "checkpoint.pt":
            raise KeyboardInterrupt

    for first, then in ((["--augment", POLICY], []), ([], ["--augment", POLICY])):
        args = ["train-student", "--cache", path, "--workers", "0", "--epochs", "2", "--out", "cut"]
        with monkeypatch.context() as m:
            m.setattr(ts, "save_whole", stop_after_checkpoint)
            assert runner.invoke(app, args + ["--overwrite", *first]).exit_code == 130
        res = runner.invoke(app, args + ["--resume", *then])
        assert res.exit_code == 0 and "resuming cut after epoch 1/2" in res.stderr, (first, then, res.output)


def test_online_views_are_fresh_every_epoch_with_persistent_workers():
    from pipeline.data import default_transform
    from pipeline.online import OnlineStream

    src = open_source(SYN)
    stream = OnlineStream(src, default_transform(src), AugmentPolicy.parse(POLICY), 64, 0, 0, True)
    loader = make_loader(stream, 1)
    epochs = []
    for e in range(2):
        stream.set_epoch(e)
        batches = list(loader)
        order = torch.cat([b["index"] for b in batches])
        x = torch.cat([b["x"] for b in batches])[order.argsort()]
        assert sorted(order.tolist()) == list(range(192))
        epochs.append(x)
    assert (epochs[0] != epochs[1]).flatten(1).any(1).float().mean() > 0.9  # new views, not epoch 0's again


def test_online_loader_workers_share_an_epoch_each_sample_once():
    """Online KD with several loader workers: each worker takes its own batches, so an epoch still gives every
    sample once, in the same batches and views as one worker gives (each worker yielding every batch passed every
    test: the online reference trained on each batch once per worker); the next epoch is shuffled anew (the order of epoch 0 every epoch passed too)."""
    from pipeline.data import default_transform
    from pipeline.online import OnlineStream

    src = open_source(SYN)
    stream = OnlineStream(src, default_transform(src), AugmentPolicy.parse(POLICY), 40, 0, 0, True)
    ref = {int(b["index"][0]): b for b in make_loader(stream, 0)}
    assert sorted(len(b["index"]) for b in ref.values()) == [32, 40, 40, 40, 40]  # 192 rows in batches of 40
    batches = list(make_loader(stream, 2))  # 5 batches: one worker takes 3, the other 2
    order = torch.cat([b["index"] for b in batches])
    assert sorted(order.tolist()) == list(range(192))
    for b in batches:
        assert torch.equal(b["index"], ref[int(b["index"][0])]["index"])
        assert torch.equal(b["x"], ref[int(b["index"][0])]["x"])
    stream.set_epoch(1)  # the next epoch: another shuffle (and other views)
    assert not torch.equal(torch.cat([b["index"] for b in make_loader(stream, 0)]), torch.cat(
        [b["index"] for b in ref.values()]))


def test_views_on_unlabelled_data(root):
    from PIL import Image

    from tests.conftest import save_teacher

    folder = root / "flat"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (14, 14), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    w = save_teacher(root / "t.pt", num_classes=3)
    res = runner.invoke(app, ["teacher-cache", "--data", f"imagefolder:{folder}", "--weights", str(w), "--views",
                              "3", "--augment", "crop=0.5-1,flip", "--layer", "avgpool", "--chunk-samples", "8"])
    assert res.exit_code == 0, res.output
    path = res.stdout.strip().splitlines()[-1]
    g = zarr.open_group(path, mode="r")
    assert "labels" not in g and g["logits"].shape == (24, 3, 3)
    res = runner.invoke(app, ["train-student", "--cache", path, "--loss", "kd=1,rkd=1", "--epochs", "2",
                              "--batch-size", "8", "--workers", "0", "--out", "run"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in open("run/metrics.jsonl")]
    assert set(rows[0]["losses"]) == {"kd_soft", "rkd_distance", "rkd_angle"}


def test_views_table_reports_differences_and_the_gap_only_where_there_is_one():
    from pipeline.results_views import table

    def row(arm, views, augment, accs, cache=0.0):
        return {"arm": arm, "views": views, "augment": augment, "test_acc": accs, "cache_seconds": cache,
                "train_seconds": 10.0, "bytes_per_sample": 20.0}

    r = {"seeds": [0, 1], "loss": "kd=1", "epochs": 1, "machine": "m", "rows": [
        row("a", 1, None, [0.80, 0.80], cache=5.0),
        row("b-mild", 4, "flip", [0.83, 0.83]), row("c-mild", None, "flip", [0.84, 0.84]),
        row("b-hard", 4, "crop=0.5-1", [0.70, 0.72]), row("c-hard", None, "crop=0.5-1", [0.75, 0.75])]}
    lines = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in table(r).splitlines() if ln.startswith("| ")}
    assert lines["b-mild"][2:5] == ["+3.00", "-1.00", "75%"]         # (83 - 80) / (84 - 80)
    assert lines["b-hard"][2:5] == ["-9.00", "-4.00", "no gap: (c) ≤ (a)"]
    assert lines["a"][5] == "15" and lines["c-mild"][2:5] == ["+4.00", "-", "-"]


def test_results_tables_time_a_resumed_cache_for_the_whole_store(root, teacher_file, monkeypatch):
    """The manifest times the run that finished a store; a resumed store's time is scaled to every unit, flagged."""
    from pipeline.results import cache_seconds
    from pipeline.results_views import table

    _interrupted_cache(monkeypatch, 5, teacher_file, layers=[], out="r.zarr")
    man = st.open_store(_cache(teacher_file, layers=[], out="r.zarr")).manifest
    stats = man["stats"]
    done = 192 * 4 - stats["samples_computed"]  # units of 64 rows committed before the failure
    assert done >= 4 * 64 and done % 64 == 0
    seconds, approx = cache_seconds(man)
    assert approx and seconds == pytest.approx(stats["seconds"] * 768 / (768 - done))
    whole = st.open_store(_cache(teacher_file, layers=[], out="w.zarr")).manifest
    assert cache_seconds(whole) == (whole["stats"]["seconds"], False)
    assert cache_seconds({"data": {"num_samples": 1}}) == (None, False)  # not recorded: unknown, not zero
    # finished by a run that computed nothing (it only marked the store complete): unknown too
    assert cache_seconds({"data": {"num_samples": 8}, "stats": {"seconds": 0.03, "samples_computed": 0}}) == (
        None, False)
    row = {"arm": "a", "views": 4, "augment": None, "test_acc": [0.8], "train_seconds": 10.0, "bytes_per_sample": 1.0,
           "cache_seconds": 30.0, "cache_extrapolated": True}
    md = table({"seeds": [0], "loss": "kd=1", "epochs": 1, "machine": "m", "rows": [row], "temperature": 2.0,
                "schedule": "batch 64, adamw + cosine, lr 0.01"})
    assert "| ≈40 | ≈30 | 10 |" in md and "≈: a cache whose run was resumed" in md
    assert "(T=2), 1 epochs, batch 64, adamw + cosine, lr 0.01" in md
    md = table({"seeds": [0], "loss": "kd=1", "epochs": 1, "machine": "m",
                "rows": [row | {"cache_seconds": None, "cache_extrapolated": False}]})
    assert "| - | - | 10 |" in md and "≈" not in md


def test_online_kd_targets_are_the_eval_teacher_on_the_view_and_its_student_starts_as_a_cached_one(root,
                                                                                                 teacher_file,
                                                                                                 monkeypatch):
    """Online KD is the reference the views experiment compares with: its targets must be the teacher in eval mode
    on exactly the batch's normalised input, carrying no gradient, the teacher unchanged by training; and at one seed
    its student must start from the weights a cached run starts from (a paired comparison)."""
    import pipeline.online as online
    import pipeline.train_student as ts
    from pipeline.data import default_transform
    from pipeline.models import capture, fingerprint_module

    starts, seen, built = {}, [], []

    def spy_setup(which):
        def wrapped(*a, **k):
            s = real_setup(*a, **k)
            starts[which] = fingerprint_module(s.student, params_only=True)
            return s
        return wrapped

    def spy_fit(cfg, s, loader, set_epoch, steps, targets, *rest, **kw):
        def checked(batch, device):
            out = targets(batch, device)
            seen.append((batch["x"].clone(), {k: v.detach().clone() for k, v in out.items()},
                         [v.requires_grad for v in out.values()]))
            return out
        return real_fit(cfg, s, loader, set_epoch, steps, checked, *rest, **kw)

    def spy_load(*a, **k):
        built.append(real_load(*a, **k))
        return built[-1]

    real_setup, real_fit, real_load = ts.setup, online.fit, online.load_teacher
    monkeypatch.setattr(online, "fit", spy_fit)
    monkeypatch.setattr(online, "load_teacher", spy_load)
    monkeypatch.setattr(online, "setup", spy_setup("online"))
    common = dict(loss="kd=1,fitnets=1", fitnets_schedule="single", fitnets_hint="layer3", epochs=1, batch_size=64,
                  workers=0, seed=3, test_data=SYN_TEST)
    online.run_online_kd(online.OnlineConfig(data=SYN, weights=str(teacher_file), augment="crop=0.5-1,flip",
                                             out="online", **common), log=lambda *_: None)
    monkeypatch.setattr(ts, "setup", spy_setup("cached"))
    ts.run_train_student(StudentConfig(cache=_cache(teacher_file, views=1, augment=None), out="cached", **common),
                         log=lambda *_: None)
    assert starts["online"] == starts["cached"]
    # the targets, against the teacher loaded afresh, in eval mode, on the same uint8 batch
    teacher, meta = load_teacher("default-teacher", teacher_file, 4, 1, 16)
    tf = Transform.from_dict(meta["transform"]) if "transform" in meta else default_transform(open_source(SYN))
    assert len(seen) == 3  # 192 samples, batches of 64
    for x, out, grads in seen:
        with torch.no_grad(), capture(teacher, ["layer3"]) as feats:
            ref = teacher.eval()(tf(x))
        assert torch.equal(out["logits"], ref) and torch.equal(out["features/layer3"], feats["layer3"])
        assert not any(grads)
    assert fingerprint_module(built[0][0]) == fingerprint_module(teacher)  # training never touched the teacher
    assert not built[0][0].training


@pytest.mark.parametrize("loss", ["ce=1", "kd=1,ce=1"])
def test_online_kd_refuses_a_label_loss_with_labels_hidden_as_train_student_does(root, teacher_file, loss):
    """ce with --no-labels: train-student refuses it before training; online KD reached cross_entropy(s, None) on
    the first batch (a TypeError traceback)."""
    import pipeline.online as online

    with pytest.raises(KDCacheError, match="^loss 'ce' needs labels but --no-labels hides them; drop it from --loss"):
        online.run_online_kd(online.OnlineConfig(data=SYN, weights=str(teacher_file), loss=loss, no_labels=True,
                                                 epochs=1, workers=0, out="online"), log=lambda *_: None)
    assert not Path("online").exists()  # refused before the run directory


def test_online_kd_trains_on_data_of_one_sample(root, teacher_file):
    """`kdcache bench --samples 1` runs online KD on one sample: its probe of the teacher loaded samples 0 and 1 and
    stopped with "sample index out of range ... the store was made from other data" (there is no store)."""
    import pipeline.online as online

    out = online.run_online_kd(online.OnlineConfig(data="synthetic:1:1x16x16:4", weights=str(teacher_file),
                                                   loss="kd=1", epochs=1, batch_size=32, workers=0,
                                                   test_data=SYN_TEST, out="online"), log=lambda *_: None)
    assert out["epochs"] == 1
    assert [json.loads(line)["samples"] for line in Path("online/metrics.jsonl").read_text().splitlines()] == [1]


def test_a_store_made_before_the_crop_fallback_check_is_still_verified_repaired_and_hit(root, teacher_file,
                                                                                        monkeypatch):
    """A policy refused since (its crops fall back to a fixed centre crop on these wide images) made stores before
    the check existed: those are still checked, repaired and hit; only a new store with it is refused."""
    import pipeline.teacher_cache as tc

    data, policy = "synthetic:64:1x8x32:4", "crop=0.5-1,flip"
    flags = ["--data", data, "--weights", str(teacher_file), "--views", "2", "--augment", policy,
             "--chunk-samples", "32"]
    with monkeypatch.context() as m:  # the kdcache of before: no fallback check
        m.setattr(tc, "check_crop_fallback", lambda *a, **k: None)
        assert runner.invoke(app, ["teacher-cache", *flags, "--out", "old.zarr"]).exit_code == 0
    res = runner.invoke(app, ["verify", "old.zarr", "--recompute", "4"])
    assert res.exit_code == 0, res.output
    next(p for p in sorted(Path("old.zarr/logits/c").rglob("*")) if p.is_file()).unlink()
    res = runner.invoke(app, ["repair", "old.zarr"])
    assert res.exit_code == 0 and runner.invoke(app, ["verify", "old.zarr"]).exit_code == 0, res.output
    res = runner.invoke(app, ["teacher-cache", *flags, "--out", "old.zarr"])
    assert res.exit_code == 0 and "cache hit" in res.stderr, res.output
    res = runner.invoke(app, ["teacher-cache", *flags, "--out", "new.zarr"])
    assert res.exit_code == 2 and "fall back to a fixed centre crop" in res.stderr and not Path("new.zarr").exists()


def test_readme_tables_are_refused_before_the_run_unless_the_markers_enclose_a_section(root):
    """check_readme (run before hours of results) refuses what write_readme (run after them) cannot use: markers
    missing, or the end marker before the start marker. Markers in order: only the text between them changes."""
    from pipeline.errors import KDCacheError
    from pipeline.results import END, START, check_readme, write_readme

    readme = Path("R.md")
    for text in ("no markers\n", f"a\n{START}\nb\n", f"a\n{END}\nb\n{START}\nc\n"):
        readme.write_text(text)
        with pytest.raises(KDCacheError, match="markers"):
            check_readme(START, END, readme)
        with pytest.raises(KDCacheError, match="markers"):
            write_readme("table\n", START, END, readme)
        assert readme.read_text() == text
    readme.write_text(f"a\n{END}\n{START}\nold\n{END}\nz\n")  # an end before the section is text like any other
    write_readme("table\n", START, END, readme)
    assert readme.read_text() == f"a\n{END}\n{START}\ntable\n{END}\nz\n"


def test_results_commands_refuse_in_one_line(root):
    """`make results*` run these modules directly, not through the kdcache CLI: a refusal is still one line on
    stderr and exit 2, not a traceback (here: run from a folder whose README has no markers)."""
    import os
    import subprocess
    import sys

    Path("README.md").write_text("no markers\n")
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for module in ("pipeline.results", "pipeline.results_views", "pipeline.results_codecs"):
        res = subprocess.run([sys.executable, "-m", module, "--write-readme"], capture_output=True, text=True,
                             env=env, timeout=120)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "markers" in lines[0], \
            (module, res.stderr)


def test_results_commands_refuse_bad_numbers_and_a_missing_table_before_any_run(root, monkeypatch, capsys):
    """--seeds abc failed with int()'s ValueError traceback, --seeds -1 or --epochs 0 only at the first student run
    (after the teacher-cache run), --table-only before any run with a FileNotFoundError traceback."""
    import sys

    import pipeline.results as r
    import pipeline.results_views as rv

    def no_run(*a, **k):
        raise AssertionError("refused before any run")

    monkeypatch.setattr(r, "run", no_run)
    monkeypatch.setattr(rv, "run", no_run)
    for module, args, says in ((r, ["--seeds", "abc"], "--seeds takes whole numbers from 0 separated by commas"),
                               (r, ["--seeds", "-1"], "(got '-1')"),
                               (r, ["--epochs", "0"], "--epochs must be at least 1"),
                               (r, ["--table-only"], "results.json does not exist; run without --table-only first"),
                               (rv, ["--views", "4,0"], "--views takes whole numbers from 1"),
                               (rv, ["--workers", "-1"], "--workers at least 0"),
                               (rv, ["--table-only"], "views.json does not exist; run without --table-only first")):
        monkeypatch.setattr(sys, "argv", [module.__name__, *args])
        with pytest.raises(SystemExit) as exit_:
            r.one_line_errors(module.main)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1 and says in lines[0], (module.__name__, args, lines)

    def interrupted(*a, **k):  # Ctrl-C hours into `make results`: one line saying the finished runs are kept
        raise KeyboardInterrupt

    monkeypatch.setattr(r, "run", interrupted)
    monkeypatch.setattr(sys, "argv", [r.__name__])
    with pytest.raises(SystemExit) as exit_:
        r.one_line_errors(r.main)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 130 and lines == ["interrupted; re-run the same command: the runs that finished are "
                                                 "kept and it goes on from there"], lines


def test_results_tables_say_their_std_is_the_sample_std_and_use_it():
    """mean ± std over 3 seeds: the sample standard deviation (n − 1), and each table's header says so."""
    import math

    from pipeline import results, results_views

    accs = [0.90, 0.91, 0.95]   # in points 90, 91, 95: mean 92, squared deviations 4 + 1 + 9
    sample, population = math.sqrt(14 / 2), math.sqrt(14 / 3)
    assert results._fmt(accs) == f"92.00 ± {sample:.2f}" != f"92.00 ± {population:.2f}"
    r = {"seeds": [0, 1, 2], "epochs": 1, "machine": "m", "cache": {"seconds": 1.0},
         "teacher": {"epochs": 1, "test_acc": 0.9, "train_seconds": 1.0},
         "rows": [{"method": "x", "test_acc": accs, "seconds": 1.0, "samples_per_s": 1.0}]}
    views = {"seeds": [0, 1, 2], "loss": "kd=1", "epochs": 1, "machine": "m",
             "rows": [{"arm": "a", "views": 1, "augment": None, "test_acc": accs, "cache_seconds": 1.0,
                       "train_seconds": 1.0, "bytes_per_sample": 1.0}]}
    for text in (results.table(r), results_views.table(views)):
        assert "mean ± sample std (n − 1) over seeds 0, 1, 2" in text and f"92.00 ± {sample:.2f}" in text
