"""One CliRunner test per command not covered elsewhere: teacher, plan, ls, inspect, eval, bench."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from pipeline.catalog import disk_bytes
from pipeline.cli import app
from tests.conftest import SYN, SYN_TEST, save_teacher

runner = CliRunner()


def test_teacher_command_trains_and_saves_weights_with_transform(root):
    res = runner.invoke(app, ["teacher", "--data", SYN, "--test-data", SYN_TEST, "--epochs", "2", "--batch-size",
                              "32", "--out", "t.pt"])
    assert res.exit_code == 0, res.output
    ckpt = torch.load("t.pt", weights_only=True)
    meta = json.loads(Path("t.json").read_text())
    assert set(ckpt) == {"state_dict", "meta"} and ckpt["meta"]["transform"]["size"] == [16, 16]
    assert meta["num_classes"] == 4 and 0.0 <= meta["test_accuracy"] <= 1.0 and "test acc" in res.stderr
    assert res.stdout.strip().splitlines()[-1] == "t.pt"
    # The recorded accuracy is the saved model's, measured independently here.
    from pipeline.data import Transform, open_source
    from pipeline.models import build_model

    model = build_model("default-teacher", 4, 1, 16)
    model.load_state_dict(ckpt["state_dict"])
    src = open_source(SYN_TEST)
    with torch.no_grad():
        pred = model.eval()(src.load(np.arange(64), Transform.from_dict(meta["transform"]))).argmax(1).numpy()
    assert meta["test_accuracy"] == (pred == src.labels(np.arange(64))).mean()


TINY = "synthetic:64:1x8x8:4"  # the teacher tests below that train: one epoch in about a second


def test_teacher_normalize_is_recorded_and_fed_to_it_by_teacher_cache(root):
    """`kdcache teacher --normalize` trains on those statistics and records them, so teacher-cache feeds the teacher
    the same input: the stored logits are the saved model's on (x/255 - 0.25) / 0.5, computed here by hand. A
    spec that cannot be read is refused before any training, and nothing is written."""
    bad = runner.invoke(app, ["teacher", "--data", TINY, "--epochs", "1", "--channels", "3", "--normalize",
                              "0.1,0.2/0.5", "--out", "t.pt"])
    assert bad.exit_code == 2 and not Path("t.pt").exists()
    assert "--normalize '0.1,0.2/0.5' gives 2 mean(s) and 1 std(s) for 3-channel inputs" in bad.stderr
    res = runner.invoke(app, ["teacher", "--data", TINY, "--epochs", "1", "--channels", "3", "--normalize",
                              "0.25/0.5", "--out", "t.pt"])
    assert res.exit_code == 0, res.output
    meta = json.loads(Path("t.json").read_text())
    assert meta["transform"]["mean"] == [0.25] * 3 and meta["transform"]["std"] == [0.5] * 3
    res = runner.invoke(app, ["teacher-cache", "--data", TINY, "--weights", "t.pt", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    g = zarr.open_group(res.stdout.strip().splitlines()[-1], mode="r")
    assert g.attrs["kdcache"]["transform"]["mean"] == [0.25] * 3
    from pipeline.data import Transform, open_source
    from pipeline.models import build_model

    model = build_model("default-teacher", 4, 3, 8)
    model.load_state_dict(torch.load("t.pt", weights_only=True)["state_dict"])
    index = g["index"][:]
    raw = open_source(TINY).load_raw(index, Transform(size=[8, 8], channels=3))  # uint8, grey repeated to RGB
    with torch.no_grad():
        expect = model.eval()((raw.float() / 255 - 0.25) / 0.5)
    torch.testing.assert_close(torch.from_numpy(g["logits"][:]), expect, rtol=1e-5, atol=1e-5)


def _crop_flip_by_hand(x, gen, pad=2):
    """The teacher's augmentation, one sample at a time: a shift by up to `pad` pixels (the border filled with the
    batch's minimum), then a horizontal flip with probability 1/2; shifts then flips drawn from `gen` in that order."""
    n, _c, h, w = x.shape
    dy, dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen), torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    padded = torch.nn.functional.pad(x, (pad,) * 4, value=float(x.min()))
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def test_teacher_trains_the_documented_recipe_from_its_seed(root):
    """`kdcache teacher` trains exactly this: weights initialised from --seed, each epoch's order a permutation
    seeded by (seed, epoch), every batch shifted and flipped from a generator seeded by --seed, SGD (Nesterov momentum
    0.9, the weight decay) under a half-epoch linear warm-up then a cosine to zero over every step, cross-entropy on
    the labels, and the accuracy recorded that of the final weights on the test data. Replayed here by hand, the
    saved weights match; the same seed trains the same bytes again, another seed other weights."""
    from pipeline.data import default_transform, open_source
    from pipeline.models import TeacherNet

    seed, epochs, bs, lr, wd = 3, 2, 16, 0.05, 1e-3
    args = ["teacher", "--data", TINY, "--test-data", "synthetic:32:1x8x8:4:5", "--epochs", str(epochs),
            "--batch-size", str(bs), "--lr", str(lr), "--weight-decay", str(wd), "--seed", str(seed)]
    assert runner.invoke(app, args + ["--out", "t.pt"]).exit_code == 0
    src, test = open_source(TINY), open_source("synthetic:32:1x8x8:4:5")
    tf = default_transform(src)
    torch.manual_seed(seed)
    model = TeacherNet(num_classes=4, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    gen = torch.Generator().manual_seed(seed)
    per_epoch = 64 // bs
    total, warmup, step = epochs * per_epoch, per_epoch // 2, 0
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(64)
        for b in range(per_epoch):
            idx = order[b * bs:(b + 1) * bs]
            rate = lr * (step + 1) / warmup if step < warmup else \
                lr / 2 * (1 + np.cos(np.pi * (step - warmup) / (total - warmup)))
            for g in opt.param_groups:
                g["lr"] = rate
            x = _crop_flip_by_hand(src.load(idx, tf), gen)
            loss = torch.nn.functional.cross_entropy(model.train()(x), torch.from_numpy(src.labels(idx)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    saved = torch.load("t.pt", weights_only=True)
    assert saved["state_dict"].keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(saved["state_dict"][k], v, msg=k)
    with torch.no_grad():
        pred = model.eval()(test.load(np.arange(32), tf)).argmax(1).numpy()
    assert saved["meta"]["test_accuracy"] == (pred == test.labels(np.arange(32))).mean()
    assert saved["meta"]["transform"] == tf.to_dict()
    assert runner.invoke(app, args + ["--out", "again.pt"]).exit_code == 0
    again = torch.load("again.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(again[k], v) for k, v in saved["state_dict"].items())
    assert runner.invoke(app, args[:-1] + [str(seed + 1), "--out", "other.pt"]).exit_code == 0
    other = torch.load("other.pt", weights_only=True)["state_dict"]
    assert not torch.equal(other["conv1.weight"], saved["state_dict"]["conv1.weight"])


def _one_line_error(res, *wanted):
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.output
    assert res.stderr.startswith("error: ") and "Traceback" not in res.output, res.output
    for w in wanted:
        assert w in res.stderr, res.stderr


def test_a_teachers_file_records_its_arch_classes_channels_and_test_accuracy(root):
    """`kdcache teacher --arch mlp --channels 3` on grey class folders, scored on a test folder holding only its
    last class: the file records the architecture (eval builds it from that alone), the class names (a test folder
    is matched by name, the cache records them), 3 input channels (teacher-cache on the grey data, without
    --channels, builds and feeds it 3) and the accuracy of its final weights with the test labels matched by name."""
    from pipeline.data import Transform, open_source
    from pipeline.models import MLP
    from tests.test_pipeline import _write_images

    for i, c in enumerate(("ant", "bee", "cat")):
        _write_images(root / "train" / c, 6, rgb=False, seed=i)
    _write_images(root / "test" / "cat", 6, rgb=False, seed=2)  # the training cats' own images: some come out cat
    res = runner.invoke(app, ["teacher", "--data", f"imagefolder:{root / 'train'}", "--test-data",
                              f"imagefolder:{root / 'test'}", "--arch", "mlp", "--channels", "3", "--image-size",
                              "8", "--epochs", "3", "--batch-size", "6", "--lr", "0.05", "--out", "t.pt"])
    assert res.exit_code == 0, res.output
    meta = torch.load("t.pt", weights_only=True)["meta"]
    assert meta["arch"] == "mlp" and meta["num_classes"] == 3 and meta["in_channels"] == 3
    assert meta["data"]["classes"] == ["ant", "bee", "cat"] and meta["transform"]["channels"] == 3
    model = MLP(num_classes=3, in_channels=3, image_size=8)
    model.load_state_dict(torch.load("t.pt", weights_only=True)["state_dict"])
    test = open_source(f"imagefolder:{root / 'test'}")
    with torch.no_grad():
        pred = model.eval()(test.load(np.arange(6), Transform.from_dict(meta["transform"]))).argmax(1).numpy()
    assert meta["test_accuracy"] == (pred == 2).mean() != (pred == 0).mean()  # cat is class 2, not the folder's 0
    res = runner.invoke(app, ["eval", "t.pt", "--data", f"imagefolder:{root / 'test'}", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["top1"] == meta["test_accuracy"]
    res = runner.invoke(app, ["teacher-cache", "--data", f"imagefolder:{root / 'train'}", "--teacher", "mlp",
                              "--weights", "t.pt", "--out", "c.zarr"])
    assert res.exit_code == 0, res.output
    recorded = zarr.open_group("c.zarr", mode="r").attrs["kdcache"]
    assert recorded["teacher"]["classes"] == ["ant", "bee", "cat"] and recorded["transform"]["channels"] == 3


def test_teacher_probes_its_model_before_training(root, monkeypatch):
    """A model that fails on the data's input, or returns no (batch, classes) scores, is refused in one line before
    the first step; --channels makes a 3-channel torchvision model fit grayscale data."""
    import pipeline.teacher_train as tt

    base = ["teacher", "--data", TINY, "--epochs", "1", "--out", "t.pt"]
    for arch, wanted in [("torchvision:resnet18", ("to have 3 channels", "set --channels")),
                         ("tests.odd_models:tuple_student", ("returns tuple, not logits",)),
                         ("tests.odd_models:feature_map_teacher", ("returns shape (2, 4, 8, 8), not logits",)),
                         ("tests.odd_models:ten_class_student", ("returns 10 class scores per sample", "4 classes",
                                                                 "num_classes=4")),
                         ("tests.odd_models:weightless_model", ("has no trainable parameters",))]:
        res = runner.invoke(app, base + ["--arch", arch])
        _one_line_error(res, f"teacher {arch}", *wanted)
        assert "teacher epoch" not in res.stderr and not Path("t.pt").exists()

    def probed(*_a, **_k):
        raise tt.KDCacheError("probed")

    with monkeypatch.context() as m:  # the probe passes: training would start (the optimizer is built)
        m.setattr(tt, "sgd", probed)
        res = runner.invoke(app, base + ["--arch", "torchvision:resnet18", "--channels", "3"])
    assert res.exit_code == 2 and res.stderr.strip() == "error: probed", res.output
    # the input flags are recorded with the teacher: teacher-cache feeds it the same
    res = runner.invoke(app, base + ["--channels", "3", "--image-size", "12"])
    assert res.exit_code == 0, res.output
    tf = torch.load("t.pt", weights_only=True)["meta"]["transform"]
    assert tf["channels"] == 3 and tf["size"] == [12, 12]


def test_teacher_on_batches_of_one_sample_that_batchnorm_cannot_train_on_is_one_line(root):
    """--batch-size 1 and BatchNorm on a 1x1 map (a torchvision ResNet's last stage on small images) failed in the
    first step with torch's ValueError traceback (the probe runs two samples); now one line naming --batch-size,
    and nothing saved. A batch size that works still trains."""
    base = ["teacher", "--data", TINY, "--epochs", "1", "--out", "t.pt", "--arch", "tests.odd_models:bn_head_student"]
    res = runner.invoke(app, base + ["--batch-size", "1"])
    _one_line_error(res, "teacher tests.odd_models:bn_head_student fails on a training batch of 1",
                    "choose a larger --batch-size")
    assert not Path("t.pt").exists() and not Path("t.json").exists()
    res = runner.invoke(app, base + ["--batch-size", "2"])
    assert res.exit_code == 0 and Path("t.pt").exists(), res.output


def test_teacher_logs_each_epochs_mean_loss(root, monkeypatch):
    """The loss each epoch's line shows is the mean over its samples (as train-student's), recomputed here from
    every step's cross-entropy; it was the last batch's alone (here 16 of 64 samples)."""
    import torch.nn.functional as F

    from pipeline.teacher_train import TeacherTrainConfig, run_teacher_train

    steps, real = [], F.cross_entropy

    def recorded(logits, y, *a, **k):
        loss = real(logits, y, *a, **k)
        steps.append((loss.item(), len(y)))
        return loss

    monkeypatch.setattr(F, "cross_entropy", recorded)
    lines = []
    run_teacher_train(TeacherTrainConfig(data=TINY, epochs=2, batch_size=16, lr=0.05, device="cpu", out="t.pt"),
                      log=lines.append)
    logged = [float(x.split("loss ")[1].split()[0]) for x in lines if x.startswith("teacher epoch")]
    assert len(steps) == 8 and [n for _, n in steps] == [16] * 8
    means = [sum(v * n for v, n in steps[e * 4:(e + 1) * 4]) / 64 for e in range(2)]
    assert all(abs(a - m) <= 5.1e-5 for a, m in zip(logged, means))  # printed to 4 places, summed in float32
    assert all(abs(a - last) > 1e-3 for a, last in zip(logged, (steps[3][0], steps[7][0])))


def test_teacher_says_when_a_class_folder_holds_no_images(root):
    """A class folder without images (a docs/ folder of notes beside the class folders) takes a class number and an
    output that nothing trains; kept, as the README says, but said instead of silently."""
    from PIL import Image

    from pipeline.teacher_train import TeacherTrainConfig, run_teacher_train

    for c in ("ant", "bee"):
        (root / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(root / "imgs" / c / f"{i}.png")
    (root / "imgs" / "docs").mkdir()
    (root / "imgs" / "docs" / "README.txt").write_text("how the images were taken")
    lines = []
    meta = run_teacher_train(TeacherTrainConfig(data="imagefolder:imgs", epochs=1, batch_size=4, device="cpu",
                                                out="t.pt"), log=lines.append)
    assert meta["num_classes"] == 3 and meta["data"]["classes"] == ["ant", "bee", "docs"]  # unchanged
    # no test split: scored on its training data, and recorded as that (it was recorded as test_accuracy)
    assert "test_accuracy" not in meta and 0 <= meta["train_accuracy"] <= 1 and meta["test_data"] is None
    assert ("note: class folder(s) docs hold no images; each still takes a class number and a teacher output no "
            "image trains: remove such folders from the data unless meant") in lines


def test_a_teacher_no_better_than_a_constant_guess_is_said_to_be(root, monkeypatch):
    """A teacher that ends no better than always answering the most frequent test class (a --lr so high training
    never settles) was saved with no word; it still is saved, but a note says it has learned nothing to distil.
    The baseline is the test data's own class shares, read by class name (the test folder numbers its classes
    otherwise: it lacks 'ant')."""
    from PIL import Image

    import pipeline.teacher_train as tt

    for split, counts in (("train", {"ant": 2, "bee": 2, "cow": 2}), ("test", {"bee": 1, "cow": 3})):
        for c, n in counts.items():
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8), 60 * i, dtype=np.uint8)).save(root / split / c / f"{i}.png")
    cfg = tt.TeacherTrainConfig(data="imagefolder:train", test_data="imagefolder:test", epochs=1, batch_size=2,
                                device="cpu", out="t.pt", overwrite=True)
    for acc, said in ((0.75, True), (0.5, True), (1.0, False)):
        with monkeypatch.context() as m:
            m.setattr(tt, "evaluate", lambda *_a, **_k: acc)
            lines = []
            tt.run_teacher_train(cfg, log=lines.append)
        notes = [x for x in lines if x.startswith("note:")]
        assert notes == ([f"note: its accuracy {acc:.4f} is no better than always answering 'cow' (0.7500 of the "
                          "evaluated samples): this teacher has learned nothing worth distilling; train it longer "
                          f"(--epochs) or with another --lr (now {cfg.lr})"] if said else []), lines


def test_a_teacher_scoring_every_sample_of_a_one_class_test_set_is_not_said_to_be_worthless():
    """Test data whose images are all of one class (a small --test-data folder): a teacher right on every one was
    said to be "no better than always answering" that class, to have learned nothing worth distilling."""
    from pipeline.teacher_train import no_better_than

    class OneClass:
        num_samples = 5

        def labels(self, idx):
            return np.full(len(idx), 2)

    assert no_better_than(1.0, OneClass(), None, ["ant", "bee", "cow"]) is None
    assert no_better_than(0.0, OneClass(), None, ["ant", "bee", "cow"]).startswith("its accuracy 0.0000 is no better "
                                                                                   "than always answering 'cow'")


def test_an_overwrite_cut_while_saving_leaves_weights_and_metadata_of_one_teacher(root, monkeypatch):
    """--overwrite cut (Ctrl-C, a full disk) after the new weights were saved and before <stem>.json was: the old
    teacher's .json stayed beside the new weights (another fingerprint and test accuracy, which results reads).
    Now the .json is written first under another name and renamed after the weights: a cut while either is
    written leaves the old pair, and the next --overwrite writes both."""
    import pipeline.loops as loops
    import pipeline.teacher_train as tt

    base = ["teacher", "--data", TINY, "--epochs", "1", "--out", "t.pt"]
    assert runner.invoke(app, base).exit_code == 0
    old = json.loads(Path("t.json").read_text())["fingerprint"]

    def cut(*_a, **_k):
        raise KeyboardInterrupt

    for where in (tt, loops.torch):  # the metadata's write, then the weights'
        with monkeypatch.context() as m:
            m.setattr(where, "write_text_whole" if where is tt else "save", cut)
            res = runner.invoke(app, base + ["--overwrite", "--seed", "1"])
        assert res.exit_code == 130, res.output
        assert torch.load("t.pt", weights_only=True)["meta"]["fingerprint"] == old
        assert json.loads(Path("t.json").read_text())["fingerprint"] == old
        assert sorted(p.name for p in Path(".").iterdir() if p.name.startswith("t.")) == ["t.json", "t.pt"]
    assert runner.invoke(app, base + ["--overwrite", "--seed", "1"]).exit_code == 0
    new = torch.load("t.pt", weights_only=True)["meta"]["fingerprint"]
    assert new != old and json.loads(Path("t.json").read_text())["fingerprint"] == new


def test_teacher_probe_leaves_the_model_and_random_numbers_as_they_were():
    """The probe runs in training mode (as the training does): BatchNorm statistics and the RNG are restored, so a
    probed run trains the same weights as one without the probe."""
    from pipeline.models import TeacherNet, fingerprint_module
    from pipeline.teacher_train import probe

    torch.manual_seed(0)
    model = torch.nn.Sequential(TeacherNet(num_classes=4), torch.nn.Dropout(0.5))
    x = torch.randn(2, 1, 8, 8)
    before, state = fingerprint_module(model), torch.get_rng_state()
    probe(model, "teacher x", x, 4)
    assert fingerprint_module(model) == before and torch.equal(torch.get_rng_state(), state)


def test_teacher_refuses_bad_numbers_and_unlabelled_data_before_training(root, monkeypatch):
    import pipeline.teacher_train as tt
    from tests.test_pipeline import _write_images

    _write_images(root / "flat", 4)
    built = []
    monkeypatch.setattr(tt, "build_model", lambda *a: built.append(1))
    base = ["teacher", "--data", TINY, "--epochs", "1", "--out", "t.pt"]
    for extra, wanted in [(["--seed", "-1"], "--seed must be 0 or more, below 2**32 (got -1)"),
                          (["--seed", str(2**32)], "--seed must be 0 or more"),
                          (["--lr", "nan"], "--lr must be a finite number"),
                          (["--lr", "inf"], "--lr must be a finite number"),
                          (["--lr", "0"], "--lr must be positive"),
                          (["--weight-decay", "-1"], "--weight-decay must be 0 or more"),
                          # finite, but not in float32: the first optimizer step raised a RuntimeError traceback
                          (["--lr", "1e300"], "--lr must be at most 3.4e+38, float32's largest number, in which "
                                              "the weights are updated (got 1e+300)"),
                          (["--weight-decay", "1e39"], "--weight-decay must be at most 3.4e+38, float32's largest "
                                                       "number, in which the weights are updated (got 1e+39)"),
                          (["--epochs", "0"], "--epochs must be at least 1"),
                          (["--epochs", str(10**12)], f"--epochs must be at most 100000 (got {10**12})"),
                          (["--batch-size", "-3"], "--batch-size must be at least 1"),
                          (["--channels", "2"], "--channels must be 1 or 3"),
                          (["--image-size", "0"], "--image-size must be from 1 to 4096"),
                          (["--test-data", f"imagefolder:{root / 'flat'}"],
                           "has no labels; pass a labelled --test-data"),
                          (["--data", f"imagefolder:{root / 'flat'}"], "has no labels, and training a teacher")]:
        res = runner.invoke(app, base + extra)
        _one_line_error(res, wanted)
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun every rank would train into the same --out
    _one_line_error(runner.invoke(app, base), "kdcache teacher trains in one process, not 2 torchrun ranks")
    monkeypatch.delenv("WORLD_SIZE")
    assert not built and not Path("t.pt").exists()


def test_teacher_never_overwrites_weights_unasked(root):
    """An existing teacher (caches key on its weights) is replaced only with --overwrite; an --out whose metadata
    sidecar (<stem>.json) would be the weights file itself, or another existing file, is refused."""
    base = ["teacher", "--data", TINY, "--epochs", "1", "--batch-size", "32"]
    res = runner.invoke(app, base + ["--out", "teacher.json"])
    _one_line_error(res, "--out teacher.json ends in .json", "teacher.pt")
    assert not Path("teacher.json").exists()
    assert runner.invoke(app, base + ["--out", "t.pt"]).exit_code == 0
    weights, meta = Path("t.pt").read_bytes(), Path("t.json").read_text()
    res = runner.invoke(app, base + ["--out", "t.pt", "--seed", "1"])
    _one_line_error(res, "--out t.pt already exists", "caches made from it key on its weights", "--overwrite")
    assert Path("t.pt").read_bytes() == weights and Path("t.json").read_text() == meta
    res = runner.invoke(app, base + ["--out", "t.pt", "--seed", "1", "--weight-decay", "0", "--overwrite"])
    assert res.exit_code == 0, res.output
    recorded = json.loads(Path("t.json").read_text())["config"]
    assert Path("t.pt").read_bytes() != weights and recorded["seed"] == 1 and recorded["weight_decay"] == 0
    # a <stem>.json that is no teacher's metadata is someone else's file: not written over, --overwrite or not
    Path("u.json").write_text("notes")
    for extra in ([], ["--overwrite"]):
        _one_line_error(runner.invoke(app, base + ["--out", "u.pt"] + extra), "metadata to u.json, which already exists")
    assert Path("u.json").read_text() == "notes" and not Path("u.pt").exists()
    # the default teacher, which `make teacher` makes only when it is missing, likewise
    default = root / "data" / "teachers" / "default.pt"
    default.parent.mkdir(parents=True)
    default.write_bytes(b"weights")
    _one_line_error(runner.invoke(app, base), f"--out {default} already exists")
    assert default.read_bytes() == b"weights"


def test_teacher_stops_when_training_diverges(root):
    """A learning rate that blows the weights up stops with one line before saving: no NaN teacher, and a teacher
    being replaced with --overwrite is kept."""
    base = ["teacher", "--data", TINY, "--epochs", "2", "--batch-size", "32", "--lr", "1e30", "--out", "t.pt"]
    res = runner.invoke(app, base)
    _one_line_error(res, "training diverged in epoch 1", "lower --lr (now 1e+30)")
    assert not Path("t.pt").exists() and not Path("t.json").exists()
    Path("t.pt").write_bytes(b"old weights")
    _one_line_error(runner.invoke(app, base + ["--overwrite"]), "training diverged")
    assert Path("t.pt").read_bytes() == b"old weights" and not Path("t.json").exists()
    # weights gone non-finite in the last step, whose update no loss has seen yet, are caught too
    from pipeline.errors import KDCacheError
    from pipeline.teacher_train import refuse_diverged

    model = torch.nn.Linear(2, 2)
    refuse_diverged(model, 1.0, 0, 0.1)
    with torch.no_grad():
        model.bias[0] = float("inf")
    with pytest.raises(KDCacheError, match="diverged in epoch 3: weight bias became non-finite"):
        refuse_diverged(model, 1.0, 2, 0.1)


def test_plan_predicts_the_size_on_disk(root, teacher_file):
    args = ["--data", "synthetic:1024:1x16x16:4", "--weights", str(teacher_file), "--layer", "layer2",
            "--chunk-samples", "256", "--batch-size", "256"]
    res = runner.invoke(app, ["plan", *args, "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["samples"] == 1024 and plan["probe_samples"] == 256
    assert plan["total_bytes"] == int(plan["bytes_per_sample"] * 1024) + plan["overhead_bytes"]
    assert not Path(plan["path"]).exists()   # planning writes nothing
    res = runner.invoke(app, ["teacher-cache", *args])
    assert res.exit_code == 0 and res.stdout.strip().splitlines()[-1] == plan["path"]
    actual = sum(disk_bytes(Path(plan["path"]) / name / "c") for name in plan["arrays"])
    predicted = plan["bytes_per_sample"] * 1024
    assert abs(predicted - actual) / actual < 0.15, (predicted, actual)
    assert abs(plan["total_bytes"] - disk_bytes(plan["path"])) / disk_bytes(plan["path"]) < 0.15
    text = runner.invoke(app, ["plan", *args]).stdout
    assert "on disk" in text and text.strip().splitlines()[-1] == plan["path"]
    made = json.loads(runner.invoke(app, ["teacher-cache", *args, "--json"]).stdout)  # a hit: what is there
    assert made["path"] == plan["path"] and made["key"] == Path(plan["path"]).stem and made["samples"] == 1024
    assert made["arrays"] == sorted(plan["arrays"]) and made["stats"]["samples_computed"] == 1024


def test_plan_counts_what_the_store_holds_besides_samples(root, teacher_file):
    """A small logits-only cache is mostly manifest, array metadata, commit markers and distortion sums: the plan's
    total is what `ls` will show (it counted the samples' chunks alone: 0.4x here)."""
    args = ["--data", "synthetic:256:1x8x8:4", "--weights", str(teacher_file), "--chunk-samples", "32",
            "--batch-size", "64", "--views", "2", "--augment", "flip"]
    plan = json.loads(runner.invoke(app, ["plan", *args, "--json"]).stdout)
    assert runner.invoke(app, ["teacher-cache", *args]).exit_code == 0
    actual = disk_bytes(plan["path"])
    assert abs(plan["total_bytes"] - actual) / actual < 0.1, (plan["total_bytes"], actual)
    assert plan["overhead_bytes"] > plan["bytes_per_sample"] * 256
    assert "manifest, metadata and commit markers" in runner.invoke(app, ["plan", *args]).stdout


def test_ls_and_inspect(root, teacher_file):
    res = runner.invoke(app, ["ls"])  # nothing cached yet: said, not a silent blank
    assert res.exit_code == 0 and res.stdout == "" and "no caches in " in res.stderr
    assert json.loads(runner.invoke(app, ["ls", "--json"]).stdout) == []
    base = ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--chunk-samples", "64"]
    done = runner.invoke(app, [*base, "--layer", "avgpool"]).stdout.strip().splitlines()[-1]
    other = runner.invoke(app, [*base, "--views", "2", "--augment", "flip"]).stdout.strip().splitlines()[-1]
    g = zarr.open_group(other, mode="r+")
    g.attrs["kdcache"] = dict(g.attrs["kdcache"], complete=False)   # as a killed run leaves it
    res = runner.invoke(app, ["ls", "--json"])
    assert res.exit_code == 0
    caches = {c["path"]: c for c in json.loads(res.stdout)}
    assert set(caches) == {done, other}
    assert caches[done]["complete"] and not caches[other]["complete"] and caches[other]["views"] == 2
    assert caches[done]["samples"] == 192 and caches[done]["bytes"] == disk_bytes(Path(done))
    text = runner.invoke(app, ["ls"]).stdout
    assert "INCOMPLETE" in text and "x 2 views" in text and "complete  " in text
    # an array deleted outright under a store marked complete is not listed as complete
    shutil.copytree(done, "gone.zarr")
    shutil.rmtree(Path("gone.zarr", "features", "avgpool"))
    gone = next(c for c in json.loads(runner.invoke(app, ["ls", "--json", "--cache-dir", "."]).stdout))
    assert not gone["complete"] and gone["missing_arrays"] == ["features/avgpool"]
    assert "DAMAGED" in runner.invoke(app, ["ls", "--cache-dir", "."]).stdout
    res = runner.invoke(app, ["inspect", done, "--json"])
    info = json.loads(res.stdout)
    assert info["manifest"]["key"] == Path(done).stem
    f = info["arrays"]["features/avgpool"]
    stored = sum(p.stat().st_size for p in (Path(done) / "features" / "avgpool" / "c").rglob("*") if p.is_file())
    assert f["stored_bytes"] == stored and f["raw_bytes"] == 192 * 64 * 2
    assert f["compression_ratio"] == round(f["raw_bytes"] / stored, 3)
    assert f["codecs"] == ["BytesCodec", "ZstdCodec", "Crc32cCodec"] and f["chunks"] == [64, 64, 1, 1]
    assert f["fill"] == "NaN" and info["arrays"]["index"]["fill"] == -1, info["arrays"]["index"]
    meta_file = Path(done, "features", "avgpool", "zarr.json")  # a fill edited by hand shows as it reads
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(dict(meta, fill_value=0.0)))
    assert json.loads(runner.invoke(app, ["inspect", done, "--json"]).stdout)["arrays"]["features/avgpool"]["fill"] == 0
    meta_file.write_text(json.dumps(meta))
    text = runner.invoke(app, ["inspect", done]).stdout
    assert "B/sample" in text and "ratio" in text
    assert runner.invoke(app, ["inspect", "nowhere.zarr"]).exit_code == 2
    Path("notes.txt").write_text("")  # KDCACHE_DATA at a file: said so, not errors naming flags never passed
    with pytest.MonkeyPatch.context() as m:
        m.setenv("KDCACHE_DATA", "notes.txt")
        for args in (["ls"], [*base, "--layer", "avgpool"]):
            res = runner.invoke(app, args)
            assert res.exit_code == 2 and res.stderr.strip() == ("error: the data folder notes.txt is a file; set "
                                                                "KDCACHE_DATA to a folder (default: data/)"), res.output
        m.setenv("KDCACHE_DATA", "")  # set but empty: the default data/ (here the root's), not the current folder
        res = runner.invoke(app, ["ls"])
        assert res.exit_code == 0 and Path(done).stem in res.stdout, res.output


def test_a_cache_is_named_by_its_key_or_the_start_of_it_as_ls_lists_it(root, teacher_file):
    """`kdcache ls` lists keys: train-student --cache, verify, repair and inspect take one (or 4+ of its first hex
    digits) for the store `<key>.zarr` in the cache folder. A prefix two keys share is refused listing them; a path
    that exists is a path even when it looks like a key."""
    path = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--chunk-samples",
                               "64"]).stdout.split()[-1]
    key = Path(path).stem
    assert Path(path).parent.resolve() == (root / "data" / "cache").resolve()
    res = runner.invoke(app, ["verify", key[:4]])
    assert res.exit_code == 0 and res.stdout.strip().splitlines()[-1] == f"OK: {path}", res.output
    res = runner.invoke(app, ["repair", key])
    assert res.exit_code == 0 and res.stdout.strip().splitlines()[-1] == f"OK: {path}", res.output
    assert json.loads(runner.invoke(app, ["inspect", key[:6], "--json"]).stdout)["manifest"]["key"] == key
    res = runner.invoke(app, ["train-student", "--cache", key[:5], "--epochs", "1", "--workers", "0", "--out", "run"])
    assert res.exit_code == 0, res.output
    assert json.loads(Path("run/config.json").read_text())["cache"]["path"] == str(Path(path).resolve())
    twin = Path(path).with_name(key[:4] + "0" * 12 + ".zarr")  # another key beginning the same
    shutil.copytree(path, twin)
    res = runner.invoke(app, ["inspect", key[:4]])
    assert res.exit_code == 2 and res.stderr.strip() == (
        f"error: {key[:4]} begins 2 cache keys in {Path(path).parent} ({', '.join(sorted([key, twin.stem]))}); "
        "give more of the key"), res.output
    assert runner.invoke(app, ["inspect", key, "--json"]).exit_code == 0  # the whole key is one of them
    shutil.copytree(twin, key[:4])  # a store at ./<4 hex digits>: the path, not the keys it begins
    res = runner.invoke(app, ["verify", key[:4]])
    assert res.exit_code == 0 and res.stdout.strip().splitlines()[-1] == f"OK: {key[:4]}", res.output
    res = runner.invoke(app, ["inspect", "0123abcd"])  # no such key: the usual line
    assert res.exit_code == 2 and "error: no cache at 0123abcd; run `kdcache teacher-cache` first" in res.stderr


def test_inspect_by_key_measures_the_store_the_key_names(root, teacher_file):
    """`kdcache inspect KEY` showed the key's store's manifest but measured the sizes at the path `KEY` (nothing
    there): every ratio None, 0.0 B/sample, total 0 B. By key or by path, the same numbers."""
    path = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file)]).stdout.split()[-1]
    by_path = json.loads(runner.invoke(app, ["inspect", path, "--json"]).stdout)
    by_key = json.loads(runner.invoke(app, ["inspect", Path(path).stem[:6], "--json"]).stdout)
    assert by_path["bytes"] == disk_bytes(path) > 0 and by_key["bytes"] == by_path["bytes"]
    assert by_key["arrays"] == by_path["arrays"] and by_key["arrays"]["logits"]["stored_bytes"] > 0
    assert by_key["path"] == path


@pytest.mark.parametrize("argv", [["verify", ""], ["repair", " "], ["inspect", ""],
                                  ["train-student", "--cache", "", "--epochs", "1"]])
def test_an_empty_store_path_is_refused_saying_so(root, argv):
    """An empty path is the current folder to pathlib: it was "error:  is not a kdcache Zarr v3 store", naming no
    path at all."""
    res = runner.invoke(app, argv)
    assert res.exit_code == 2 and res.stderr == ("error: the store path is empty; pass the .zarr folder teacher-cache "
                                                 "printed, or its key from `kdcache ls`\n"), res.output


def test_a_blank_weights_flag_is_refused_naming_it(root, teacher_file):
    """--weights ' ' said "weights file not found: <cwd>/" (pathlib reads blanks as the current folder) on
    teacher-cache and plan, "--weights  : no such file" on verify and repair; --weights '' (an empty shell variable)
    was taken as no --weights at all. Now one line naming the flag, before anything is written."""
    from pipeline.errors import KDCacheError
    from pipeline.online import OnlineConfig, run_online_kd
    from pipeline.teacher_cache import CacheConfig, run_teacher_cache

    store = run_teacher_cache(CacheConfig(data=SYN, weights=str(teacher_file), chunk_samples=64, layers=[]),
                              log=lambda *_: None)
    before = sorted(str(p) for p in root.rglob("*"))
    for blank in (" ", ""):
        for args in (["teacher-cache", "--data", SYN, "--out", "x.zarr"], ["plan", "--data", SYN],
                     ["verify", store, "--recompute", "2"], ["repair", store]):
            res = runner.invoke(app, [*args, "--weights", blank])
            assert res.exit_code == 2 and res.stderr == (f"error: --weights {blank!r} is only blanks; name a file or "
                                                         "folder (or leave --weights out for the default)\n"), (
                args, res.output)
        with pytest.raises(KDCacheError, match="^--weights .* is only blanks"):  # online KD's teacher, as teacher-cache's
            run_online_kd(OnlineConfig(data=SYN, weights=blank, epochs=1, out="online"), log=lambda *_: None)
    assert sorted(str(p) for p in root.rglob("*")) == before


def test_train_student_refuses_more_epochs_than_any_run_finishes_before_opening_the_store(root):
    """--epochs 10**12 hung silently: the schedule sums every epoch's batch count before the first epoch."""
    res = runner.invoke(app, ["train-student", "--cache", "nowhere.zarr", "--epochs", str(10**12), "--out", "run"])
    assert res.exit_code == 2 and res.stderr == f"error: --epochs must be at most 100000 (got {10**12})\n", res.output
    assert not Path("run").exists()


def test_a_typos_count_of_loader_processes_or_writer_threads_is_refused_before_anything_starts(root):
    """--workers 10**12 hung starting loader processes (torch only warned); --writers likewise asks for threads no
    machine has. Both are refused in one line, before the store or the data is opened."""
    res = runner.invoke(app, ["train-student", "--cache", "nowhere.zarr", "--workers", str(10**12), "--out", "run"])
    assert res.exit_code == 2 and res.stderr == (
        f"error: --workers {10**12} is more loader processes than a machine runs well (at most 256); use about as "
        "many as the CPU cores that the training leaves free\n"), res.output
    assert not Path("run").exists()
    assert runner.invoke(app, ["train-student", "--cache", "nowhere.zarr", "--workers", "256"]).stderr.startswith(
        "error: no cache at nowhere.zarr")  # 256 itself passes the check
    res = runner.invoke(app, ["teacher-cache", "--data", "synthetic:8:1x8x8:2", "--writers", "257"])
    assert res.exit_code == 2 and res.stderr == "error: --writers must be 0 (automatic) to 256 (got 257)\n", res.output
    assert not Path("data/cache").exists()


def test_eval_scores_a_students_weights_as_an_independent_forward_does(root, teacher_file):
    cache = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file)]).stdout.split()[-1]
    res = runner.invoke(app, ["train-student", "--cache", cache, "--epochs", "1", "--workers", "0", "--out", "run",
                              "--test-data", SYN_TEST])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", "run/student.pt", "--data", SYN_TEST, "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["top1"] == json.loads(Path("run/summary.json").read_text())["test_acc"]
    # Independently: the architecture and transform the run recorded, a plain forward, a confusion matrix by hand.
    from pipeline.data import Transform, open_source
    from pipeline.models import build_model

    config = json.loads(Path("run/config.json").read_text())
    model = build_model("default-student", 4, 1, 16)
    model.load_state_dict(torch.load("run/student.pt", weights_only=True)["state_dict"])
    src = open_source(SYN_TEST)
    with torch.no_grad():
        pred = model.eval()(src.load(np.arange(64), Transform.from_dict(config["transform"]))).argmax(1).numpy()
    y = src.labels(np.arange(64))
    confusion = np.zeros((4, 4), int)
    np.add.at(confusion, (y, pred), 1)
    assert got["confusion"] == confusion.tolist() and got["top1"] == (pred == y).mean() and got["top5"] is None
    assert got["per_class"]["0"] == confusion[0, 0] / confusion[0].sum()
    text = runner.invoke(app, ["eval", "run/student.pt", "--data", SYN_TEST])
    assert json.loads(text.stdout.strip().splitlines()[-1])["top1"] == got["top1"]
    # A bare state_dict does not say what it is: the error asks for --model, in one line.
    torch.save(model.state_dict(), "bare.pt")
    res = runner.invoke(app, ["eval", "bare.pt", "--data", SYN_TEST])
    assert res.exit_code == 2 and "pass --model" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(app, ["eval", "bare.pt", "--data", SYN_TEST, "--model", "default-student", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["top1"] == got["top1"]  # same default transform


def test_eval_top5_and_its_bad_inputs(root):
    """Top-5 against an independent forward (10 and exactly 5 outputs); each bad input one line naming the fix."""
    from PIL import Image

    from pipeline.data import default_transform, open_source
    from pipeline.evaluate import EvalConfig, run_eval
    from pipeline.models import build_model

    for classes in (10, 5):
        data = f"synthetic:96:1x16x16:{classes}"
        torch.manual_seed(0)
        model = build_model("default-student", classes, 1, 16).eval()
        torch.save({"state_dict": model.state_dict(), "meta": {"arch": "default-student", "num_classes": classes,
                                                                "in_channels": 1}}, "s.pt")
        got = run_eval(EvalConfig(weights="s.pt", data=data, batch_size=32), log=lambda *_: None)
        src = open_source(data)
        with torch.no_grad():
            logits = model(src.load(np.arange(96), default_transform(src)))
        y = torch.from_numpy(src.labels(np.arange(96)))
        assert got["top5"] == (logits.topk(5, dim=1).indices == y[:, None]).any(1).sum().item() / 96
        assert got["top1"] == (logits.argmax(1) == y).sum().item() / 96
    text = runner.invoke(app, ["eval", "s.pt", "--data", "synthetic:96:1x16x16:5"]).stdout.splitlines()
    assert text[0].split()[:2] == ["class", "accuracy"]  # a header, one line per class, then the JSON
    assert text[1].split() == ["0", f"{got['per_class']['0']:.4f}"]
    Path("flat").mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save("flat/a.png")
    torch.save({"state_dict": build_model("default-student", 2, 1, 16).state_dict(),
                "meta": {"arch": "default-student", "num_classes": 2, "in_channels": 1}}, "two.pt")
    from pipeline.models import TeacherNet

    torch.save(TeacherNet(num_classes=5).state_dict(), "teacher-bare.pt")
    torch.save({"state_dict": {}, "meta": {"num_classes": 5}}, "pair.pt")
    for args, needle in [
        (["eval", "s.pt", "--data", "imagefolder:flat"], "has no labels to score against"),
        (["eval", "s.pt", "--data", "synthetic:96:1x16x16:5", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["eval", "two.pt", "--data", "synthetic:96:1x16x16:5"], "gives outputs of shape (2,) per sample, but the "
                                                                  "labels have 5 classes"),
        (["eval", "teacher-bare.pt", "--model", "default-student", "--data", "synthetic:96:1x16x16:5"],
         "check --model, and --image-size / --channels if given"),
        # a tuple out of the forward: was "fails on input ... (AttributeError ...); set --image-size / --channels"
        (["eval", "pair.pt", "--model", "tests.odd_models:tuple_student", "--data", "synthetic:96:1x16x16:5"],
         "tests.odd_models:tuple_student returns tuple, not logits of shape (batch, classes)"),
        # '' and a folder: were "cannot load weights from .: IsADirectoryError; pass a torch state_dict file"
        (["eval", "", "--data", "synthetic:96:1x16x16:5"], "error: the weights path is empty; pass a weights file"),
        (["eval", "flat", "--data", "synthetic:96:1x16x16:5"], "error: flat is a folder, not a weights file; pass "
                                                                "the file itself"),
    ]:
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, \
            (args, res.output)


def test_eval_scores_bare_weights_with_more_outputs_than_the_datas_classes(root):
    """A bare state_dict of 10 outputs on data of 4 classes: it was built with the data's 4 and failed to load (size
    mismatch for fc.weight); now built with the weights' 10, and scored as a plain forward over all 10 scores is."""
    from pipeline.data import default_transform, open_source
    from pipeline.evaluate import EvalConfig, run_eval
    from pipeline.models import build_model

    torch.manual_seed(3)
    model = build_model("default-student", 10, 1, 16).eval()
    torch.save(model.state_dict(), "bare10.pt")
    data = "synthetic:96:1x16x16:4:7"
    got = run_eval(EvalConfig(weights="bare10.pt", data=data, model="default-student", batch_size=40),
                   log=lambda *_: None)
    src = open_source(data)
    with torch.no_grad():
        logits = model(src.load(np.arange(96), default_transform(src)))
    y = torch.from_numpy(src.labels(np.arange(96)))
    pred = logits.argmax(1)
    assert got["top1"] == (pred == y).sum().item() / 96 and (pred >= 4).any()  # outputs the data lacks are wrong
    assert got["top5"] == (logits.topk(5, dim=1).indices == y[:, None]).any(1).sum().item() / 96
    assert np.array(got["confusion"]).shape == (4, 10) and got["classes"] == ["0", "1", "2", "3"]
    assert got["per_class"]["2"] == ((pred == 2) & (y == 2)).sum().item() / (y == 2).sum().item()


def test_bench_command_writes_table_and_json(root):
    res = runner.invoke(app, ["bench", "--preset", "tiny", "--samples", "2048", "--workers", "0", "--repeat", "2",
                              "--scaling", "1024,2048", "--out", "bench.json"])
    assert res.exit_code == 0, res.output
    r = json.loads(Path("bench.json").read_text())
    keys = ["a_teacher_forward", "b_cache_logits", "c_cache_logits_hint", "d_student_alone", "e_student_kd",
            "e_student_fitnets", "f_online_kd"]
    assert all(len(r[k]["rounds"]) == 2 and r[k]["img_s"] > 0 for k in keys)
    # each number is the median of its rounds; each ratio the median of per-round ratios (same round's pair)
    assert all(r[k]["img_s"] == np.mean([x["img_s"] for x in r[k]["rounds"]]) for k in keys)
    a, b = ([x["img_s"] for x in r[k]["rounds"]] for k in ("a_teacher_forward", "b_cache_logits"))
    assert r["ratio_rounds"]["b/a"] == [b[0] / a[0], b[1] / a[1]]
    assert abs(r["ratios"]["b/a"] - (b[0] / a[0] + b[1] / a[1]) / 2) < 1e-12
    for k in ("b_cache_logits", "c_cache_logits_hint"):   # CPU use of the stage and of its writer threads
        assert 0 < r[k]["writer_cores"] and 0 < r[k]["cores_busy"] <= os.cpu_count() + 0.5
    e, f = ([x["img_s"] for x in r[k]["rounds"]] for k in ("e_student_kd", "f_online_kd"))
    assert abs(r["ratios"]["e/f"] - (e[0] / f[0] + e[1] / f[1]) / 2) < 1e-12
    assert r["device"].startswith("cpu") and r["versions"]["zarr"]
    assert r["note"].startswith("2 batches per epoch") and "use --samples 16384 or more" in res.stdout  # too short
    assert [q["buffer_chunks"] for q in r["shuffle"]][-1] == "uniform"
    assert {q["workers"] for q in r["shuffle"]} == {1, 2, 4, None}   # the default buffer at several worker counts
    for k in ("e_student_kd", "e_student_fitnets"):  # stored bytes streamed per second, and the buffer it used
        assert r[k]["MB_s"] > 0 and r[k]["buffer_chunks"] >= 2
    per_sample = {k: r[k]["MB_s"] / r[k]["img_s"] for k in ("e_student_kd", "e_student_fitnets")}  # no timing left
    assert per_sample["e_student_fitnets"] > per_sample["e_student_kd"] * 1.5  # feature maps on top of the logits
    assert "| (f) online KD (teacher in the loop) |" in res.stdout
    assert r["store_read"]["bytes"] > 0 and r["store_read"]["cold_MB_s"] > 0 and r["store_read"]["warm_MB_s"] > 0
    assert "| store read, 1 thread, page cache dropped / cached (same run) |" in res.stdout
    from pipeline.bench import store_read_bandwidth

    for name, size in (("logits/c/0", 100), ("features/l/c/0/0", 250), ("logits/zarr.json", 7)):
        Path("s.zarr", name).parent.mkdir(parents=True, exist_ok=True)
        Path("s.zarr", name).write_bytes(b"x" * size)
    dropped, real = [], os.posix_fadvise
    with pytest.MonkeyPatch.context() as m:  # every chunk file's pages dropped before the cold read
        m.setattr(os, "posix_fadvise", lambda fd, off, n, advice: (dropped.append(advice), real(fd, off, n, advice)))
        assert store_read_bandwidth(Path("s.zarr"))["bytes"] == 350  # chunk files only, not metadata
    assert dropped == [os.POSIX_FADV_DONTNEED] * 2
    assert [x["samples"] for x in r["scaling"]] == [1024, 2048]
    assert all(abs(x["student_us_per_sample"] * x["student_kd_img_s"] - 1e6) < 1e-3 for x in r["scaling"])
    from pipeline.bench import readme_section
    # the command the README shows is the one that measured: the flags given, those left at the preset's default not
    assert "`kdcache bench --preset tiny --samples 2048 --workers 0 --repeat 2 --scaling 1024,2048` on cpu" in \
        readme_section([r])
    assert "`kdcache bench --preset tiny` on cpu" in readme_section([r | {"samples": 10000, "workers": 1,
                                                                          "repeat": 3, "scaling": None}])
    assert "| b/a | " in res.stdout and "median of 2 interleaved rounds" in res.stdout
    assert not list(Path("data/bench").glob("bench-tiny-*"))   # its scratch caches are removed
    bad = runner.invoke(app, ["bench", "--preset", "tiny", "--repeat", "0"])
    assert bad.exit_code == 2 and "--repeat must be at least 1" in bad.output


def test_bench_numbers_are_medians_and_each_ratio_pairs_its_own_rows(root, monkeypatch):
    """Every README ratio from scripted rates, against a hand computation: b/a, c/a, e/d (KD), e/d (FitNets) and
    e/f each divide their own two rows' rates of the same round, each row's number and each ratio is the median of
    3 rounds (which here differs from the mean and from the ratio of the medians), and c's write rate is compared
    with the disk's. The real bench test runs 2 rounds (where the median is the mean) and checks b/a and e/f alone:
    c/a over b, e/d (FitNets) taking KD's rate, e/d (KD) over f, or means instead of medians each passed it."""
    import statistics
    from types import SimpleNamespace

    import pipeline.bench as bench
    import pipeline.catalog as catalog
    import pipeline.online as online
    import pipeline.store as store
    import pipeline.teacher_cache as tc
    import pipeline.train_student as ts

    n = 2048
    rates = {"a": [100.0, 400.0, 130.0], "b": [90.0, 200.0, 128.0], "c": [50.0, 380.0, 60.0],
             "alone": [10.0, 40.0, 13.0], "kd": [9.0, 11.0, 12.0], "fitnets": [5.0, 39.0, 6.0],
             "online": [4.0, 30.0, 11.0]}
    queue = {k: list(v) for k, v in rates.items()}
    disk = 7.0                 # MB/s of the disk probe
    size = 3_000_000           # bytes of every store folder or array
    monkeypatch.setattr(bench, "disk_write_bandwidth", lambda *a, **k: disk)
    monkeypatch.setattr(bench, "teacher_forward", lambda *a, **k: queue["a"].pop(0))
    monkeypatch.setattr(bench, "student_step", lambda *a, **k: 1.0)
    monkeypatch.setattr(bench, "loader_alone", lambda *a, **k: 1.0)
    monkeypatch.setattr(bench, "store_read_bandwidth", lambda p: {"cold_MB_s": 1.0, "warm_MB_s": 1.0, "bytes": 1})
    monkeypatch.setattr(bench, "shuffle_table", lambda *a, **k: [])
    monkeypatch.setattr(catalog, "disk_bytes", lambda p: size)
    monkeypatch.setattr(tc, "run_teacher_cache", lambda ccfg, log: ccfg.out)
    cache_secs = {}

    def fake_open_store(path):  # a store whose manifest times its run at the scripted rate
        tag = "b" if Path(path).name == "logits.zarr" else "c"
        secs = n / queue[tag].pop(0)
        cache_secs.setdefault(tag, []).append(secs)
        return SimpleNamespace(manifest={"stats": {"seconds": secs, "writer_seconds": secs / 2}})

    monkeypatch.setattr(store, "open_store", fake_open_store)

    def fake_student(cfg, log):
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        Path(cfg.out, "config.json").write_text(json.dumps({"reader": {"streamed_arrays": ["logits"],
                                                                       "buffer_chunks": 2}}))

    monkeypatch.setattr(ts, "run_train_student", fake_student)
    monkeypatch.setattr(online, "run_online_kd", lambda cfg, log: None)
    monkeypatch.setattr(bench, "last_epoch_img_s", lambda run_dir: queue[run_dir.name[len("run-"):]].pop(0))
    r = bench.run_bench(bench.BenchConfig(preset="tiny", samples=n, workers=0, repeat=3, out="bench.json"),
                        log=lambda *_: None)
    assert not any(queue.values())  # every scripted measurement taken, once
    assert json.loads(Path("bench.json").read_text())["ratios"] == r["ratios"]
    rows = {"a": "a_teacher_forward", "b": "b_cache_logits", "c": "c_cache_logits_hint", "alone": "d_student_alone",
            "kd": "e_student_kd", "fitnets": "e_student_fitnets", "online": "f_online_kd"}
    for k, key in rows.items():
        assert [x["img_s"] for x in r[key]["rounds"]] == pytest.approx(rates[k], rel=1e-12), key
        assert r[key]["img_s"] == pytest.approx(statistics.median(rates[k]), rel=1e-12), key
        assert statistics.median(rates[k]) != statistics.mean(rates[k])  # the scripted rates tell them apart
    pairs = {"b/a": ("b", "a"), "c/a": ("c", "a"), "e/d (KD)": ("kd", "alone"), "e/d (FitNets)": ("fitnets", "alone"),
             "e/f": ("kd", "online")}
    for ratio, (num, den) in pairs.items():
        per_round = [u / v for u, v in zip(rates[num], rates[den])]
        assert r["ratio_rounds"][ratio] == pytest.approx(per_round, rel=1e-12), ratio
        assert r["ratios"][ratio] == pytest.approx(statistics.median(per_round), rel=1e-12), ratio
        assert statistics.median(per_round) not in (statistics.mean(per_round), pytest.approx(
            statistics.median(rates[num]) / statistics.median(rates[den]), rel=1e-9)), ratio
    write = [size / s / 1e6 / disk for s in cache_secs["c"]]
    assert r["ratio_rounds"]["c_write_vs_disk"] == pytest.approx(write, rel=1e-12)
    assert r["ratios"]["c_write_vs_disk"] == pytest.approx(statistics.median(write), rel=1e-12)
    # a target is met at exactly its value, missed just below it
    at = {"preset": "cpu", "ratios": {"b/a": 0.9, "e/d (KD)": 0.8999, "c_write_vs_disk": 0.0}}
    assert bench.target_lines(at) == ["- b/a = 0.90, target ≥ 0.9: met", "- e/d (KD) = 0.90, target ≥ 0.9: missed"]


def test_disk_write_bandwidth_is_in_the_same_megabytes_as_the_cache_rate(root, monkeypatch):
    """(c)'s MB/s is 10^6 bytes per second; the disk probe's must be too, or c_write_vs_disk (and the c/a target's
    bandwidth clause) is off by 2^20/10^6 (it gave MiB/s)."""
    import pipeline.bench as bench

    clock = iter([10.0, 12.0])  # the write takes 2 s
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    assert bench.disk_write_bandwidth(root, 16) == 2 * (8 << 20) / 2 / 1e6


def test_bench_refuses_bad_flags_and_outputs_before_measuring(root):
    import pipeline.bench as bench

    Path("folder").mkdir()
    Path("weights.pt").write_bytes(b"someone's file")  # not a bench's results: never overwritten
    with pytest.MonkeyPatch.context() as m:  # nothing may be measured before the refusal
        m.setattr(bench, "teacher_forward", lambda *a, **k: pytest.fail("measured before refusing"))
        for args, says in ((["--batch-size", "-5"], "--batch-size must be at least 1"),
                           (["--workers", "-1"], "--workers must be at least 0"),
                           (["--out", "folder"], "--out folder is a folder"),
                           (["--out", "weights.pt"], "--out weights.pt exists and holds no bench results"),
                           (["--write-readme"], "has no <!-- bench:start --> ... <!-- bench:end --> markers"),
                           # measured last: refused only after every round, and its results were lost
                           (["--scaling", "1000,1000000000"], "synthetic:1000000000:1x8x8:10 has 1,000,000,000 "
                                                              "samples"),
                           # the students' test split is as large as a batch: refused after the cache rounds, then
                           # as 'synthetic:300000000:1x8x8:10:1 has 300,000,000 samples', a spec no one wrote
                           (["--batch-size", "300000000"], "--batch-size must be at most 268,435,456, the most "
                                                           "samples bench's synthetic data holds (got 300000000)"),
                           # 10**12 rounds ran for ever
                           (["--repeat", str(10**12)], f"--repeat must be at most 1000 (got {10**12}); a median "
                                                       "settles within a few rounds (default 3)"),
                           # refused by the first student run, after the cache rounds had been measured
                           (["--workers", "1000"], "--workers 1000 is more loader processes than a machine runs "
                                                   "well (at most 256)")):
            res = runner.invoke(app, ["bench", "--preset", "tiny", "--samples", "256", *args])
            lines = res.stderr.strip().splitlines()
            assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], \
                (args, res.output)
    assert Path("weights.pt").read_bytes() == b"someone's file"
    # under torchrun each rank made its own scratch folder, and rank 1 could not open the store rank 0 created there
    with pytest.MonkeyPatch.context() as m:
        m.setattr(bench, "teacher_forward", lambda *a, **k: pytest.fail("measured before refusing"))
        m.setenv("WORLD_SIZE", "2")
        res = runner.invoke(app, ["bench", "--preset", "tiny", "--samples", "256"])
    assert res.exit_code == 2 and res.stderr.strip() == ("error: kdcache bench measures one process, not 2 torchrun "
                                                         "ranks; run it without torchrun"), res.output


def test_results_reuse_a_finished_run_of_the_same_config(root, teacher_file):
    from pipeline.results import reuse_or_run
    from pipeline.teacher_cache import CacheConfig, run_teacher_cache
    from pipeline.train_student import StudentConfig, run_train_student

    cache = run_teacher_cache(CacheConfig(data=SYN, weights=str(teacher_file), chunk_samples=64),
                              log=lambda *_: None)
    cfg = StudentConfig(cache=cache, epochs=1, batch_size=32, workers=0, test_data=SYN_TEST, out="run")
    first = reuse_or_run(cfg, run_train_student)
    calls = []
    assert reuse_or_run(cfg, lambda c, log: calls.append(c)) == first and not calls   # reused, not rerun
    changed = StudentConfig(**{**cfg.__dict__, "seed": 1})
    reuse_or_run(changed, lambda c, log: calls.append(c) or {})
    assert calls == [replace(changed, overwrite=True)]                               # another config: rerun
    # 0 loader workers and 1 read the same batches in the same order: the same run
    assert reuse_or_run(replace(cfg, workers=1), lambda c, log: calls.append(c)) == first and len(calls) == 1
    other_name = StudentConfig(**{**cfg.__dict__, "cache": os.path.relpath(cache), "out": str(root / "moved")})
    shutil.copytree("run", other_name.out)
    assert reuse_or_run(other_name, lambda c, log: calls.append(c)) == first and len(calls) == 1  # same store
    # a run made before a setting existed did what its default does: reused; set otherwise, it is rerun
    saved = json.loads(Path("run/config.json").read_text())
    del saved["config"]["optimizer"]
    Path("run/config.json").write_text(json.dumps(saved))
    assert reuse_or_run(cfg, lambda c, log: calls.append(c)) == first and len(calls) == 1
    adam = StudentConfig(**{**cfg.__dict__, "optimizer": "adamw"})
    reuse_or_run(adam, lambda c, log: calls.append(c) or {})
    assert calls[1:] == [replace(adam, overwrite=True)]
    # the store rebuilt in place from another teacher holds other targets: the run made from the old one is rerun
    run_teacher_cache(CacheConfig(data=SYN, weights=str(save_teacher(root / "other.pt", seed=1)), chunk_samples=64,
                                  out=cache, force=True), log=lambda *_: None)
    reuse_or_run(cfg, lambda c, log: calls.append(c) or {})
    assert calls[2:] == [replace(cfg, overwrite=True)]


def test_results_rerun_an_online_run_made_by_another_view_replay(root, teacher_file):
    from pipeline.online import OnlineConfig, run_online_kd
    from pipeline.results import reuse_or_run

    cfg = OnlineConfig(data=SYN, weights=str(teacher_file), augment="crop=0.5-1,flip", epochs=1, batch_size=32,
                       workers=0, test_data=SYN_TEST, out="online")
    first = reuse_or_run(cfg, run_online_kd)
    calls = []
    assert reuse_or_run(cfg, lambda c, log: calls.append(c)) == first and not calls   # same replay: reused
    saved = json.loads(Path("online/config.json").read_text())
    Path("online/config.json").write_text(json.dumps(saved | {"replay": 0}))         # made by an older replay
    reuse_or_run(cfg, lambda c, log: calls.append(c) or {})
    assert calls == [replace(cfg, overwrite=True)]
    del saved["student_init"]  # its student started from other weights than a cached run of its seed
    Path("online/config.json").write_text(json.dumps(saved))
    reuse_or_run(cfg, lambda c, log: calls.append(c) or {})
    assert len(calls) == 2


def test_results_rerun_an_online_run_whose_teacher_or_data_changed(root, teacher_file):
    """An online run's teacher is its targets: retrained under the same file name (as `make teacher` does on a
    fresh machine), the finished run was taught by another teacher and is rerun, as the cached arms' new cache key
    reruns theirs; so is one whose data changed under the same spec. The same teacher and data: reused."""
    from pipeline.online import OnlineConfig, run_online_kd
    from pipeline.results import reuse_or_run

    cfg = OnlineConfig(data=SYN, weights=str(teacher_file), augment="crop=0.5-1,flip", epochs=1, batch_size=32,
                       workers=0, test_data=SYN_TEST, out="online")
    first = reuse_or_run(cfg, run_online_kd)
    calls = []
    assert reuse_or_run(cfg, lambda c, log: calls.append(c)) == first and not calls   # same teacher: reused
    save_teacher(teacher_file, seed=1)                                                # retrained in place
    reuse_or_run(cfg, lambda c, log: calls.append(c) or {})
    assert calls == [replace(cfg, overwrite=True)]
    save_teacher(teacher_file, seed=0)                                                # the first one again
    assert reuse_or_run(cfg, lambda c, log: calls.append(c)) == first and len(calls) == 1
    saved = json.loads(Path("online/config.json").read_text())
    Path("online/config.json").write_text(json.dumps(saved | {"identity": {**saved["identity"], "data": "x"}}))
    reuse_or_run(cfg, lambda c, log: calls.append(c) or {})
    assert len(calls) == 2
    del saved["identity"]  # made before online runs recorded their teacher: which one taught it is unknown
    Path("online/config.json").write_text(json.dumps(saved))
    reuse_or_run(cfg, lambda c, log: calls.append(c) or {})
    assert len(calls) == 3
    # the identity follows the data itself: the same teacher on another sample of the same shape is another run
    from pipeline.online import identity

    ours, other = identity(cfg), identity(replace(cfg, data="synthetic:192:1x16x16:4:5"))
    assert ours["teacher"] == other["teacher"] and ours["data"] != other["data"]


def test_results_rerun_a_finished_run_made_with_any_other_training_setting(root, teacher_file):
    """reuse_or_run reuses a finished run only where every setting that trains it is the same: the epoch count,
    the view policy, the views' augmentation policy and their seed, ... A setting its comparison dropped would put a
    run made with it (say 5 epochs, or another augmentation) in a README table that says another. Only where the
    run lies and how it was started do not count, nor a cached run's store or data path (the store counts by its
    key) or its --augment (a check of the store's policy); an online run's data counts by its content (`online.identity`)."""
    from dataclasses import fields

    from pipeline.online import OnlineConfig, run_online_kd
    from pipeline.results import reuse_or_run
    from pipeline.teacher_cache import CacheConfig, run_teacher_cache
    from pipeline.train_student import RUN_PLACE, StudentConfig, run_train_student

    def other(v):
        if isinstance(v, bool):
            return not v
        if isinstance(v, (int, float)):
            return v * 2 + 1
        return "kd=1,ce=1" if v == "kd=1" else (v or "") + "x"

    cache = run_teacher_cache(CacheConfig(data=SYN, weights=str(teacher_file), chunk_samples=64), log=lambda *_: None)
    cached = StudentConfig(cache=cache, epochs=1, batch_size=32, workers=0, test_data=SYN_TEST, out="run")
    online = OnlineConfig(data=SYN, weights=str(teacher_file), augment="translate=2,flip", epochs=1, batch_size=32,
                          workers=0, test_data=SYN_TEST, out="online")
    # a cached run's --augment only checks the store's views policy, which the store's key names
    for cfg, fn, same in ((cached, run_train_student, ("cache", "data", "augment")),
                          (online, run_online_kd, ("cache",))):
        first = reuse_or_run(cfg, fn)
        calls = []
        assert reuse_or_run(cfg, lambda c, log: calls.append(c)) == first and not calls, cfg.out
        for f in fields(cfg):
            if f.name in RUN_PLACE + same:
                continue
            # 0 workers read the batches 1 worker reads (same_run): 2 is another count
            value = 2 if f.name == "workers" else other(getattr(cfg, f.name))
            changed = replace(cfg, **{f.name: value})
            reuse_or_run(changed, lambda c, log: calls.append(c) or {})
            assert calls[-1:] == [replace(changed, overwrite=True)], (cfg.out, f.name)
        assert reuse_or_run(cfg, lambda c, log: calls.append(c)) == first, cfg.out  # the run is still there
    # an online run's views are drawn by the view replay of the kdcache that made it, whatever its policy (not only
    # crops): one made by an older replay, or before runs recorded theirs (replay 1), saw other pixels
    saved = json.loads(Path("online/config.json").read_text())
    for stale in (saved | {"replay": 1}, {k: v for k, v in saved.items() if k != "replay"}):
        Path("online/config.json").write_text(json.dumps(stale))
        calls = []
        reuse_or_run(online, lambda c, log: calls.append(c) or {})
        assert calls == [replace(online, overwrite=True)], stale.get("replay")


def test_help_is_instant_and_names_every_flag_whole():
    """`kdcache --help` imports neither torch nor zarr (a subprocess, so this process's imports do not count), and
    an 80-column help prints each flag's full name (rich's option table truncated the long ones)."""
    import subprocess
    import sys

    probe = ("import sys; from typer.testing import CliRunner; from pipeline.cli import app; "
             "r = CliRunner().invoke(app, ['train-student', '--help'], terminal_width=80); "
             "print(r.exit_code, sorted(m for m in ('torch', 'zarr', 'numpy') if m in sys.modules)); print(r.output)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "80"}).stdout
    assert out.splitlines()[0] == "0 []", out[:200]
    for flag in ("--fitnets-hint-epochs", "--rkd-distance-weight", "--no-labels", "--temperature"):
        assert flag in out, flag
    assert "…" not in out and "<bool>" not in out
