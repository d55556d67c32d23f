"""Module hooks: what is captured is the named module's output, whatever the modules after it do in place."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models import capture


def test_capture_keeps_the_output_a_later_inplace_op_overwrites():
    torch.manual_seed(0)
    # bn -> ReLU(inplace) overwrites bn's output tensor, as in torchvision's ResNets
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(3))
    model.train()
    x = torch.randn(5, 1, 8, 8)
    model(x)  # materialise the lazy layer
    with torch.no_grad():
        expected = model[1](model[0](x))  # computed independently, before any in-place op
    assert (expected < 0).any()
    with capture(model, ["1"]) as feats:
        out = model(x)
    torch.testing.assert_close(feats["1"], expected)
    # and it still carries gradients to the layers before it (students are hooked the same way)
    (feats["1"].sum() + out.sum()).backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_probe_forward_finds_the_modules_an_inplace_op_rewrites():
    from pipeline.models import probe_forward

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(5, 1, 8, 8)
    model(x)
    model.eval()
    assert probe_forward(model, ["0", "1", "4"], x)[2] == {"1"}  # the modules an in-place op rewrites
    with torch.no_grad():
        expected = model[1](model[0](x))
    with torch.no_grad(), capture(model, ["1"], copy=set()) as feats:  # a reference: rewritten by the ReLU
        model(x)
    assert (feats["1"] >= 0).all() and not torch.equal(feats["1"], expected)
    with torch.no_grad(), capture(model, ["1"], copy={"1"}) as feats:
        model(x)
    torch.testing.assert_close(feats["1"], expected)


def test_a_torchvision_teachers_bn1_is_cached_before_its_inplace_relu(root):
    import torchvision
    import zarr

    from pipeline.data import Transform, open_source
    from pipeline.teacher_cache import CacheConfig, run_teacher_cache

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=4)
    torch.save(net.state_dict(), root / "r18.pt")
    data = "synthetic:64:3x32x32:4"
    path = run_teacher_cache(CacheConfig(data=data, teacher="torchvision:resnet18", weights=str(root / "r18.pt"),
                                         layers=["bn1", "layer1.0.bn2", "layer1"], dtype="float32",
                                         chunk_samples=32, device="cpu"), log=lambda *_: None)
    g = zarr.open_group(path, mode="r")
    x = open_source(data).load(g["index"][:], Transform.from_dict(g.attrs["kdcache"]["transform"]))
    net.eval()
    with torch.no_grad():
        bn1 = net.bn1(net.conv1(x))                                  # computed independently, module by module
        stem = net.maxpool(net.relu(bn1.clone()))
        block = net.layer1[0]
        bn2 = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(stem)))))
        layer1 = net.layer1(stem)
    for name, ref in (("bn1", bn1), ("layer1.0.bn2", bn2), ("layer1", layer1)):
        got = torch.from_numpy(g[f"features/{name}"][:])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=name)
    assert (torch.from_numpy(g["features/bn1"][:]) < 0).any()   # before the ReLU, as asked


def test_a_module_function_model_beside_the_user_is_found(root, monkeypatch):
    """`--student mymodels:tiny` with mymodels.py in the current folder works from the `kdcache` command too (whose
    sys.path does not start with the current folder, unlike `python -m pipeline`)."""
    import sys

    from pipeline.models import build_model

    (root / "mymodels_here.py").write_text("from torch import nn\n\n"
                                          "def tiny(num_classes=10):\n"
                                          "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(root))])
    model = build_model("mymodels_here:tiny", 3, 1, 8)
    assert model(__import__("torch").zeros(2, 1, 8, 8)).shape == (2, 3)


def test_a_layer_returning_a_tuple_caches_its_first_element_and_says_so(root):
    import zarr

    from pipeline.data import Transform, open_source
    from pipeline.teacher_cache import CacheConfig, run_teacher_cache
    from tests.odd_models import tuple_layer_teacher

    torch.manual_seed(0)
    net = tuple_layer_teacher().eval()
    torch.save(net.state_dict(), root / "t.pt")
    said = []
    data = "synthetic:64:1x8x8:4"
    path = run_teacher_cache(CacheConfig(data=data, teacher="tests.odd_models:tuple_layer_teacher",
                                         weights=str(root / "t.pt"), layers=["split", "conv"], dtype="float32",
                                         device="cpu"), log=said.append)
    assert "note: --layer split returns a tuple of 2; its first element is cached" in said
    assert not any("--layer conv" in line for line in said)
    g = zarr.open_group(path, mode="r")
    x = open_source(data).load(g["index"][:], Transform.from_dict(g.attrs["kdcache"]["transform"]))
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(g["features/split"][:]), net.conv(x), rtol=1e-5, atol=1e-5)


def test_data_classes_unlike_the_teachers_recorded_ones_are_noted(root):
    from pipeline.teacher_cache import CacheConfig, run_teacher_cache
    from pipeline.train_student import StudentConfig, run_train_student
    from tests.conftest import save_teacher

    w = save_teacher(root / "t.pt")
    ckpt = torch.load(w, weights_only=True)
    for names, noted in ((["0", "1", "2", "3"], False), (["b", "a", "c", "d"], True)):  # synthetic data: 0..3
        ckpt["meta"]["classes"] = names
        torch.save(ckpt, w)
        said = []
        path = run_teacher_cache(CacheConfig(data="synthetic:64:1x16x16:4", weights=str(w), device="cpu", force=True,
                                             layers=["layer3"]), log=said.append)  # class names are no part of the key: the same cache, rebuilt
        note = ("note: the data's classes (0, 1, 2, 3) are not the teacher's (b, a, c, d); label i is taken to mean "
                "the teacher's output i (its top-1 and KD's hard-label term pair them so): check the data's order, "
                "or use train-student --no-labels")
        notes = [line for line in said if "are not the teacher's" in line]
        assert notes == ([note] if noted else []), said
        # ... and by every student run that trains on the labels beside the teacher's outputs, no other
        for loss, no_labels, says in (("kd=1", False, noted), ("ce=1,rkd=1", False, noted), ("kd=1", True, False),
                                      ("rkd=1", False, False)):
            said = []
            run_train_student(StudentConfig(cache=str(path), loss=loss, no_labels=no_labels, rkd_layer="layer3",
                                            epochs=1, workers=0, out=str(root / "run"), overwrite=True),
                              log=said.append)
            assert [line for line in said if "are not the teacher's" in line] == ([note] if says else []), \
                (loss, no_labels, said)


TEACHER_CLASSES = ["ant", "cat", "dog", "eel"]


def _teacher_of_four_and_a_folder_of_two(root):
    """A teacher whose file records 4 class names, and a labelled image folder holding 2 of them (cat, dog: the
    teacher's outputs 1 and 2), which numbers them 0 and 1. Returns the teacher's weights file."""
    import numpy as np
    from PIL import Image

    from tests.conftest import save_teacher

    w = save_teacher(root / "t.pt")
    ckpt = torch.load(w, weights_only=True)
    ckpt["meta"]["classes"] = TEACHER_CLASSES
    torch.save(ckpt, w)
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / "imgs" / c / f"{i}.png")
    return w


def _check_scored_by_the_teachers_names(root, res):
    """student.pt names its outputs by the teacher's classes, and the run's test score pairs `cat` images with output
    1 and `dog` with output 2, recomputed here from a plain forward of student.pt."""
    import numpy as np
    import pytest

    from pipeline.data import Transform, open_source
    from pipeline.models import load_model

    meta = torch.load(root / "run" / "student.pt", weights_only=True)["meta"]
    assert meta["classes"] == TEACHER_CLASSES
    student, _ = load_model("default-student", root / "run" / "student.pt", 4, 1, 8)
    src = open_source("imagefolder:imgs")
    with torch.no_grad():
        pred = student.eval()(src.load(np.arange(12), Transform.from_dict(meta["transform"]))).argmax(1).numpy()
    assert res["test_acc"] == pytest.approx(float((pred == np.array([1, 2])[src.labels(np.arange(12))]).mean()))


def test_a_no_labels_student_names_its_outputs_by_the_teachers_classes(root):
    """With --no-labels the student learns the teacher's outputs alone, so output i is the teacher's class i: a data
    folder holding some of the teacher's classes (here 2 of 4, at other positions) names them by the teacher's names,
    in student.pt and when its test data is scored. Named by the data's folders, `dog` images were scored against
    output 1 (the teacher's `cat`)."""
    from pipeline.teacher_cache import CacheConfig, run_teacher_cache
    from pipeline.train_student import StudentConfig, run_train_student

    w = _teacher_of_four_and_a_folder_of_two(root)
    path = run_teacher_cache(CacheConfig(data="imagefolder:imgs", weights=str(w), device="cpu"), log=lambda *_: None)
    res = run_train_student(StudentConfig(cache=path, no_labels=True, epochs=1, batch_size=4, workers=0, out="run",
                                          test_data="imagefolder:imgs"), log=lambda *_: None)
    _check_scored_by_the_teachers_names(root, res)


def test_labels_of_some_of_the_teachers_classes_pair_with_its_outputs_by_name(root, monkeypatch):
    """A labelled folder holding 2 of the teacher's 4 classes (cat, dog: its outputs 1 and 2) numbers them 0 and 1.
    Paired by position, the teacher's cache-time top-1 and the hard-label loss took `cat` for output 0 (`ant`) and
    `dog` for output 1 (`cat`), against the soft targets. Now each label is the teacher's output of its name: in the
    top-1 (recomputed here from the stored logits), in the labels the loss receives, in student.pt's class names
    and in the test score; the store's labels stay the data's own."""
    import numpy as np
    import pytest
    import torch.nn.functional as F
    import zarr

    from pipeline.teacher_cache import CacheConfig, run_teacher_cache
    from pipeline.train_student import StudentConfig, run_train_student

    w = _teacher_of_four_and_a_folder_of_two(root)
    said = []
    path = run_teacher_cache(CacheConfig(data="imagefolder:imgs", weights=str(w), device="cpu", dtype="float32"),
                             log=said.append)
    assert ("note: the data's 2 classes (cat, dog) are among the teacher's 4 (ant, cat, dog, eel) at other "
            "positions; each label is paired with the teacher's output of its name") in said
    g = zarr.open_group(path, mode="r")
    named = np.array([1, 2])[g["labels"][:]]
    assert sorted(g["labels"][:]) == [0] * 6 + [1] * 6  # stored: the data's own numbers
    top1 = (g["logits"][:].argmax(1) == named).mean()
    assert g.attrs["kdcache"]["teacher"]["accuracy"]["top1"] == pytest.approx(top1, abs=1e-12)
    seen, real = [], F.cross_entropy

    def recorded(logits, y, *a, **k):
        seen.extend(y.tolist())
        return real(logits, y, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(F, "cross_entropy", recorded)
        res = run_train_student(StudentConfig(cache=path, loss="kd=1", epochs=2, batch_size=4, workers=0, out="run",
                                              test_data="imagefolder:imgs"), log=lambda *_: None)
    assert sorted(seen) == [1] * 12 + [2] * 12  # 2 epochs of 6 cats (output 1) and 6 dogs (output 2)
    _check_scored_by_the_teachers_names(root, res)


def test_weights_that_do_not_fit_name_the_architecture_their_file_records(root):
    """`kdcache teacher --arch torchvision:resnet18 --out r18.pt` records the architecture in r18.pt; teacher-cache
    given only `--weights r18.pt` builds the default teacher. The one-line error says which --teacher the file
    was made for, instead of only listing missing keys."""
    import pytest

    from pipeline.errors import KDCacheError
    from pipeline.models import MLP, load_teacher

    torch.save({"state_dict": MLP(num_classes=4, in_channels=1, image_size=16).state_dict(),
                "meta": {"arch": "mlp", "num_classes": 4, "in_channels": 1}}, root / "mlp.pt")
    with pytest.raises(KDCacheError, match=r"do not fit 'default-teacher'.*records its architecture as 'mlp': "
                                           r"pass --teacher mlp"):
        load_teacher("default-teacher", root / "mlp.pt", None, 1, 16)
    model, _ = load_teacher("mlp", root / "mlp.pt", None, 1, 16)  # the recorded one fits
    assert isinstance(model, MLP)


def test_a_malformed_transform_in_a_weights_files_meta_is_one_line(root):
    """A weights file whose meta's transform was hand-edited or damaged: 'x' failed with a TypeError traceback in
    teacher-cache and eval; size "16" fed the teacher 1x6 inputs and a std of 0 infinite ones, without a word."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from tests.conftest import save_teacher

    good = torch.load(save_teacher(root / "t.pt"))
    tf = {"size": [16, 16], "channels": 1, "mean": [0.5], "std": [0.5]}
    for bad, says in (("x", "is not a {size, channels, mean, std} record"), (tf | {"size": "16"}, "has size '16'"),
                      (tf | {"std": [0.0]}, "std [0.0], not 1 finite number(s) each with stds positive"),
                      (tf | {"channels": 2}, "has channels 2, not 1 or 3")):
        torch.save({"state_dict": good["state_dict"], "meta": good["meta"] | {"transform": bad}}, root / "bad.pt")
        for args in (["teacher-cache", "--data", "synthetic:64:1x16x16:4", "--weights", "bad.pt"],
                     ["eval", "bad.pt", "--data", "synthetic:64:1x16x16:4"]):
            res = CliRunner().invoke(app, args)
            lines = res.stderr.strip().splitlines()
            assert res.exit_code == 2 and len(lines) == 1, (bad, args, res.exception, res.output)
            assert "bad.pt: the transform its meta records " in lines[0] and says in lines[0], (bad, args, lines)
    assert not (root / "data" / "cache").exists()


def test_classifier_width_reads_the_output_count_off_the_last_classifier_weight(root):
    """A bare state_dict (no meta) says its output count only through its classifier's weight, the last Linear (or,
    in a conv-only net like SqueezeNet, the last 1x1 convolution): rows of that weight, not of the first matrix (an
    embedding, a hidden layer, MobileNet's first classifier layer) nor its columns. SqueezeNet used to give None (no
    2-D weight), so its bare weights were built with 1000 outputs and failed to load. (Taking the first matrix,
    mo_classifier_width_first, passed every test.)"""
    import torchvision

    from pipeline.models import build_model, classifier_width, load_model

    cases = [("torchvision:resnet18", 7, 3), ("torchvision:mobilenet_v3_small", 5, 3),
             ("torchvision:squeezenet1_1", 3, 3), ("default-teacher", 6, 1), ("default-student", 5, 1),
             ("mlp", 9, 1)]
    for i, (spec, classes, channels) in enumerate(cases):
        torch.manual_seed(i)
        model = build_model(spec, classes, channels, 32)
        sd = model.state_dict()
        # the output count, counted independently: the model's own output on an input
        with torch.no_grad():
            assert model.eval()(torch.zeros(1, channels, 32, 32)).shape == (1, classes), spec
        assert classifier_width(sd) == classes, spec
        # a bare state_dict file loads with that many outputs, the weights as saved
        torch.save(sd, root / f"bare{i}.pt")
        loaded, meta = load_model(spec, root / f"bare{i}.pt", None, channels, 32)
        assert meta == {} and all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items()), spec
    # the only 2-D weight of a ResNet is its fc: the width is its rows (7), not its columns (512)
    fc = torchvision.models.resnet18(num_classes=7).state_dict()["fc.weight"]
    assert fc.shape == (7, 512)
    assert classifier_width({"fc.weight": fc, "fc.bias": torch.zeros(7)}) == 7
    assert classifier_width({"bn.weight": torch.ones(4), "conv.weight": torch.ones(4, 3, 3, 3)}) is None
    assert classifier_width(None) is None


def test_built_in_models_take_non_square_inputs(root, monkeypatch):
    """Image folders are as wide as their first image, so rarely square: the built-in mlp was sized by the height
    alone (a 'mat1 and mat2 shapes' error on 8x12 inputs) and the default student pooled a 2x3 map to 2x2. Both are
    now built for [H, W]: an mlp teacher trains on 8x12 inputs, is cached, and mlp and default students learn from it;
    a module:function gets image_shape=(H, W) beside image_size=H."""
    import json
    import sys
    from pathlib import Path

    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.models import MLP, StudentNet, build_model

    runner = CliRunner()
    data = "synthetic:96:1x8x12:4"
    res = runner.invoke(app, ["teacher", "--arch", "mlp", "--data", data, "--epochs", "1", "--out", "t.pt"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["teacher-cache", "--teacher", "mlp", "--weights", "t.pt", "--data", data])
    assert res.exit_code == 0, res.output
    store = res.stdout.split()[-1]
    for student in ("mlp", "default-student"):
        res = runner.invoke(app, ["train-student", "--cache", store, "--student", student, "--epochs", "1",
                                  "--workers", "0", "--out", f"run-{student}", "--test-data", data])
        assert res.exit_code == 0, res.output
        assert json.loads(Path(f"run-{student}/config.json").read_text())["transform"]["size"] == [8, 12]
    mlp = build_model("mlp", 4, 1, [8, 12])
    assert isinstance(mlp, MLP) and mlp.hidden[1].in_features == 8 * 12
    student = build_model("default-student", 4, 1, [8, 12])
    assert isinstance(student, StudentNet) and student.embed[1].in_features == 32 * 2 * 3
    assert student(torch.zeros(2, 1, 8, 12)).shape == (2, 4)
    square = build_model("default-student", 4, 1, 16)  # a side alone: square, as before
    assert square.embed[1].in_features == 32 * 4 * 4
    Path("shaped.py").write_text("def net(num_classes, image_size, image_shape):\n"
                                 "    import torch\n    return torch.nn.Linear(image_shape[0] * image_shape[1], "
                                 "num_classes + image_size)\n")
    monkeypatch.syspath_prepend(str(Path.cwd()))
    sys.modules.pop("shaped", None)
    got = build_model("shaped:net", 4, 1, [8, 12])
    assert (got.in_features, got.out_features) == (96, 12)


def test_a_teacher_whose_weights_record_no_transform_is_noted_with_what_it_gets(root):
    """A bare state_dict (or a file without a recorded transform) says nothing about the teacher's input: teacher-cache
    feeds it the data's defaults, and says so, with the size, channels and statistics it uses and the flags that
    change them; --normalize, or weights recording their transform (`kdcache teacher`'s), need no note."""
    from pipeline.teacher_cache import CacheConfig, run_teacher_cache
    from tests.conftest import SYN, save_teacher

    bare = save_teacher(root / "bare.pt")  # meta without a transform
    said = []
    run_teacher_cache(CacheConfig(data=SYN, weights=str(bare), chunk_samples=64), log=said.append)
    assert ("note: the teacher's weights record no input transform, so it gets the data's defaults: 16x16, 1 "
            "channel(s), normalised by 0.5/0.5 (mean/std); if it was trained on other inputs, pass --image-size, "
            "--channels and --normalize as it was") in said
    said.clear()
    run_teacher_cache(CacheConfig(data=SYN, weights=str(bare), chunk_samples=64, normalize="0.5/0.5", force=True),
                      log=said.append)
    assert not any("no input transform" in str(x) for x in said)
    ckpt = torch.load(bare, weights_only=True)
    ckpt["meta"]["transform"] = {"size": [16, 16], "channels": 1, "mean": [0.5], "std": [0.5]}
    torch.save(ckpt, root / "told.pt")
    said.clear()
    run_teacher_cache(CacheConfig(data=SYN, weights=str(root / "told.pt"), chunk_samples=32), log=said.append)
    assert not any("cache hit" in str(x) or "no input transform" in str(x) for x in said)  # written, and no note
