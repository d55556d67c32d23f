"""End to end: teacher-cache -> store -> train-student, through the functions and the CLI."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data import Transform, open_source
from pipeline.errors import KDCacheError
from pipeline.models import capture, load_teacher
from pipeline.store import open_store
from pipeline.teacher_cache import CacheConfig, run_teacher_cache
from pipeline.train_student import StudentConfig, run_train_student
from tests.conftest import REPO, SYN, SYN_TEST, run_ranks

runner = CliRunner()


def _run_files(folder) -> list[str]:
    """A run directory's files, its lock (`.lock`, held while a run writes there) aside."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name != ".lock")


def _cache(teacher_file, **kw):
    kw.setdefault("layers", ["layer2", "layer3", "avgpool"])
    kw.setdefault("device", "cpu")  # exact float32 comparison: no autocast even where a GPU exists
    return run_teacher_cache(CacheConfig(data=SYN, weights=str(teacher_file), chunk_samples=64, batch_size=32,
                                         **kw), log=lambda *_: None)


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("float32", 1e-6)])
def test_store_round_trip_equals_teacher_outputs(root, teacher_file, dtype, tol):
    path = _cache(teacher_file, dtype=dtype)
    g = zarr.open_group(path, mode="r")
    man = g.attrs["kdcache"]
    # Independent recomputation: load the teacher ourselves and run it on the rebuilt inputs.
    src = open_source(SYN)
    teacher, _ = load_teacher("default-teacher", teacher_file, 4, 1, 16)
    index = g["index"][:]  # rows hold the samples in a fixed shuffled order; `index` is the join key
    assert sorted(index) == list(range(192)) and not np.array_equal(index, np.arange(192))
    x = src.load(index, Transform.from_dict(man["transform"]))
    with torch.no_grad(), capture(teacher, ["layer2", "layer3", "avgpool"]) as feats:
        logits = teacher(x)
    expect = {"logits": logits, **{f"features/{k}": v for k, v in feats.items()}}
    for name, ref in expect.items():
        got = torch.from_numpy(np.asarray(g[name][:]).astype(np.float32))
        assert got.shape == ref.shape, name
        assert g[name].dtype == np.dtype(dtype)
        # fp16 rounding is relative: |err| <= tol * max(1, |x|)
        assert ((got - ref).abs() <= tol * ref.abs().clamp_min(1)).all(), name
    np.testing.assert_array_equal(g["labels"][:], src.labels(index))
    # The teacher's accuracy on the cached inputs, counted at cache time
    top1 = (logits.argmax(1).numpy() == src.labels(index)).mean()
    assert man["teacher"]["accuracy"]["top1"] == pytest.approx(top1, abs=1e-12)
    # Manifest: what produced the store.
    assert man["complete"] is True and man["format_version"] == 2
    assert len(man["teacher"]["fingerprint"]) == 16 and man["teacher"]["spec"] == "default-teacher"
    assert man["data"]["spec"] == SYN and man["data"]["num_samples"] == 192 and man["data"]["fingerprint"]
    assert man["transform"]["size"] == [16, 16] and man["layers"] == ["layer2", "layer3", "avgpool"]
    assert man["dtype"] == dtype and man["codecs"] == {"compressor": "zstd", "level": 1, "checksum": "crc32c"}
    assert man["targets"]["logits"] == {"shape": [4], "codec": {"name": dtype}, "parts": ["logits"]}
    assert man["views"] is None and set(man["distortion"]) == {"logits", *[f"features/{k}" for k in
                                                                            ("layer2", "layer3", "avgpool")]}
    assert {"torch", "zarr", "numcodecs", "kdcache", "python"} <= set(man["versions"])
    assert man["created"] and man["completed"] and man["stats"]["samples_computed"] == 192
    # where the time went: the writer threads' busy time is part of the stage's, summed over the threads
    stats = man["stats"]
    assert 0 < stats["writer_seconds"] <= stats["seconds"] * stats["writers"] and stats["writers"] >= 1
    # Chunked along samples, compressed and checksummed.
    assert g["features/layer2"].chunks[0] == 64 and g["logits"].chunks == (64, 4)
    codecs = [type(c).__name__ for c in g["logits"].metadata.codecs]
    assert codecs == ["BytesCodec", "ZstdCodec", "Crc32cCodec"]


def _forbid_teacher(monkeypatch):
    """Any attempt to build or load the teacher in this process raises."""
    import pipeline.models as models

    def boom(*a, **k):
        raise AssertionError("the student stage touched the teacher")

    monkeypatch.setattr(models, "load_teacher", boom)
    monkeypatch.setattr(models.TeacherNet, "__init__", boom)
    real_load = torch.load

    def guarded_load(f, *a, **k):
        if "teacher" in str(f):
            boom()
        return real_load(f, *a, **k)

    monkeypatch.setattr(torch, "load", guarded_load)


def test_cli_end_to_end_student_never_builds_teacher(root, teacher_file, monkeypatch):
    res = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--layer", "layer3",
                              "--layer", "avgpool", "--chunk-samples", "64"])
    assert res.exit_code == 0, res.output
    store = res.stdout.strip().splitlines()[-1]            # the last line is the store's path
    assert store.endswith(".zarr") and Path(store).resolve().parent == (root / "data" / "cache").resolve()
    assert (Path(store) / "zarr.json").exists()
    _forbid_teacher(monkeypatch)
    res = runner.invoke(app, ["train-student", "--cache", store, "--loss", "kd=1,fitnets=1,rkd=1",
                              "--fitnets-schedule", "single", "--epochs", "2", "--batch-size", "32",
                              "--test-data", SYN_TEST, "--workers", "0", "--out", "run"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0.0 <= out["test_acc"] <= 1.0
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]["losses"]) == {"kd_soft", "kd_hard", "fitnets", "rkd_distance", "rkd_angle"}
    assert all(np.isfinite(v) for r in rows for v in r["losses"].values())
    assert rows[0]["samples_per_s"] > 0 and rows[0]["train_acc"] is not None
    cfg = json.loads((root / "run" / "config.json").read_text())
    assert cfg["config"]["loss"] == "kd=1,fitnets=1,rkd=1" and cfg["cache"]["key"]
    assert cfg["cache"]["path"] == str(Path(store).resolve())  # readable from any folder
    # 3 chunks of 64 rows, one worker: a buffer holds at most those 3 whatever the setting says
    assert cfg["reader"]["buffer_chunks"] >= 3 and cfg["reader"]["buffer_chunks_used"] == 3
    # what else decides the weights bit for bit: torchvision (its models, the views' roi_align replay) and torch's
    # CPU thread count (another count sums in another order: other weights)
    import torchvision
    assert cfg["versions"]["torchvision"] == torchvision.__version__
    assert cfg["threads"] == torch.get_num_threads()
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["test_acc"] == out["test_acc"]
    assert "state_dict" in torch.load(root / "run" / "student.pt", weights_only=True)


def test_student_learns_from_cache_alone(root):
    """A trained teacher's soft targets alone (labels hidden) teach the student well above chance."""
    from pipeline.teacher_train import TeacherTrainConfig, run_teacher_train

    run_teacher_train(TeacherTrainConfig(data=SYN, test_data=SYN_TEST, epochs=8, batch_size=32, lr=0.05,
                                         out="t.pt"), log=lambda *_: None)
    path = run_teacher_cache(CacheConfig(data=SYN, weights="t.pt", chunk_samples=64), log=lambda *_: None)
    s = run_train_student(StudentConfig(cache=path, loss="kd=1", no_labels=True, epochs=6, batch_size=32, lr=0.05,
                                        test_data=SYN_TEST, workers=0, out="run"), log=lambda *_: None)
    assert s["test_acc"] > 0.6  # 4 classes: chance is 0.25
    rows = [json.loads(x) for x in open("run/metrics.jsonl")]
    assert set(rows[0]["losses"]) == {"kd_soft"} and rows[0]["train_acc"] is None
    s = run_train_student(StudentConfig(cache=path, loss="kd=1", no_labels=True, epochs=6, batch_size=32, lr=3e-3,
                                        optimizer="adamw", weight_decay=0.05, test_data=SYN_TEST, workers=0,
                                        out="run-adamw"), log=lambda *_: None)
    assert s["test_acc"] > 0.6
    assert json.loads(Path("run-adamw/config.json").read_text())["config"]["optimizer"] == "adamw"


def _interrupt_after_first_checkpoint(monkeypatch, cfg):
    """Run train-student as if Ctrl-C came right after its first epoch's checkpoint was written."""
    import pipeline.train_student as ts

    real = ts.save_whole

    def stop_after_first(obj, at, then):
        real(obj, at, then)
        if at.name == "checkpoint.pt":
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ts, "save_whole", stop_after_first)
        with pytest.raises(KeyboardInterrupt):
            run_train_student(cfg, log=lambda *_: None)


def _write_images(folder, n, rgb=True, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = (20 + i % 3, 18)  # mixed sizes: all are resized to the first image's size
        arr = rng.integers(0, 256, (size[1], size[0], 3) if rgb else (size[1], size[0]), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:03d}.png")


def test_a_colour_image_in_a_folder_whose_first_image_is_grey_keeps_its_colour(root):
    """The folder's mode comes from its first image; asked for 3 channels, every image is decoded as RGB, so a
    colour image after a grey one keeps its colour (it was decoded grey and repeated), and grey ones are unchanged."""
    from PIL import Image

    from pipeline.data import Transform, default_transform, open_source

    (root / "mixed").mkdir()
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    colour = np.zeros((8, 8, 3), dtype=np.uint8)
    colour[..., 0] = 200                                 # pure red
    Image.fromarray(grey).save(root / "mixed" / "a.png")
    Image.fromarray(colour).save(root / "mixed" / "b.png")
    src = open_source("imagefolder:mixed")
    assert default_transform(src).channels == 1          # the first image's
    rgb = src.load_raw(np.array([0, 1]), Transform(size=[8, 8], channels=3))
    assert rgb.shape == (2, 3, 8, 8)
    assert (rgb[1, 0] == 200).all() and (rgb[1, 1:] == 0).all()   # still red
    assert all((rgb[0, c].numpy() == grey).all() for c in range(3))  # grey, repeated
    one = src.load_raw(np.array([0, 1]), Transform(size=[8, 8], channels=1))  # 1 channel: as it always was
    assert (one[0, 0].numpy() == grey).all() and one[1, 0, 0, 0] == np.asarray(Image.fromarray(colour).convert("L"))[0, 0]


def test_images_in_a_linked_folder_inside_a_class_folder_are_data(root):
    """A class folder's images at any depth are its samples, also those under a link to a folder (as a linked class
    folder's are): rglob does not follow links, so they were silently left out. A link back to an ancestor is
    walked once, not forever."""
    _write_images(root / "elsewhere", 2, seed=1)
    _write_images(root / "data" / "a", 2)
    _write_images(root / "data" / "b", 1, seed=2)
    (root / "data" / "b" / "more").symlink_to(root / "elsewhere")
    (root / "data" / "b" / "loop").symlink_to(root / "data" / "b")  # an ancestor: its images are already counted
    src = open_source("imagefolder:data")
    assert [str(f.relative_to(src.root)) for f in src.files] == [
        "a/img_000.png", "a/img_001.png", "b/img_000.png", "b/more/img_000.png", "b/more/img_001.png"]
    np.testing.assert_array_equal(src.labels(np.arange(5)), [0, 0, 1, 1, 1])


def test_a_macos_archives_metadata_folder_is_no_class(root):
    """A zip made on macOS unpacks a `__MACOSX` folder of `._name` resource forks beside the class folders: it was
    class 0 with no images (every class number shifted, the teacher given an output more), and beside a flat
    folder's images it refused them as 'class folders and loose images'. Skipped, as hidden folders are."""
    for folder in ("labelled/ant", "labelled/bee", "flat"):
        _write_images(root / folder, 2)
        (root / folder.split("/")[0] / "__MACOSX" / "x").mkdir(parents=True, exist_ok=True)
        (root / folder.split("/")[0] / "__MACOSX" / "x" / "._img_000.png").write_bytes(b"\0\5\26\7 resource fork")
    src = open_source("imagefolder:labelled")
    assert src.classes == ["ant", "bee"] and list(src.labels(np.arange(4))) == [0, 0, 1, 1]
    src = open_source("imagefolder:flat")
    assert src.classes is None and src.num_samples == 2


def test_a_dataset_split_into_train_and_test_folders_is_refused_not_read_as_two_classes(root):
    """`imagefolder:DS` where DS holds train/<class>/... and test/<class>/... was a 2-class dataset "test"/"train"
    (images are found at any depth): a teacher trained to tell the splits apart. Refused, naming the split folders
    to pass; folders named train/test that hold their images directly are a real 2-class dataset and still work."""
    for split in ("train", "val"):
        for c in ("ant", "bee"):
            _write_images(root / "ds" / split / c, 2, seed=len(split + c))
    with pytest.raises(KDCacheError) as e:
        open_source("imagefolder:ds")
    assert str(e.value) == ("ds looks like a dataset split into train/ and val/ folders, each holding the class "
                            "folders, not a folder of classes; use imagefolder:ds/train (and --test-data "
                            "imagefolder:ds/val)")
    src = open_source("imagefolder:ds/train")
    assert src.classes == ["ant", "bee"] and list(src.labels(np.arange(4))) == [0, 0, 1, 1]
    for split in ("test", "train"):  # classes that happen to be named so, their images directly inside
        _write_images(root / "two" / split, 2, seed=len(split))
    src = open_source("imagefolder:two")
    assert src.classes == ["test", "train"] and list(src.labels(np.arange(4))) == [0, 0, 1, 1]


def test_images_in_every_common_format_pillow_reads_are_data(root):
    """`.jfif` and `.jpe` (JPEG), `.pbm` and `.pnm` (netpbm), `.dib` (BMP) and `.tga` files decode with Pillow's own
    codecs but were skipped silently: a class folder of them lost its samples, a flat folder of them had 'no images'."""
    from PIL import Image

    (root / "flat").mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    names = ["a.jfif", "b.jpe", "c.pbm", "d.pnm", "e.dib", "f.tga"]
    for name in names:
        im = Image.fromarray(rgb)
        (im.convert("1") if name.endswith(".pbm") else im).save(root / "flat" / name)
    src = open_source("imagefolder:flat")
    assert [f.name for f in src.files] == names
    x = src.load_raw(np.arange(6), Transform(size=[6, 5], channels=3))
    for i in (3, 4, 5):  # the lossless ones give back their pixels
        assert (x[i].numpy().transpose(1, 2, 0) == rgb).all(), names[i]
    assert set(np.unique(x[2].numpy())) <= {0, 255}  # one bit a pixel


def test_fashion_mnist_dir_set_to_a_folder_without_its_files_is_refused(root, monkeypatch):
    """KDCACHE_FASHION_MNIST_DIR names where the data is read from: set to a folder lacking the IDX files (a typo,
    a partial copy), it is refused, naming the folder and the missing files, instead of silently reading another
    copy (Debian's, data/datasets/, or a download)."""
    import gzip

    (root / "fm").mkdir()
    with gzip.open(root / "fm" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"")
    monkeypatch.setenv("KDCACHE_FASHION_MNIST_DIR", str(root / "fm"))
    with pytest.raises(KDCacheError, match=r"KDCACHE_FASHION_MNIST_DIR.*fm.*train-labels-idx1-ubyte\.gz"):
        open_source("fashion-mnist:test")


def test_a_damaged_fashion_mnist_file_is_named_in_one_line(root, monkeypatch):
    """A truncated .gz was reported as 'interrupted' with exit 130 (its EOFError is click's Ctrl-D); a file of
    another kind, or the labels in the images' place, failed with numpy tracebacks; a test split's images beside
    the train split's labels with another. Each names the file now."""
    import gzip

    def idx(name, dims):
        header = (0x0800 + len(dims)).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
        with gzip.open(root / "fm" / name, "wb") as f:
            f.write(header + bytes(int(np.prod(dims))))
        return (root / "fm" / name).read_bytes()

    (root / "fm").mkdir()
    for split, n in (("train", 6), ("t10k", 4)):
        images = idx(f"{split}-images-idx3-ubyte.gz", [n, 28, 28])
        labels = idx(f"{split}-labels-idx1-ubyte.gz", [n])
    monkeypatch.setenv("KDCACHE_FASHION_MNIST_DIR", str(root / "fm"))
    assert open_source("fashion-mnist:test").num_samples == 4  # intact
    cases = [("t10k-images-idx3-ubyte.gz", images[: len(images) // 2], "t10k-images-idx3-ubyte.gz (EOFError"),
             ("t10k-labels-idx1-ubyte.gz", gzip.compress(b"garbage"), "(no IDX header of 1-D unsigned bytes"),
             ("t10k-images-idx3-ubyte.gz", labels, "(no IDX header of 3-D unsigned bytes (magic 0x801, not 0x803)"),
             ("t10k-labels-idx1-ubyte.gz", (root / "fm" / "train-labels-idx1-ubyte.gz").read_bytes(),
              "hold 4 images of (28, 28) pixels and 6 labels")]
    for name, content, says in cases:
        (root / "fm" / name).write_bytes(content)
        res = runner.invoke(app, ["plan", "--data", "fashion-mnist:test", "--weights", "none.pt"])
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and says in lines[0], (name, res.exception, res.output)
        idx("t10k-images-idx3-ubyte.gz", [4, 28, 28])  # intact again for the next case
        idx("t10k-labels-idx1-ubyte.gz", [4])


def test_fashion_mnist_fingerprint_is_its_images_and_labels_wherever_they_lie(root, monkeypatch):
    """Fashion-MNIST's fingerprint hashes its content: the same four files in another folder are the same data, and
    a labels file changed under the same images (a relabelled copy) is other data, so a store or run made from the
    old labels is not taken for it."""
    import gzip

    from pipeline.data import data_differs

    rng = np.random.default_rng(0)

    def idx(folder, name, values):
        header = (0x0800 + values.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in values.shape)
        with gzip.open(folder / name, "wb") as f:
            f.write(header + values.astype(np.uint8).tobytes())

    fm = root / "fm"
    fm.mkdir()
    labels = rng.integers(0, 10, 6)
    for split, n in (("train", 6), ("t10k", 4)):
        idx(fm, f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        idx(fm, f"{split}-labels-idx1-ubyte.gz", labels if split == "train" else rng.integers(0, 10, n))
    monkeypatch.setenv("KDCACHE_FASHION_MNIST_DIR", str(fm))
    before = open_source("fashion-mnist:train")
    recorded = before.describe()
    assert before.labels(np.arange(6)).tolist() == labels.tolist()
    shutil.copytree(fm, root / "fm2")
    monkeypatch.setenv("KDCACHE_FASHION_MNIST_DIR", str(root / "fm2"))
    assert open_source("fashion-mnist:train").fingerprint() == before.fingerprint()
    assert open_source("fashion-mnist:test").fingerprint() != before.fingerprint()
    relabelled = labels.copy()
    relabelled[3] = (relabelled[3] + 1) % 10
    idx(root / "fm2", "train-labels-idx1-ubyte.gz", relabelled)
    after = open_source("fashion-mnist:train")
    assert torch.equal(after.load_raw(np.arange(6), Transform([28, 28], 1)),
                       before.load_raw(np.arange(6), Transform([28, 28], 1)))
    assert after.fingerprint() != before.fingerprint() and data_differs(after, recorded) is not None


def test_unlabelled_flat_imagefolder(root):
    from tests.conftest import save_teacher

    imgs = root / "flat"
    _write_images(imgs, 40)
    (imgs / "._img000.png").write_bytes(b"\0\5\26\7 macOS resource fork")  # hidden: not data, never read
    (imgs / ".thumbs").mkdir()
    w = save_teacher(root / "rgb_teacher.pt", in_channels=3, num_classes=5)
    res = runner.invoke(app, ["teacher-cache", "--data", f"imagefolder:{imgs}", "--weights", str(w),
                              "--layer", "avgpool", "--chunk-samples", "16"])
    assert res.exit_code == 0, res.output
    store = res.stdout.strip().splitlines()[-1]
    g = zarr.open_group(store, mode="r")
    assert "labels" not in g and g["logits"].shape == (40, 5)
    assert g.attrs["kdcache"]["data"]["labelled"] is False
    res = runner.invoke(app, ["train-student", "--cache", store, "--loss", "kd=1,rkd=1", "--epochs", "1",
                              "--batch-size", "8", "--workers", "0", "--out", "run"])
    assert res.exit_code == 0, res.output
    row = json.loads((root / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert set(row["losses"]) == {"kd_soft", "rkd_distance", "rkd_angle"} and row["test_acc"] is None
    # A label-based loss on unlabelled data is refused with one line.
    res = runner.invoke(app, ["train-student", "--cache", store, "--loss", "ce=1", "--workers", "0"])
    assert res.exit_code == 2 and "needs labels" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    # So is training a teacher on it.
    res = runner.invoke(app, ["teacher", "--data", f"imagefolder:{imgs}", "--out", "t.pt"])
    assert res.exit_code == 2 and "has no labels" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_no_default_teacher_for_an_image_folder_says_how_to_get_a_teacher_for_it(root, monkeypatch):
    """`make teacher` trains the default teacher on Fashion-MNIST: for an image folder, the missing-weights line
    also says to pass a teacher of one's own, or to train one on that folder."""
    _write_images(root / "imgs" / "ant", 2)
    _write_images(root / "imgs" / "bee", 2, seed=1)
    res = runner.invoke(app, ["teacher-cache", "--data", "imagefolder:imgs"])
    default = root / "data" / "teachers" / "default.pt"
    assert res.exit_code == 2 and res.stderr.strip() == (
        f"error: weights file not found: {default} (the default teacher; `make teacher` trains it on Fashion-MNIST); "
        f"for imagefolder:{root / 'imgs'} pass --weights FILE of your own teacher, or train one with "
        f"`kdcache teacher --data imagefolder:{root / 'imgs'} --out FILE`"), res.output
    monkeypatch.setenv("KDCACHE_FASHION_MNIST_DIR", str(_fake_fashion_mnist(root / "fm")))
    res = runner.invoke(app, ["teacher-cache", "--data", "fashion-mnist:train"])  # the default teacher's own data
    assert res.exit_code == 2 and res.stderr.strip() == (
        f"error: weights file not found: {default} (run `make teacher` to train the default teacher)"), res.output


def test_a_store_whose_image_folder_moved_says_to_pass_data(root, monkeypatch):
    """The store records its image folder; moved, train-student names --data (not only the folder it looked in), and
    a run interrupted before the move resumes with --data naming the new place (the same images)."""
    from tests.conftest import save_teacher

    _write_images(root / "photos", 24)
    w = save_teacher(root / "rgb_teacher.pt", in_channels=3, num_classes=5)
    store = run_teacher_cache(CacheConfig(data="imagefolder:photos", weights=str(w), chunk_samples=8, device="cpu"),
                              log=lambda *_: None)
    _interrupt_after_first_checkpoint(monkeypatch, StudentConfig(cache=store, epochs=2, batch_size=8, workers=0, out="run"))
    (root / "photos").rename(root / "photos-moved")
    args = ["train-student", "--cache", store, "--epochs", "2", "--batch-size", "8", "--workers", "0", "--out", "run",
            "--resume"]
    res = runner.invoke(app, args)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0] == (f"error: cache {store} was made from imagefolder:{root / 'photos'}, which is no longer there; "
                        "if the data moved, pass --data imagefolder:DIR with where it lies now (checked to be the "
                        "same images)")
    res = runner.invoke(app, args + ["--data", "imagefolder:photos-moved"])
    assert res.exit_code == 0 and "resuming run after epoch 1/2" in res.stderr, res.output


def test_own_teacher_on_unlabelled_data_and_its_class_names(root, teacher_file):
    """On unlabelled data the teacher's output count comes from its weights (a bare state_dict records none), or
    --num-classes; its students are scored by the class names its weights file records, else by position (said)."""
    from pipeline.models import TeacherNet

    imgs = root / "flat"
    _write_images(imgs, 24)
    torch.manual_seed(0)
    torch.save(TeacherNet(num_classes=5, in_channels=3).state_dict(), root / "bare.pt")  # no meta at all
    base = ["teacher-cache", "--data", f"imagefolder:{imgs}", "--weights", "bare.pt", "--chunk-samples", "8"]
    res = runner.invoke(app, base + ["--out", "bare.zarr"])
    assert res.exit_code == 0, res.output
    g = zarr.open_group("bare.zarr", mode="r")
    assert g["logits"].shape == (24, 5) and g.attrs["kdcache"]["teacher"]["classes"] is None
    res = runner.invoke(app, base + ["--num-classes", "7", "--out", "seven.zarr"])  # not what the weights hold
    assert res.exit_code == 2 and "size mismatch for fc.weight" in res.stderr and "--num-classes" in res.stderr
    res = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--num-classes", "7"])
    assert res.exit_code == 2 and "the teacher's weights file records 4 outputs; drop --num-classes" in res.stderr
    _write_images(root / "test" / "cat", 3, seed=1)
    _write_images(root / "test" / "ant", 3, seed=2)
    student = ["train-student", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--test-data",
               f"imagefolder:{root / 'test'}"]
    res = runner.invoke(app, student + ["--cache", "bare.zarr", "--out", "run-bare"])
    assert res.exit_code == 0, res.output
    assert "are taken as the teacher's outputs 0, 1, ... in that order" in res.stderr
    # A teacher whose file names its classes: test folders are matched by those names, unknown ones refused.
    names = ["ant", "bee", "cat", "dog", "eel"]
    torch.save({"state_dict": torch.load(root / "bare.pt"), "meta": {"num_classes": 5, "in_channels": 3,
                                                                    "data": {"classes": names}}}, root / "named.pt")
    res = runner.invoke(app, base[:4] + ["named.pt", "--chunk-samples", "8", "--out", "named.zarr"])
    assert res.exit_code == 0, res.output
    assert zarr.open_group("named.zarr", mode="r").attrs["kdcache"]["teacher"]["classes"] == names
    res = runner.invoke(app, student + ["--cache", "named.zarr", "--out", "run-named"])
    assert res.exit_code == 0 and "taken as the teacher's outputs" not in res.stderr, res.output
    meta = torch.load(root / "run-named" / "student.pt", weights_only=True)["meta"]
    assert meta["classes"] == names
    from pipeline.data import class_map
    assert list(class_map(open_source(f"imagefolder:{root / 'test'}"), meta["classes"])) == [0, 2]  # ant, cat
    _write_images(root / "test" / "zebra", 2, seed=3)
    res = runner.invoke(app, student + ["--cache", "named.zarr", "--out", "run-zebra"])
    assert res.exit_code == 2 and "class(es) 'zebra' that the teacher lacks" in res.stderr


def test_class_names_in_another_unicode_form_are_the_same_class(root):
    """A folder copied from macOS names `ñandú` in decomposed form (NFD: n + combining tilde), which differs from
    the composed name as a string: the test folder was refused for a class the training data 'lacks' while the
    message listed it. Names are matched by their composed (NFC) form."""
    import unicodedata

    from pipeline.data import class_map

    for c in ("ant", "ñandú", "zebu"):
        _write_images(root / "train" / c, 1)
    for c in ("ñandú", "zebu"):
        _write_images(root / "test" / unicodedata.normalize("NFD", c), 1)
    train, test = open_source(f"imagefolder:{root / 'train'}"), open_source(f"imagefolder:{root / 'test'}")
    assert test.classes[0] != "ñandú" and unicodedata.normalize("NFC", test.classes[0]) == "ñandú"
    assert train.classes == ["ant", "zebu", "ñandú"]  # sorted by code point: composed ñ (U+00F1) after z
    assert list(class_map(test, train.classes)) == [2, 1]  # decomposed, the test folder's ñandú sorts first


def test_test_folder_classes_are_matched_by_name(root):
    """A test folder lacking a class must not shift the others' labels; one with a class the training data lacks is
    refused; the data the student trains on is said to be no test split."""
    from pipeline.data import class_map
    from pipeline.loops import evaluate
    from tests.conftest import save_teacher

    for c in ("ant", "bee", "cat"):
        _write_images(root / "train" / c, 4, seed=len(c))
    _write_images(root / "train" / "bee" / ".ipynb_checkpoints", 2)  # hidden: not samples
    _write_images(root / "test" / "cat", 5)           # only the third class
    train, test = open_source(f"imagefolder:{root / 'train'}"), open_source(f"imagefolder:{root / 'test'}")
    assert test.classes == ["cat"] and list(test.labels(np.arange(5))) == [0] * 5  # the folder's own numbering
    assert train.num_samples == 12
    assert list(class_map(test, train.classes)) == [2]

    class AlwaysCat(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, 0.0, 1.0]).expand(len(x), 3)

    tf = Transform.from_dict({"size": [18, 18], "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3})
    assert evaluate(AlwaysCat(), test, tf, torch.device("cpu"), class_map(test, train.classes)) == 1.0
    assert evaluate(AlwaysCat(), test, tf, torch.device("cpu")) == 0.0  # what position-matching would have said

    w = save_teacher(root / "t.pt", in_channels=3, num_classes=3)
    path = run_teacher_cache(CacheConfig(data=f"imagefolder:{root / 'train'}", weights=str(w), chunk_samples=8),
                             log=lambda *_: None)
    common = dict(cache=path, loss="kd=1", epochs=1, batch_size=4, workers=0, out="run")
    s = run_train_student(StudentConfig(test_data=f"imagefolder:{root / 'test'}", **common), log=lambda *_: None)
    assert s["test_acc"] is not None
    # student.pt records its class names: `kdcache eval` on the one-class folder scores it as the run did.
    from pipeline.evaluate import EvalConfig, run_eval

    assert torch.load("run/student.pt", weights_only=True)["meta"]["classes"] == ["ant", "bee", "cat"]
    scored = run_eval(EvalConfig(weights="run/student.pt", data=f"imagefolder:{root / 'test'}"), log=lambda *_: None)
    assert scored["top1"] == s["test_acc"] and scored["classes"] == ["ant", "bee", "cat"] and scored["samples"] == 5
    assert sum(scored["confusion"][2]) == 5 and scored["per_class"]["ant"] is None  # every test sample is a cat
    _write_images(root / "test" / "dog", 2)
    with pytest.raises(KDCacheError, match="class\\(es\\) 'dog' that the training data lacks"):
        run_train_student(StudentConfig(test_data=f"imagefolder:{root / 'test'}", overwrite=True, **common),
                          log=lambda *_: None)
    with pytest.raises(KDCacheError, match="pass a --data with the same classes"):
        run_eval(EvalConfig(weights="run/student.pt", data=f"imagefolder:{root / 'test'}"), log=lambda *_: None)
    logs = []
    run_train_student(StudentConfig(test_data=f"imagefolder:{root / 'train'}", overwrite=True, **common),
                      log=logs.append)
    assert any("is the data the student trains on; its accuracy is no test" in m for m in logs)


def test_an_empty_folder_in_the_test_data_is_no_class_it_could_lack(root):
    """A test folder's extra folder with no images (a misc/ never filled) holds no sample to score, but was refused
    as a class the training data lacks. The training side keeps such a folder as a class (it takes a number); the
    test side maps its samples by name, so it only needs no sample to belong to a class the training data lacks."""
    from pipeline.data import class_map

    for c in ("ant", "bee", "cat"):
        _write_images(root / "train" / c, 1, seed=len(c))
    _write_images(root / "test" / "ant", 2)
    _write_images(root / "test" / "cat", 3)
    (root / "test" / "misc" / "notes").mkdir(parents=True)  # nothing in it, at any depth, is an image
    (root / "test" / "misc" / "notes" / "README.txt").write_text("to sort\n")
    train, test = open_source(f"imagefolder:{root / 'train'}"), open_source(f"imagefolder:{root / 'test'}")
    assert test.classes == ["ant", "cat", "misc"] and test.empty_classes == ["misc"]
    assert list(class_map(test, train.classes)[test.labels(np.arange(5))]) == [0, 0, 2, 2, 2]
    _write_images(root / "test" / "misc", 1)  # now it holds a sample the training data has no class for
    with pytest.raises(KDCacheError) as e:
        class_map(open_source(f"imagefolder:{root / 'test'}"), train.classes)
    assert str(e.value) == (f"test data imagefolder:{root / 'test'} has class(es) 'misc' that the training data "
                            "lacks (it has 'ant', 'bee', 'cat'); pass a --test-data with the same classes")


def _fake_fashion_mnist(folder, n_train=24, n_test=20, seed=0):
    """A tiny Fashion-MNIST folder (the four IDX .gz files, 28x28 images, labels 0..9) for KDCACHE_FASHION_MNIST_DIR."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        for kind, dims, data in (("images", [n, 28, 28], rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                                 ("labels", [n], rng.integers(0, 10, n, dtype=np.uint8))):
            header = (0x0800 + len(dims)).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
            with gzip.open(folder / f"{split}-{kind}-idx{len(dims)}-ubyte.gz", "wb") as f:
                f.write(header + data.tobytes())
    return folder


def test_fashion_mnist_without_debians_package_is_downloaded_by_torchvision_or_says_how_to_get_it(root, monkeypatch):
    """The chain #2 asks for: Debian's files when present; else torchvision's download into data/datasets (read from
    there, and found there next time without downloading again); else one line saying how to get it."""
    import torchvision.datasets

    import pipeline.data as data_mod

    monkeypatch.delenv("KDCACHE_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIRS", (str(root / "no-debian-package"),))
    calls = []

    def offline(folder, train, download):
        calls.append((folder, train, download))
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(KDCacheError, match=r"^Fashion-MNIST not found and could not be downloaded \(RuntimeError\); "
                                           r"install it with `apt-get install dataset-fashion-mnist`"):
        open_source("fashion-mnist:train")
    assert calls == [(str(root / "data" / "datasets"), True, True)]

    def downloads(folder, train, download):  # what torchvision's download leaves: FashionMNIST/raw/*.gz
        calls.append((folder, train, download))
        _fake_fashion_mnist(Path(folder) / "FashionMNIST" / "raw", seed=7)

    calls.clear()
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", downloads)
    src = open_source("fashion-mnist:test")
    assert [c[1] for c in calls] == [True, False] and src.num_samples == 20
    ref = _fake_fashion_mnist(root / "ref", seed=7)  # the same files, read by hand
    with gzip.open(ref / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    assert src.labels(np.arange(20)).tolist() == labels.tolist()
    calls.clear()
    assert open_source("fashion-mnist:train").num_samples == 24 and calls == []  # found where it was downloaded


def test_the_data_the_student_trains_on_is_no_test_split(root, monkeypatch):
    """A cache of fashion-mnist:test: its automatic test split (fashion-mnist:test) is the training data itself, so
    it is dropped (no test accuracy, none recorded, no note about it); the same split named by --test-data is kept
    and scored (the accuracy of student.pt on those images, counted here by hand) with a note that it is no test.
    A cache of fashion-mnist:train keeps its automatic test split. (Keeping the automatic split,
    ts_test_equal_train_kept, passed every test.)"""
    from pipeline.models import build_model
    from tests.conftest import save_teacher

    monkeypatch.setenv("KDCACHE_FASHION_MNIST_DIR", str(_fake_fashion_mnist(root / "fm")))
    teacher = save_teacher(root / "t10.pt", num_classes=10)
    caches = {split: run_teacher_cache(CacheConfig(data=f"fashion-mnist:{split}", weights=str(teacher),
                                                   chunk_samples=8, batch_size=8, device="cpu"), log=lambda *_: None)
              for split in ("test", "train")}
    common = dict(loss="kd=1", epochs=2, batch_size=8, workers=0, device="cpu")

    def by_hand(run, spec):  # student.pt's accuracy on `spec`, with its own transform, without kdcache's evaluate
        saved = torch.load(f"{run}/student.pt", weights_only=True)
        model = build_model("default-student", 10, 1, saved["meta"]["transform"]["size"][0])
        model.load_state_dict(saved["state_dict"])
        src = open_source(spec)
        idx = np.arange(src.num_samples)
        with torch.no_grad():
            pred = model.eval()(src.load(idx, Transform.from_dict(saved["meta"]["transform"]))).argmax(1).numpy()
        return float((pred == src.labels(idx)).mean())

    # the automatic test split of a cache of the test split: itself, dropped
    logs = []
    auto = run_train_student(StudentConfig(cache=caches["test"], out="auto", **common), log=logs.append)
    rows = [json.loads(x) for x in Path("auto/metrics.jsonl").read_text().splitlines()]
    assert auto["test_acc"] is None and [r["test_acc"] for r in rows] == [None, None]
    assert json.loads(Path("auto/config.json").read_text())["test_data"] is None
    assert any("student trained (no labelled test split)" in m for m in logs), logs
    assert not any("its accuracy is no test" in m for m in logs), logs

    # named by --test-data: kept, scored, and said to be no test
    logs = []
    named = run_train_student(StudentConfig(cache=caches["test"], out="named", test_data="fashion-mnist:test",
                                            **common), log=logs.append)
    assert named["test_acc"] == pytest.approx(by_hand("named", "fashion-mnist:test"), abs=1e-12)
    assert json.loads(Path("named/config.json").read_text())["test_data"] == "fashion-mnist:test"
    said = [m for m in logs if "is the data the student trains on; its accuracy is no test" in m]
    assert said == ["note: --test-data fashion-mnist:test is the data the student trains on; its accuracy is no test"]

    # a cache of the train split: its automatic test split is other data, kept and scored, no note
    logs = []
    other = run_train_student(StudentConfig(cache=caches["train"], out="train", **common), log=logs.append)
    assert other["test_acc"] == pytest.approx(by_hand("train", "fashion-mnist:test"), abs=1e-12)
    assert json.loads(Path("train/config.json").read_text())["test_data"] == "fashion-mnist:test"
    assert not any("its accuracy is no test" in m for m in logs), logs


def test_a_run_that_never_trains_the_classifier_says_so(root, teacher_file):
    path = _cache(teacher_file, layers=["avgpool", "layer3"])
    hint_only = dict(epochs=2, fitnets_hint_epochs=2)  # two-stage, every epoch in the hint stage: KD never runs
    for loss, kw, noted in (("rkd=1", {}, True), ("rkd=1,ce=1", {}, False), ("kd=1", {}, False),
                            ("fitnets=1", hint_only, True), ("fitnets=1", dict(epochs=2, fitnets_hint_epochs=1), False)):
        logs = []
        run_train_student(StudentConfig(cache=path, loss=loss, workers=0, out="run", overwrite=True,
                                        **{"epochs": 1, **kw}), log=logs.append)
        assert any(m.startswith("note: no loss of the run") for m in logs) == noted, (loss, kw, logs)
        epochs = [m for m in logs if m.startswith("epoch ")]
        hint = kw.get("fitnets_hint_epochs", 0) if loss == "fitnets=1" else 0  # epoch lines that say hint stage
        assert [("(hint stage:" in m) for m in epochs] == [i < hint for i in range(len(epochs))], (loss, kw, epochs)


def test_normalize_sets_the_teachers_input_statistics(root, teacher_file):
    """A teacher trained elsewhere gets its own normalisation: recorded in the transform, applied to every input."""
    path = _cache(teacher_file, layers=[], dtype="float32", normalize="0.25/0.5")
    g = zarr.open_group(path, mode="r")
    tf = g.attrs["kdcache"]["transform"]
    assert tf["mean"] == [0.25] and tf["std"] == [0.5]
    index = g["index"][:]
    raw = open_source(SYN).load_raw(index, Transform.from_dict(tf)).float() / 255  # independent normalisation
    teacher, _ = load_teacher("default-teacher", teacher_file, 4, 1, 16)
    with torch.no_grad():
        expect = teacher((raw - 0.25) / 0.5)
    torch.testing.assert_close(torch.from_numpy(g["logits"][:]), expect, rtol=1e-5, atol=1e-5)
    assert Path(_cache(teacher_file, layers=[], dtype="float32")).name != Path(path).name  # another key


def test_a_size_or_channel_flag_keeps_the_recorded_statistics(root):
    """A teacher file records mean/std 0.25/0.5: --image-size (even its own size) or --channels must not swap them
    for the data's defaults; only --normalize changes them. The same for teacher-cache and eval."""
    from pipeline.data import resolve_transform
    from pipeline.evaluate import EvalConfig, run_eval
    from tests.conftest import save_teacher

    w = save_teacher(root / "t.pt")
    ckpt = torch.load(w, weights_only=True)
    recorded = {"size": [16, 16], "channels": 1, "mean": [0.25], "std": [0.5]}
    ckpt["meta"]["transform"] = recorded
    torch.save(ckpt, w)
    src = open_source(SYN)
    assert resolve_transform(src, {"transform": recorded}, image_size=16).to_dict() == recorded
    assert resolve_transform(src, {"transform": recorded}, image_size=20).to_dict() == dict(recorded, size=[20, 20])
    assert resolve_transform(src, {"transform": recorded}, channels=3).to_dict() == dict(
        recorded, channels=3, mean=[0.25] * 3, std=[0.5] * 3)
    assert resolve_transform(src, {"transform": recorded}, normalize="0.1/0.2").mean == [0.1]
    assert resolve_transform(src, {}, image_size=16).mean == [0.5]  # nothing recorded: the data's default
    plain = run_teacher_cache(CacheConfig(data=SYN, weights=str(w)), log=lambda *_: None)
    assert run_teacher_cache(CacheConfig(data=SYN, weights=str(w), image_size=16), log=lambda *_: None) == plain
    scored = [run_eval(EvalConfig(weights=str(w), data=SYN, **kw), log=lambda *_: None)["top1"]
              for kw in ({}, {"image_size": 16})]
    assert scored[0] == scored[1]
    with pytest.raises(KDCacheError, match="--image-size must be from 1 to 4096"):
        run_eval(EvalConfig(weights=str(w), data=SYN, image_size=0), log=lambda *_: None)
    # a teacher with more outputs (4) than the data has classes (2): scored over all its outputs, as training does
    two = "synthetic:64:1x16x16:2"
    got = run_eval(EvalConfig(weights=Path(w), data=two), log=lambda *_: None)
    teacher, _ = load_teacher("default-teacher", w, 4, 1, 16)
    with torch.no_grad():
        pred = teacher(open_source(two).load(np.arange(64), Transform.from_dict(recorded))).argmax(1).numpy()
    assert got["top1"] == (pred == open_source(two).labels(np.arange(64))).mean()
    assert np.asarray(got["confusion"]).shape == (2, 4)
    # scripting users may pass paths (they are kept as text, as JSON needs) and a single layer name
    from pipeline.online import OnlineConfig

    cfg = StudentConfig(cache=root / "c.zarr", out=root / "r", test_data=None, data=None)
    assert cfg.cache == str(root / "c.zarr") and cfg.out == str(root / "r")
    assert OnlineConfig(weights=w, out=root / "o").weights == str(w) and isinstance(OnlineConfig(out=root).out, str)
    path = run_teacher_cache(CacheConfig(data=SYN, weights=w, layers="layer2", out=root / "p.zarr"),
                             log=lambda *_: None)
    assert path == str(root / "p.zarr") and "features/layer2" in open_store(path).arrays


def test_flags_reach_the_losses_and_the_student_sees_the_recorded_input(root, teacher_file, monkeypatch):
    import pipeline.train_student as ts

    path = _cache(teacher_file, layers=["avgpool"], image_size=20, normalize="0.3/0.6")
    built = {}
    real = ts.build_losses

    def spy(*a, **k):
        made = real(*a, **k)
        built.update(made)
        return made

    monkeypatch.setattr(ts, "build_losses", spy)
    common = dict(cache=path, epochs=1, batch_size=32, workers=0, lr=1e-12, temperature=2.5, alpha=0.3,
                  rkd_distance_weight=7.0, rkd_angle_weight=11.0)
    run_train_student(StudentConfig(loss="kd=1,rkd=1", out="a", **common), log=lambda *_: None)
    assert (built["kd"].temperature, built["kd"].alpha) == (2.5, 0.3)
    assert (built["rkd"].wd, built["rkd"].wa) == (7.0, 11.0)
    # the input the teacher saw (20x20, mean 0.3, std 0.6), not the data's native 16x16
    resolved = json.loads(Path("a/config.json").read_text())
    assert resolved["transform"] == {"size": [20, 20], "channels": 1, "mean": [0.3], "std": [0.6]}
    assert resolved["student_shapes"]["embed"] == [64]
    # --loss weights scale each part: at a learning rate of 1e-12 the student does not move, so the same batches give
    # the same unweighted parts, and the weighted ones in the ratio of the weights
    run_train_student(StudentConfig(loss="kd=2,rkd=0.5", out="b", **common), log=lambda *_: None)
    a, b = (json.loads(Path(d, "metrics.jsonl").read_text().splitlines()[0])["losses"] for d in ("a", "b"))
    assert set(a) == set(b) == {"kd_soft", "kd_hard", "rkd_distance", "rkd_angle"}
    for k, w in (("kd_soft", 2), ("kd_hard", 2), ("rkd_distance", 0.5), ("rkd_angle", 0.5)):
        assert b[k] == pytest.approx(w * a[k], rel=1e-5), k


def test_metrics_rows_are_per_sample_means_of_the_weighted_parts(root, teacher_file):
    """metrics.jsonl's parts against a hand computation over the whole epoch: each part as it enters the total
    (--loss weight, KD's 1 - alpha and alpha, T^2), averaged over samples, not over batches (192 rows in batches of
    80, 80 and 32), and train_acc over the samples. A student without BatchNorm (a linear classifier) and a learning
    rate too small to move it make every sample's values independent of the batch it came in. Only the ratios of
    two runs' parts were checked before: an average over batches instead of samples passed."""
    path = _cache(teacher_file, layers=[])
    T, alpha, w_kd, w_ce = 3.0, 0.3, 2.0, 0.5
    run_train_student(StudentConfig(cache=path, student="tests.odd_models:idle_head_model", loss=f"kd={w_kd},ce={w_ce}",
                                    temperature=T, alpha=alpha, epochs=1, batch_size=80, workers=0, lr=1e-12,
                                    out="run"), log=lambda *_: None)
    row = json.loads(Path("run/metrics.jsonl").read_text())
    assert row["samples"] == 192 and set(row["losses"]) == {"kd_soft", "kd_hard", "ce"}

    g = zarr.open_group(path, mode="r")
    index, y = g["index"][:], g["labels"][:]
    teacher = g["logits"][:].astype(np.float64)
    config = json.loads(Path("run/config.json").read_text())
    x = open_source(SYN).load(index, Transform.from_dict(config["transform"])).numpy().reshape(192, -1)
    sd = torch.load("run/student.pt", weights_only=True)["state_dict"]
    student = x.astype(np.float64) @ sd["body.1.weight"].double().numpy().T + sd["body.1.bias"].double().numpy()

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lt, ls = log_softmax(teacher / T), log_softmax(student / T)
    kl = (np.exp(lt) * (lt - ls)).sum(1)                      # per sample KL(p_t || p_s) at T
    ce = -log_softmax(student)[np.arange(192), y]             # per sample, at T = 1
    want = {"kd_soft": w_kd * (1 - alpha) * T * T * kl.mean(), "kd_hard": w_kd * alpha * ce.mean(),
            "ce": w_ce * ce.mean()}
    for k, v in want.items():
        assert row["losses"][k] == pytest.approx(v, rel=1e-5), k
    assert row["loss"] == pytest.approx(sum(want.values()), rel=1e-5)
    assert row["train_acc"] == (student.argmax(1) == y).mean()


def test_missing_array_refused_before_training(root, teacher_file):
    path = _cache(teacher_file, layers=["avgpool"])
    with pytest.raises(KDCacheError, match=r"lacks array 'features/layer3' needed by loss 'fitnets'; "
                                           r"re-run teacher-cache with --layer layer3"):
        run_train_student(StudentConfig(cache=path, loss="kd=1,fitnets=1", workers=0, out="run"))
    assert not (root / "run").exists()  # refused before anything was written
    res = runner.invoke(app, ["train-student", "--cache", path, "--loss", "rkd=1", "--rkd-layer", "layer2"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "features/layer2" in lines[0] and "--layer layer2" in lines[0]
    # The array's name (as `ls` and `inspect` list it) for the layer: it said to re-run teacher-cache with
    # `--layer features/avgpool`, a module no teacher has, for a layer the store holds.
    res = runner.invoke(app, ["train-student", "--cache", path, "--loss", "rkd=1", "--rkd-layer", "features/avgpool"])
    assert res.exit_code == 2 and res.stderr.strip() == (
        "error: loss 'rkd' names the array 'features/avgpool' as its layer; the layer flags (--fitnets-hint, "
        "--rkd-layer) take the teacher layer's module path, e.g. avgpool (cached here: avgpool)")


def test_two_stage_fitnets_runs_hint_then_kd(root, teacher_file):
    path = _cache(teacher_file)
    run_train_student(StudentConfig(cache=path, loss="fitnets=1", fitnets_hint_epochs=1, epochs=3, batch_size=32,
                                    test_data=SYN_TEST, workers=0, out="run"), log=lambda *_: None)
    rows = [json.loads(x) for x in open("run/metrics.jsonl")]
    assert [r["stage"] for r in rows] == [1, 2, 2]
    assert set(rows[0]["losses"]) == {"fitnets"}
    assert set(rows[1]["losses"]) == {"kd_soft", "kd_hard"}
    # FitNets with other losses: the hint alone, then those others without the hint (Romero et al.'s stage 2)
    run_train_student(StudentConfig(cache=path, loss="kd=1,rkd=1,fitnets=1", fitnets_hint_epochs=1, epochs=2,
                                    batch_size=32, test_data=SYN_TEST, workers=0, out="run-mixed"), log=lambda *_: None)
    rows = [json.loads(x) for x in open("run-mixed/metrics.jsonl")]
    assert [r["stage"] for r in rows] == [1, 2] and set(rows[0]["losses"]) == {"fitnets"}
    assert set(rows[1]["losses"]) == {"kd_soft", "kd_hard", "rkd_distance", "rkd_angle"}


def test_hint_stage_only_updates_layers_up_to_guided(root, teacher_file, monkeypatch):
    """Stage 1 of FitNets trains the student up to its guided layer (and the regressor), nothing after it."""
    import pipeline.train_student as ts
    from pipeline.models import build_model, fingerprint_module

    path = _cache(teacher_file)
    made, real_setup = [], ts.setup

    def spy(*a, **k):
        s = real_setup(*a, **k)
        made.append((s, fingerprint_module(s.losses["fitnets"], params_only=True)))
        return s

    monkeypatch.setattr(ts, "setup", spy)
    run_train_student(StudentConfig(cache=path, loss="fitnets=1", fitnets_hint_epochs=1, epochs=1, batch_size=32,
                                    workers=0, out="run", test_data=SYN_TEST), log=lambda *_: None)
    assert fingerprint_module(made[0][0].losses["fitnets"], params_only=True) != made[0][1]  # regressor trained

    torch.manual_seed(0)
    init = build_model("default-student", 4, 1, 16).state_dict()
    trained = torch.load("run/student.pt", weights_only=True)["state_dict"]
    assert not torch.equal(init["block2.0.weight"], trained["block2.0.weight"])  # guided layer moved
    assert torch.equal(init["fc.weight"], trained["fc.weight"])                  # head untouched
    assert torch.equal(init["embed.1.weight"], trained["embed.1.weight"])
    # The forward stops at the guided layer: what follows neither trains nor moves its BatchNorm statistics, and
    # the untrained classifier is given no training accuracy.
    run_train_student(StudentConfig(cache=path, loss="fitnets=1", fitnets_hint_epochs=1, epochs=1, batch_size=32,
                                    fitnets_hint="layer2", fitnets_guided="block1", workers=0, out="run1",
                                    test_data=SYN_TEST), log=lambda *_: None)
    trained = torch.load("run1/student.pt", weights_only=True)["state_dict"]
    assert not torch.equal(init["block1.1.running_mean"], trained["block1.1.running_mean"])
    for k in ("block2.1.running_mean", "block2.1.running_var", "block2.0.weight"):
        assert torch.equal(init[k], trained[k]), k
    assert json.loads(Path("run1/metrics.jsonl").read_text())["train_acc"] is None


def test_test_accuracy_is_taken_in_eval_mode_and_training_goes_on_in_train_mode(root, teacher_file, monkeypatch):
    """`evaluate` scores the student in eval mode (BatchNorm's running statistics, no dropout) and hands it back in
    the mode it had: every training step after the first epoch's evaluation runs in train mode. (Leaving the student
    in eval mode after evaluating passed every test: later epochs trained with frozen BatchNorm statistics.)"""
    import pipeline.train_student as ts
    from pipeline.loops import evaluate

    class ModeNet(torch.nn.Module):  # its answer says which mode it ran in: class 0 in train mode, 1 in eval mode
        def forward(self, x):
            out = torch.zeros(len(x), 4)
            out[:, 0 if self.training else 1] = 1.0
            return out

    test = open_source(SYN_TEST)
    tf = Transform.from_dict({"size": [16, 16], "channels": 1, "mean": [0.5], "std": [0.5]})
    labels = test.labels(np.arange(test.num_samples))
    assert 0 < (labels == 1).mean() != (labels == 0).mean()  # the two modes score differently
    for mode in (True, False):
        net = ModeNet().train(mode)
        assert evaluate(net, test, tf, torch.device("cpu")) == (labels == 1).mean()
        assert net.training is mode

    class Fails(torch.nn.Module):  # an error part-way still hands the model back in the mode it came in
        def forward(self, x):
            raise RuntimeError("boom")

    net = Fails().train()
    with pytest.raises(RuntimeError, match="boom"):
        evaluate(net, test, tf, torch.device("cpu"))
    assert net.training

    modes = []  # (inference mode, train mode) of every forward of the student during the run
    real_setup = ts.setup

    def spy(*a, **k):
        s = real_setup(*a, **k)
        s.student.register_forward_pre_hook(
            lambda m, _inp: modes.append((torch.is_inference_mode_enabled(), m.training)))
        return s

    monkeypatch.setattr(ts, "setup", spy)
    run_train_student(StudentConfig(cache=_cache(teacher_file, layers=[]), loss="kd=1", epochs=3, batch_size=64,
                                    test_data=SYN_TEST, workers=0, out="run"), log=lambda *_: None)
    steps = [training for inference, training in modes if not inference]
    evals = [training for inference, training in modes if inference]
    assert len(steps) == 3 * 3 and all(steps)  # 192 rows in batches of 64, 3 epochs: all in train mode
    assert len(evals) == 3 and not any(evals)  # one batch of 64 test rows per epoch, in eval mode


def test_bad_inputs_give_one_line_errors(root, teacher_file):
    cases = [
        (["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--layer", "layr3"],
         "no module 'layr3' in TeacherNet (from --layer); nearest: layer3"),
        (["teacher-cache", "--data", "nonsense:1"], "unknown data spec"),
        (["teacher-cache", "--data", "synthetic:abc"], "synthetic:N:CxHxW"),
        *((["teacher-cache", "--data", spec], f"bad synthetic spec '{spec}': N, C, H and W must be whole numbers "
           "from 1, CLASSES from 2 (default 10), SEED from 0 to 16777215")
          # SEED 2**24 made seed 0's images under another fingerprint; 10**20 raised an OverflowError
          for spec in ("synthetic:0:1x8x8", "synthetic:10:0x8x8", "synthetic:10:1x8", "synthetic:10:1x8x8:1",
                       "synthetic:10:1x8x8:4:-1", "synthetic:10:1x8x8:4:16777216",
                       "synthetic:10:1x8x8:4:100000000000000000000")),
        # refused by its size before building a list of 10**10 class names (which ran out of memory first)
        (["teacher-cache", "--data", "synthetic:10:1x8x8:10000000000"], "GiB of noise patterns and class templates"),
        (["teacher-cache", "--data", SYN, "--weights", "missing.pt"], "weights file not found"),
        (["teacher-cache", "--data", SYN, "--teacher", "torchvision:resnet18"], "needs --weights"),
        (["train-student", "--cache", "nowhere.zarr"], "no cache at"),
        (["train-student", "--cache", str(root)], "not a kdcache"),
        (["teacher-cache", "--data", f"imagefolder:{teacher_file}"], "is a file, not a folder"),
    ]
    for args, needle in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, res.stderr)


def test_nonsense_settings_are_refused_before_any_work(root, teacher_file):
    path = _cache(teacher_file, layers=["layer3"])
    Path("a-file").write_text("")
    cache = ["teacher-cache", "--data", SYN, "--weights", str(teacher_file)]
    train = ["train-student", "--cache", path, "--workers", "0"]
    cases = [
        (cache + ["--limit", "0"], "--limit must be positive"),
        (cache + ["--compression-level", "99"], "--compression-level"),
        (cache + ["--normalize", "abc"], "cannot read --normalize"),
        (cache + ["--normalize", "imagenet"], "3 mean(s) and 3 std(s) for 1-channel inputs"),
        (cache + ["--normalize", "0.5/0"], "stds positive"),
        # positive and finite as Python floats, 0 and inf in the float32 inputs: the teacher's logits were inf, and
        # the error said to use --dtype float32 (teacher: lower --lr)
        *((cmd + ["--normalize", spec], f"--normalize '{spec}': means must be finite and stds positive in float32, "
                                        "the inputs' type (stds from 1.2e-38, both up to 3.4e+38)")
          for spec in ("0.5/1e-300", "1e300/1") for cmd in (cache, ["teacher", "--data", SYN, "--out", "t.pt"])),
        (cache + ["--normalize", "0.5,0.5,0.5/0.2,0.2"], "gives 3 mean(s) and 2 std(s);"),
        (cache + ["--normalize", "0.5,0.5/0.2"], "gives 2 mean(s) and 1 std(s) for 1-channel inputs"),
        (cache + ["--cache-dir", "a-file"], "--cache-dir: a-file is a file, not a folder"),
        (cache + ["--out", "a-file/x.zarr"], "a-file"),                      # a path through a file
        # by its file:// URL too: plan named a store it can never write, teacher-cache said "File exists"
        (["plan", *cache[1:], "--cache-dir", f"file://{os.path.abspath('a-file')}"],
         f"--cache-dir: {os.path.abspath('a-file')} is a file, not a folder"),
        (cache + ["--out", f"file://{os.path.abspath('a-file')}/x.zarr"], "--out: "),
        (cache + ["--cache-dir", path], f"--cache-dir: {path} is a Zarr store"),  # a store nested in a store
        (cache + ["--out", f"{path}/features/x.zarr"], f"--out: {path}/features is a Zarr store (or a group in one)"),
        (cache + ["--out", f"{path}/sub/x.zarr"],
         f"--out: {path}/sub is inside the Zarr store {Path(path).absolute()}"),
        (cache + ["--out", f"file://{Path(path).absolute()}/sub/x.zarr"], "is inside the Zarr store"),  # a URL too
        (train + ["--out", f"{path}/logits/run"], f"is inside the cache store {Path(path).absolute()}, whose --force"),
        (["teacher", "--data", SYN, "--out", f"{path}/t.pt"], f"is inside the cache store {Path(path).absolute()}"),
        (["teacher-cache", "--data", "synthetic:64:1x16x16:9", "--weights", str(teacher_file)],
         "9 classes but the teacher has 4 outputs"),
        (train + ["--temperature", "0"], "--temperature must be positive"),
        (train + ["--alpha", "2"], "--alpha"),
        (train + ["--epochs", "0"], "--epochs must be at least 1"),
        (train + ["--batch-size", "0"], "--batch-size"),
        (train + ["--workers", "-1"], "--workers"),
        (train + ["--lr", "-1"], "--lr must be positive"),
        (train + ["--lr", "1e300"], "--lr must be at most 3.4e+38, float32's largest number"),
        (train + ["--loss", "kd=0"], "every weight"),
        (train + ["--view-policy", "foo"], "unknown --view-policy"),
        (train + ["--optimizer", "lbfgs"], "unknown --optimizer"),
        (train + ["--loss", "kd=1,fitnets=1", "--epochs", "2", "--fitnets-hint-epochs", "2"], "no epoch for stage 2"),
        (train + ["--loss", "fitnets=1", "--fitnets-hint-epochs", "0"], "no hint stage"),
        # every loss but the hint weighted 0: the second stage would train KD, which --loss gave weight 0
        (train + ["--loss", "fitnets=1,kd=0"], "weights every loss but fitnets 0, so FitNets' second stage"),
        # FitNets alone: more hint epochs than --epochs would train past --epochs (the hint stage is taken out of it)
        (train + ["--loss", "fitnets=1", "--epochs", "1", "--fitnets-hint-epochs", "2"],
         "--epochs 1 leaves no epoch for stage 2 (kd) after --fitnets-hint-epochs 2"),
        # 3-channel net, 1-channel data: it said to re-cache with the student's --channels, which the grey teacher
        # refuses; the student is what to change
        (train + ["--student", "torchvision:resnet18"], "fails on the cached input (1, 16, 16) (RuntimeError: Given "
                                                        "groups=1, weight of size [64, 3, 7, 7]"),
        (train + ["--student", "torchvision:resnet18"], "the cache holds its teacher's input, so give a student "
                                                        "built for 1-channel 16x16 images (a module:function gets "
                                                        "in_channels and image_size)"),
        (train + ["--out", "a-file"], "is a file"),
        # blanks alone made a file or folder named ' ' here and printed it as nothing ("saved  ")
        *((cmd + [flag, " "], f"{flag} ' ' is only blanks; name a file or folder (or leave {flag} out for the default)")
          for cmd, flag in ((cache, "--out"), (cache, "--cache-dir"), (train, "--out"),
                            (["teacher", "--data", SYN], "--out"), (["bench", "--preset", "tiny"], "--out"))),
        (train + ["--out", path], "is a cache store"),
        (train + ["--device", "tpu"], "--device"),
        (train + ["--device", "cpu:1"], "--device cpu:1 is not supported"),
        (train + ["--loss", "fitnets=1", "--fitnets-schedule", "single", "--fitnets-hint", ""], "an empty layer"),
        (train + ["--loss", "rkd=1", "--rkd-layer", "logits"], "names the logits as a layer"),
        (["ls", "--cache-dir", "no-such-dir"], "not a folder"),
        (["ls", "--cache-dir", path], "is a cache store, not a folder of caches; `kdcache inspect"),
        # by its file:// URL too (it said "no caches in" the store)
        (["ls", "--cache-dir", f"file://{os.path.abspath(path)}"], "is a cache store, not a folder of caches"),
        (["verify", path, "--recompute", "-1"], "--recompute"),
    ]
    if not torch.cuda.is_available():
        cases.append((train + ["--device", "cuda"], "0 CUDA device(s)"))
    for args, needle in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, res.stderr)
    assert not Path("run").exists() and Path(path, "zarr.json").exists()
    assert not list(Path(".").glob(" *"))  # no file or folder named blanks
    assert not list(Path(path).glob("*.zarr")) and not list(Path(path, "features").glob("*.zarr"))
    assert sorted(p.name for p in Path(path).iterdir()) == ["_commit", "_stats", "features", "index", "labels",
                                                             "logits", "zarr.json"]  # nothing written inside it


def test_a_data_folder_inside_a_cache_store_is_refused(root, teacher_file, monkeypatch):
    """KDCACHE_DATA (or ./data) inside a store: train-student's default run directory went there, to be deleted by
    that store's --force rebuild (an --out there is refused), and teacher-cache named a --cache-dir never passed."""
    path = _cache(teacher_file)
    monkeypatch.setenv("KDCACHE_DATA", f"{path}/mine")
    for args in (["train-student", "--cache", path, "--workers", "0", "--epochs", "1"],
                 ["teacher-cache", "--data", SYN, "--weights", str(teacher_file)], ["ls"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and res.stderr.strip().splitlines() == [
            f"error: the data folder {path}/mine (KDCACHE_DATA) is inside the cache store {Path(path).absolute()}, "
            "whose --force rebuild would delete the runs, teachers and caches kdcache keeps there; set KDCACHE_DATA "
            "to a folder outside it"], (args, res.output)
    assert not Path(path, "mine").exists()


def test_a_rerun_never_leaves_an_older_runs_results_looking_finished(root, teacher_file):
    """A run directory holding a run's work is kept unless --overwrite; replaced, none of the old results is left to
    pass for the new run's."""
    from pipeline.train_student import open_run_dir

    Path("run").mkdir()
    for name in ("summary.json", "student.pt", "metrics.jsonl"):
        Path("run", name).write_text("{}")  # an earlier run's results
    cfg = StudentConfig(cache=_cache(teacher_file, layers=[]), epochs=1, workers=0, out="run", test_data=SYN_TEST)
    Path("run", "config.json").write_text(json.dumps({"config": asdict(cfg)}))  # ... and the settings it recorded
    with pytest.raises(KDCacheError, match="--out run holds a finished run; --overwrite replaces it"):
        open_run_dir(cfg)
    assert all(Path("run", n).exists() for n in ("summary.json", "student.pt", "metrics.jsonl"))
    open_run_dir(replace(cfg, overwrite=True))
    assert not any(Path("run", n).exists() for n in ("summary.json", "student.pt", "metrics.jsonl"))
    # an interrupted run's checkpoint is work too: refused, pointing at --resume
    Path("run", "checkpoint.pt").write_text("{}")
    res = runner.invoke(app, ["train-student", "--cache", cfg.cache, "--workers", "0", "--out", "run"])
    assert res.exit_code == 2 and "holds an interrupted run's checkpoint (--resume continues it)" in res.stderr
    res = runner.invoke(app, ["train-student", "--cache", cfg.cache, "--out", "run", "--resume", "--overwrite"])
    assert res.exit_code == 2 and "pick one" in res.stderr
    # refused before any set-up: nothing else (here a store that is not there) is looked at first
    res = runner.invoke(app, ["train-student", "--cache", "nowhere.zarr", "--out", "run"])
    assert res.exit_code == 2 and "--out run holds an interrupted run's checkpoint" in res.stderr


def test_a_folder_of_someone_elses_files_is_never_written_into(root, teacher_file):
    """An --out that is not empty and holds no kdcache run (no config.json of a run's) is refused, --overwrite or
    not, before any set-up, and nothing in it changes; in a run's own folder, --overwrite replaces the run's files
    only."""
    path = _cache(teacher_file, layers=[])
    Path("myproj").mkdir()
    Path("myproj/config.json").write_text('{"my": "settings"}')
    Path("myproj/metrics.jsonl").write_text("my log\n")
    args = ["train-student", "--cache", path, "--epochs", "1", "--workers", "0", "--out", "myproj"]
    for extra in ([], ["--overwrite"], ["--resume"]):
        res = runner.invoke(app, args + extra)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith(
            "error: --out myproj is not empty and holds no kdcache run (config.json, metrics.jsonl)"), res.output
        assert "choose a new or empty --out" in lines[0]
    assert Path("myproj/config.json").read_text() == '{"my": "settings"}'
    assert Path("myproj/metrics.jsonl").read_text() == "my log\n"
    assert sorted(p.name for p in Path("myproj").iterdir()) == ["config.json", "metrics.jsonl"]
    # refused before the store is looked at
    res = runner.invoke(app, ["train-student", "--cache", "nowhere.zarr", "--out", "myproj", "--overwrite"])
    assert res.exit_code == 2 and "holds no kdcache run" in res.stderr, res.output
    # a hidden file is no one's work; a run's folder with the user's notes added stays a run's, notes and all
    Path("run").mkdir()
    Path("run/.gitkeep").touch()
    assert runner.invoke(app, args[:-1] + ["run"]).exit_code == 0
    Path("run/notes.txt").write_text("mine")
    res = runner.invoke(app, args[:-1] + ["run", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert Path("run/notes.txt").read_text() == "mine" and Path("run/.gitkeep").exists()
    assert Path("run/summary.json").is_file()


def test_an_empty_out_is_the_default_run_folder_not_the_current_one(root, teacher_file):
    """--out '' (an unset variable in `--out "$RUN"`) means the default, as for teacher, teacher-cache and bench:
    it was Path(''), the current folder, which the run was written into when it was empty (else refused as '.')."""
    path = _cache(teacher_file, layers=[])
    Path("notes.txt").write_text("mine")
    res = runner.invoke(app, ["train-student", "--cache", path, "--epochs", "1", "--workers", "0", "--out", ""])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in root.iterdir()) == ["data", "notes.txt", "teacher.pt"]
    assert len(list((root / "data" / "runs").glob("*/summary.json"))) == 1
    res = runner.invoke(app, ["train-student", "--cache", path, "--out", "", "--resume"])
    assert res.exit_code == 2 and res.stderr == "error: --resume continues the run in --out DIR: name it\n"


def test_a_run_killed_while_writing_a_file_leaves_its_folder_its_own(root, teacher_file):
    """SIGKILL while a run writes config.json (or checkpoint.pt, student.pt) leaves its temporary, `<name>.tmp`,
    beside it: that is the run's own file, not someone else's. A folder holding only config.json.tmp was refused as
    'not empty and holds no kdcache run (config.json.tmp)', --overwrite or not, so the killed run could never be
    re-run there; and --overwrite left an old checkpoint.pt.tmp behind."""
    path = _cache(teacher_file, layers=[])
    args = ["train-student", "--cache", path, "--epochs", "1", "--workers", "0", "--out", "run"]
    Path("run").mkdir()
    Path("run/config.json.tmp").write_text('{"config": {"lo')  # killed mid-write: no config.json yet
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert _run_files("run") == ["config.json", "metrics.jsonl", "student.pt", "summary.json"]
    Path("run/checkpoint.pt.tmp").write_bytes(b"PK")  # an earlier run killed while saving its checkpoint
    res = runner.invoke(app, args + ["--overwrite"])
    assert res.exit_code == 0, res.output
    assert not Path("run/checkpoint.pt.tmp").exists()


def test_incomplete_store_refused(root, teacher_file):
    path = _cache(teacher_file, layers=[])
    g = zarr.open_group(path, mode="r+")
    g.attrs["kdcache"] = dict(g.attrs["kdcache"], complete=False)
    with pytest.raises(KDCacheError, match="incomplete"):
        open_store(path)


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_under_torchrun_train_one_student(root, teacher_file, workers):
    """torchrun ranks read disjoint shares of the store (every sample once an epoch across them), average their
    gradients (the student's and FitNets' regressor's) so their weights stay equal, and rank 0 alone writes the run."""
    path = _cache(teacher_file, layers=["layer2"])  # 192 rows in 3 chunks of 64
    res = run_ranks(REPO / "tests" / "rank_summary.py", path, "run", SYN_TEST, workers)
    assert res.returncode == 0, res.stderr[-3000:]
    summaries = {s.get("rank", 0): s for s in map(json.loads, res.stdout.strip().splitlines())}
    assert set(summaries) == {0, 1}
    assert summaries[0]["params_fingerprint"] == summaries[1]["params_fingerprint"]
    assert summaries[0]["ranks"] == 2 and summaries[0]["test_acc"] is not None and summaries[1]["run_dir"] is None
    rows = [json.loads(x) for x in Path("run/metrics.jsonl").read_text().splitlines()]
    # chunks 0-2 go to ranks 0, 1, 0 (in the epoch's order): the steps every rank can take (the fewer rank's 4 of
    # 16) are taken by both, so 2 x 4 x 16 = 128 samples an epoch, summed over the ranks
    assert [r["samples"] for r in rows] == [128, 128]
    assert json.loads(Path("run/config.json").read_text())["ranks"] == 2


def test_ranks_resume_each_with_its_own_rng_state(root, teacher_file):
    """Under torchrun each rank draws its own dropout masks from its own torch RNG, whose state diverges from rank
    0's once the ranks' batches differ in size (here rank 1's 4th batch is 4 rows, rank 0's 20). The checkpoint kept
    rank 0's state alone and every rank resumed from it, so a resumed two-rank dropout run ended with other weights
    than an uninterrupted one."""
    path = _cache(teacher_file, layers=[])  # 192 rows in 3 chunks of 64: 128 rows for rank 0, 64 for rank 1
    res = run_ranks(REPO / "tests" / "rank_resume.py", path, SYN_TEST)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in res.stdout.strip().splitlines()]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    assert all(r["cut"] == r["whole"] for r in rows), rows


def test_ranks_reading_different_caches_are_refused(root, teacher_file):
    """Ranks whose --cache names different stores (another store under the same path on another node, say) each
    checked their own, then trained from different teachers' targets with their gradients averaged, in silence."""
    from tests.conftest import save_teacher

    ours = _cache(teacher_file, layers=[])
    theirs = run_teacher_cache(CacheConfig(data=SYN, weights=str(save_teacher(root / "other.pt", seed=1)),
                                           chunk_samples=64, out="theirs.zarr", device="cpu"), log=lambda *_: None)
    script = root / "two_caches.py"
    script.write_text(
        "import os, sys\nfrom pipeline.errors import KDCacheError\n"
        "from pipeline.train_student import StudentConfig, run_train_student\n"
        "try:\n"
        "    run_train_student(StudentConfig(cache=sys.argv[1 + int(os.environ['RANK'])], epochs=1, workers=0, "
        "out='run'), log=lambda *_: None)\n"
        "except KDCacheError as e:\n"
        "    sys.stdout.write(f'rank {os.environ[\"RANK\"]}: {e}\\n')  # one write: the ranks share the pipe\n")
    res = run_ranks(script, ours, theirs)
    assert res.returncode == 0, res.stderr[-3000:]
    keys = [open_store(p).manifest["key"] for p in (ours, theirs)]
    want = (f"the ranks read different caches: rank 0 key {keys[0]} at {ours}, rank 1 key {keys[1]} at {theirs}; "
            "every rank must read the same store")
    assert sorted(res.stdout.strip().splitlines()) == [f"rank 0: {want}", f"rank 1: {want}"], res.stdout
    assert not Path("run/checkpoint.pt").exists() and not Path("run/metrics.jsonl").exists()


def test_a_set_up_failure_on_one_rank_stops_every_rank_with_one_line(root, teacher_file):
    """Rank 0 alone opens the run directory; when it cannot, rank 1 must not die in the gradient all-reduce with
    a gloo traceback but say which rank failed and why."""
    path = _cache(teacher_file, layers=[])
    Path("afile").write_text("x")
    res = run_ranks("-m", "pipeline", "train-student", "--cache", path, "--epochs", "1", "--workers", "0",
                    "--out", "afile")
    assert res.returncode != 0
    assert "error: --out afile is a file, not a run directory" in res.stderr  # rank 0's own
    assert "error: rank 0 of 2 failed: --out afile is a file" in res.stderr   # rank 1's
    assert "[rank1]: Traceback" not in res.stderr and "[rank0]: Traceback" not in res.stderr, res.stderr[-2000:]
    # A store of one chunk gives one of two ranks nothing to read: said before training, not a division by zero.
    one = run_teacher_cache(CacheConfig(data=SYN, weights=str(teacher_file), chunk_samples=192, device="cpu"),
                            log=lambda *_: None)
    res = run_ranks("-m", "pipeline", "train-student", "--cache", one, "--epochs", "1", "--workers", "0",
                    "--out", "one")
    assert res.returncode != 0 and "share the store's 1 chunk(s), so some rank gets none" in res.stderr
    assert "[rank0]: Traceback" not in res.stderr and "ZeroDivisionError" not in res.stderr, res.stderr[-2000:]


def test_a_killed_student_run_resumes_to_the_same_weights(root, teacher_file, monkeypatch):
    """Killed in its third epoch (inside FitNets' second stage), a run resumed with --resume ends with the weights,
    accuracy and metrics of an uninterrupted one; a checkpoint of other settings is refused."""
    import pipeline.train_student as ts

    path = _cache(teacher_file, layers=["layer2"])
    common = dict(cache=path, loss="kd=1,fitnets=1", fitnets_hint="layer2", fitnets_guided="block1",
                  fitnets_hint_epochs=1, epochs=4, batch_size=32, workers=0, test_data=SYN_TEST)
    whole = run_train_student(StudentConfig(out="whole", **common), log=lambda *_: None)
    assert not Path("whole/checkpoint.pt").exists()  # a finished run keeps its result, not its checkpoint

    real, calls = ts.evaluate, []

    def killed_in_epoch_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(ts, "evaluate", killed_in_epoch_3)
        with pytest.raises(KeyboardInterrupt):
            run_train_student(StudentConfig(out="cut", **common), log=lambda *_: None)
    assert not Path("cut/summary.json").exists() and Path("cut/checkpoint.pt").exists()
    with pytest.raises(KDCacheError, match="other settings \\(lr: 0.05 there, 0.01 now\\)"):
        run_train_student(StudentConfig(out="cut", resume=True, **(common | {"lr": 0.01})), log=lambda *_: None)
    res = runner.invoke(app, ["train-student", "--cache", path, "--loss", "kd=1,fitnets=1", "--fitnets-hint",
                              "layer2", "--fitnets-guided", "block1", "--fitnets-hint-epochs", "1", "--epochs", "4",
                              "--batch-size", "32", "--workers", "0", "--test-data", SYN_TEST, "--out", "cut",
                              "--resume"])
    assert res.exit_code == 0, res.output
    assert "resuming cut after epoch 2/4" in res.stderr
    cut = json.loads(Path("cut/summary.json").read_text())
    assert cut["params_fingerprint"] == whole["params_fingerprint"] and cut["test_acc"] == whole["test_acc"]
    rows = [json.loads(x) for x in Path("cut/metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in Path("whole/metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["losses"], r["test_acc"]) for r in rows] == [(r["epoch"], r["losses"], r["test_acc"])
                                                                       for r in ref]
    # its time covers every epoch, those before the interruption too (kept in the checkpoint)
    assert cut["seconds"] >= sum(r["seconds"] for r in rows)
    res = runner.invoke(app, ["train-student", "--cache", path, "--out", "cut", "--resume", "--workers", "0"])
    assert res.exit_code == 2 and "holds a finished run" in res.stderr


def test_an_unfinished_runs_checkpoint_given_as_weights_is_named_not_sent_to_a_useless_model_flag(
        root, teacher_file, monkeypatch):
    """eval (and teacher-cache --weights) on checkpoint.pt read it as a bare state_dict: 'pass --model', and with
    --model 'Missing key(s) ... block1.0.weight' (its keys are epoch, student, opt, ...). Now one line naming it."""
    _interrupt_after_first_checkpoint(monkeypatch, StudentConfig(cache=_cache(teacher_file), epochs=2, batch_size=32,
                                                                 workers=0, out="cut", test_data=SYN_TEST))
    assert Path("cut/checkpoint.pt").is_file()
    for args in (["eval", "cut/checkpoint.pt", "--data", SYN_TEST],
                 ["eval", "cut/checkpoint.pt", "--data", SYN_TEST, "--model", "default-student"],
                 ["teacher-cache", "--data", SYN, "--teacher", "default-student", "--weights", "cut/checkpoint.pt"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.output
        assert "unfinished train-student run's checkpoint (after epoch 1)" in res.stderr, res.output
        assert "--resume --out " in res.stderr and "cut) and use its student.pt" in res.stderr


def test_a_resumed_run_has_one_metrics_row_per_epoch_and_a_summary_of_them(root, teacher_file, monkeypatch):
    """metrics.jsonl of a resumed run holds epochs 1..E once each, equal (timings aside) to an uninterrupted run's:
    killed while writing epoch 2's checkpoint (its metrics row already written, the checkpoint still epoch 1's), the
    resumed run rewrites metrics.jsonl from the checkpoint's history and redoes epoch 2 (neither a duplicate row nor a
    lost one); killed while writing student.pt (every epoch in the checkpoint), it trains nothing and writes the
    same. summary.json counts the epochs trained and gives the mean of the rows' samples/s. (Leaving metrics.jsonl
    as it was, ts_metrics_not_rewritten, and samples/s of the first epoch alone, ts_summary_sps_first, passed every
    test.)"""
    import pipeline.train_student as ts

    path = _cache(teacher_file, layers=[])
    common = dict(cache=path, loss="kd=1", epochs=3, batch_size=32, workers=0, test_data=SYN_TEST)
    timing = ("samples_per_s", "seconds")

    def rows_of(run):
        return [json.loads(x) for x in Path(run, "metrics.jsonl").read_text().splitlines()]

    def untimed(rows):
        return [{k: v for k, v in r.items() if k not in timing} for r in rows]

    def check_summary(run, rows):
        summary = json.loads(Path(run, "summary.json").read_text())
        assert summary["epochs"] == len(rows) == 3
        assert summary["test_acc"] == rows[-1]["test_acc"] is not None
        assert len({r["samples_per_s"] for r in rows}) == 3  # measured: no two epochs alike, so first != mean
        assert summary["samples_per_s"] == pytest.approx(sum(r["samples_per_s"] for r in rows) / 3, rel=1e-12)
        assert summary["seconds"] >= sum(r["seconds"] for r in rows)
        return summary

    run_train_student(StudentConfig(out="whole", **common), log=lambda *_: None)
    whole_rows = rows_of("whole")
    assert [r["epoch"] for r in whole_rows] == [1, 2, 3]
    whole = check_summary("whole", whole_rows)

    real = ts.save_whole

    def killed_saving(name, nth):
        calls = []

        def save(obj, at, then):
            if Path(at).name == name:
                calls.append(1)
                if len(calls) == nth:
                    raise KeyboardInterrupt  # before anything is written: the previous file stays
            real(obj, at, then)
        return save

    for run, name, nth, was in (("cut", "checkpoint.pt", 2, 1), ("last", "student.pt", 1, 3)):
        with monkeypatch.context() as m:
            m.setattr(ts, "save_whole", killed_saving(name, nth))
            with pytest.raises(KeyboardInterrupt):
                run_train_student(StudentConfig(out=run, **common), log=lambda *_: None)
        assert torch.load(f"{run}/checkpoint.pt", weights_only=True)["epoch"] == was
        before = rows_of(run)
        assert [r["epoch"] for r in before] == [1, 2, 3][:max(was, 2)]  # cut: epoch 2's row but epoch 1's checkpoint
        logs = []
        run_train_student(StudentConfig(out=run, resume=True, **common), log=logs.append)
        assert f"resuming {run} after epoch {was}/3" in logs
        rows = rows_of(run)
        assert [r["epoch"] for r in rows] == [1, 2, 3], (run, rows)
        assert untimed(rows) == untimed(whole_rows), run
        assert rows[:was] == before[:was]  # the checkpoint's epochs keep their own rows, timings included
        summary = check_summary(run, rows)
        assert summary["params_fingerprint"] == whole["params_fingerprint"] and summary["test_acc"] == whole["test_acc"]


def _signalled_import(module, signum, finished: list):
    """A stand-in for `module` in sys.modules: every name a command imports from it raises `signum` (Ctrl-C,
    SIGTERM) in the middle of the import, which still finishes (the name goes into `finished`)."""
    import signal
    import types

    class Importing(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):  # the import machinery's own questions
                raise AttributeError(name)
            signal.raise_signal(signum)
            finished.append(name)
            return getattr(module, name)

    return Importing(module.__name__)


def test_a_full_disk_or_an_interrupt_in_a_student_run_says_how_to_resume(root, teacher_file, monkeypatch):
    """torch.save reports a full disk as a RuntimeError: one line that says to resume, no .tmp left behind, the
    previous epoch's checkpoint kept and resumable; Ctrl-C says the same, not that the run starts over."""
    import pipeline.loops as loops

    path = _cache(teacher_file, layers=[])
    args = ["train-student", "--cache", path, "--epochs", "3", "--batch-size", "64", "--workers", "0", "--out", "r"]
    real, saves = torch.save, []

    def full_on_second_checkpoint(obj, f, *a, **k):
        saves.append(str(f))
        if len(saves) == 2:
            Path(f).write_bytes(b"PK\x03\x04 partial")  # what a full disk leaves
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 25728 vs 25624")
        return real(obj, f, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(loops.torch, "save", full_on_second_checkpoint)
        res = runner.invoke(app, args)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and lines[-1].startswith("error: cannot write r/checkpoint.pt (") \
        and "is the disk full? free space, then re-run with --resume --out r" in lines[-1], res.output
    assert _run_files("r") == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    assert torch.load("r/checkpoint.pt", weights_only=True)["epoch"] == 1  # the first epoch's, intact
    res = runner.invoke(app, args + ["--resume"])
    assert res.exit_code == 0 and "resuming r after epoch 1/3" in res.stderr, res.output

    # the last save, student.pt itself: the same line, no result and no temporary left, the run resumable
    def full_on_the_result(obj, f, *a, **k):
        if str(f).endswith("student.pt.tmp"):
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9 vs 4")
        return real(obj, f, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(loops.torch, "save", full_on_the_result)
        res = runner.invoke(app, args[:-2] + ["--epochs", "1", "--out", "r2"])
    assert res.exit_code == 2 and "error: cannot write r2/student.pt (" in res.stderr, res.output
    assert not Path("r2/student.pt").exists() and not Path("r2/student.pt.tmp").exists()
    res = runner.invoke(app, args[:-2] + ["--epochs", "1", "--out", "r2", "--resume"])
    assert res.exit_code == 0 and Path("r2/student.pt").is_file() and Path("r2/summary.json").is_file()

    import pipeline.train_student as ts

    logs = []  # a run named here says where, so that it can be resumed
    s = run_train_student(StudentConfig(cache=path, epochs=1, workers=0), log=logs.append)
    assert f"run directory: {s['run_dir']}" in logs

    def interrupted(cfg, log):
        raise KeyboardInterrupt

    # Ctrl-C inside the loop: before the first checkpoint there is nothing to resume, and the line says so
    evals = []

    def ctrl_c_at(n):
        def evaluate(*a, **k):
            evals.append(1)
            if len(evals) == n:
                raise KeyboardInterrupt
            return 0.5
        return evaluate

    for n, advice in ((1, "interrupted; re-run the same command without --resume: no epoch had finished"),
                      (2, "interrupted; re-run the same command with --resume --out")):
        evals.clear()
        with monkeypatch.context() as m:
            m.setattr(ts, "evaluate", ctrl_c_at(n))
            res = runner.invoke(app, args[:-1] + [f"r-int{n}"])
        assert res.exit_code == 130 and advice in res.stderr, res.output
    # ... and during set-up: without a checkpoint in --out, without --resume; with one, with it
    def set_up_interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ts, "_set_up", set_up_interrupted)
        res = runner.invoke(app, args[:-1] + ["r-setup"])
        assert res.exit_code == 130 and "without --resume: no epoch had finished" in res.stderr, res.output
        res = runner.invoke(app, args[:-1] + ["r-int2", "--resume"])
        assert res.exit_code == 130 and "with --resume --out" in res.stderr, res.output
    # ... and while the command imports torch: Ctrl-C is held until the imports are done (raised inside torch's
    # C++ initialisation it aborts the process), then stops it before anything started, saying so
    import signal
    import sys

    finished = []
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "pipeline.train_student", _signalled_import(ts, signal.SIGINT, finished))
        res = runner.invoke(app, args[:-1] + ["r-import"])
    assert finished == ["StudentConfig", "run_train_student"], finished
    assert res.exit_code == 130 and "interrupted; nothing had started; re-run the same command" in res.stderr, \
        res.output
    assert not Path("r-import").exists()
    monkeypatch.setattr(ts, "run_train_student", interrupted)
    res = runner.invoke(app, args)
    assert res.exit_code == 130 and "interrupted; re-run the same command with --resume --out" in res.stderr


def test_ctrl_c_while_a_store_command_imports_torch_is_held_until_the_imports_are_done(root, teacher_file):
    """verify, repair, ls and inspect imported the pipeline (torch) with Ctrl-C live, as the training commands no
    longer do: one pressed inside torch's C++ initialisation aborts the process. Held like theirs, the imports
    finish, then the command stops before anything started, saying so."""
    import signal
    import sys

    import pipeline.catalog as catalog
    import pipeline.verify as verify

    path = _cache(teacher_file, layers=[])
    for args, module, names in ((["verify", path], verify, ["verify_store"]),
                                (["repair", path], verify, ["repair_store"]),
                                (["ls"], catalog, ["dumps", "human", "list_caches"]),
                                (["inspect", path], catalog, ["dumps", "human", "inspect_cache"])):
        finished = []
        with pytest.MonkeyPatch.context() as m:
            m.setitem(sys.modules, module.__name__, _signalled_import(module, signal.SIGINT, finished))
            res = runner.invoke(app, args)
        assert names == [n for n in finished if n in names], (args, finished)
        assert res.exit_code == 130 and res.stderr.strip() == \
            "interrupted; nothing had started; re-run the same command", (args, res.output)


def test_sigterm_to_a_student_runs_process_group_says_how_to_resume_and_it_resumes(root, teacher_file):
    """SIGTERM to the whole process group, as a scheduler sends it on pre-emption or a time limit (the DataLoader
    worker included), mid-epoch: one line with the --resume advice and exit code 143, no traceback from the worker
    (it killed the run at once, silently, exit -15); --resume then ends with an uninterrupted run's weights."""
    import signal
    import subprocess
    import sys
    import time

    path = run_teacher_cache(CacheConfig(data="synthetic:4096:1x16x16:4", weights=str(teacher_file),
                                         chunk_samples=256, batch_size=128, device="cpu"), log=lambda *_: None)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "pipeline", "train-student", "--cache", path, "--epochs", "4", "--batch-size", "64",
            "--workers", "1", "--test-data", SYN_TEST]
    proc = subprocess.Popen(args + ["--out", "cut"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 180
    while not Path("cut/checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert not Path("cut/summary.json").exists(), "the signal must land mid-run"
    assert "Traceback" not in err and "Error" not in err, err[-2000:]
    assert [x for x in err.splitlines() if "terminated" in x or "interrupted" in x or "error" in x] == [
        err.strip().splitlines()[-1]], err[-2000:]
    assert err.strip().splitlines()[-1].startswith("terminated (SIGTERM); re-run the same command with --resume "
                                                   "--out RUN_DIR"), err[-2000:]
    res = subprocess.run(args + ["--out", "cut", "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "resuming cut after epoch" in res.stderr, res.stderr[-2000:]
    res = subprocess.run(args + ["--out", "whole"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    cut, whole = (json.loads(Path(f"{d}/summary.json").read_text()) for d in ("cut", "whole"))
    assert cut["params_fingerprint"] == whole["params_fingerprint"] and cut["test_acc"] == whole["test_acc"]


def test_sigterm_while_a_command_imports_torch_is_held_until_the_imports_are_done(root, teacher_file, monkeypatch):
    """As Ctrl-C: SIGTERM raised inside torch's C++ initialisation would abort the process; the CLI's handler
    (installed here as the CLI's entry installs it) is held over the imports, then stops the command before
    anything started, saying so, exit code 143."""
    import signal
    import sys

    import pipeline.errors as errors
    import pipeline.train_student as ts

    path = _cache(teacher_file, layers=[])
    finished, before = [], signal.getsignal(signal.SIGTERM)
    assert before == signal.SIG_DFL
    monkeypatch.setattr(errors, "_sigterm", {"installed": False, "raised": False})
    try:
        errors.on_sigterm()
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "pipeline.train_student", _signalled_import(ts, signal.SIGTERM, finished))
            res = runner.invoke(app, ["train-student", "--cache", path, "--epochs", "1", "--workers", "0", "--out",
                                      "r-import"])
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # one is enough: later ones are ignored
    finally:
        signal.signal(signal.SIGTERM, before)
    assert finished == ["StudentConfig", "run_train_student"], finished
    assert res.exit_code == 143 and res.stderr.strip() == \
        "terminated (SIGTERM); nothing had started; re-run the same command", res.output
    assert not Path("r-import").exists()


def test_a_full_disk_while_writing_summary_json_leaves_no_finished_looking_run(root, teacher_file, monkeypatch):
    """summary.json marks a finished run. It was written in place: a full disk (or a kill) mid-write left a
    truncated one beside the checkpoint, so the folder passed for 'a finished run' (and results' reuse read
    half a JSON). Now written whole like the other outputs: none is left, and --resume finishes the run."""
    path = _cache(teacher_file, layers=[])
    args = ["train-student", "--cache", path, "--epochs", "1", "--batch-size", "64", "--workers", "0", "--out", "r"]
    real = Path.write_text

    def full_on_summary(self, text, *a, **k):
        if self.name.startswith("summary.json"):
            real(self, text[:10], *a, **k)  # what a full disk leaves
            raise OSError(28, "No space left on device", str(self))
        return real(self, text, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", full_on_summary)
        res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--resume --out" in res.stderr, res.output
    assert _run_files("r") == ["checkpoint.pt", "config.json", "metrics.jsonl", "student.pt"]
    res = runner.invoke(app, args + ["--resume"])
    assert res.exit_code == 0 and json.loads(Path("r/summary.json").read_text())["epochs"] == 1, res.output


def test_runs_started_in_the_same_second_get_their_own_directories(root, teacher_file, monkeypatch):
    import pipeline.train_student as ts

    monkeypatch.setattr(ts.time, "strftime", lambda *_: "20260101-000000")  # every run in one second
    cfg = StudentConfig(cache="-", loss="kd=1")
    dirs = [ts.open_run_dir(cfg) for _ in range(3)]
    assert [d.name for d in dirs] == ["20260101-000000-kd1-s0", "20260101-000000-kd1-s0-2",
                                      "20260101-000000-kd1-s0-3"]
    assert all(d.is_dir() for d in dirs)
    # a --loss written with spaces names its run without them
    assert ts.run_dir_for(replace(cfg, loss=" kd = 1 , rkd=0.5 ")).name == "20260101-000000-kd1+rkd0.5-s0"


def test_teacher_save_failure_and_interrupt_say_what_to_do(root, monkeypatch):
    import pipeline.loops as loops
    import pipeline.teacher_train as tt

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 10 vs 4")

    with monkeypatch.context() as m:
        m.setattr(loops.torch, "save", full)
        res = runner.invoke(app, ["teacher", "--data", SYN, "--epochs", "1", "--out", "t.pt"])
    assert res.exit_code == 2 and "error: cannot write t.pt (" in res.stderr and "re-run `kdcache teacher`" in \
        res.stderr, res.output
    assert not Path("t.pt").exists() and not Path("t.pt.tmp").exists()

    def ctrl_c(obj, f, *a, **k):  # Ctrl-C while the weights are being written
        Path(f).write_bytes(b"PK partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loops.torch, "save", ctrl_c)
        res = runner.invoke(app, ["teacher", "--data", SYN, "--epochs", "1", "--out", "t.pt"])
    assert res.exit_code == 130 and "its training starts over" in res.stderr, res.output
    assert not Path("t.pt").exists() and not Path("t.pt.tmp").exists()  # no half-written weights under any name
    res = runner.invoke(app, ["teacher", "--data", SYN, "--epochs", "1", "--out", "t.pt"])  # as it says: re-run
    assert res.exit_code == 0 and Path("t.pt").is_file() and Path("t.json").is_file(), res.output

    def interrupted(cfg, log):
        raise KeyboardInterrupt

    monkeypatch.setattr(tt, "run_teacher_train", interrupted)
    res = runner.invoke(app, ["teacher", "--data", SYN, "--out", "t2.pt"])
    assert res.exit_code == 130 and "its training starts over" in res.stderr


def test_user_errors_name_the_commands_own_next_step(capsys, monkeypatch):
    """A full disk says what this command does next; under torchrun, a peer's closed connection is one line."""
    import typer

    from pipeline.cli import RESUMES_STUDENT, user_errors

    with pytest.raises(typer.Exit) as ex, user_errors(RESUMES_STUDENT):
        raise OSError(28, "No space left on device", "r/metrics.jsonl")
    err = capsys.readouterr().err
    assert ex.value.exit_code == 2 and err.startswith("error: disk full while writing r/metrics.jsonl; free space "
                                                      "and re-run the same command with --resume --out")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(typer.Exit) as ex, user_errors():
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1234")
    assert ex.value.exit_code == 2 and capsys.readouterr().err.startswith("error: another rank stopped")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError), user_errors():  # one process: not ours to explain
        raise RuntimeError("Connection closed by peer")


def test_world_size_without_a_launcher_is_one_line(root, teacher_file, monkeypatch):
    """WORLD_SIZE left set without torchrun's other variables: torch's rendezvous ValueError was a traceback."""
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file)])
    assert res.exit_code == 2 and res.stderr.startswith("error: WORLD_SIZE=2, but environment variable RANK "
                                                        "expected") and "torchrun" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1
    monkeypatch.setenv("RANK", "0")
    res = runner.invoke(app, ["train-student", "--cache", "x.zarr"])
    assert res.exit_code == 2 and "but environment variable MASTER_ADDR expected" in res.stderr, res.output


def test_launcher_variables_that_are_no_ranks_are_one_line(root, teacher_file, monkeypatch):
    """WORLD_SIZE or RANK that is not a number was int()'s ValueError traceback; a RANK outside 0..WORLD_SIZE-1
    waited in torch's rendezvous for ranks that can never all arrive (for hours)."""
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    args = ["teacher-cache", "--data", SYN, "--weights", str(teacher_file)]
    monkeypatch.setenv("WORLD_SIZE", "abc")
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and res.stderr.startswith("error: WORLD_SIZE='abc' is not a whole number"), res.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "x")
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and res.stderr.startswith("error: RANK='x' is not a whole number"), res.output
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and res.stderr.startswith("error: RANK=2 is not a rank of WORLD_SIZE=2 (0 to 1)"), \
        res.output
    assert len(res.stderr.strip().splitlines()) == 1
    # rank 0 of a hand-made launch whose MASTER_PORT another program holds: torch's DistNetworkError traceback
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("MASTER_PORT", str(held.getsockname()[1]))
        res = runner.invoke(app, args)
    assert res.exit_code == 2 and res.stderr.startswith("error: cannot start the process group of WORLD_SIZE=2 "
                                                        "ranks (DistNetworkError: address already in use); check "
                                                        "MASTER_ADDR and MASTER_PORT"), res.output
    assert len(res.stderr.strip().splitlines()) == 1


def test_teacher_checks_its_out_before_training(root, monkeypatch):
    import pipeline.teacher_train as tt

    Path("afile").write_text("")
    trained = []
    monkeypatch.setattr(tt, "build_model", lambda *a: trained.append(1))
    res = runner.invoke(app, ["teacher", "--data", SYN, "--epochs", "1", "--out", "afile/t.pt"])
    assert res.exit_code == 2 and "cannot write into afile" in res.stderr and not trained, res.output
    Path("adir").mkdir()
    res = runner.invoke(app, ["teacher", "--data", SYN, "--epochs", "1", "--out", "adir"])
    assert res.exit_code == 2 and "--out adir is a folder" in res.stderr and not trained


def test_synthetic_data_is_pinned_and_named_canonically():
    """A synthetic store's data fingerprint is of its numbers, not its bytes, so the generator must never change:
    these digests are of the images and labels it has always made (computed with the generator as first written).
    Specs that spell the same numbers differently are the same data; another seed is other data."""
    import hashlib

    from pipeline.data import default_transform

    for spec, images, labels in [("synthetic:64:1x16x16:4", "cbeeae40fc086d23", "04928e91cdf0008c"),
                                 ("synthetic:64:3x8x8:4:7", "9bd5739fe030b122", "86a092a784b71cc8")]:
        src = open_source(spec)
        x = src.load_raw(np.arange(64), default_transform(src)).numpy()
        assert hashlib.sha256(x.tobytes()).hexdigest()[:16] == images, spec
        assert hashlib.sha256(src.labels(np.arange(64)).tobytes()).hexdigest()[:16] == labels, spec
    fp = open_source("synthetic:64:1x28x28:10").fingerprint()
    assert open_source("synthetic:64:1X28x28:10:0").fingerprint() == fp
    assert open_source("synthetic:64:1x28x28:10:1").fingerprint() != fp
    # every number counts: the sample count, the shape and the class count
    for other in ("synthetic:65:1x28x28:10", "synthetic:64:1x28x27:10", "synthetic:64:3x28x28:10",
                  "synthetic:64:1x28x28:9"):
        assert open_source(other).fingerprint() != fp, other
    assert not torch.equal(open_source("synthetic:8:1x8x8:2")._noise, open_source("synthetic:8:1x8x8:2:1")._noise)


def test_a_lone_last_row_trains_a_batchnorm_student(root, teacher_file):
    """193 samples in batches of 64: the last row joins the batch before it, so a student with BatchNorm on a 1x1
    map (which torch refuses to train on one sample) trains; each epoch still sees every sample."""
    path = run_teacher_cache(CacheConfig(data="synthetic:193:1x16x16:4", weights=str(teacher_file), chunk_samples=193,
                                         device="cpu"), log=lambda *_: None)
    run_train_student(StudentConfig(cache=path, student="tests.odd_models:bn_head_student", batch_size=64, epochs=1,
                                    workers=0, out="run"), log=lambda *_: None)
    rows = [json.loads(x) for x in Path("run", "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["samples"] == 193


def test_resume_replays_dropout_and_refuses_another_worker_count(root, teacher_file, monkeypatch):
    """The checkpoint keeps torch's RNG state (and the loader draws no numbers from it), so a student with dropout,
    read by a persistent loader worker, resumes to the weights of an uninterrupted run; another --workers (other
    batches, another schedule length; 0, loading in this process, reads what 1 reads) or another --loss is
    refused, the same --loss spelled otherwise is not."""

    path = _cache(teacher_file, layers=[])
    common = dict(cache=path, student="tests.odd_models:dropout_student", loss="kd=1", epochs=3, batch_size=20,
                  workers=1, seed=0)
    whole = run_train_student(StudentConfig(out="whole", **common), log=lambda *_: None)
    _interrupt_after_first_checkpoint(monkeypatch, StudentConfig(out="cut", **common))
    with pytest.raises(KDCacheError, match="other settings \\(workers: 1 there, 2 now\\)"):
        run_train_student(StudentConfig(out="cut", resume=True, **(common | {"workers": 2})), log=lambda *_: None)
    with pytest.raises(KDCacheError, match="other settings \\(loss: \\[\\[\"kd\", 1.0\\]\\] there, \\[\\[\"kd\", 2.0\\]\\] now\\)"):
        run_train_student(StudentConfig(out="cut", resume=True, **(common | {"loss": "kd=2"})), log=lambda *_: None)
    # --loss compares by what it trains: kd=1 spelled otherwise, with a loss weighted 0 beside it, resumes
    cut = run_train_student(StudentConfig(out="cut", resume=True, **(common | {"loss": "kd = 1.0, ce=0"})),
                            log=lambda *_: None)
    assert cut["params_fingerprint"] == whole["params_fingerprint"]


def test_zero_loader_workers_train_what_one_does_and_resume_each_others_runs(root, teacher_file, monkeypatch):
    """--workers 0 loads in the training process what one worker loads, in the same order, and draws nothing from
    torch's RNG there: bitwise the same student as --workers 1, from a store of augmented views read in random view
    order and online alike (dropout included). So --resume across 0 and 1 continues the run (it was refused as
    another worker count) to the weights of an uninterrupted one, from a checkpoint that recorded 0 too."""
    from pipeline.online import OnlineConfig, run_online_kd

    def weights(out):
        return torch.load(Path(out, "student.pt"), weights_only=False)["state_dict"]

    def same(a, b):
        wa, wb = weights(a), weights(b)
        return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    views = _cache(teacher_file, layers=[], views=3, augment="crop=0.6-1,flip")
    common = dict(cache=views, student="tests.odd_models:dropout_student", view_policy="random", epochs=3,
                  batch_size=20, buffer_chunks=2, seed=0)
    for w in (0, 1):
        run_train_student(StudentConfig(out=f"whole{w}", workers=w, **common), log=lambda *_: None)
        run_online_kd(OnlineConfig(data=SYN, weights=str(teacher_file), augment="crop=0.6-1,flip", epochs=2,
                                   student="tests.odd_models:dropout_student", batch_size=20, workers=w, seed=0,
                                   device="cpu", out=f"online{w}"), log=lambda *_: None)
    assert same("whole0", "whole1") and same("online0", "online1")
    for before, after in ((0, 1), (1, 0)):
        _interrupt_after_first_checkpoint(monkeypatch, StudentConfig(out=f"cut{before}", workers=before, **common))
        run_train_student(StudentConfig(out=f"cut{before}", workers=after, resume=True, **common),
                          log=lambda *_: None)
        assert same(f"cut{before}", "whole0"), (before, after)
    # a checkpoint written before 0 and 1 compared as one count recorded --workers 0 as it was given
    _interrupt_after_first_checkpoint(monkeypatch, StudentConfig(out="old", workers=0, **common))
    state = torch.load("old/checkpoint.pt", weights_only=False)
    torch.save(state | {"config": state["config"] | {"workers": 0}}, "old/checkpoint.pt")
    run_train_student(StudentConfig(out="old", workers=1, resume=True, **common), log=lambda *_: None)
    assert same("old", "whole0")


def test_a_student_whose_lazy_layer_runs_only_in_training_mode_trains(root, teacher_file):
    """The set-up's training-mode probe restores the buffers it found; a lazy one it makes is no KeyError."""
    res = runner.invoke(app, ["train-student", "--cache", _cache(teacher_file, layers=[]), "--student",
                              "tests.odd_models:lazy_in_training_student", "--epochs", "1", "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["test_acc"] is not None


def test_resume_whose_student_code_changed_since_is_one_line_and_keeps_the_checkpoint(root, teacher_file,
                                                                                      monkeypatch):
    """The settings match, but the module:function now builds another network (its code was edited): the
    checkpoint's weights do not fit, which load_state_dict reported as a bare RuntimeError traceback."""
    Path("mystudent.py").write_text("from torch import nn\n\ndef net(num_classes=4, in_channels=1, image_size=16):\n"
                                    "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, "
                                    "32), nn.ReLU(), nn.Linear(32, num_classes))\n")
    path = _cache(teacher_file, layers=[])
    flags = ["--cache", path, "--student", "mystudent:net", "--epochs", "2", "--batch-size", "64", "--workers", "0",
             "--out", "cut"]
    _interrupt_after_first_checkpoint(monkeypatch, StudentConfig(cache=path, student="mystudent:net", epochs=2,
                                                                 batch_size=64, workers=0, out="cut"))
    Path("mystudent.py").write_text(Path("mystudent.py").read_text().replace("32", "16"))
    monkeypatch.delitem(__import__("sys").modules, "mystudent")  # as a new process would import it
    res = runner.invoke(app, ["train-student", *flags, "--resume"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: --resume: the checkpoint in cut does not fit student mystudent:net as it is "
                               "built now (size mismatch for 1.weight: copying a param with shape torch.Size([32, 256])")
    assert Path("cut/checkpoint.pt").is_file() and not Path("cut/summary.json").exists()


def test_resume_knows_the_store_by_its_key_and_the_device_by_its_kind(root, teacher_file, monkeypatch):
    """--resume compares the store by its manifest's key, not the --cache text: the same store spelled otherwise or
    moved resumes, one rebuilt in place from another teacher is refused (its targets are another teacher's); and the
    device by what it resolved to: a run started with --device auto on a machine without CUDA resumes with cpu."""
    from tests.conftest import save_teacher

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine: auto is cpu
    path = _cache(teacher_file, layers=[])
    common = dict(loss="kd=1", epochs=2, batch_size=64, workers=0)
    _interrupt_after_first_checkpoint(monkeypatch, StudentConfig(cache=path, out="cut", device="auto", **common))
    shutil.copytree("cut", "cut2")
    assert os.path.isabs(path)  # the store moved, named relatively (as teacher-cache prints it), on cpu
    shutil.copytree(path, "moved.zarr")
    args = ["train-student", "--epochs", "2", "--batch-size", "64", "--workers", "0", "--resume"]
    res = runner.invoke(app, args + ["--cache", "./moved.zarr", "--out", "cut", "--device", "cpu"])
    assert res.exit_code == 0 and "resuming cut after epoch 1/2" in res.stderr, res.output
    # the store rebuilt at its path from another teacher: refused, and the checkpoint kept
    _cache(save_teacher(root / "other.pt", seed=1), layers=[], out=path, force=True)
    res = runner.invoke(app, args + ["--cache", path, "--out", "cut2"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "was trained from the cache with key " in lines[0], res.output
    assert f"but {path} holds key {open_store(path).manifest['key']}" in lines[0]
    assert Path("cut2/checkpoint.pt").is_file() and not Path("cut2/summary.json").exists()


def test_train_accuracy_is_the_share_of_training_samples_predicted_right(root, teacher_file):
    """metrics.jsonl's train_acc counts each sample of the epoch once: with a learning rate too small to move the
    weights (and a student without batch statistics), it is the trained model's accuracy on every training input."""
    from pipeline.models import build_model

    path = _cache(teacher_file, layers=[])
    run_train_student(StudentConfig(cache=path, student="mlp", loss="ce=1", epochs=1, batch_size=50, lr=1e-12,
                                    workers=0, out="run", test_data=SYN_TEST), log=lambda *_: None)
    row = json.loads(Path("run/metrics.jsonl").read_text().splitlines()[0])
    saved = torch.load("run/student.pt", weights_only=True)
    model = build_model("mlp", 4, 1, 16)
    model.load_state_dict(saved["state_dict"])
    src = open_source(SYN)
    with torch.no_grad():
        pred = model.eval()(src.load(np.arange(192), Transform.from_dict(saved["meta"]["transform"]))).argmax(1)
    want = (pred.numpy() == src.labels(np.arange(192))).mean()
    assert row["samples"] == 192 and 0 < want < 1 and row["train_acc"] == pytest.approx(want, abs=1 / 192)


def test_each_stages_cosine_schedule_spans_its_own_steps_and_a_resumed_run_goes_on_where_it_stopped(
        root, teacher_file, monkeypatch):
    """The learning rate of every step, against the cosine computed by hand: FitNets' hint stage (1 epoch, 6 steps)
    decays over its 6 steps alone, stage 2 (2 epochs) restarts at --lr and decays over its own 12; a run resumed
    after its first epoch goes on at step 6 of 18, not at 0 nor over a schedule of other length."""
    import math

    import pipeline.train_student as ts

    real, seen = ts.cosine_lr, []

    def spy(opt, base_lr, step, total, *a, **k):
        real(opt, base_lr, step, total, *a, **k)
        seen.append((step, total, opt.param_groups[0]["lr"]))

    def want(steps_total, start=0):
        return [(i, steps_total, 0.5 * 0.1 * (1 + math.cos(math.pi * i / steps_total)))
                for i in range(start, steps_total)]

    monkeypatch.setattr(ts, "cosine_lr", spy)
    path = _cache(teacher_file, layers=["layer2"])
    run_train_student(StudentConfig(cache=path, loss="kd=1,fitnets=1", fitnets_hint="layer2", fitnets_guided="block1",
                                    fitnets_hint_epochs=1, epochs=3, batch_size=32, lr=0.1, workers=0, out="two"),
                      log=lambda *_: None)
    assert [(s, t) for s, t, _ in seen] == [(s, t) for s, t, _ in want(6) + want(12)]  # 192 rows / 32 a step
    assert [lr for *_, lr in seen] == pytest.approx([lr for *_, lr in want(6) + want(12)], rel=1e-12)
    common = dict(cache=path, loss="kd=1", epochs=3, batch_size=32, lr=0.1, workers=0, out="cut")
    _interrupt_after_first_checkpoint(monkeypatch, StudentConfig(**common))
    seen.clear()
    run_train_student(StudentConfig(resume=True, **common), log=lambda *_: None)
    assert [(s, t) for s, t, _ in seen] == [(s, t) for s, t, _ in want(18, start=6)]
    assert [lr for *_, lr in seen] == pytest.approx([lr for *_, lr in want(18, start=6)], rel=1e-12)


def test_every_training_setting_counts_for_resume_and_reuse_and_only_those_do():
    """`same_run` (what --resume and the results' reuse of a finished run compare) changes with every StudentConfig
    field but where the run lies, how it was started, and the store's and data's paths (the store counts by its key);
    `_comparable` adds the ranks and the device kind. A field left out would let a run made with another setting (say
    --no-labels or --view-policy) be resumed or reused as this one."""
    from dataclasses import fields

    from pipeline.train_student import RUN_PLACE, _comparable, same_run

    base = StudentConfig(cache="a.zarr", out="run")
    ref = same_run(asdict(base), "key")

    def other(v):
        if isinstance(v, bool):
            return not v
        if isinstance(v, (int, float)):
            return v * 2 + 1
        return "kd=1,ce=1" if v == base.loss else (v or "") + "x"

    for f in fields(StudentConfig):
        changed = same_run(asdict(base) | {f.name: other(getattr(base, f.name))}, "key")
        # --augment from a store only checks its views policy, which the key names; online KD trains with it
        if f.name in RUN_PLACE + ("cache", "data", "augment"):
            assert changed == ref, f.name
        else:
            assert changed != ref, f.name
    online = asdict(replace(base, cache=None, augment="crop=0.5-1"))
    assert same_run(online | {"augment": "crop=0.5-1,flip"}, None) != same_run(online, None)
    assert same_run(asdict(base), "other key") != ref
    cpu = torch.device("cpu")
    assert _comparable(base, 1, "key", cpu) != _comparable(base, 2, "key", cpu)
    assert _comparable(base, 1, "key", cpu) != _comparable(base, 1, "key", torch.device("cuda"))
    assert _comparable(base, 1, "key", torch.device("cuda", 0)) == _comparable(base, 1, "key", torch.device("cuda", 1))


def test_two_runs_on_one_out_the_second_is_refused_while_the_first_runs(root, teacher_file):
    """Two train-student runs started with one --out both passed its checks and wrote over each other's checkpoint
    and metrics. The run holds a lock inside its directory (released by the kernel however it ends): a second run
    there, --overwrite or --resume, is refused in one line naming the holder, and touches nothing; once the
    holder is gone the same command runs. A run refused before writing anything removes the folder it made."""
    import subprocess
    import sys

    path = _cache(teacher_file, layers=[])
    common = dict(cache=path, loss="kd=1", epochs=1, batch_size=32, workers=0)
    run_train_student(StudentConfig(out="run", **common), log=lambda *_: None)
    files = lambda: {p.name: p.read_bytes() for p in Path("run").iterdir() if p.name != ".lock"}  # noqa: E731
    before = files()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom pipeline.train_student import "
         "run_lock\nwith run_lock(Path('run')):\n    print('held', flush=True)\n    time.sleep(60)\n"],
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for flags in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(KDCacheError, match=f"^another train-student \\(pid {holder.pid} on .*\\) is writing "
                                                   "run directory run; wait for it to end, or choose another --out$"):
                run_train_student(StudentConfig(out="run", **common, **flags), log=lambda *_: None)
        assert files() == before
    finally:
        holder.kill()
        holder.wait()
    run_train_student(StudentConfig(out="run", overwrite=True, **common), log=lambda *_: None)
    assert json.loads(Path("run/summary.json").read_text())["epochs"] == 1
    with pytest.raises(KDCacheError, match="features/layer3"):  # refused by the store's check, after the lock
        hint = {"loss": "fitnets=1", "fitnets_schedule": "single"}
        run_train_student(StudentConfig(out="new/run", **(common | hint)), log=lambda *_: None)
    assert not Path("new/run").exists()


def test_a_failed_run_that_made_its_out_leaves_a_lock_taken_since_where_it_is(root, monkeypatch):
    """A train-student that made --out and then failed removed `--out/.lock` and the folder if the lock was all it
    held, after releasing it: a run that had taken --out meanwhile lost its lock file and its folder, and a third
    run then held --out beside it. Only the empty folder is removed now (the failed run's own lock file is gone)."""
    import subprocess
    import sys
    from contextlib import contextmanager

    import pipeline.train_student as ts

    real, taker = ts.exclusive, []

    @contextmanager
    def then_another_takes_it(lock, busy):
        try:
            with real(lock, busy):
                yield
        finally:  # released: another run takes --out before this one's clean-up
            taker.append(subprocess.Popen(
                [sys.executable, "-c", "import time\nfrom pathlib import Path\nfrom pipeline.train_student import "
                 "run_lock\nwith run_lock(Path('run')):\n    print('held', flush=True)\n    time.sleep(60)\n"],
                env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, text=True))
            assert taker[0].stdout.readline().strip() == "held"

    try:
        with monkeypatch.context() as m:
            m.setattr(ts, "exclusive", then_another_takes_it)
            with pytest.raises(RuntimeError, match="refused"), ts.run_lock(Path("run")):
                raise RuntimeError("refused")
        assert Path("run/.lock").read_text().startswith(f"pid {taker[0].pid} on ")
        with pytest.raises(KDCacheError, match=f"another train-student \\(pid {taker[0].pid} on "), \
                ts.run_lock(Path("run")):
            pass
    finally:
        for p in taker:
            p.kill()
            p.wait()
    with pytest.raises(RuntimeError), ts.run_lock(Path("new")):  # alone: the folder it made is removed
        raise RuntimeError
    assert not Path("new").exists()


def test_resuming_with_another_cpu_thread_count_says_the_weights_will_differ(root, teacher_file, monkeypatch):
    """On the CPU the thread count changes the order sums add in, so a run resumed with another count ends with
    other weights than an uninterrupted one: allowed (the run is as valid), but said, with how to resume exactly.
    The same count resumes without the note."""
    path = _cache(teacher_file, layers=[])
    cfg = StudentConfig(cache=path, epochs=2, batch_size=32, workers=0, out="run")
    threads = torch.get_num_threads()
    _interrupt_after_first_checkpoint(monkeypatch, cfg)
    assert torch.load("run/checkpoint.pt", weights_only=True)["threads"] == threads
    other = 1 if threads > 1 else 2
    said = []
    try:
        torch.set_num_threads(other)
        run_train_student(replace(cfg, resume=True), log=said.append)
    finally:
        torch.set_num_threads(threads)
    assert f"note: the run began with {threads} CPU threads and resumes with {other}; " in "\n".join(said)
    assert f"(OMP_NUM_THREADS={threads} resumes it exactly)" in "\n".join(said)
    _interrupt_after_first_checkpoint(monkeypatch, replace(cfg, out="run2"))
    said.clear()
    run_train_student(replace(cfg, out="run2", resume=True), log=said.append)
    assert any("resuming run2" in x for x in said) and not any("CPU threads" in x for x in said)


def test_a_failed_or_interrupted_library_run_leaves_no_loader_workers_alive(root, teacher_file, monkeypatch):
    """From Python (a notebook), a run stopped by Ctrl-C or a KDCacheError mid-training must not leave its DataLoader
    workers running: the exception's traceback (which IPython keeps as sys.last_traceback, and pytest.raises here)
    holds the training frames, hence the loader, and its persistent workers (each with up to 256 MiB of buffered
    chunks) lived on until that traceback was dropped."""
    import multiprocessing as mp

    import pipeline.train_student as ts

    path = _cache(teacher_file, layers=[])
    before = {p.pid for p in mp.active_children()}
    for i, error in enumerate((KeyboardInterrupt, KDCacheError)):
        def stop(*_a, **_k):
            raise error("stopped")

        with monkeypatch.context() as m:
            m.setattr(ts, "evaluate", stop)  # after the first epoch's batches: the workers are running
            with pytest.raises(error) as caught:
                run_train_student(StudentConfig(cache=path, epochs=2, batch_size=32, workers=2, test_data=SYN_TEST,
                                                out=f"run{i}"), log=lambda *_: None)
        assert caught.value is not None  # the traceback is still held, as in a notebook
        left = [p for p in mp.active_children() if p.pid not in before]
        for p in left:
            p.join(5)
        assert not [p for p in left if p.is_alive()], f"loader workers left running after {error.__name__}"


def test_configs_from_python_take_numpy_numbers_and_paths_and_refuse_wrong_kinds_in_one_line(root, teacher_file):
    """A notebook passes values as it computes them: numpy scalars (`for seed in np.arange(3)`) and pathlib.Path.
    They raised a bare TypeError only after the work was done (json.dumps of the summary, of a teacher's metadata, of
    a cache's key; a numpy seed in torch.Generator), losing the training. They are now the plain values, giving what
    the CLI's give; a value of the wrong kind is one KDCacheError naming the field."""
    from pipeline.evaluate import EvalConfig
    from pipeline.teacher_train import TeacherTrainConfig, run_teacher_train

    quiet = lambda *_: None  # noqa: E731
    plain = _cache(teacher_file, layers=["layer3"])
    numpy = run_teacher_cache(CacheConfig(data=SYN, weights=teacher_file, layers=("layer3",), out=Path("np.zarr"),
                                          chunk_samples=np.int64(64), batch_size=np.int64(32), device="cpu"), log=quiet)
    assert open_store(numpy).manifest["key"] == open_store(plain).manifest["key"]
    assert CacheConfig(layers=None).layers == [] and CacheConfig(layers="layer3").layers == ["layer3"]

    kw = dict(epochs=1, batch_size=32, workers=0, test_data=SYN_TEST, device="cpu")
    ref = run_train_student(StudentConfig(cache=plain, out="ref", seed=1, lr=0.05, **kw), log=quiet)
    cfg = StudentConfig(cache=Path(plain), out=Path("np"), seed=np.int64(1), lr=np.float32(0.05),
                        **kw | {"epochs": np.int64(1), "batch_size": np.int64(32)})
    assert type(cfg.seed) is int and type(cfg.lr) is float and cfg.out == "np"
    s = run_train_student(cfg, log=quiet)
    assert s["params_fingerprint"] == ref["params_fingerprint"] and json.loads(Path("np/summary.json").read_text())

    meta = run_teacher_train(TeacherTrainConfig(data=SYN, test_data=SYN_TEST, epochs=np.int64(1), batch_size=32,
                                                seed=np.int64(1), lr=np.float32(0.1), device="cpu",
                                                out=Path("t.pt")), log=quiet)
    assert meta["path"] == "t.pt" and Path("t.json").is_file()

    for make, field in [(lambda: StudentConfig(cache=plain, loss={"kd": 1}), "StudentConfig.loss"),
                        (lambda: StudentConfig(cache=plain, epochs=1.5), "StudentConfig.epochs"),
                        (lambda: StudentConfig(cache=plain, overwrite="yes"), "StudentConfig.overwrite"),
                        (lambda: CacheConfig(layers=[3]), "CacheConfig.layers"),
                        (lambda: EvalConfig(weights="t.pt", batch_size="16"), "EvalConfig.batch_size"),
                        (lambda: TeacherTrainConfig(lr="0.1"), "TeacherTrainConfig.lr")]:
        with pytest.raises(KDCacheError, match=re.escape(field)):
            make()
