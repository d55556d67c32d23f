"""The cache as a trustworthy artifact: identity, cache hits, resume after SIGKILL, verify/repair, refusals."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import pipeline.teacher_cache as tc
from pipeline import store as st
from pipeline.cli import app
from pipeline.errors import KDCacheError
from pipeline.teacher_cache import CacheConfig, run_teacher_cache
from pipeline.train_student import StudentConfig, run_train_student
from tests.conftest import REPO, SYN, run_ranks, save_teacher

runner = CliRunner()


def cfg(teacher_file, **kw):
    kw.setdefault("data", SYN)
    kw.setdefault("layers", ["layer2"])
    kw.setdefault("chunk_samples", 64)
    return CacheConfig(weights=str(teacher_file), batch_size=32, **kw)


def arrays_of(path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    names = [n for n in ("index", "labels", "logits") if n in g] + [f"features/{k}" for k in g.get("features", {})]
    return {n: np.asarray(g[n][:]) for n in names}


def assert_same_arrays(path, reference) -> None:
    """Every target array of the store at `path` equals `reference`'s bit for bit (NaN-free)."""
    a, b = arrays_of(path), arrays_of(reference)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_cache_hit_runs_no_teacher_and_keys_follow_content(root, teacher_file, monkeypatch):
    first = run_teacher_cache(cfg(teacher_file), log=lambda *_: None)
    assert Path(first).parent == root / "data" / "cache"  # default location: data/cache/<key>.zarr
    mtime = (Path(first) / "zarr.json").stat().st_mtime_ns

    def no_forward(*a, **k):
        raise AssertionError("a cache hit must not run the teacher")

    from pipeline.models import TeacherNet

    with monkeypatch.context() as m:
        m.setattr(TeacherNet, "forward", no_forward)  # not even a probe batch
        m.setattr(tc, "fill_units", no_forward)
        logs = []
        assert run_teacher_cache(cfg(teacher_file), log=logs.append) == first
    assert any("cache hit" in m for m in logs)
    assert (Path(first) / "zarr.json").stat().st_mtime_ns == mtime
    # Any change of content gives a new key: data, teacher weights, layers, dtype.
    other_teacher = save_teacher(root / "t2.pt", seed=1)
    keys = {Path(first).stem,
            Path(run_teacher_cache(cfg(teacher_file, data="synthetic:192:1x16x16:4:7"), log=lambda *_: None)).stem,
            Path(run_teacher_cache(cfg(other_teacher), log=lambda *_: None)).stem,
            Path(run_teacher_cache(cfg(teacher_file, layers=["layer3"]), log=lambda *_: None)).stem,
            Path(run_teacher_cache(cfg(teacher_file, dtype="float32"), log=lambda *_: None)).stem,
            Path(run_teacher_cache(cfg(teacher_file, image_size=20), log=lambda *_: None)).stem,       # transform
            Path(run_teacher_cache(cfg(teacher_file, normalize="0.4/0.3"), log=lambda *_: None)).stem,
            Path(run_teacher_cache(cfg(teacher_file, limit=100), log=lambda *_: None)).stem,
            # the same state_dict in another architecture (here: another forward) is another teacher
            Path(run_teacher_cache(cfg(teacher_file, teacher="tests.odd_models:loud_teacher"),
                                   log=lambda *_: None)).stem}
    views = [Path(run_teacher_cache(cfg(teacher_file, layers=[], **({"views": 2} | kw)), log=lambda *_: None)).stem
             for kw in ({"augment": "flip"}, {"augment": "translate=2"}, {"augment": "flip", "aug_seed": 1},
                        {"augment": "flip", "views": 3})]
    # ... and how it is stored and laid out: the codec of each target with its settings, the rows' order, the chunks
    layout = {Path(run_teacher_cache(cfg(teacher_file, layers=[], **kw), log=lambda *_: None)).stem
              for kw in ({}, {"logits_topk": 2}, {"logits_topk": 3}, {"row_order": "source"}, {"chunk_samples": 32})}
    assert len(keys) == 9 and len(set(views)) == 4 and not keys & set(views)
    assert len(layout) == 5 and not layout & (keys | set(views))
    # --force rebuilds the same key.
    logs = []
    run_teacher_cache(cfg(teacher_file, force=True), log=logs.append)
    assert any("--force" in m for m in logs)


def _labelled_folder(folder: Path, n_per_class=6):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(folder / c / f"{i}.png")


def _copy_without_times(folder: Path, copy: Path) -> None:
    """A copy of an image folder as cp/scp/git make it: the same bytes, other modification times."""
    shutil.copytree(folder, copy, copy_function=shutil.copyfile)
    for f in copy.rglob("*.png"):
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))


def test_an_image_whose_name_is_not_utf8_is_data_like_any_other(root, teacher_file):
    """A file name that is not UTF-8 (latin-1 `caf\xe9.png`, common in old archives) reaches Python with surrogates:
    fingerprinting the folder failed with a bare UnicodeEncodeError. It hashes the name's own bytes now; UTF-8 names
    hash as before, so existing caches keep their keys."""
    import hashlib

    folder = root / "imgs"
    _labelled_folder(folder)
    f = folder / "a" / "0.png"
    expected = hashlib.sha256()
    for p in sorted(folder.rglob("*.png")):
        st_ = p.stat()
        expected.update(f"{p.relative_to(folder)}\0{st_.st_size}\0{st_.st_mtime_ns}\n".encode())
    from pipeline.data import open_source

    assert open_source(f"imagefolder:{folder}").fingerprint() == expected.hexdigest()[:16]
    os.rename(bytes(f), os.fsencode(folder / "a") + b"/caf\xe9.png")
    path = run_teacher_cache(cfg(teacher_file, data=f"imagefolder:{folder}", layers=[]), log=lambda *_: None)
    res = runner.invoke(app, ["verify", path, "--recompute", "12"])
    assert res.exit_code == 0, res.output
    assert run_train_student(StudentConfig(cache=path, epochs=1, workers=0, test_data=f"imagefolder:{folder}"),
                             log=lambda *_: None)["test_acc"] is not None


def test_changed_dataset_is_refused(root):
    folder = root / "imgs"
    _labelled_folder(folder)
    w = save_teacher(root / "t.pt", num_classes=2)
    path = run_teacher_cache(CacheConfig(data=f"imagefolder:{folder}", weights=str(w), chunk_samples=4),
                             log=lambda *_: None)
    from PIL import Image

    f = folder / "a" / "3.png"
    size = f.stat().st_size
    raw = bytearray(f.read_bytes())
    raw[-20] ^= 0xFF  # an edit in place: same size, other bytes
    f.write_bytes(bytes(raw))
    assert f.stat().st_size == size
    with pytest.raises(KDCacheError, match=r"differs from what cache .* was made from .*re-run teacher-cache"):
        run_train_student(StudentConfig(cache=path, workers=0, out="run"))
    Image.fromarray(np.zeros((12, 12), dtype=np.uint8)).save(f)  # content and size change
    with pytest.raises(KDCacheError, match=r"differs from what cache .* was made from .*re-run teacher-cache"):
        run_train_student(StudentConfig(cache=path, workers=0, out="run"))


def test_a_copy_of_an_image_folder_is_the_same_data(root):
    """A copy made without keeping file times (cp, scp, git) has another quick fingerprint but the same content:
    train-student and verify --recompute accept it (with a note); the same copy with one file edited is refused."""
    from pipeline.verify import verify_store

    folder = root / "imgs"
    _labelled_folder(folder)
    w = save_teacher(root / "t.pt", num_classes=2)
    path = run_teacher_cache(CacheConfig(data=f"imagefolder:{folder}", weights=str(w), chunk_samples=4),
                             log=lambda *_: None)
    copy = root / "elsewhere"
    _copy_without_times(folder, copy)
    logs = []
    run_train_student(StudentConfig(cache=path, data=f"imagefolder:{copy}", workers=0, epochs=1, out="run"),
                      log=logs.append)
    assert Path("run/summary.json").exists() and any("the same files and bytes" in m for m in logs)
    assert verify_store(path, recompute=4, moved={"data": f"imagefolder:{copy}"}).ok
    (copy / "b" / "0.png").write_bytes((copy / "b" / "1.png").read_bytes())  # one file now another's bytes
    with pytest.raises(KDCacheError, match=r"differs from what cache .* was made from .*re-run teacher-cache"):
        run_train_student(StudentConfig(cache=path, data=f"imagefolder:{copy}", workers=0, out="run2"))


def test_an_image_folder_grown_by_an_image_is_other_data_but_not_for_a_store_of_its_first_images(root):
    """A store of a whole folder holds every image in it: an image added since, even one sorting last (so the folder
    still begins with the store's files, in their order), is data the store lacks, and train-student refuses it
    instead of saying 'the same files and bytes' and training without it. A store made with --limit 8 holds the
    first 8 images alone: the grown folder, and a copy of it made without file times, still hold those, and are
    accepted; a copy with one of those 8 edited is not."""
    import zarr
    from PIL import Image

    from pipeline.data import data_differs, open_source

    folder = root / "imgs"
    _labelled_folder(folder)
    spec = f"imagefolder:{folder}"
    w = save_teacher(root / "t.pt", num_classes=2)
    whole = run_teacher_cache(CacheConfig(data=spec, weights=str(w), chunk_samples=4), log=lambda *_: None)
    first = run_teacher_cache(CacheConfig(data=spec, weights=str(w), chunk_samples=4, limit=8), log=lambda *_: None)
    files = open_source(spec).files
    Image.fromarray(np.full((12, 12), 7, dtype=np.uint8)).save(folder / "b" / "9.png")  # sorts last: b/0..5, 9
    grown = open_source(spec)
    assert grown.num_samples == 13 and grown.files[:12] == files
    man = zarr.open_group(whole, mode="r").attrs["kdcache"]["data"]
    assert grown.content_fingerprint(12) == man["content_fingerprint"]  # its first 12 are the store's
    assert data_differs(grown, man) == "13 samples where the cache holds 12"
    with pytest.raises(KDCacheError, match=r"differs from what cache .* was made from \(13 samples where the cache "
                                           r"holds 12\); re-run teacher-cache"):
        run_train_student(StudentConfig(cache=whole, workers=0, epochs=1, out="run"))

    logs = []
    run_train_student(StudentConfig(cache=first, workers=0, epochs=1, out="run1"), log=logs.append)
    assert json.loads(Path("run1/summary.json").read_text())["epochs"] == 1
    assert any("(other file times or images added since), but its first 8 images, the ones the store holds "
               "(--limit 8), are the same files and bytes" in m for m in logs), logs
    copy = root / "elsewhere"
    _copy_without_times(folder, copy)
    logs = []
    run_train_student(StudentConfig(cache=first, data=f"imagefolder:{copy}", workers=0, epochs=1, out="run2"),
                      log=logs.append)
    assert any("the same files and bytes" in m for m in logs), logs
    (copy / "b" / "1.png").write_bytes((copy / "b" / "2.png").read_bytes())  # the 8th image: another's bytes
    with pytest.raises(KDCacheError, match=r"differs from what cache .* was made from .*re-run teacher-cache"):
        run_train_student(StudentConfig(cache=first, data=f"imagefolder:{copy}", workers=0, out="run3"))


def test_renaming_or_moving_an_image_changes_the_data_fingerprints(root):
    """The data fingerprint covers each file's relative path, size and modification time (issue #3), and the content
    fingerprint each file's relative path and bytes: an image renamed, or moved into another class folder, with its
    bytes, size and modification time kept and the files' order unchanged, is other data (a moved image has another
    label), so both fingerprints change, and a store made before the move no longer matches it."""
    from pipeline.data import data_differs, open_source

    folder = root / "imgs"
    _labelled_folder(folder)
    spec = f"imagefolder:{folder}"
    for f in folder.rglob("*.png"):  # one time for all: only a path can tell the files apart by their metadata
        os.utime(f, ns=(10**18, 10**18))
    before = open_source(spec)
    recorded = before.describe() | {"content_fingerprint": before.content_fingerprint()}
    quick, content, labels = before.fingerprint(), before.content_fingerprint(), before.labels(np.arange(12))
    data = [f.read_bytes() for f in before.files]
    # a/5.png, the last of class a, becomes b/-.png, the first of class b ("-" sorts before "0"): the same bytes in
    # the same order, one label changed
    os.rename(folder / "a" / "5.png", folder / "b" / "-.png")
    moved = open_source(spec)
    assert [f.read_bytes() for f in moved.files] == data
    assert [f.stat().st_mtime_ns for f in moved.files] == [10**18] * 12
    assert moved.labels(np.arange(12)).tolist() == labels.tolist()[:5] + [1] * 7
    assert moved.fingerprint() != quick and moved.content_fingerprint() != content
    assert data_differs(moved, recorded) is not None
    # renamed within its class, keeping its place in the order: the same bytes and labels, another file's name
    os.rename(folder / "b" / "-.png", folder / "a" / "5.png")
    assert open_source(spec).fingerprint() == quick and open_source(spec).content_fingerprint() == content
    os.rename(folder / "a" / "5.png", folder / "a" / "5x.png")
    renamed = open_source(spec)
    assert renamed.labels(np.arange(12)).tolist() == labels.tolist()
    assert renamed.fingerprint() != quick and renamed.content_fingerprint() != content


def test_an_image_moved_into_another_class_folder_under_its_own_name_is_other_data(root):
    """`mv cat/x.png dog/` relabels an image and keeps its name, bytes, size and modification time. Where it was
    the last of its old class and sorts first in its new one, the files' order, names, sizes and times are all
    unchanged: only the class folder in its path tells. Both fingerprints change, and teacher-cache makes a new
    store holding the new labels instead of taking the old store (with the old label) as a cache hit."""
    import zarr
    from PIL import Image

    from pipeline.data import data_differs, open_source

    folder, rng = root / "imgs", np.random.default_rng(0)
    for c, names in (("a", ["a0", "a1", "m"]), ("b", ["n0", "n1", "n2"])):  # "m" sorts last in a, first in b
        (folder / c).mkdir(parents=True)
        for name in names:
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(folder / c / f"{name}.png")
    for f in folder.rglob("*.png"):
        os.utime(f, ns=(10**18, 10**18))
    spec = f"imagefolder:{folder}"
    before = open_source(spec)
    recorded = before.describe() | {"content_fingerprint": before.content_fingerprint()}
    names, data = [f.name for f in before.files], [f.read_bytes() for f in before.files]
    assert before.labels(np.arange(6)).tolist() == [0, 0, 0, 1, 1, 1]
    w = save_teacher(root / "t.pt", num_classes=2)
    old = run_teacher_cache(CacheConfig(data=spec, weights=str(w), chunk_samples=4), log=lambda *_: None)

    os.rename(folder / "a" / "m.png", folder / "b" / "m.png")
    moved = open_source(spec)
    assert [f.name for f in moved.files] == names and [f.read_bytes() for f in moved.files] == data
    assert [f.stat().st_mtime_ns for f in moved.files] == [10**18] * 6
    assert moved.labels(np.arange(6)).tolist() == [0, 0, 1, 1, 1, 1]
    assert moved.fingerprint() != before.fingerprint()
    assert moved.content_fingerprint() != before.content_fingerprint()
    assert data_differs(moved, recorded) is not None
    said = []
    new = run_teacher_cache(CacheConfig(data=spec, weights=str(w), chunk_samples=4), log=said.append)
    assert new != old and not any("cache hit" in str(line) for line in said), said
    for store, labels in ((new, [0, 0, 1, 1, 1, 1]), (old, [0, 0, 0, 1, 1, 1])):  # rows in the store's order
        g = zarr.open_group(store, mode="r")
        assert g["labels"][:].tolist() == [labels[i] for i in g["index"][:]]


def test_an_empty_class_folder_is_another_cache_because_it_shifts_the_labels(root):
    """A class folder with no images in it (mkdir b_extra between a/ and c/) shifts every later class's index, so
    the data's labels change although no image's path, size, time or bytes do. Both fingerprints name such
    folders, so the cache key changes with them: train-student refuses the old store as made from other data,
    teacher-cache makes a new store (not a hit) with the shifted labels, and removing the folder again finds the
    old store as a hit. A folder without empty classes keeps the fingerprint it had before they were counted."""
    import hashlib

    from PIL import Image

    from pipeline.data import data_differs, open_source

    folder, rng = root / "imgs", np.random.default_rng(0)
    for c in ("a", "c"):
        (folder / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(folder / c / f"{i}.png")
    spec = f"imagefolder:{folder}"
    before = open_source(spec)
    h = hashlib.sha256()  # the fingerprint as written before empty classes counted: paths, sizes, times
    for f in before.files:
        st_ = f.stat()
        h.update(f"{f.relative_to(folder)}\0{st_.st_size}\0{st_.st_mtime_ns}\n".encode())
    assert before.fingerprint() == h.hexdigest()[:16]
    w = save_teacher(root / "t.pt", num_classes=3)
    cfg = CacheConfig(data=spec, weights=str(w), chunk_samples=4)
    path = run_teacher_cache(cfg, log=lambda *_: None)
    recorded = zarr.open_group(str(path), mode="r").attrs[st.MANIFEST_KEY]["data"]

    (folder / "b_extra").mkdir()  # no images: not a sample, but a class
    after = open_source(spec)
    assert after.labels(np.arange(8)).tolist() == [0, 0, 0, 0, 2, 2, 2, 2] != before.labels(np.arange(8)).tolist()
    assert after.fingerprint() != before.fingerprint()
    assert after.content_fingerprint() != before.content_fingerprint()
    assert data_differs(after, recorded) is not None
    train = ["train-student", "--cache", str(path), "--workers", "0", "--epochs", "1", "--out", "run"]
    line = _one_line(runner.invoke(app, train))
    assert f"differs from what cache {path} was made from" in line and "re-run teacher-cache" in line, line
    said = []
    new = run_teacher_cache(cfg, log=said.append)
    assert new != path and not any("cache hit" in str(x) for x in said), said
    g = zarr.open_group(str(new), mode="r")
    assert g["labels"][:].tolist() == [[0, 0, 0, 0, 2, 2, 2, 2][i] for i in g["index"][:]]
    res = runner.invoke(app, ["train-student", "--cache", str(new), "--workers", "0", "--epochs", "1", "--out",
                              "run2", "--test-data", spec])
    assert res.exit_code == 0, res.output

    (folder / "b_extra").rmdir()
    said = []
    assert run_teacher_cache(cfg, log=said.append) == path and any("cache hit" in str(x) for x in said), said


def _commits(path: Path) -> int:
    d = path / st.COMMIT / "c"
    return len([f for f in d.iterdir() if not f.name.startswith(".")]) if d.exists() else 0  # not temporaries


def test_sigkill_mid_write_then_resume_equals_uninterrupted(root):
    w = save_teacher(root / "t.pt", num_classes=10)
    data, blocks = "synthetic:12288:1x28x28:10", 48
    args = [sys.executable, "-m", "pipeline", "teacher-cache", "--data", data, "--weights", str(w),
            "--layer", "layer2", "--chunk-samples", "256", "--batch-size", "128"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    killed = root / "killed.zarr"
    proc = subprocess.Popen(args + ["--out", str(killed)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _commits(killed) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # What the store holds as committed: a marker file the kill caught mid-write counts as not committed (the file
    # count above may include it), and resume redoes that unit.
    done_at_kill = int(st.committed_units(st.open_group(str(killed), "r")).sum())
    assert 3 <= done_at_kill < blocks, "the kill must land mid-write"
    with pytest.raises(KDCacheError, match="incomplete"):
        st.open_store(killed)                       # nothing reads as complete
    res = subprocess.run(args + ["--out", str(killed)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "already cached" in res.stderr and res.stdout.strip().splitlines()[-1] == str(killed)
    assert not list(killed.rglob(".*.tmp"))  # temporaries the kill left behind are cleared on resume
    m = st.open_store(killed).manifest
    assert m["stats"]["samples_computed"] <= 12288 - done_at_kill * 256
    clean = root / "clean.zarr"
    res = subprocess.run(args + ["--out", str(clean)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert_same_arrays(killed, clean)


def test_sigterm_mid_write_says_so_in_one_line_and_the_run_resumes(root):
    """SIGTERM (a scheduler's pre-emption or time limit) is an interruption like Ctrl-C: the writers finish or drop
    their units as on Ctrl-C, one line says what happened and what to do, exit code 143 (128 + 15). It killed the
    process at once, silently (exit -15). Sent twice, as a job's processes can get it (the scheduler's and
    torchrun's): still one line. The re-run completes the store with an uninterrupted run's arrays."""
    w = save_teacher(root / "t.pt", num_classes=10)
    args = [sys.executable, "-m", "pipeline", "teacher-cache", "--data", "synthetic:12288:1x28x28:10", "--weights",
            str(w), "--layer", "layer2", "--chunk-samples", "256", "--batch-size", "128"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cut = root / "cut.zarr"
    proc = subprocess.Popen(args + ["--out", str(cut)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while _commits(cut) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and [x for x in err.splitlines() if "terminated" in x or "interrupted" in x] == [
        "terminated (SIGTERM); re-run the same command: committed chunks are kept and the run resumes"], err[-2000:]
    assert err.strip().splitlines()[-1].startswith("terminated (SIGTERM); ")
    done = int(st.committed_units(st.open_group(str(cut), "r")).sum())
    assert 3 <= done < 48, "the signal must land mid-run"
    assert not list(cut.rglob(".*.tmp"))  # the writers finished their units (or never began one), as on Ctrl-C
    res = subprocess.run(args + ["--out", str(cut)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "already cached" in res.stderr, res.stderr
    clean = root / "clean.zarr"
    res = subprocess.run(args + ["--out", str(clean)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert_same_arrays(cut, clean)
    # library use: the pipeline's functions leave the process's SIGTERM as it was (only the CLI's entry sets it)
    run_teacher_cache(CacheConfig(data=SYN, weights=str(save_teacher(root / "t4.pt")), chunk_samples=64,
                                  batch_size=32, device="cpu"), log=lambda *_: None)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def _flip_byte(path: Path) -> Path:
    f = sorted(p for p in path.rglob("*") if p.is_file() and "/c/" in str(p) and "features" in str(p))[1]
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))
    return f


def _zarr_reads_in_flight() -> int:
    import asyncio

    from zarr.core.sync import sync

    async def count():
        return sum(not t.done() for t in asyncio.all_tasks() if t is not asyncio.current_task())

    return sync(count())


def test_verify_names_flipped_chunk_and_repair_fixes_only_it(root, teacher_file):
    path = Path(run_teacher_cache(cfg(teacher_file), log=lambda *_: None))
    before = arrays_of(path)
    assert runner.invoke(app, ["verify", str(path)]).exit_code == 0
    f = _flip_byte(path)
    block = int(f.relative_to(path / "features" / "layer2" / "c").parts[0])
    res = runner.invoke(app, ["verify", str(path)])
    assert res.exit_code == 1
    assert f"features/layer2 chunk {block} (rows {block * 64}-{block * 64 + 63}): crc32c checksum mismatch" \
        in res.stdout
    # The student stage refuses the corrupt chunk with one line instead of training on it.
    with pytest.raises(KDCacheError, match="run `kdcache verify` then `kdcache repair`"):
        run_train_student(StudentConfig(cache=str(path), loss="fitnets=1", fitnets_hint="layer2",
                                        fitnets_schedule="single", fitnets_guided="block1", epochs=1, workers=0,
                                        out="run", test_data=SYN))
    # ...and leaves none of zarr's sibling chunk reads in flight: a process exiting on the error would close zarr's
    # loop under them, printing dozens of asyncio tracebacks below the one line.
    assert _zarr_reads_in_flight() == 0
    # Also when a DataLoader worker meets it (the default): one line, not the worker's traceback.
    res = runner.invoke(app, ["train-student", "--cache", str(path), "--loss", "fitnets=1", "--fitnets-hint",
                              "layer2", "--fitnets-guided", "block1", "--fitnets-schedule", "single", "--epochs", "1",
                              "--workers", "1", "--out", "run", "--test-data", SYN])
    errors = [line for line in res.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert res.exit_code == 2 and len(errors) == 1 and "run `kdcache verify` then `kdcache repair`" in errors[0], \
        res.stderr
    computed = []
    real = tc.teacher_outputs_async
    with pytest.MonkeyPatch.context() as m:
        m.setattr(tc, "teacher_outputs_async", lambda p, idx, *a, **k: computed.append(len(idx)) or real(
            p, idx, *a, **k))
        res = runner.invoke(app, ["repair", str(path)])
    assert res.exit_code == 0, res.output
    assert "recomputing 1 bad chunk(s)" in res.stderr and "128/192 samples already cached" in res.stderr
    assert computed == [64]  # one unit recomputed, no more
    after = arrays_of(path)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


def test_verify_recompute_passes_then_fails_on_tampered_values(root, teacher_file):
    path = run_teacher_cache(cfg(teacher_file), log=lambda *_: None)
    res = runner.invoke(app, ["verify", path, "--recompute", "16", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["recompute"]["ok"] and rep["recompute"]["arrays"]["logits"]["max_rel"] <= 1e-2
    g = zarr.open_group(path, mode="r+")
    row = g["logits"][5].astype(np.float32)
    step = np.maximum(1.0, np.abs(row)) * 1e-2  # the float16 tolerance, relative to max(1, |x|)
    g["logits"][5] = (row + 0.4 * step).astype(np.float16)  # inside it, float16 rounding included: still good
    res = runner.invoke(app, ["verify", path, "--recompute", "192"])
    assert res.exit_code == 0, res.output
    g["logits"][5] = (row + 2 * step).astype(np.float16)    # valid chunk, values just twice the tolerance off
    res = runner.invoke(app, ["verify", path, "--recompute", "192"])
    assert res.exit_code == 1 and "BAD  recompute logits" in res.stdout


def test_verify_recompute_names_the_chunk_of_a_tampered_row_among_a_few(root, teacher_file):
    """With --recompute N < all rows, each tampered output is named by the chunk its row lies in (what repair
    --recompute redoes), not by the row's position among the N samples drawn."""
    from pipeline.verify import repair_store, verify_store

    path = run_teacher_cache(cfg(teacher_file, dtype="float32", layers=[]), log=lambda *_: None)
    before = arrays_of(path)
    # the rows verify draws, computed independently: 20 of 192, sorted, from default_rng(seed)
    seed = 3
    drawn = np.sort(np.random.default_rng(seed).choice(192, 20, replace=False))
    row = int(drawn[-1])  # the last drawn row: position 19 among the drawn, in chunk row // 64 of the store
    assert row // 64 == 2, drawn  # far from its position's chunk (0), the case this test is about
    g = zarr.open_group(path, mode="r+")
    g["logits"][row] = g["logits"][row] + 1.0
    rep = verify_store(path, recompute=20, seed=seed)
    assert not rep.ok and rep.recompute["samples"] == 20
    assert [(p.array, p.block, p.start, p.end, p.view) for p in rep.recompute["problems"]] == \
        [("logits", 2, 128, 192, None)]
    assert repair_store(path, log=lambda *_: None, recompute=20, seed=seed).ok
    for name, v in arrays_of(path).items():
        np.testing.assert_array_equal(v, before[name], err_msg=name)


def test_a_single_non_finite_output_stops_the_cache(root, teacher_file, monkeypatch):
    """One sample's non-finite logit (a single overflow) is refused like a whole unit of them, with its unit's rows:
    it would otherwise be stored, and verify's NaN check or the student's loss would meet it later."""
    from pipeline.models import TeacherNet

    real, calls = TeacherNet.forward, {"n": 0}

    def one_inf(self, x):
        out = real(self, x)
        if len(x) == 32:  # teacher-cache's batches (not the 2-sample probe)
            calls["n"] += 1
            if calls["n"] == 4:  # the second batch of the second unit: rows 96-127
                out = out.clone()
                out[5, 1] = float("inf")
        return out

    monkeypatch.setattr(TeacherNet, "forward", one_inf)
    with pytest.raises(KDCacheError, match="non-finite logits in rows 64-127; use --dtype float32"):
        run_teacher_cache(cfg(teacher_file, layers=[], writers=1), log=lambda *_: None)


def test_missing_chunk_reported_with_range(root, teacher_file):
    path = Path(run_teacher_cache(cfg(teacher_file), log=lambda *_: None))
    (path / "logits" / "c" / "2" / "0").unlink()
    res = runner.invoke(app, ["verify", str(path)])
    assert res.exit_code == 1 and "logits chunk 2 (rows 128-191): missing (never written)" in res.stdout


def test_two_concurrent_readers(root, teacher_file):
    path = run_teacher_cache(cfg(teacher_file, layers=["avgpool"]), log=lambda *_: None)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "train-student", "--cache", path, "--loss",
                               "kd=1,rkd=1", "--epochs", "2", "--batch-size", "32", "--workers", "1",
                               "--test-data", "synthetic:64:1x16x16:4:1", "--out", f"run{i}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    accs = [json.loads(o[0].strip().splitlines()[-1])["test_acc"] for o in outs]
    assert accs[0] == accs[1]  # same seed, same store, read concurrently: same result
    assert st.open_store(path).manifest["complete"]


def test_disk_full_is_a_clean_error_and_rerun_resumes(root, teacher_file, monkeypatch):
    calls = {"n": 0}

    def filling_disk(src, dst):  # the store's rename of a written temporary into place: the disk fills on the 2nd
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.replace(src, dst)

    args = ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--layer", "layer2",
            "--chunk-samples", "64", "--writers", "1", "--out", "full.zarr"]
    with monkeypatch.context() as m:
        m.setattr(st, "os", SimpleNamespace(**({k: getattr(os, k) for k in dir(os) if not k.startswith("_")}
                                               | {"replace": filling_disk})))
        res = runner.invoke(app, args)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert "disk full" in lines[-1] and "re-run the same command" in lines[-1]
    assert not list(Path("full.zarr").rglob(".*.tmp"))  # the failed chunk's temporary is gone
    with pytest.raises(KDCacheError, match="incomplete"):
        st.open_store("full.zarr")
    missing = int((~st.committed_units(st.open_group("full.zarr", "r"))).sum())
    assert 0 < missing < 3
    # A temporary left by a writer killed mid-chunk (SIGKILL skips the cleanup above) is removed on resume.
    stale = Path("full.zarr", "logits", "c", ".0.99999.1.tmp")
    stale.write_bytes(b"half a chunk")
    computed = []
    real = tc.teacher_outputs_async
    monkeypatch.setattr(tc, "teacher_outputs_async", lambda p, idx, *a, **k: computed.append(len(idx)) or real(
        p, idx, *a, **k))
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "already cached" in res.stderr
    assert computed == [64] * missing  # the teacher ran on the missing units alone
    assert not stale.exists() and not list(Path("full.zarr").rglob(".*.tmp"))
    clean = run_teacher_cache(cfg(teacher_file, out="clean.zarr"), log=lambda *_: None)
    for name, v in arrays_of(clean).items():
        np.testing.assert_array_equal(v, arrays_of("full.zarr")[name])


def test_a_quota_exceeded_or_a_name_too_long_is_one_line(root, teacher_file, monkeypatch):
    """EDQUOT (a user's quota on a shared disk) is a full disk for that user, and ENAMETOOLONG a path to fix: both
    were OSError tracebacks."""
    def over_quota(src, dst):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    args = ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--chunk-samples", "64", "--writers", "1"]
    with monkeypatch.context() as m:
        m.setattr(st, "os", SimpleNamespace(**({k: getattr(os, k) for k in dir(os) if not k.startswith("_")}
                                               | {"replace": over_quota})))
        res = runner.invoke(app, [*args, "--out", "q.zarr"])
    assert res.exit_code == 2 and not isinstance(res.exception, OSError), res.exception
    assert "disk full (quota exceeded)" in res.stderr and "re-run the same command" in res.stderr, res.output
    long = "x" * 300 + ".zarr"
    for command in ([*args, "--out", long], ["verify", long]):
        res = runner.invoke(app, command)
        assert res.exit_code == 2 and "File name too long" in res.stderr and "check the path" in res.stderr, \
            res.output[-300:]


def test_bad_inputs(root, teacher_file):
    # corrupt image: the error names the file
    folder = root / "flat"
    _labelled_folder(folder)
    (folder / "b" / "2.png").write_bytes(b"not a png")
    w = save_teacher(root / "t2.pt", num_classes=2)
    res = runner.invoke(app, ["teacher-cache", "--data", f"imagefolder:{folder}", "--weights", str(w)])
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and errors == res.stderr.strip().splitlines()[-1:]
    assert "cannot read image" in errors[0] and "2.png" in errors[0]
    partial = next((root / "data" / "cache").glob("*.zarr"))   # the blocks before the bad file are kept ...
    assert f"the partial store {partial} can then be deleted" in errors[0]
    with pytest.raises(KDCacheError, match="incomplete"):     # ... and the store never reads as complete
        st.open_store(partial)
    # a store of another format version
    path = run_teacher_cache(cfg(teacher_file), log=lambda *_: None)
    g = zarr.open_group(path, mode="r+")
    g.attrs["kdcache"] = dict(g.attrs["kdcache"], format_version=99)
    res = runner.invoke(app, ["train-student", "--cache", path])
    assert res.exit_code == 2 and "store format 99" in res.stderr
    # an explicit --out holding another cache is never overwritten without --force
    other = run_teacher_cache(cfg(teacher_file, layers=[], out="x.zarr"), log=lambda *_: None)
    with pytest.raises(KDCacheError, match="holds a different cache"):
        run_teacher_cache(cfg(teacher_file, out=other), log=lambda *_: None)
    # ... and a folder that is no store is never emptied, not even with --force
    mine = root / "my-results"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    for force in (False, True):
        with pytest.raises(KDCacheError, match="is not a kdcache store"):
            run_teacher_cache(cfg(teacher_file, out=str(mine), force=force), log=lambda *_: None)
    assert (mine / "notes.txt").read_text() == "precious"
    # ... nor when named by a URL (zarr deleted every file under it to create the store)
    (mine / "sub").mkdir()
    (mine / "sub" / "more.txt").write_text("also precious")
    for force in (False, True):
        with pytest.raises(KDCacheError, match="is not a kdcache store"):
            run_teacher_cache(cfg(teacher_file, out=f"file://{mine}/", force=force), log=lambda *_: None)
    with pytest.raises(KDCacheError, match="is a file, not a cache folder"):
        run_teacher_cache(cfg(teacher_file, out=f"file://{mine / 'notes.txt'}"), log=lambda *_: None)
    assert (mine / "notes.txt").read_text() == "precious" and (mine / "sub" / "more.txt").is_file()
    # plan (teacher-cache's flags) printed that file as the path its store would have
    res = runner.invoke(app, ["plan", "--data", SYN, "--weights", str(teacher_file), "--out", str(mine / "notes.txt")])
    assert res.exit_code == 2 and "notes.txt exists and is a file, not a cache folder" in res.stderr, res.output


def test_cache_dir_as_fsspec_url(root, teacher_file):
    """A URL cache dir: its arrays equal a local cache's. A file:// store is a folder on this disk and is written as
    one: chunks and metadata renamed into place, fsynced, a lost chunk found and redone on resume; a chained URL
    (simplecache::file://) reads it through fsspec."""
    url_dir = f"file://{root / 'remote'}"
    path = run_teacher_cache(cfg(teacher_file, cache_dir=url_dir), log=lambda *_: None)
    assert path.startswith(url_dir) and path.endswith(".zarr")
    logs = []
    assert run_teacher_cache(cfg(teacher_file, cache_dir=url_dir), log=logs.append) == path
    assert any("cache hit" in m for m in logs)
    local = run_teacher_cache(cfg(teacher_file), log=lambda *_: None)
    assert Path(local).stem == Path(path).stem  # the key does not depend on where the cache lives
    remote = arrays_of(root / "remote" / Path(local).name)
    for name, v in arrays_of(local).items():
        np.testing.assert_array_equal(remote[name], v, err_msg=name)
    folder = root / "remote" / Path(local).name
    g = st.open_group(path, "r+")
    assert st.local_root(g) == str(folder) and not list(folder.rglob("*.tmp"))
    inode = (folder / "zarr.json").stat().st_ino  # the manifest is replaced by a rename, never rewritten in place
    g.attrs["probe"] = 1  # (fsspec's local file system rewrote it in place: a kill mid-write left it unreadable)
    assert (folder / "zarr.json").stat().st_ino != inode
    del g.attrs["probe"]
    g.attrs[st.MANIFEST_KEY] = dict(g.attrs[st.MANIFEST_KEY], complete=False)  # a power cut lost a chunk's rename
    st.chunk_file(folder, "logits", g.attrs[st.MANIFEST_KEY]["arrays"]["logits"], 1, 0).unlink()
    logs = []
    assert run_teacher_cache(cfg(teacher_file, cache_dir=url_dir), log=logs.append) == path
    assert any("1 unit(s)" in m for m in logs), logs
    for name, v in arrays_of(local).items():
        np.testing.assert_array_equal(arrays_of(folder)[name], v, err_msg=name)
    assert runner.invoke(app, ["verify", path]).exit_code == 0
    res = runner.invoke(app, ["verify", f"simplecache::{path}"])  # a chained URL (was "fsspec knows no protocol")
    assert res.exit_code == 0, res.output
    listed = json.loads(runner.invoke(app, ["ls", "--cache-dir", url_dir, "--json"]).stdout)
    on_disk = sum(f.stat().st_size for f in (root / "remote").rglob("*") if f.is_file() and f.suffix != ".lock")
    assert [c["path"] for c in listed] == [path] and listed[0]["bytes"] == on_disk and listed[0]["complete"]
    info = json.loads(runner.invoke(app, ["inspect", path, "--json"]).stdout)
    assert info["bytes"] == on_disk and info["arrays"]["logits"]["stored_bytes"] == sum(
        f.stat().st_size for f in (root / "remote" / Path(local).name / "logits" / "c").rglob("*") if f.is_file())
    s = run_train_student(StudentConfig(cache=path, epochs=1, workers=1, out="run", test_data=SYN))
    assert s["test_acc"] is not None
    # memory:// works from Python, within one process; the command line says it will not outlive the command
    mem = run_teacher_cache(cfg(teacher_file, cache_dir="memory://caches"), log=lambda *_: None)
    assert run_train_student(StudentConfig(cache=mem, epochs=1, workers=0, out="run-mem", test_data=SYN),
                             log=lambda *_: None)["test_acc"] is not None
    # an object store: a chunk object deleted under its marker (a lifecycle rule) is found by listing and redone
    import fsspec

    g = st.open_group(mem, "r+")
    assert st.local_root(g) is None
    g.attrs[st.MANIFEST_KEY] = dict(g.attrs[st.MANIFEST_KEY], complete=False)
    fsspec.filesystem("memory").rm(f"{mem}/logits/c/2/0")
    logs = []
    assert run_teacher_cache(cfg(teacher_file, cache_dir="memory://caches"), log=logs.append) == mem
    assert any("1 unit(s) were marked committed" in m for m in logs), logs
    g = st.open_group(mem, "r")
    for name, v in arrays_of(local).items():
        np.testing.assert_array_equal(g[name][:], v, err_msg=name)
    res = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--cache-dir",
                              "memory://caches"])
    assert res.exit_code == 0 and "lives in this process only" in res.stderr
    # a protocol's root: `--cache-dir memory://` made a local folder named "memory:" and printed memory:/KEY.zarr
    assert run_teacher_cache(cfg(teacher_file, cache_dir="memory://"), log=lambda *_: None).startswith("memory://")
    assert not Path("memory:").exists()
    with pytest.raises(KDCacheError, match="file:// names no folder"):  # ... and file:// a folder named "file:"
        run_teacher_cache(cfg(teacher_file, cache_dir="file://"), log=lambda *_: None)


@pytest.mark.parametrize("damage", ["lost", "garbled"])
@pytest.mark.parametrize("where", ["s.zarr", "memory://lost/s.zarr"])
def test_a_committed_unit_whose_distortion_row_is_lost_is_redone(root, teacher_file, where, damage):
    """A unit's `_stats` row lost under its marker (a power cut before the final fsync; an object deleted by a
    lifecycle rule) read as NaN: the resumed run marked the store complete with NaN distortion and teacher accuracy
    ("teacher top-1 accuracy ...: nan%"), and verify then failed it; garbled (a checksum error), completing the
    store stopped with zarr's ValueError traceback. Now the unit is recomputed like a lost chunk."""
    out = where.replace("lost", damage)  # memory:// lives as long as the process: one store per case
    path = run_teacher_cache(cfg(teacher_file, out=out, layers=[]), log=lambda *_: None)
    want = st.open_store(path).manifest
    g = st.open_group(path, "r+")
    g.attrs[st.MANIFEST_KEY] = dict(g.attrs[st.MANIFEST_KEY], complete=False)
    g[st.COMMIT][0, 0] = 0  # interrupted before its last unit
    fs, base = st.filesystem(path)
    if damage == "lost":
        fs.rm_file(f"{base}/{st.STATS}/c/2/0/0")
    else:
        fs.pipe_file(f"{base}/{st.STATS}/c/2/0/0", b"garbled bytes")
    logs = []
    assert run_teacher_cache(cfg(teacher_file, out=out, layers=[]), log=logs.append) == path
    assert any("1 unit(s) were marked committed" in m for m in logs), logs
    man = st.open_store(path).manifest
    assert man["stats"]["samples_computed"] == 128  # units 0 and 2
    assert man["distortion"] == want["distortion"] and man["teacher"]["accuracy"] == want["teacher"]["accuracy"]
    res = runner.invoke(app, ["verify", path])
    assert res.exit_code == 0, res.output


def test_a_url_whose_fsspec_backend_is_missing_names_it(root, teacher_file, monkeypatch):
    """s3:// needs s3fs, which kdcache does not install: every command says so in one line, not 'not a store'."""
    import fsspec

    real = fsspec.get_filesystem_class

    def no_s3fs(protocol):
        if protocol == "s3":
            raise ImportError("Install s3fs to access S3")
        return real(protocol)

    monkeypatch.setattr(fsspec, "get_filesystem_class", no_s3fs)
    for args in (["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--cache-dir", "s3://b/caches"],
                 ["verify", "s3://b/caches/x.zarr"], ["train-student", "--cache", "s3://b/caches/x.zarr"],
                 ["ls", "--cache-dir", "s3://b/caches"], ["inspect", "s3://b/caches/x.zarr"],
                 ["verify", "simplecache::s3://b/caches/x.zarr"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "s3:// needs a package kdcache does not install (Install s3fs" in res.stderr, \
            (args, res.output)
    res = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--cache-dir", "nope://x"])
    assert res.exit_code == 2 and "fsspec knows no protocol 'nope://'" in res.stderr


def test_an_object_store_gets_its_credentials_from_fsspecs_own_configuration(root, teacher_file, monkeypatch):
    """kdcache takes no credential flags: a URL's options (keys, endpoint, anon...) come from fsspec's configuration
    (FSSPEC_<PROTOCOL>_<OPTION> variables, or JSON files in ~/.config/fsspec) on every open, writer, reader and
    verify alike. Without them the store cannot be reached, and every command says so in one line."""
    import fsspec.config
    from fsspec.implementations.memory import MemoryFileSystem

    class NeedsToken(MemoryFileSystem):  # an object store that refuses a client without its token
        protocol = "kdcred"

        def __init__(self, *args, token=None, **kw):
            if token != "s3cret":
                raise PermissionError("Access Denied")
            super().__init__(*args, **kw)

        @classmethod
        def _strip_protocol(cls, path):
            return MemoryFileSystem._strip_protocol(str(path).replace("kdcred://", "memory://", 1))

    # (fsspec.registry is also the name of a read-only view the package exports; the module holds the dict)
    monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, "kdcred", NeedsToken)
    monkeypatch.setitem(fsspec.config.conf, "kdcred", {"token": "s3cret"})  # what FSSPEC_KDCRED_TOKEN=s3cret sets
    path = run_teacher_cache(cfg(teacher_file, cache_dir="kdcred://creds"), log=lambda *_: None)
    assert path.startswith("kdcred://creds/")
    assert runner.invoke(app, ["verify", path]).exit_code == 0
    s = run_train_student(StudentConfig(cache=path, epochs=1, workers=0, out="run-cred", test_data=SYN),
                          log=lambda *_: None)
    assert s["test_acc"] is not None
    monkeypatch.delitem(fsspec.config.conf, "kdcred")
    for args in (["verify", path], ["inspect", path], ["train-student", "--cache", path, "--out", "run-nocred"],
                 ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--cache-dir", "kdcred://creds"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "PermissionError: Access Denied" in res.stderr and "credentials" in res.stderr \
            and len(res.stderr.strip().splitlines()) == 1, (args, res.output)


def test_a_store_is_checked_from_anywhere_and_after_its_teacher_moved(root, teacher_file, monkeypatch):
    Path("t.pt").write_bytes(teacher_file.read_bytes())
    res = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", "t.pt", "--chunk-samples", "64",
                              "--out", "s.zarr"])  # named relative to this directory
    assert res.exit_code == 0, res.output
    (root / "elsewhere").mkdir()
    monkeypatch.chdir(root / "elsewhere")
    res = runner.invoke(app, ["verify", "../s.zarr", "--recompute", "4"])
    assert res.exit_code == 0, res.output
    (root / "t.pt").rename(root / "moved.pt")
    res = runner.invoke(app, ["verify", "../s.zarr", "--recompute", "4"])
    assert res.exit_code == 2 and "pass --weights FILE" in res.stderr
    res = runner.invoke(app, ["verify", "../s.zarr", "--recompute", "4", "--weights", "../moved.pt"])
    assert res.exit_code == 0, res.output
    save_teacher(root / "other.pt", seed=1)   # the wrong weights or data given: which flag to fix, in one line
    res = runner.invoke(app, ["verify", "../s.zarr", "--recompute", "4", "--weights", "../other.pt"])
    assert res.exit_code == 2 and "are not the ones that made" in res.stderr and "pass --weights FILE with the " \
        "weights that made it" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output
    res = runner.invoke(app, ["verify", "../s.zarr", "--recompute", "4", "--weights", "../moved.pt", "--data",
                              "synthetic:192:1x16x16:4:7"])
    assert res.exit_code == 2 and "pass --data SPEC with the data that made it" in res.stderr, res.output
    st.open_group(str(root / "s.zarr"), "r+")[st.COMMIT][1, 0] = 0   # one unit to redo, with the moved teacher
    res = runner.invoke(app, ["repair", "../s.zarr", "--weights", "../moved.pt"])
    assert res.exit_code == 0 and "recomputing 1 bad chunk(s)" in res.stderr, res.output


@pytest.mark.parametrize("command", ["verify", "repair"])
def test_a_given_data_that_does_not_open_or_is_other_data_is_refused_without_recompute(root, teacher_file, command):
    """--data also serves the check of the stored labels: one that is malformed, or is not the store's data, was
    passed over there, and verify (or repair, with nothing to redo) said OK having checked nothing against it."""
    path = run_teacher_cache(cfg(teacher_file, out="s.zarr"), log=lambda *_: None)
    res = runner.invoke(app, [command, path, "--data", "synthetic:10:0x8x8"])
    assert res.exit_code == 2 and res.stderr.startswith("error: bad synthetic spec 'synthetic:10:0x8x8'") \
        and len(res.stderr.strip().splitlines()) == 1, res.output
    res = runner.invoke(app, [command, path, "--data", "synthetic:192:1x16x16:4:7"])
    assert res.exit_code == 2 and res.stderr.startswith(f"error: data synthetic:192:1x16x16:4:7 is not the data "
                                                        f"{path} was made from (fingerprint ") \
        and res.stderr.endswith("); pass --data SPEC with the data that made it, or leave --data out\n"), res.output
    res = runner.invoke(app, [command, path, "--data", SYN])  # the store's own data: checked, and OK
    assert res.exit_code == 0 and res.stdout.strip().splitlines()[-1] == f"OK: {path}", res.output


def test_verify_names_a_repair_that_works_with_the_moved_teacher(root, teacher_file):
    """verify --recompute --weights (the teacher moved) that finds outputs other than the teacher's prints the repair
    command that redoes them: with that --weights (and --data), or the repair fails to find the teacher."""
    import shlex

    Path("t.pt").write_bytes(teacher_file.read_bytes())
    res = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", "t.pt", "--chunk-samples", "64",
                              "--out", "s.zarr"])
    assert res.exit_code == 0, res.output
    Path("t.pt").rename("moved.pt")
    g = zarr.open_group("s.zarr", mode="r+")
    g["logits"][5] = (g["logits"][5].astype(np.float32) + 1.0).astype(np.float16)  # a valid chunk, wrong values
    res = runner.invoke(app, ["verify", "s.zarr", "--recompute", "192", "--seed", "3", "--weights", "moved.pt"])
    assert res.exit_code == 1 and "BAD  recompute logits" in res.stdout, res.output
    hint = next(line for line in res.stdout.splitlines() if "redoes them" in line)
    command = shlex.split(hint.split("`")[1])
    assert command == ["kdcache", "repair", "s.zarr", "--recompute", "192", "--seed", "3", "--weights", "moved.pt"]
    res = runner.invoke(app, command[1:])
    assert res.exit_code == 0 and "recomputing 1 bad chunk(s)" in res.stderr, res.output
    assert runner.invoke(app, ["verify", "s.zarr", "--recompute", "192", "--weights", "moved.pt"]).exit_code == 0


def test_a_cpu_made_store_is_not_resumed_or_repaired_on_a_gpu(root, teacher_file, monkeypatch):
    """Units a GPU computes (float16 autocast) differ from a CPU-made store's float32 outputs beyond the tolerance
    verify --recompute gives it, so a resume or repair there would leave units verify flags, and repair
    --recompute on that GPU would redo them forever. Both refuse before touching the store; on the CPU both go
    on. (No GPU here: the prepared run is handed a cuda device, which the check reads before any CUDA call.)"""
    import torch

    from pipeline.teacher_cache import refuse_gpu_units_in_cpu_store

    for made, ok in (("cpu", False), ("cuda:0", True)):
        try:
            refuse_gpu_units_in_cpu_store("s.zarr", {"device": made}, torch.device("cuda", 1))
            assert ok, made
        except KDCacheError as e:
            assert not ok and "s.zarr was begun on the cpu" in str(e) and "add --device cpu" in str(e), str(e)
    refuse_gpu_units_in_cpu_store("s.zarr", {"device": "cpu"}, torch.device("cpu"))  # the CPU: any store

    path = run_teacher_cache(cfg(teacher_file), log=lambda *_: None)
    before = arrays_of(path)
    real = tc.prepare

    def on_a_gpu(*a, **k):
        from dataclasses import replace
        return replace(real(*a, **k), device=torch.device("cuda", 0))

    (Path(path) / "logits" / "c" / "1" / "0").unlink()
    g = st.open_group(path, "r+")
    g[st.COMMIT][1, :] = 0
    g.attrs[st.MANIFEST_KEY] = dict(g.attrs[st.MANIFEST_KEY], complete=False)  # as a run killed before unit 1
    with monkeypatch.context() as m:
        m.setattr(tc, "prepare", on_a_gpu)
        with pytest.raises(KDCacheError, match="was begun on the cpu.*add --device cpu"):
            run_teacher_cache(cfg(teacher_file), log=lambda *_: None)
        line = _one_line(runner.invoke(app, ["repair", path]))
        assert f"{path} was begun on the cpu" in line, line
    assert st.open_group(path, "r")[st.COMMIT][1, 0] == 0  # untouched: still the one unit to do
    assert runner.invoke(app, ["repair", path]).exit_code == 0
    for name, v in arrays_of(path).items():
        np.testing.assert_array_equal(v, before[name], err_msg=name)


def test_repair_of_a_store_made_on_a_gpu_this_machine_lacks(root, teacher_file):
    """A store made with --device cuda:N records that device, and repair re-runs the store's own settings: on a
    machine without it, it failed saying `use --device cpu`, a flag repair did not have. `repair --device` now
    picks where the units are recomputed (verify --recompute's check still runs on the CPU)."""
    path = run_teacher_cache(cfg(teacher_file), log=lambda *_: None)
    before = arrays_of(path)
    g = st.open_group(path, "r+")
    man = g.attrs[st.MANIFEST_KEY]
    g.attrs[st.MANIFEST_KEY] = dict(man, config=dict(man["config"], device="cuda:7"))  # as if made there
    (Path(path) / "logits" / "c" / "1" / "0").unlink()
    line = _one_line(runner.invoke(app, ["repair", path]))
    assert "--device cuda:7: this machine has" in line and "use --device cpu" in line, line
    res = runner.invoke(app, ["repair", path, "--device", "cpu", "--recompute", "8"])
    assert res.exit_code == 0 and "recomputing 1 bad chunk(s): 1" in res.stderr, res.output
    for name, v in arrays_of(path).items():
        np.testing.assert_array_equal(v, before[name], err_msg=name)


def test_two_ranks_under_torchrun_fill_one_store_like_one_process(root, teacher_file):
    """torchrun ranks own disjoint units of one store (no shared file, no resize): the result equals a single
    process's, bit for bit, each rank computed a share, and a resumed multi-rank run redoes only what is missing.
    With views: each view's parameters depend on (seed, sample, view) only, not on the rank that drew them."""
    data = "synthetic:384:1x16x16:4"
    flags = ["teacher-cache", "--data", data, "--weights", str(teacher_file), "--layer", "layer2",
             "--chunk-samples", "64", "--batch-size", "32", "--writers", "1", "--views", "2",
             "--augment", "crop=0.5-1,flip"]
    shared = root / "ranks.zarr"
    res = run_ranks("-m", "pipeline", *flags, "--out", shared)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines() == [str(shared)]  # printed once, by rank 0
    stats = st.open_store(shared).manifest["stats"]
    assert stats["ranks"] == 2 and stats["units_per_rank"] == [6, 6]
    single = run_teacher_cache(cfg(teacher_file, data=data, out=str(root / "one.zarr"), writers=1, views=2,
                                   augment="crop=0.5-1,flip"), log=lambda *_: None)
    assert_same_arrays(shared, single)
    a = arrays_of(shared)
    # Undo three units of the single-process store (data overwritten, markers cleared, not complete): two ranks
    # resume it and compute those three alone.
    g = st.open_group(single, "r+")
    for block in (0, 3, 5):
        g["logits"][block * 64:(block + 1) * 64, 0] = 0
        g[st.COMMIT][block, 0] = 0
    g.attrs[st.MANIFEST_KEY] = dict(g.attrs[st.MANIFEST_KEY], complete=False)
    res = run_ranks("-m", "pipeline", *flags, "--out", single)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already cached" in res.stderr
    assert st.open_store(single).manifest["stats"]["units_per_rank"] == [2, 1]
    for name, v in arrays_of(single).items():
        np.testing.assert_array_equal(v, a[name], err_msg=name)


def test_ranks_that_disagree_on_a_cache_hit_do_not_wait_for_each_other(root, teacher_file):
    """Another run can complete the store between the ranks' hit checks: the rank that saw it complete returned
    while the others waited for it at their next meeting, for hours. Now every rank goes on as rank 0 decides."""
    script = root / "race.py"
    script.write_text(
        "import os, sys\nimport pipeline.store as st\nfrom pipeline.teacher_cache import CacheConfig, "
        "run_teacher_cache\n"
        "if os.environ['RANK'] == '1':  # as if another run completed it just before this rank's check\n"
        "    st.is_complete = lambda path, key: True\n"
        f"path = run_teacher_cache(CacheConfig(data={SYN!r}, weights={str(teacher_file)!r}, chunk_samples=64, "
        "out=sys.argv[1], device='cpu'), log=lambda *_: None)\n"
        "sys.stdout.write(path + '\\n')  # one write: the ranks share the pipe\n")
    res = run_ranks(script, "s.zarr", timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["s.zarr", "s.zarr"]
    assert st.open_store("s.zarr").manifest["stats"]["units_per_rank"] == [2, 1]


def test_ranks_that_resolve_other_caches_write_nothing(root, teacher_file):
    """A rank that sees other data (or weights) under the same names, on another node say, filled its share of rank
    0's store with its own teacher outputs on its own data, and the store was marked complete. Every rank now
    refuses before anything is written."""
    script = root / "disagree.py"
    script.write_text(
        "import os, sys\nfrom pipeline.errors import KDCacheError\n"
        "from pipeline.teacher_cache import CacheConfig, run_teacher_cache\n"
        f"data = {SYN!r} + (':1' if os.environ['RANK'] == '1' else '')  # rank 1: another sample of the data\n"
        "try:\n"
        f"    run_teacher_cache(CacheConfig(data=data, weights={str(teacher_file)!r}, chunk_samples=64, "
        "out=sys.argv[1], device='cpu'), log=lambda *_: None)\n"
        "except KDCacheError as e:\n"
        "    sys.stdout.write(f'rank {os.environ[\"RANK\"]}: {e}\\n')  # one write: the ranks share the pipe\n")
    res = run_ranks(script, "s.zarr", timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = sorted(res.stdout.strip().splitlines())
    assert [line[:8] for line in lines] == ["rank 0: ", "rank 1: "], res.stdout
    assert all(line[8:].startswith("the ranks disagree on the cache: rank 0 resolved key ") and
               ", rank 1 key " in line and "every rank must see the same teacher weights and data" in line
               for line in lines), res.stdout
    assert not Path("s.zarr").exists()


def test_ranks_cannot_share_a_memory_store(root, teacher_file):
    """memory:// is one process's: under torchrun rank 0 would create the store where no other rank sees it, and
    rank 1 died with zarr's GroupNotFoundError traceback. Every rank refuses it in one line."""
    res = run_ranks("-m", "pipeline", "teacher-cache", "--data", SYN, "--weights", teacher_file,
                    "--chunk-samples", "64", "--cache-dir", "memory://caches")
    assert res.returncode != 0
    assert res.stderr.count("a memory:// store lives in one process, so 2 ranks cannot fill it together") == 2
    assert "[rank1]: Traceback" not in res.stderr and "[rank0]: Traceback" not in res.stderr, res.stderr[-2000:]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_closing_the_ranks_ends_the_gloo_threads_even_after_torchvision_is_imported(root):
    """torchvision, imported once the group is up (store.versions writing a manifest, augment's roi_align), imports
    torch.distributed.nn.functional, whose default arguments held the group: destroy_process_group could not free
    it, its gloo threads ran on into interpreter exit, and a few two-rank teacher-cache runs in a hundred died by
    SIGABRT after its store was complete ("terminate called without an active exception": a gloo worker freeing
    the last all_gather's tensors took the GIL while the interpreter was finalising). After close no gloo thread
    is left on any rank."""
    script = root / "close.py"
    script.write_text(
        "import os, sys\nfrom pipeline.ranks import Ranks\nfrom pipeline.store import versions\n"
        "ranks = Ranks.from_env()\nranks.gather(ranks.rank)\nversions()  # imports torchvision\nranks.close()\n"
        "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
        "sys.stdout.write(f'rank {ranks.rank} gloo threads {sorted(n for n in names if \"gloo\" in n)}\\n')\n")
    res = run_ranks(script, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(res.stdout.splitlines()) == ["rank 0 gloo threads []", "rank 1 gloo threads []"], res.stdout


@contextmanager
def _writer_elsewhere(path):
    """Another process holding `path`'s writer lock (as a teacher-cache run writing it does) for the block; the
    process, for its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pipeline import store\nwith store.writer_lock(sys.argv[1]):\n"
         "    print('held', flush=True)\n    time.sleep(60)\n", path],
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_refused_teacher_cache_leaves_no_lock_file_behind(root, teacher_file, monkeypatch):
    """teacher-cache takes the store's writer lock before its checks of --out: refused (a folder that is no store,
    the working folder), it left `DIR.lock` beside DIR. A run removes the lock file it made, not one it found: a
    writer's lock stays while it writes. A run that opened the lock file before a failed run removed it locks the
    file at that path after all (holding the removed one, it would not exclude the next run)."""
    import platform

    Path("mine").mkdir()
    Path("mine", "notes.txt").write_text("precious")
    Path("work").mkdir()
    before = sorted(p.name for p in root.iterdir())
    res = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--out", "mine"])
    assert res.exit_code == 2 and "mine exists and is not a kdcache store" in res.stderr, res.output
    with monkeypatch.context() as m:
        m.chdir("work")
        res = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--out", "."])
        assert res.exit_code == 2 and "is the folder this command runs in" in res.stderr, res.output
        assert not list(Path.cwd().iterdir())
    assert sorted(p.name for p in root.iterdir()) == before
    # a refused run leaves a lock it found (a writer's) where it was
    path = run_teacher_cache(cfg(teacher_file, out="s.zarr", layers=[]), log=lambda *_: None)
    with _writer_elsewhere(path) as holder:
        with pytest.raises(KDCacheError, match=f"another run \\(pid {holder.pid} on"):
            run_teacher_cache(cfg(teacher_file, out=path, layers=[], force=True), log=lambda *_: None)
        assert st.writer(path) == f"pid {holder.pid} on {platform.node()}"
    # the lock file this run opened was removed (by a failed run) before it took the lock: it locks the one there
    lock = os.path.realpath("t.zarr") + ".lock"
    Path(lock).write_text("")
    stale = open(lock)  # noqa: SIM115 - the file the removed lock was
    os.unlink(lock)
    opened = []

    def first_the_removed(file, mode="r", *a, **kw):
        opened.append(mode)
        return stale if len(opened) == 1 else open(file, mode, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(st, "open", first_the_removed, raising=False)
        with st.writer_lock("t.zarr"):
            assert len(opened) == 2 and Path(lock).read_text() == f"pid {os.getpid()} on {platform.node()}\n"
            held = os.stat(lock).st_ino
    assert stale.closed and os.stat(lock).st_ino == held  # made by a run that succeeded: kept
    with pytest.raises(KeyboardInterrupt), st.writer_lock("u.zarr"):
        assert Path("u.zarr.lock").is_file()
        raise KeyboardInterrupt
    assert not Path("u.zarr.lock").exists()


def test_a_run_starting_while_someone_asks_who_writes_is_not_refused(root, teacher_file):
    """`writer()` (kdcache ls, an open of an incomplete store) holds a shared lock on the writer lock for an instant
    to see whether anyone writes; a teacher-cache starting in that instant was refused as if another run were
    writing. A lock held that briefly is waited for; one held for a run's length still refuses."""
    import fcntl
    import threading

    Path("s.zarr.lock").write_text("")
    asking = open("s.zarr.lock")  # noqa: SIM115 - another process's probe, as writer() makes it
    fcntl.flock(asking, fcntl.LOCK_SH | fcntl.LOCK_NB)
    done = threading.Timer(0.05, lambda: fcntl.flock(asking, fcntl.LOCK_UN))
    done.start()
    try:
        path = run_teacher_cache(cfg(teacher_file, out="s.zarr", layers=[]), log=lambda *_: None)
    finally:
        done.join()
        asking.close()
    assert st.open_store(path).manifest["complete"]
    with _writer_elsewhere(path) as holder:  # a writer holds it for good: refused, naming it
        with pytest.raises(KDCacheError, match=f"another run \\(pid {holder.pid} on"):
            run_teacher_cache(cfg(teacher_file, out=path, layers=[], force=True), log=lambda *_: None)


def test_a_lock_path_that_never_opens_is_an_error_not_a_hang(root, teacher_file):
    """The lock's retry (a failed run removed the file or its folder meanwhile) looped for ever on a lock path that
    never opens: a link left to a folder that does not exist. Now a bounded number of tries, then the path's own
    one-line error."""
    os.symlink(str(root / "gone" / "x"), "s.zarr.lock")
    res = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--out", "s.zarr"])
    assert res.exit_code == 2 and res.stderr.startswith("error: No such file or directory:") and \
        "s.zarr.lock" in res.stderr and len(res.stderr.splitlines()) == 1, res.output
    assert not Path("s.zarr").exists()


def test_a_run_whose_lock_folder_went_with_a_failed_runs_lock_takes_it_again(root, monkeypatch):
    """A failed train-student removes its lock file and then the run directory it made: a run that had opened the
    lock file before found it gone once it held it, and retried, but in a folder no longer there (it failed with
    "No such file or directory" instead of taking --out)."""
    Path("run").mkdir()
    lock = os.path.realpath("run") + "/.lock"
    Path(lock).write_text("")
    opened = []

    def first_the_removed(file, mode="r", *a, **kw):
        opened.append(mode)
        if len(opened) == 1:
            stale = open(lock)  # noqa: SIM115 - this run's open ...
            os.unlink(lock)  # ... then the failed run's clean-up: its lock file, the folder it made
            os.rmdir("run")
            return stale
        return open(file, mode, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(st, "open", first_the_removed, raising=False)
        with st.exclusive(lock, lambda who: f"busy: {who}"):
            assert Path(lock).read_text().startswith(f"pid {os.getpid()} on ")
    assert len(opened) == 2


def test_a_lock_file_this_user_may_not_write_still_says_who_writes(root, teacher_file, monkeypatch):
    """Another user's run left the lock beside a store (theirs, 0644), or the store lies on a read-only mount:
    verify and train-student on an incomplete store asked who writes it by opening the lock for appending, and
    failed with 'Permission denied: <store>.lock; ... choose another --out'. Reading it is enough."""
    import builtins

    path = run_teacher_cache(cfg(teacher_file, out="s.zarr"), log=lambda *_: None)
    g = st.open_group(path, "r+")
    g.attrs[st.MANIFEST_KEY] = dict(g.attrs[st.MANIFEST_KEY], complete=False)
    lock = os.path.abspath(path) + ".lock"

    def no_writes(file, mode="r", *a, **kw):  # as for a user without write permission on the lock file
        if str(file) == lock and any(c in mode for c in "wa+"):
            raise PermissionError(errno.EACCES, "Permission denied", file)
        return builtins.open(file, mode, *a, **kw)

    with _writer_elsewhere(path) as holder:
        monkeypatch.setattr(st, "open", no_writes, raising=False)
        for args in (["verify", path], ["train-student", "--cache", path, "--workers", "0"]):
            res = runner.invoke(app, args)
            assert res.exit_code == 2 and f"is being written now (pid {holder.pid} on" in res.stderr, res.output
    res = runner.invoke(app, ["verify", path])  # its writer gone: an incomplete store, said as such
    assert res.exit_code == 1 and "BAD  manifest: not marked complete" in res.stdout, res.output


def test_force_through_a_link_rebuilds_the_store_it_points_to(root, teacher_file):
    """`--force --out link.zarr`, link.zarr a symlink to a store: the store it points to is rebuilt in its place and
    the link kept. It renamed the link aside (a `.link.zarr.old-PID` link rmtree refuses to delete) and made a new
    store where the link was, leaving the old store on disk beside it."""
    path = Path(run_teacher_cache(cfg(teacher_file, out="kept/s.zarr"), log=lambda *_: None)).resolve()
    before = arrays_of(path)
    Path("link.zarr").symlink_to(path)
    (path / "logits" / "c" / "0" / "0").write_bytes(b"stale")  # rebuilt, not reused
    said = []
    got = run_teacher_cache(cfg(teacher_file, out="link.zarr", force=True), log=said.append)
    assert got.endswith("link.zarr") and any("--force: rebuilding" in str(x) for x in said), said
    assert Path("link.zarr").is_symlink() and Path("link.zarr").resolve() == path
    assert sorted(p.name for p in Path(".").iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.zarr", "s.zarr.lock"]  # nothing set aside left
    for name, v in arrays_of(path).items():
        np.testing.assert_array_equal(v, before[name], err_msg=name)
    assert runner.invoke(app, ["verify", str(path)]).exit_code == 0

def test_a_bad_device_or_missing_weights_is_refused_even_with_nothing_to_recompute(root, teacher_file):
    """`repair --device tpu` and `verify/repair --weights missing.pt` on a whole store said OK (nothing to repair or
    recompute, so the flags were never read): a mistyped flag passed for a checked one. Both are refused in one line
    before the store is read."""
    path = run_teacher_cache(cfg(teacher_file), log=lambda *_: None)
    assert runner.invoke(app, ["repair", path]).exit_code == 0  # whole: nothing to do
    assert _one_line(runner.invoke(app, ["repair", path, "--device", "tpu"])) == (
        "error: unknown --device 'tpu'; use auto, cpu, cuda or cuda:N")
    for command in ("verify", "repair"):
        assert _one_line(runner.invoke(app, [command, path, "--weights", "missing.pt"])) == (
            "error: --weights missing.pt: no such file; give where the teacher's weights lie now")


def test_repair_under_torchrun_is_refused_before_touching_the_store(root, teacher_file, monkeypatch):
    """Under torchrun every rank ran the whole repair: all but one failed on the store's writer lock ("being written
    now" by its sibling rank), and the rest of the run left a complete store marked incomplete."""
    path = run_teacher_cache(cfg(teacher_file, out="s.zarr"), log=lambda *_: None)
    Path(path, "logits", "c", "1", "0").unlink()
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = runner.invoke(app, ["repair", path])
    assert res.exit_code == 2 and res.stderr.strip() == ("error: repair runs as one process, not as 2 torchrun "
                                                         "ranks; run `kdcache repair s.zarr` without torchrun")
    assert st.open_store(path).manifest["complete"] is True  # untouched
    monkeypatch.delenv("WORLD_SIZE")
    assert runner.invoke(app, ["repair", path]).exit_code == 0


def test_one_writing_run_per_store_and_lost_chunks_are_redone(root, teacher_file):
    """A second run on a store another process is writing gets one line and touches nothing; `complete` is never set
    with a unit missing; a unit marked committed whose chunk file is gone (a power cut) is recomputed on resume."""
    path = run_teacher_cache(cfg(teacher_file, out="s.zarr"), log=lambda *_: None)
    before = arrays_of(path)
    with _writer_elsewhere(path) as holder:
        res = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--layer", "layer2",
                                  "--chunk-samples", "64", "--batch-size", "32", "--out", path, "--force"])
        assert res.exit_code == 2 and f"is writing {path}" in res.stderr and len(res.stderr.strip().splitlines()) == 1
        Path("link.zarr").symlink_to(Path(path).resolve())  # the same store through a link: the same lock
        res = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--layer", "layer2",
                                  "--chunk-samples", "64", "--batch-size", "32", "--out", "link.zarr", "--force"])
        assert res.exit_code == 2 and f"(pid {holder.pid} on" in res.stderr and "is writing link.zarr" in res.stderr
        assert Path("link.zarr").is_symlink()
        url = f"file://{Path(path).resolve()}/"  # the same folder by URL: the same lock (it had none, and rebuilt it)
        res = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--layer", "layer2",
                                  "--chunk-samples", "64", "--batch-size", "32", "--out", url, "--force"])
        assert res.exit_code == 2 and f"(pid {holder.pid} on" in res.stderr and f"is writing {url}" in res.stderr
        res = runner.invoke(app, ["repair", path])
        assert res.exit_code == 0 and "nothing to repair" in res.output  # a complete store needs no lock to check
        g = st.open_group(path, "r+")
        g.attrs[st.MANIFEST_KEY] = dict(g.attrs[st.MANIFEST_KEY], complete=False)  # as while it is being written
        res = runner.invoke(app, ["verify", path])  # work in progress, not damage
        assert res.exit_code == 2 and f"{path} is being written now (pid {holder.pid} on" in res.stderr
        res = runner.invoke(app, ["verify", url])
        assert res.exit_code == 2 and f"{url} is being written now (pid {holder.pid} on" in res.stderr
        res = runner.invoke(app, ["repair", path])  # says when to repair, not to verify
        assert res.exit_code == 2 and "is being written now" in res.stderr and "repair it when" in res.stderr
        res = runner.invoke(app, ["train-student", "--cache", path, "--workers", "0"])  # not "killed: resume it"
        assert res.exit_code == 2 and "is being written now" in res.stderr and "train from it when" in res.stderr
        g.attrs[st.MANIFEST_KEY] = dict(g.attrs[st.MANIFEST_KEY], complete=True)
    # The killed holder's lock is gone (taking it would raise otherwise), and this process's own lock is no other
    # writer (repair verifies under it).
    with st.writer_lock(path):
        assert st.writer(path) is None
    # The lock lies beside the store however the store is named: `.` or a trailing slash lock the folder itself.
    Path("here").mkdir()
    os.chdir("here")
    try:
        for name in (".", f"..{os.sep}here{os.sep}"):
            with st.writer_lock(name):
                assert Path("..", "here.lock").exists() and not Path("..lock").exists()
    finally:
        os.chdir("..")
    for name, v in arrays_of(path).items():
        np.testing.assert_array_equal(v, before[name], err_msg=name)  # --force was refused: nothing rebuilt
    g = st.open_group(path, "r+")
    g.attrs[st.MANIFEST_KEY] = dict(g.attrs[st.MANIFEST_KEY], complete=False)
    g[st.COMMIT][1, 0] = 0
    with pytest.raises(KDCacheError, match="1 unit\\(s\\) .* not committed"):
        st.mark_complete(g, {})
    g[st.COMMIT][1, 0] = 1
    Path(path, "features", "layer2", "c", "2", "0", "0", "0").unlink()  # block 2's chunk, its marker still set
    Path(path, "logits", "c", "1", "0").write_bytes(b"")  # block 1's: renamed into place, its data never reached disk
    logs = []
    run_teacher_cache(cfg(teacher_file, out="s.zarr"), log=logs.append)
    assert any("2 unit(s) were marked committed but their chunk files are missing" in m for m in logs), logs
    assert st.open_store(path).manifest["stats"]["samples_computed"] == 128
    for name, v in arrays_of(path).items():
        np.testing.assert_array_equal(v, before[name], err_msg=name)
    # The unit's _stats row lost the same way (written as unsynced as its marker): redone too, never completed into
    # a manifest whose distortion and teacher accuracy are NaN (verify then failed on the store just completed).
    man = st.open_store(path).manifest
    g = st.open_group(path, "r+")
    g.attrs[st.MANIFEST_KEY] = dict(g.attrs[st.MANIFEST_KEY], complete=False)
    Path(path, st.STATS, "c", "1", "0", "0").unlink()
    logs = []
    run_teacher_cache(cfg(teacher_file, out="s.zarr"), log=logs.append)
    assert any("1 unit(s) were marked committed but their chunk files are missing" in m for m in logs), logs
    after = st.open_store(path).manifest
    assert after["distortion"] == man["distortion"] and after["teacher"]["accuracy"] == man["teacher"]["accuracy"]
    assert runner.invoke(app, ["verify", path]).exit_code == 0


def test_odd_models_images_and_settings_give_one_line_errors(root, teacher_file):
    """What an adversarial audit found: each is one `error:` line (exit 2), never a traceback or a silent result."""
    from PIL import Image

    path = run_teacher_cache(cfg(teacher_file, layers=["avgpool"]), log=lambda *_: None)
    (root / "one" / "only").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "one" / "only" / "a.png")
    (root / "float").mkdir()
    Image.fromarray(np.ones((8, 8), np.float32), mode="F").save(root / "float" / "a.tiff")
    torch_save = __import__("torch").save
    torch_save({"state_dict": 5}, root / "odd.pt")
    (root / "fails_at_import.py").write_text("raise RuntimeError('needs a GPU')\n")
    (root / "bad_syntax.py").write_text("def f(:\n")
    cache = ["teacher-cache", "--data", SYN, "--weights", str(teacher_file)]
    train = ["train-student", "--cache", path, "--workers", "0", "--epochs", "1"]
    cases = [
        (["teacher-cache", "--data", SYN, "--teacher", "tests.odd_models:feature_map_teacher", "--weights",
          str(save_module(root, "map.pt"))], "not logits of shape (batch, classes)"),
        (["teacher-cache", "--data", SYN, "--teacher", "tests.odd_models:raising_model", "--weights", "odd.pt"],
         "raised ValueError while building the model: no such width"),
        (["teacher-cache", "--data", SYN, "--weights", "odd.pt"], "do not fit"),
        (cache + ["--layer", ""], "an empty module path"),
        (cache + ["--image-size", "100000"], "--image-size must be from 1 to 4096"),
        (cache + ["--aug-seed", str(2**64)], "--aug-seed"),
        (cache + ["--feature-codec", "foo"], "foo"),
        (cache + ["--views", "2", "--augment", "translate=1000"], "off the 16x16 images"),
        (["teacher-cache", "--data", f"imagefolder:{root / 'one'}", "--weights", str(teacher_file)], "single class"),
        (["teacher-cache", "--data", f"imagefolder:{root / 'float'}", "--weights", str(teacher_file)],
         "floating-point pixels"),
        (train + ["-T", "inf"], "--temperature must be a finite number"),
        (train + ["-T", "1e200"], "--temperature 1e+200 is too large: KD's T^2 scaling overflows float32"),  # not "diverged"
        (train + ["--lr", "inf"], "--lr must be a finite number"),
        (train + ["--seed", "-1"], "--seed must be 0 or more"),
        (train + ["--loss", "rkd=1", "--rkd-distance-weight", "0", "--rkd-angle-weight", "0"], "nothing to match"),
        # batches too small for any pair or triplet: the term was silently 0 every step
        (train + ["--loss", "rkd=1,ce=1", "--batch-size", "1"], "RKD's distance term compares pairs of samples in a "
                                                                "batch, so --batch-size 1 gives it nothing"),
        (train + ["--loss", "rkd=1", "--batch-size", "2"], "RKD's angle term compares triplets of samples in a batch, "
                                                           "so --batch-size 2 gives it nothing"),
        (train + ["--student", "tests.odd_models:ten_class_student"], "returns shape (10,) per sample"),
        # a tuple is no class count's doing: the fix said "build it with num_classes=4"
        (train + ["--student", "tests.odd_models:tuple_student"], "returns a tuple per sample, but the cache's teacher "
                                                                  "has 4 classes; build it to return one (batch, "
                                                                  "classes) tensor of class scores"),
        (train + ["--student", "tests.odd_models:ten_class_student"], "; build it with num_classes=4"),
        (train + ["--student", "tests.odd_models:raising_model"], "raised ValueError"),
        # the user's module failing as it is imported, not only the function it names: was a bare traceback
        (train + ["--student", "fails_at_import:f"], "cannot import model 'fails_at_import:f': importing module "
                                                     "'fails_at_import' raised RuntimeError: needs a GPU"),
        (cache + ["--teacher", "bad_syntax:f"], "cannot import model 'bad_syntax:f': importing module 'bad_syntax' "
                                                "raised SyntaxError"),
        # no weights, or none the loss reaches: the optimizer or the first backward raised a bare traceback
        (train + ["--student", "tests.odd_models:weightless_model"], "student tests.odd_models:weightless_model has "
                                                                    "no trainable parameters"),
        # a layer whose first axis is not the samples: RKD raised a size mismatch (or, with as many positions as
        # samples, would relate positions), FitNets named the wrong shape
        (train + ["--student", "tests.odd_models:sequence_first_student", "--loss", "kd=1,rkd=1",
                  "--rkd-student-layer", "seq"], "module 'seq' of student tests.odd_models:sequence_first_student "
                                                 "gives shape (16, 2, 8) on a batch of 2: its first axis is not the "
                                                 "samples"),
        # scores in eval mode, a tuple in training mode: 'tuple' object has no attribute 'float' at the first step
        (train + ["--student", "tests.odd_models:aux_in_training_student"], "returns a tuple per sample in training "
                                                                            "mode (in eval mode its 4 class scores)"),
        (train + ["--student", "tests.odd_models:detached_student"], "the loss (kd) does not depend on any trainable "
                                                                     "parameter of student"),
        (train + ["--loss", "kd=1e38"], "training diverged in epoch 1"),
        (["teacher-cache", "--data", SYN, "--teacher", "tests.odd_models:idle_head_model", "--weights",
          str(save_idle_head(root)), "--layer", "aux"], "module 'aux' of teacher tests.odd_models:idle_head_model gave "
                                                         "no tensor during a forward"),
        (train + ["--student", "tests.odd_models:idle_head_model", "--loss", "kd=1,rkd=1", "--rkd-student-layer",
                  "aux"], "module 'aux' of student tests.odd_models:idle_head_model gave no tensor"),
        (["teacher-cache", "--data", "synthetic:10:3x4096x4096:10", "--weights", str(teacher_file)],
         "GiB of noise patterns and class templates"),
        (["plan", "--data", "synthetic:10000000000:1x8x8:10", "--weights", str(teacher_file)],
         "every per-sample array (row order, index, labels) would take 74.5 GiB"),
        (cache + ["--views", "2", "--augment", "ratio=0.5-2"], "needs crop=LO-HI too"),
        (["teacher-cache", "--data", SYN, "--teacher", "tests.odd_models:loud_model", "--weights",
          str(save_lazy(root, "loud_model"))], "non-finite logits in rows 0-191; use --dtype float32"),
        (["teacher-cache", "--data", SYN, "--weights", str(save_bare_teacher(root, 10))],
         "(size mismatch for fc.weight: copying a param with shape torch.Size([10, 64])"),
        (["teacher-cache", "--data", SYN, "--weights", str(save_bare_teacher(root, 10))],
         "check --teacher and --weights, and that the data has the classes and channels"),
        (["teacher-cache", "--data", SYN, "--teacher", "tests.odd_models:no_tensor_model", "--weights",
          str(save_lazy(root, "no_tensor_model")), "--layer", "meta"], "module 'meta' of teacher "
                                                                        "tests.odd_models:no_tensor_model gave no tensor"),
        (train + ["--student", "tests.odd_models:no_tensor_model", "--loss", "kd=1,rkd=1", "--rkd-student-layer",
                  "meta"], "module 'meta' of student tests.odd_models:no_tensor_model gave no tensor"),
        (train + ["--loss", "kd=1,rkd=1", "--rkd-student-layer", "nope"],
         "no module 'nope' in StudentNet (from --rkd-student-layer); its top-level modules: block1, block2, pool, embed, fc"),
        (["teacher-cache", "--data", SYN, "--teacher", "tests.odd_models:shared_act_model", "--weights",
          str(save_lazy(root, "shared_act_model")), "--layer", "act"],
         "module 'act' of teacher tests.odd_models:shared_act_model runs 2 times in one forward"),
        (train + ["--student", "tests.odd_models:shared_act_model", "--loss", "kd=1,rkd=1", "--rkd-student-layer",
                  "act"], "module 'act' of student tests.odd_models:shared_act_model runs 2 times"),
        (["teacher-cache", "--data", "synthetic:64:2x16x16:4", "--weights", str(teacher_file), "--channels", "1"],
         "use --channels 2, the data's own"),
        (["verify", path, "--recompute", "2", "--seed", "-1"], "--seed must be 0 or more"),
        (["bench", "--preset", "tiny", "--scaling", "abc"], "--scaling takes sample counts"),
        # the test split is one batch: too large, the error named 'synthetic:10000000000:1x8x8:10:1', not the flag
        *((["bench", "--preset", "tiny", flag, str(10**10)], f"{flag} must be at most 268,435,456, the most samples "
                                                              f"bench's synthetic data holds (got 10000000000)")
          for flag in ("--batch-size", "--samples")),
    ]
    for args, needle in cases:
        res = runner.invoke(app, args)
        lines = [x for x in res.stderr.strip().splitlines()  # the error, beside notes and how far a bar got
                 if not x.startswith(("note: ", "run directory: ")) and "━" not in x]
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], (args[-4:], res.output[-300:])
    assert not Path("run").exists() and not list(Path("data/runs").glob("*/summary.json"))  # nothing passed for done
    # typer's own usage errors, through the console entry point, are one line too
    res = subprocess.run([sys.executable, "-m", "pipeline", "teacher-cache", "--views", "abc"], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [res.stderr.strip()] \
        and res.stderr.startswith("error: Invalid value for '--views'")


def save_lazy(root, name):
    import torch

    from tests import odd_models

    model = getattr(odd_models, name)()
    model(torch.zeros(1, 1, 16, 16))  # materialise the lazy layer
    torch.save(model.state_dict(), root / f"{name}.pt")
    return root / f"{name}.pt"


def save_bare_teacher(root, classes):
    import torch

    from pipeline.models import TeacherNet

    torch.save(TeacherNet(num_classes=classes).state_dict(), root / "bare.pt")  # no meta: sized by the data
    return root / "bare.pt"


def save_idle_head(root):
    import torch

    from tests.odd_models import idle_head_model

    model = idle_head_model()
    model(torch.zeros(1, 1, 16, 16))  # materialise the lazy layer
    torch.save(model.state_dict(), root / "idle.pt")
    return root / "idle.pt"


def save_module(root, name):
    import torch

    from tests.odd_models import feature_map_teacher

    torch.save(feature_map_teacher().state_dict(), root / name)
    return root / name


def test_odd_data_is_read_right_and_stores_stay_trustworthy(root, teacher_file):
    from PIL import Image

    from pipeline.augment import AugmentPolicy, sample_params
    from pipeline.data import Transform, open_source

    # 16-bit grey images are scaled onto 0-255, not clipped to white
    (root / "i16").mkdir()
    values = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    Image.fromarray(values).save(root / "i16" / "a.png")
    src = open_source(f"imagefolder:{root / 'i16'}")
    got = src.load_raw(np.array([0]), Transform(size=[8, 8], channels=1))[0, 0].numpy()
    np.testing.assert_array_equal(got, np.round(values / 257).astype(np.uint8))
    # class folders beside loose images: neither dropped silently nor made a class
    for c in ("a", "b"):
        (root / "mixed" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "mixed" / c / "x.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "mixed" / "loose.png")
    with pytest.raises(KDCacheError, match="holds class folders and also 1 image\\(s\\) directly inside it"):
        open_source(f"imagefolder:{root / 'mixed'}")
    # a link to an image that is gone is named as an unreadable image
    (root / "mixed" / "loose.png").rename(root / "mixed" / "a" / "gone.png")
    (root / "mixed" / "b" / "link.png").symlink_to(root / "mixed" / "a" / "gone.png")
    (root / "mixed" / "a" / "gone.png").unlink()
    with pytest.raises(KDCacheError, match="cannot read image .*link.png .*fix or remove the file"):
        open_source(f"imagefolder:{root / 'mixed'}").fingerprint()
    # an aspect-ratio range no crop can meet falls back to a centre crop of at least one pixel
    box, _ = sample_params(AugmentPolicy.parse("crop=0.5-1,ratio=100-1000"), 0, np.arange(4), [0, 1], (16, 16))
    assert (box[..., 2] >= 1).all() and (box[..., 3] >= 1).all()
    # a chunk longer than the data is the data's length; a repeated --layer is one layer, one cache
    one = run_teacher_cache(CacheConfig(data=SYN, weights=str(teacher_file), chunk_samples=10**9),
                            log=lambda *_: None)
    assert st.open_store(one).chunk_samples == 192
    assert run_teacher_cache(cfg(teacher_file, layers=["layer2", "layer2"]), log=lambda *_: None) == \
        run_teacher_cache(cfg(teacher_file), log=lambda *_: None)
    path = Path(run_teacher_cache(cfg(teacher_file, out="s.zarr"), log=lambda *_: None))
    # labels swapped between chunks: the checksums are fine, the data's labels are not
    a, b = path / "labels" / "c" / "0", path / "labels" / "c" / "1"
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    res = runner.invoke(app, ["verify", str(path), "--recompute", "192"])
    # named block by block (verify compares labels with the data's); recompute then takes the intact rows alone
    assert res.exit_code == 1 and "BAD  labels chunk 0 (rows 0-63): differ from the data's labels" in res.stdout
    assert "BAD  labels chunk 1 (rows 64-127): differ from the data's labels" in res.stdout
    assert "ok   recompute labels: 0 of 64 differ" in res.stdout, res.stdout
    # an array deleted outright is reported, chunk by chunk
    import shutil

    shutil.rmtree(path / "features" / "layer2")
    res = runner.invoke(app, ["verify", str(path)])
    assert res.exit_code == 1 and "features/layer2 chunk 0 (rows 0-63): array missing" in res.stdout
    res = runner.invoke(app, ["inspect", str(path)])
    assert res.exit_code == 0 and "MISSING (rebuild with teacher-cache --force)" in res.stdout
    committed = st.open_group(str(path), "r")[st.COMMIT][:].copy()
    for args in (["repair", str(path)], ["teacher-cache", "--data", SYN, "--weights", str(teacher_file),
                                         "--chunk-samples", "64", "--layer", "layer2", "--out", str(path)]):
        res = runner.invoke(app, args)  # neither can recreate the array: refused, nothing marked complete
        assert res.exit_code == 2 and "missing outright" in res.stderr, (args, res.output)
    g = st.open_group(str(path), "r")
    np.testing.assert_array_equal(g[st.COMMIT][:], committed)
    assert not (path / "features" / "layer2").exists()
    # a manifest without the parts a reader needs is refused in one line
    g = st.open_group(str(path), "r+")
    manifest = dict(g.attrs[st.MANIFEST_KEY])
    g.attrs[st.MANIFEST_KEY] = {k: v for k, v in manifest.items() if k != "data"}
    for args in (["verify", str(path)], ["inspect", str(path)], ["train-student", "--cache", str(path)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "its manifest lacks data" in res.stderr, (args, res.output)
    # ... and so is one whose fields hold the wrong kind of value (hand-edited), in ls too
    # (a transform of size "16" or std 0, an array's spec without its view axis or with a dtype numpy lacks:
    # train-student failed with a TypeError/KeyError traceback, or trained on infinite inputs until it diverged)
    for field, value in (("teacher", {}), ("targets", []), ("views", 7), ("chunk_samples", "x"), ("transform", {}),
                         ("transform", dict(manifest["transform"], size="16")),
                         ("transform", dict(manifest["transform"], std=[0.0])),
                         ("targets", dict(manifest["targets"], logits=dict(manifest["targets"]["logits"], shape="x"))),
                         ("stat_columns", "x"),  # (it was blamed on the _stats array's metadata)
                         ("arrays", dict(manifest["arrays"], logits=dict(manifest["arrays"]["logits"], dtype="x"))),
                         ("arrays", dict(manifest["arrays"], logits={k: v for k, v in manifest["arrays"]["logits"]
                                                                     .items() if k != "view_axis"}))):
        g.attrs[st.MANIFEST_KEY] = dict(manifest, **{field: value})
        for args in (["verify", str(path)], ["inspect", str(path)], ["train-student", "--cache", str(path)],
                     ["ls", "--cache-dir", str(path.parent)]):
            res = runner.invoke(app, args)
            out = res.stderr if args[0] != "ls" else res.stdout
            assert res.exception is None or isinstance(res.exception, SystemExit), (field, args, res.exception)
            assert res.exit_code == (0 if args[0] == "ls" else 2), (field, args, res.output)
            assert f"its manifest has a malformed {field}" in out, (field, args, res.output)


def test_a_manifest_at_odds_with_its_store_is_refused_in_one_line(root, teacher_file):
    """A sample count its arrays do not have, or settings (config) from a kdcache with others, which verify
    --recompute and repair re-run: one line, not a numpy or CacheConfig traceback."""
    path = run_teacher_cache(CacheConfig(data=SYN, weights=str(teacher_file), chunk_samples=64), log=lambda *_: None)
    (Path(path) / "logits" / "c" / "1" / "0").unlink()  # something for repair to do
    g = st.open_group(path, "r+")
    manifest = dict(g.attrs[st.MANIFEST_KEY])
    for change, says in (({"data": dict(manifest["data"], num_samples=5)}, "sample count (5) is not the length"),
                         ({"config": dict(manifest["config"], newer_flag=1)}, "settings this kdcache does not know "
                                                                              "(newer_flag)")):
        g.attrs[st.MANIFEST_KEY] = dict(manifest, **change)
        for args in (["verify", path, "--recompute", "4"], ["repair", path],
                     *([["train-student", "--cache", path]] if "data" in change else [])):
            res = runner.invoke(app, args)
            assert res.exception is None or isinstance(res.exception, SystemExit), (args, res.exception)
            assert res.exit_code == 2 and says in res.stderr, (args, res.output)
        assert st.open_group(path, "r").attrs[st.MANIFEST_KEY]["complete"]  # repair refused before touching it


def test_a_manifest_whose_arrays_are_not_what_readers_assume_is_refused(root, teacher_file):
    """Arrays the manifest lists that no store of it holds: no index (train-student failed with KeyError 'index'),
    labels missing on labelled data (trained silently without them), a target shape or codec its arrays do not
    have (a tensor-size RuntimeError), another chunking. verify passed each; every reader now refuses it."""
    path = run_teacher_cache(cfg(teacher_file), log=lambda *_: None)
    g = st.open_group(path, "r+")
    manifest = dict(g.attrs[st.MANIFEST_KEY])
    arrays, targets = manifest["arrays"], manifest["targets"]
    logits = dict(targets["logits"])
    for change, says in (
            ({"arrays": {k: v for k, v in arrays.items() if k != "index"}}, "lists no index array"),
            ({"arrays": {k: v for k, v in arrays.items() if k != "labels"}}, "labelled but lists no labels array"),
            ({"targets": dict(targets, logits=dict(logits, shape=[3]))}, "describes target logits"),
            ({"targets": dict(targets, logits=dict(logits, codec={"name": "int8"}))}, "describes target logits"),
            ({"chunk_samples": 32}, "says chunk_samples 32, not the chunking")):
        g.attrs[st.MANIFEST_KEY] = dict(manifest, **change)
        for args in (["verify", path], ["train-student", "--cache", path, "--workers", "0", "--epochs", "1"]):
            res = runner.invoke(app, args)
            assert res.exit_code == 2 and says in res.stderr, (change, args, res.output, res.exception)
    g.attrs[st.MANIFEST_KEY] = manifest
    assert runner.invoke(app, ["verify", path]).exit_code == 0


def test_a_manifest_whose_printed_fields_are_not_text_is_one_line_in_ls(root, teacher_file):
    """ls prints the teacher's fingerprint (its first 8 characters) and accuracy (a percentage): a hand-edited one
    of another kind failed as a bare TypeError, ValueError or AttributeError; an empty key printed as nothing."""
    path = run_teacher_cache(cfg(teacher_file), log=lambda *_: None)
    g = st.open_group(path, "r+")
    manifest = dict(g.attrs[st.MANIFEST_KEY])
    teacher = manifest["teacher"]
    for change, says in (({"teacher": dict(teacher, fingerprint=5)}, "malformed teacher"),
                         ({"teacher": dict(teacher, accuracy={"top1": "high"})}, "malformed teacher"),
                         ({"teacher": dict(teacher, accuracy="high")}, "malformed teacher"),
                         ({"data": dict(manifest["data"], spec=5)}, "malformed data"),
                         ({"key": ""}, "malformed key"),
                         # (found by fuzzing the manifest: these failed check_manifest itself with a TypeError)
                         ({"targets": dict(manifest["targets"], logits=dict(manifest["targets"]["logits"], parts=5))},
                          "malformed targets"),
                         ({"targets": dict(manifest["targets"], logits=dict(manifest["targets"]["logits"], codec={
                             "name": "topk", "k": 2, "dtype": "no-such-dtype"}))}, "describes target logits")):
        g.attrs[st.MANIFEST_KEY] = dict(manifest, **change)
        for args in (["ls"], ["ls", "--json"]):
            res = runner.invoke(app, args)
            assert res.exit_code == 0 and res.exception is None and says in res.stdout, (change, res.output)
        res = runner.invoke(app, ["verify", path])
        assert res.exit_code == 2 and says in res.stderr, (change, res.output)
    # a mean past int64 is a (silly) finite number: np.isfinite raised a TypeError on it
    g.attrs[st.MANIFEST_KEY] = dict(manifest, transform=dict(manifest["transform"], mean=[10**20]))
    res = runner.invoke(app, ["ls"])
    assert res.exit_code == 0 and res.exception is None and "complete" in res.stdout, res.output


def test_an_array_whose_metadata_disagrees_with_the_manifest_is_damage(root, teacher_file):
    """An array's zarr.json edited or damaged to another shape or dtype: its chunks read as something else. verify
    reports it, repair and train-student refuse it in one line (they failed with numpy/torch tracebacks)."""
    path = run_teacher_cache(CacheConfig(data=SYN, weights=str(teacher_file), chunk_samples=64), log=lambda *_: None)
    meta = Path(path) / "logits" / "zarr.json"
    original = json.loads(meta.read_text())
    for change in ({"shape": [100, original["shape"][1]]}, {"data_type": "float32"}):
        meta.write_text(json.dumps(original | change))
        res = runner.invoke(app, ["verify", path, "--recompute", "4"])
        assert res.exception is None or isinstance(res.exception, SystemExit), (change, res.exception)
        assert res.exit_code == 1 and "BAD  logits chunk 0 (rows 0-63): array damaged (its metadata says" in \
            res.stdout, (change, res.output)
        for args in (["repair", path], ["train-student", "--cache", path, "--workers", "0"]):
            res = runner.invoke(app, args)
            assert res.exception is None or isinstance(res.exception, SystemExit), (args, res.exception)
            lines = res.stderr.strip().splitlines()
            assert res.exit_code == 2 and len(lines) == 1 and "rebuild the store with" in lines[0], (args, res.output)
            assert "missing outright" in lines[0] or "its metadata says shape" in lines[0], (args, res.output)
        assert st.open_group(path, "r").attrs[st.MANIFEST_KEY]["complete"]  # repair refused before touching it


def test_an_array_whose_fill_value_or_chunks_were_edited_is_damage(root, teacher_file):
    """A fill value edited to 0 made a deleted chunk read as zeros: verify said OK, repair 'nothing to repair' and
    train-student trained on them. Chunks edited to another row count read as garbage that repair never mended."""
    path = run_teacher_cache(CacheConfig(data=SYN, weights=str(teacher_file), chunk_samples=64, layers=["layer2"]),
                             log=lambda *_: None)
    big = {"name": "bytes", "configuration": {"endian": "big"}}
    for name, change in (("features/layer2", lambda m: dict(m, fill_value=0.0)),
                         ("logits", lambda m: dict(m, chunk_grid={"name": "regular", "configuration": {
                             "chunk_shape": [32, m["shape"][1]]}})),
                         # codecs, byte order or chunk names other than the writer's: chunks read byte-swapped
                         # (or not at all), and a repair rewrote chunks that still read so
                         ("logits", lambda m: dict(m, codecs=[big, *m["codecs"][1:]])),
                         ("logits", lambda m: dict(m, codecs=m["codecs"][:2])),
                         ("logits", lambda m: dict(m, chunk_key_encoding={"name": "default", "configuration": {
                             "separator": "."}}))):
        meta = Path(path, *name.split("/"), "zarr.json")
        original = json.loads(meta.read_text())
        meta.write_text(json.dumps(change(original)))
        chunk = next(p for p in Path(path, *name.split("/"), "c").rglob("*") if p.is_file())
        kept = chunk.read_bytes()
        chunk.unlink()
        res = runner.invoke(app, ["verify", path])
        assert res.exit_code == 1 and f"BAD  {name} chunk 0 (rows 0-63): array damaged (its metadata says" in \
            res.stdout, (name, res.output)
        for args in (["repair", path], ["train-student", "--cache", path, "--workers", "0", "--epochs", "1",
                                        "--test-data", SYN],
                     ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--layer", "layer2",
                      "--chunk-samples", "64", "--out", path]):  # (it answered 'cache hit ... complete')
            line = _one_line(runner.invoke(app, args))
            assert "rebuild the store with" in line, (name, args, line)
        chunk.write_bytes(kept)
        meta.write_text(json.dumps(original))
    assert runner.invoke(app, ["verify", path]).exit_code == 0  # the store as made passes


def _one_line(res) -> str:
    lines = [x for x in res.stderr.strip().splitlines() if not x.startswith("note: ") and "━" not in x]
    assert res.exit_code == 2 and len(lines) == 1, res.output[-400:]
    return lines[0]


def test_swapped_index_or_labels_chunks_are_refused_by_train_student(root, teacher_file):
    """Chunks swapped between files pass every checksum: train-student compares `index` with the rows' samples and
    `labels` with the data's labels before training, instead of pairing inputs with other samples' targets."""
    path = Path(run_teacher_cache(cfg(teacher_file), log=lambda *_: None))
    train = ["train-student", "--cache", str(path), "--workers", "0", "--epochs", "1", "--out", "run"]
    for name in ("index", "labels"):
        a, b = path / name / "c" / "0", path / name / "c" / "1"
        raw_a, raw_b = a.read_bytes(), b.read_bytes()
        a.write_bytes(raw_b), b.write_bytes(raw_a)
        line = _one_line(runner.invoke(app, train))
        what = "do not hold the samples they should" if name == "index" else "differ from the data's labels"
        assert f"{name} rows 0-63 (chunk 0) {what}" in line and "kdcache repair" in line
        a.write_bytes(raw_a), b.write_bytes(raw_b)
    assert runner.invoke(app, train).exit_code == 0
    # --no-labels reads no labels, so swapped label chunks do not stop it
    (path / "labels" / "c" / "0").write_bytes((path / "labels" / "c" / "1").read_bytes())
    assert runner.invoke(app, train[:-1] + ["run2", "--no-labels"]).exit_code == 0
    # ... nor does a labels chunk that fails its checksum: it is never read
    raw = bytearray((path / "labels" / "c" / "0").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (path / "labels" / "c" / "0").write_bytes(bytes(raw))
    res = runner.invoke(app, train[:-1] + ["run3", "--no-labels"])
    assert res.exit_code == 0, res.output
    # ... but swapped index chunks still are: they pair inputs with other samples' targets, labels or not
    a, b = path / "index" / "c" / "0", path / "index" / "c" / "1"
    raw_a, raw_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(raw_b), b.write_bytes(raw_a)
    line = _one_line(runner.invoke(app, train[:-1] + ["run4", "--no-labels"]))
    assert "index rows 0-63 (chunk 0) do not hold the samples they should" in line and "kdcache repair" in line


def test_repair_mends_labels_chunks_swapped_between_files(root, teacher_file):
    """train-student refuses swapped labels chunks and says to run verify then repair: repair compares the labels
    with the data's and recomputes those blocks, rather than answer 'nothing to repair'."""
    path = Path(run_teacher_cache(cfg(teacher_file), log=lambda *_: None))
    before = arrays_of(path)
    a, b = path / "labels" / "c" / "0", path / "labels" / "c" / "2"
    raw_a, raw_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(raw_b), b.write_bytes(raw_a)
    res = runner.invoke(app, ["repair", str(path)])
    assert res.exit_code == 0 and "recomputing 2 bad chunk(s): 0, 2" in res.stderr, res.output
    for name, v in arrays_of(path).items():
        np.testing.assert_array_equal(v, before[name], err_msg=name)
    res = runner.invoke(app, ["repair", str(path)])
    assert res.exit_code == 0 and "nothing to repair" in res.output


def test_verify_names_labels_chunks_swapped_between_files(root, teacher_file):
    """train-student's line for swapped labels says to run verify, then repair: verify names those blocks (it
    compares the labels with the data's labels of their rows), not 'OK', and is OK again after repair."""
    path = Path(run_teacher_cache(cfg(teacher_file), log=lambda *_: None))
    a, b = path / "labels" / "c" / "0", path / "labels" / "c" / "2"
    raw_a, raw_b = a.read_bytes(), b.read_bytes()
    assert raw_a != raw_b
    a.write_bytes(raw_b), b.write_bytes(raw_a)
    res = runner.invoke(app, ["verify", str(path), "--json"])
    assert res.exit_code == 1, res.output
    found = {(p["array"], p["block"], p["start"], p["end"]) for p in json.loads(res.stdout)["problems"]}
    assert found == {("labels", 0, 0, 64), ("labels", 2, 128, 192)}, found
    res = runner.invoke(app, ["verify", str(path)])
    assert "BAD  labels chunk 0 (rows 0-63): differ from the data's labels of their index" in res.stdout, res.output
    assert runner.invoke(app, ["repair", str(path)]).exit_code == 0
    res = runner.invoke(app, ["verify", str(path)])
    assert res.exit_code == 0 and res.stdout.strip().endswith(f"OK: {path}"), res.output


def test_verify_names_values_no_writer_writes_in_chunks_that_pass_their_checksum(root, teacher_file):
    """A chunk rewritten whole (its crc32c valid) can still hold what no writer writes: one NaN or an infinity
    among float data, the int8 fill (-128) in a few rows, a non-finite distortion sum, or another block's index.
    Each is named by plain verify (train-student refuses them too), and repair redoes those units alone."""
    path = Path(run_teacher_cache(cfg(teacher_file, feature_codec="int8"), log=lambda *_: None))
    before = arrays_of(path)
    assert runner.invoke(app, ["verify", str(path)]).exit_code == 0
    g = zarr.open_group(str(path), mode="r+")
    logits = g["logits"][:]
    logits[5, 1], logits[70, 2] = np.nan, np.inf          # block 0: one NaN; block 1: one infinity
    g["logits"][:] = logits
    q = g["features/layer2"][130:132]
    q[0, 0, 0, 0] = q[1, 3, 1, 2] = -128                   # block 2: two int8 fill values among data
    g["features/layer2"][130:132] = q
    stats = g[st.STATS][:]
    stats[2, 0, 0] = np.nan
    g[st.STATS][:] = stats
    a, b = path / "index" / "c" / "0", path / "index" / "c" / "1"
    raw_a, raw_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(raw_b), b.write_bytes(raw_a)
    res = runner.invoke(app, ["verify", str(path), "--json"])
    assert res.exit_code == 1, res.output
    found = {(p["array"], p["block"], p["what"]) for p in json.loads(res.stdout)["problems"]}
    assert found == {("logits", 0, "1 NaN values"), ("logits", 1, "infinite values"),
                     ("features/layer2", 2, "missing rows"),
                     (st.STATS, 2, "missing or non-finite distortion sums"),
                     ("index", 0, "index does not match its rows"), ("index", 1, "index does not match its rows")}, \
        found
    res = runner.invoke(app, ["repair", str(path)])
    assert res.exit_code == 0 and "recomputing 3 bad chunk(s): 0, 1, 2" in res.stderr, res.output
    assert runner.invoke(app, ["verify", str(path)]).exit_code == 0
    for name, v in arrays_of(path).items():
        np.testing.assert_array_equal(v, before[name], err_msg=name)


def test_verify_recompute_skips_damaged_chunks_and_reports_them(root, teacher_file):
    path = Path(run_teacher_cache(cfg(teacher_file), log=lambda *_: None))
    f = path / "logits" / "c" / "1" / "0"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    (path / "index" / "c" / "2").unlink()
    res = runner.invoke(app, ["verify", str(path), "--recompute", "192", "--json"])
    assert res.exit_code == 1, res.output
    rep = json.loads(res.stdout)
    assert {(p["array"], p["block"]) for p in rep["problems"]} == {("logits", 1), ("index", 2)}
    assert rep["recompute"]["samples"] == 64 and rep["recompute"]["arrays"]["logits"]["ok"]  # block 0 alone


def test_commit_markers_and_stats_that_are_lost_or_damaged(root, teacher_file):
    """`_commit` gone or a marker emptied: those units count as not committed (verify says so, resume redoes them);
    `_stats` (checksummed) damaged: verify names it and repair recomputes the unit, so the manifest's distortion
    numbers are never rebuilt from garbage."""
    path = Path(run_teacher_cache(cfg(teacher_file), log=lambda *_: None))
    before, man = arrays_of(path), st.open_store(path).manifest
    (path / st.COMMIT / "c" / "1" / "0").write_bytes(b"")
    res = runner.invoke(app, ["verify", str(path)])
    assert res.exit_code == 1 and "_commit chunk 1 (rows 64-127): not committed" in res.stdout, res.output
    f = path / st.STATS / "c" / "2" / "0" / "0"
    raw = bytearray(f.read_bytes())
    raw[3] ^= 0x40
    f.write_bytes(bytes(raw))
    res = runner.invoke(app, ["verify", str(path)])
    assert "_stats chunk 2 (rows 128-191): crc32c checksum mismatch" in res.stdout, res.output
    res = runner.invoke(app, ["repair", str(path)])
    assert res.exit_code == 0 and "recomputing 2 bad chunk(s): 1, 2" in res.stderr, res.output
    after = st.open_store(path).manifest
    assert after["distortion"] == man["distortion"] and after["teacher"]["accuracy"] == man["teacher"]["accuracy"]
    for name, v in arrays_of(path).items():
        np.testing.assert_array_equal(v, before[name], err_msg=name)
    # a marker with a flipped bit (1 -> 254) is no commit either: verify names it, repair redoes the unit and writes 1
    marker = path / st.COMMIT / "c" / "2" / "0"
    marker.write_bytes(bytes([marker.read_bytes()[0] ^ 0xFF]))
    res = runner.invoke(app, ["verify", str(path)])
    assert res.exit_code == 1 and "_commit chunk 2 (rows 128-191): damaged marker (value 254" in res.stdout, res.output
    res = runner.invoke(app, ["repair", str(path)])
    assert res.exit_code == 0 and "recomputing 1 bad chunk(s): 2" in res.stderr, res.output
    assert marker.read_bytes() == b"\x01"
    for name, v in arrays_of(path).items():
        np.testing.assert_array_equal(v, before[name], err_msg=name)
    # the whole marker array gone (a creation cut short, or deleted): nothing is trusted, verify and repair say so
    import shutil

    shutil.rmtree(path / st.COMMIT)
    res = runner.invoke(app, ["verify", str(path)])
    assert res.exit_code == 1 and res.stdout.count("not committed") == 3, res.output
    assert f"3 of 3 units were never committed (a writer stopped before them; their chunks are not data): re-run " \
           f"the teacher-cache command, or `kdcache repair {path}`" in res.stdout
    res = runner.invoke(app, ["repair", str(path)])
    assert res.exit_code == 0 and runner.invoke(app, ["verify", str(path)]).exit_code == 0, res.output
    for name, v in arrays_of(path).items():
        np.testing.assert_array_equal(v, before[name], err_msg=name)


def test_force_rebuild_killed_while_deleting_leaves_a_rebuildable_path(root, teacher_file, monkeypatch):
    """--force moves the old store aside with one rename before deleting it: a kill during the deletion leaves the
    path absent (rebuilt by the next run), never a folder that is neither store."""
    import shutil

    path = run_teacher_cache(cfg(teacher_file, out="f.zarr"), log=lambda *_: None)
    before = arrays_of(path)
    real = shutil.rmtree

    def killed(p, *a, **k):
        if ".old-" in str(p):
            raise KeyboardInterrupt  # the kill, half way
        return real(p, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            run_teacher_cache(cfg(teacher_file, out="f.zarr", force=True), log=lambda *_: None)
    assert not Path("f.zarr").exists() and list(Path(".").glob(".f.zarr.old-*"))
    assert run_teacher_cache(cfg(teacher_file, out="f.zarr"), log=lambda *_: None) == path
    assert not list(Path(".").glob(".f.zarr.old-*"))  # the leftover is cleaned up
    for name, v in arrays_of(path).items():
        np.testing.assert_array_equal(v, before[name], err_msg=name)


def test_repair_checks_its_teacher_and_data_before_touching_the_store(root):
    """repair with moved weights fails before un-committing anything (the store stays complete); repair on a copy
    of the image folder (other file times, same bytes) recomputes in place."""
    import shutil

    folder = root / "imgs"
    _labelled_folder(folder)
    w = save_teacher(root / "t.pt", num_classes=2)
    path = Path(run_teacher_cache(CacheConfig(data=f"imagefolder:{folder}", weights=str(w), chunk_samples=4),
                                  log=lambda *_: None))
    before = arrays_of(path)
    (path / "logits" / "c" / "1" / "0").unlink()
    w.rename(root / "moved.pt")
    line = _one_line(runner.invoke(app, ["repair", str(path)]))
    assert "not found" in line and "--weights FILE" in line
    assert st.open_store(path, require_complete=False).manifest["complete"]  # untouched
    copy = root / "copy"
    _copy_without_times(folder, copy)
    shutil.rmtree(folder)
    res = runner.invoke(app, ["repair", str(path), "--data", f"imagefolder:{copy}", "--weights", "moved.pt"])
    assert res.exit_code == 0 and "recomputing 1 bad chunk(s)" in res.stderr, res.output
    for name, v in arrays_of(path).items():
        np.testing.assert_array_equal(v, before[name], err_msg=name)


def test_small_store_troubles_read_clearly(root, teacher_file):
    """A store of this key in another format version; an array whose metadata is damaged (inspect marks it,
    train-student says to rebuild, since repair cannot restore metadata); `ls` names a store made with --out."""
    path = Path(run_teacher_cache(cfg(teacher_file, out="data/cache/mine.zarr"), log=lambda *_: None))
    res = runner.invoke(app, ["ls"])
    assert res.exit_code == 0 and "(mine.zarr)" in res.stdout, res.output
    original = json.loads((path / "logits" / "zarr.json").read_text())
    (path / "logits" / "zarr.json").write_text("{bad")
    res = runner.invoke(app, ["inspect", str(path), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["arrays"]["logits"]["missing"], res.output
    line = _one_line(runner.invoke(app, ["train-student", "--cache", str(path), "--workers", "0", "--epochs", "1"]))
    assert "array logits of" in line and "missing outright" in line and "--force" in line
    # metadata that is JSON but not an array zarr reads (an unknown codec, another zarr format, a group's):
    # `ls` failed with UnknownCodecError / MetadataValidationError / TypeError tracebacks
    for change in ({"codecs": [{"name": "nosuch"}]}, {"zarr_format": 2}, {"node_type": "group"}):
        (path / "logits" / "zarr.json").write_text(json.dumps(original | change))
        res = runner.invoke(app, ["ls"])
        assert res.exception is None and res.exit_code == 0, (change, res.exception)
        assert "(mine.zarr)  DAMAGED" in res.stdout, (change, res.output)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"][st.MANIFEST_KEY]["format_version"] = 99
    (path / "zarr.json").write_text(json.dumps(meta))
    line = _one_line(runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--layer",
                                         "layer2", "--chunk-samples", "64", "--batch-size", "32", "--out", str(path)]))
    assert "holds this cache in store format 99" in line and "--force" in line
    listed = [x for x in runner.invoke(app, ["ls"]).stdout.splitlines() if "mine.zarr" in x]  # named once, not twice
    assert len(listed) == 1 and listed[0].count("mine.zarr") == 1 and "has store format 99" in listed[0], listed


def test_a_store_keyed_before_the_architecture_joined_the_key_is_still_this_cache(root, teacher_file):
    """Stores made before the key named the teacher's architecture keep working: teacher-cache finds them (a hit,
    nothing recomputed), and repair mends them in place; nothing already written is lost."""
    import shutil

    path = Path(run_teacher_cache(cfg(teacher_file), log=lambda *_: None))
    before = arrays_of(path)
    g = zarr.open_group(str(path), mode="r+")
    man = dict(g.attrs[st.MANIFEST_KEY])
    legacy = {k: v for k, v in man["identity"].items() if k != "architecture"}
    man.update(identity=legacy, key=tc.cache_key(legacy))
    g.attrs[st.MANIFEST_KEY] = man
    old = path.with_name(f"{man['key']}.zarr")
    shutil.move(path, old)
    logs = []
    assert run_teacher_cache(cfg(teacher_file), log=logs.append) == str(old) and not path.exists()
    assert any("cache hit" in m for m in logs)
    (old / "logits" / "c" / "1" / "0").unlink()
    res = runner.invoke(app, ["repair", str(old)])
    assert res.exit_code == 0 and "recomputing 1 bad chunk(s)" in res.stderr, res.output
    for name, v in arrays_of(old).items():
        np.testing.assert_array_equal(v, before[name], err_msg=name)


def test_damaged_marker_or_stats_metadata_is_one_line_not_a_traceback(root, teacher_file):
    path = Path(run_teacher_cache(cfg(teacher_file), log=lambda *_: None))
    (path / st.STATS / "zarr.json").write_text("{bad")
    res = runner.invoke(app, ["verify", str(path)])
    assert res.exit_code == 1 and "_stats chunk 0 (rows 0-63): array missing" in res.stdout, res.output
    line = _one_line(runner.invoke(app, ["repair", str(path)]))
    assert "missing outright" in line and "--force" in line
    (path / st.COMMIT / "zarr.json").write_text("{bad")
    res = runner.invoke(app, ["verify", str(path)])
    assert res.exit_code == 1 and res.stdout.count("not committed") == 3, res.output


def test_a_stats_array_deleted_outright_is_damage_everywhere(root, teacher_file):
    """`_stats` gone, which repair refuses to recreate: ls said `complete` and teacher-cache took it as a cache hit;
    once the store was not marked complete, teacher-cache's writers failed with a bare KeyError. Now every command
    calls it damage, and teacher-cache says to rebuild it with --force (which does)."""
    path = Path(run_teacher_cache(cfg(teacher_file, out="data/cache/mine.zarr"), log=lambda *_: None))
    shutil.rmtree(path / st.STATS)
    res = runner.invoke(app, ["ls"])
    assert res.exit_code == 0 and "(mine.zarr)  DAMAGED" in res.stdout, res.output
    with pytest.raises(KDCacheError, match="array _stats is missing outright.*--force"):
        run_teacher_cache(cfg(teacher_file, out=str(path)), log=lambda *_: None)
    g = zarr.open_group(str(path), mode="r+")  # not complete (a repair or run stopped): the same line, no KeyError
    g.attrs[st.MANIFEST_KEY] = dict(g.attrs[st.MANIFEST_KEY], complete=False)
    g[st.COMMIT][1, 0] = 0
    with pytest.raises(KDCacheError, match="array _stats is missing outright.*--force"):
        run_teacher_cache(cfg(teacher_file, out=str(path)), log=lambda *_: None)
    run_teacher_cache(cfg(teacher_file, out=str(path), force=True), log=lambda *_: None)
    assert runner.invoke(app, ["verify", str(path)]).exit_code == 0


def test_verify_folds_the_chunks_of_units_never_committed():
    """An interrupted store's unwritten chunks are one count line with what to run, not a line per array and chunk;
    damage elsewhere is listed, at most `most` lines of it."""
    from pipeline.verify import Problem, Report

    rep = Report(path="s.zarr", units=40, problems=[Problem(st.COMMIT, b, 64 * b, 64 * b + 64, "not committed")
                                                    for b in (3, 4)])
    rep.problems += [Problem(a, b, 64 * b, 64 * b + 64, "missing") for a in ("logits", "index") for b in (3, 4)]
    rep.problems += [Problem("logits", b, 64 * b, 64 * b + 64, "crc32c checksum mismatch") for b in range(10, 40)]
    lines = rep.summary_lines(most=5)
    assert lines[:2] == ["_commit chunk 3 (rows 192-255): not committed", "_commit chunk 4 (rows 256-319): not committed"]
    assert lines[2:5] == [f"logits chunk {b} (rows {64 * b}-{64 * b + 63}): crc32c checksum mismatch" for b in (10, 11, 12)]
    assert lines[5] == "... and 27 more (--json lists every one)"
    assert lines[6].startswith("2 of 40 units were never committed") and len(lines) == 7
    assert not any("missing" in x for x in lines)  # the unwritten units' chunks: folded into that line
    # a view store: index and labels (no view axis) are written by a block's view-0 unit, and fold with it
    rep = Report(path="v.zarr", units=4, problems=[Problem(st.COMMIT, 1, 32, 64, "not committed", 0),
                                                   Problem(st.COMMIT, 1, 32, 64, "not committed", 1),
                                                   Problem("index", 1, 32, 64, "missing"),
                                                   Problem("logits", 1, 32, 64, "missing", 1)])
    assert [x.split(" (")[0] for x in rep.summary_lines()] == ["_commit chunk 1 view 0", "_commit chunk 1 view 1",
                                                               "2 of 4 units were never committed"]


def test_commit_or_stats_metadata_of_another_shape_is_one_line_not_a_traceback(root, teacher_file):
    """_commit or _stats edited to another shape: verify and repair failed with IndexError/BoundsCheckError
    tracebacks, and a resume indexed past the markers. Now one line saying to rebuild, which --force does."""
    path = Path(run_teacher_cache(cfg(teacher_file), log=lambda *_: None))  # 3 blocks, 1 view
    for name in (st.COMMIT, st.STATS):
        meta = path / name / "zarr.json"
        original = json.loads(meta.read_text())
        for rows in (2, 4):
            meta.write_text(json.dumps(dict(original, shape=[rows, *original["shape"][1:]])))
            for args in (["verify", str(path)], ["repair", str(path)]):
                line = _one_line(runner.invoke(app, args))
                assert f"its {name} array's metadata says shape ({rows}, 1" in line and "--force" in line, line
        g = st.open_group(str(path), "r+")
        g.attrs[st.MANIFEST_KEY] = dict(g.attrs[st.MANIFEST_KEY], complete=False)  # a resume reads the markers
        line = _one_line(runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file),
                                             "--layer", "layer2", "--chunk-samples", "64", "--out", str(path)]))
        assert f"its {name} array's metadata says shape" in line, line
        res = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--layer",
                                  "layer2", "--chunk-samples", "64", "--out", str(path), "--force"])
        assert res.exit_code == 0 and runner.invoke(app, ["verify", str(path)]).exit_code == 0, res.output


def test_teacher_cache_is_no_hit_on_a_manifest_every_reader_refuses(root, teacher_file):
    """A complete store whose manifest was hand-edited (a field of the wrong kind): teacher-cache answered 'cache
    hit ... is complete; nothing to compute' on a store verify, train-student and repair refuse; now it refuses it
    likewise, and --force rebuilds it."""
    path = run_teacher_cache(cfg(teacher_file, out="s.zarr"), log=lambda *_: None)
    args = ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--layer", "layer2", "--chunk-samples",
            "64", "--out", path]
    g = st.open_group(path, "r+")
    manifest = dict(g.attrs[st.MANIFEST_KEY])
    for field, value in (("data", dict(manifest["data"], num_samples="192")), ("teacher", {})):
        g.attrs[st.MANIFEST_KEY] = dict(manifest, **{field: value})
        for complete in (True, False):  # a hit, and a resume
            g.attrs[st.MANIFEST_KEY] = dict(g.attrs[st.MANIFEST_KEY], complete=complete)
            line = _one_line(runner.invoke(app, args))
            assert f"its manifest has a malformed {field}" in line and "--force" in line, (field, complete, line)
    res = runner.invoke(app, [*args, "--force"])
    assert res.exit_code == 0 and runner.invoke(app, ["verify", path]).exit_code == 0, res.output


def test_complete_is_exactly_true(root, teacher_file):
    """An interrupted store whose manifest says complete: "false" (a hand edit; any truthy value) passed for
    complete: ls said complete and teacher-cache 'cache hit ... nothing to compute' over a unit never written. Only
    true is complete; the same command resumes it."""
    path = run_teacher_cache(cfg(teacher_file, out="s.zarr"), log=lambda *_: None)
    g = st.open_group(path, "r+")
    g[st.COMMIT][1, 0] = 0  # a unit the writer never reached
    (Path(path) / "logits" / "c" / "1" / "0").unlink()
    g.attrs[st.MANIFEST_KEY] = dict(g.attrs[st.MANIFEST_KEY], complete="false")
    res = runner.invoke(app, ["ls", "--cache-dir", str(root)])
    assert res.exit_code == 0 and "(s.zarr)  INCOMPLETE" in res.stdout, res.output
    assert "is incomplete" in _one_line(runner.invoke(app, ["train-student", "--cache", path, "--workers", "0"]))
    res = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--layer", "layer2",
                              "--chunk-samples", "64", "--out", path])
    assert res.exit_code == 0 and "resuming" in res.stderr, res.output
    assert st.open_group(path, "r").attrs[st.MANIFEST_KEY]["complete"] is True
    assert runner.invoke(app, ["verify", path]).exit_code == 0


def test_a_folder_where_a_chunk_file_belongs_is_named_and_kept(root, teacher_file):
    """A chunk file replaced by a folder (by hand): repair failed with 'Is a directory: .../.0.<pid>.<tid>.tmp; check
    the path, or choose another --out / --cache-dir', naming a temporary file and the wrong fix. It names the folder
    now, before touching the store, leaves it and its files alone, and repairs once it is moved out."""
    path = Path(run_teacher_cache(cfg(teacher_file, out="s.zarr"), log=lambda *_: None))
    for chunk in (path / "logits" / "c" / "1" / "0", path / st.STATS / "c" / "2" / "0" / "0",
                  path / st.COMMIT / "c" / "0" / "0"):  # (zarr deleted this one, with its files, on un-committing)
        chunk.unlink()
        chunk.mkdir()
        (chunk / "notes.txt").write_text("mine")
        line = _one_line(runner.invoke(app, ["repair", str(path)]))
        assert line.startswith(f"error: {chunk} is a folder where ") and "move it out of the store" in line, line
        assert (chunk / "notes.txt").read_text() == "mine"
        assert st.open_group(str(path), "r").attrs[st.MANIFEST_KEY]["complete"]  # refused before touching it
        shutil.move(chunk, root / "moved")
        res = runner.invoke(app, ["repair", str(path)])
        assert res.exit_code == 0 and runner.invoke(app, ["verify", str(path)]).exit_code == 0, res.output
        shutil.rmtree(root / "moved")


def test_outputs_other_than_caches_refuse_a_url(root, teacher_file, monkeypatch):
    """Only caches live on object storage. A run folder, teacher weights or KDCACHE_DATA named by a memory:// or
    s3:// URL was written to a local folder named "memory:" or "s3:" (Path folds the slashes) and reported as the
    URL's; now one line, nothing written. A file:// URL names its folder on this disk, as for a cache."""
    path = run_teacher_cache(cfg(teacher_file, out="s.zarr"), log=lambda *_: None)
    train = ["train-student", "--cache", path, "--epochs", "1", "--workers", "0"]
    for url in ("memory://runs/r1", "s3://b/runs/r1"):
        res = runner.invoke(app, train + ["--out", url])
        assert res.exit_code == 2 and f"--out {url}: only caches" in res.stderr, res.output
    res = runner.invoke(app, ["teacher", "--data", SYN, "--epochs", "1", "--out", "memory://t/t.pt"])
    assert res.exit_code == 2 and "--out memory://t/t.pt: only caches" in res.stderr, res.output
    with monkeypatch.context() as m:
        m.setenv("KDCACHE_DATA", "memory://kd")
        for args in (["ls"], ["teacher-cache", "--data", SYN, "--weights", str(teacher_file)]):
            res = runner.invoke(app, args)
            assert res.exit_code == 2 and "KDCACHE_DATA memory://kd: only caches" in res.stderr, res.output
    assert not [p.name for p in root.iterdir() if p.name.endswith(":")]
    res = runner.invoke(app, train + ["--out", f"file://{root / 'run-f'}"])
    assert res.exit_code == 0 and (root / "run-f" / "summary.json").is_file(), res.output
    assert not Path("file:").exists()


def test_force_on_a_file_url_sets_the_old_store_aside_like_its_path(root, teacher_file):
    """--force on a store named by a file:// URL deleted it in place through zarr (a kill mid-deletion left a
    half-deleted store under its name), and never removed what a killed deletion had left beside it: it now moves
    the old store aside with one rename, as for the same folder named by its path."""
    url = f"file://{root / 'remote' / 's.zarr'}"
    path = run_teacher_cache(cfg(teacher_file, out=url), log=lambda *_: None)
    before = arrays_of(root / "remote" / "s.zarr")
    stale = root / "remote" / ".s.zarr.old-1"  # what a deletion killed half way leaves
    (stale / "logits").mkdir(parents=True)
    renamed = []
    real = Path.rename
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Path, "rename", lambda self, target: renamed.append(Path(target).name) or real(self, target))
        assert run_teacher_cache(cfg(teacher_file, out=url, force=True), log=lambda *_: None) == path
    assert renamed == [f".s.zarr.old-{os.getpid()}"] and not stale.exists()
    assert sorted(p.name for p in (root / "remote").iterdir()) == ["s.zarr", "s.zarr.lock"]
    for name, v in arrays_of(root / "remote" / "s.zarr").items():
        np.testing.assert_array_equal(v, before[name], err_msg=name)


def test_a_store_named_as_the_working_folder_is_refused_in_one_line(root, teacher_file, monkeypatch):
    """`--out .` (or `--out file://`, the same folder) in an empty folder: setting the folder aside stopped with
    pathlib's "PosixPath('.') has an empty name" traceback, and had it renamed the folder, the store would have been
    created under a working directory that no longer exists."""
    Path("work").mkdir()
    monkeypatch.chdir("work")
    for out in (".", "file://"):
        res = runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--out", out])
        assert res.exit_code == 2 and res.stderr.strip() == (f"error: --out {out} is the folder this command runs in "
                                                             "(or holds it); run it from the parent folder with "
                                                             "--out work"), res.output
    assert Path.cwd() == root / "work" and not list(Path.cwd().iterdir())
    monkeypatch.chdir(root)
    assert runner.invoke(app, ["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--out", "work"]
                         ).exit_code == 0
    assert st.open_store("work").manifest["complete"] is True
    # from inside the store, `.` is the store, not a folder inside it: repair and verify --recompute run (they said
    # "--out: . is a Zarr store (or a group in one), not a folder of caches", or ".. is inside the Zarr store")
    Path("work", "logits", "c", "0", "0").unlink()
    monkeypatch.chdir("work")
    res = runner.invoke(app, ["repair", "."])
    assert res.exit_code == 0 and "recomputing 1 bad chunk(s): 0" in res.stderr, res.output
    assert runner.invoke(app, ["verify", ".", "--recompute", "4"]).exit_code == 0


def test_a_url_that_cannot_be_read_is_not_called_a_foreign_store(root, teacher_file):
    """An object store this machine may not read (no credentials, access denied: s3fs raises PermissionError) was
    reported by teacher-cache as "exists and is not a kdcache store; choose another --out", and by verify and
    train-student as "not a kdcache Zarr v3 store". Now each says it cannot read it, and why, in one line."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class Denied(MemoryFileSystem):
        protocol, store, pseudo_dirs = "kdcache-denied", {}, [""]

        def _deny(self, *a, **k):
            raise PermissionError(13, "Access Denied")

        cat_file = ls = info = _open = pipe_file = rm = mkdir = exists = isfile = isdir = find = _deny

    fsspec.register_implementation("kdcache-denied", Denied, clobber=True)
    url = "kdcache-denied://b/caches/x.zarr"
    for args in (["teacher-cache", "--data", SYN, "--weights", str(teacher_file), "--out", url],
                 ["verify", url], ["train-student", "--cache", url, "--epochs", "1"], ["inspect", url]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and f"cannot read {url} (PermissionError: [Errno 13] Access Denied)" in res.stderr \
            and len(res.stderr.strip().splitlines()) == 1, (args, res.output)


def test_a_url_with_no_store_says_no_cache(root):
    """A URL where nothing is (a mistyped bucket or key) was "not a kdcache Zarr v3 store (GroupNotFoundError); pass
    the .zarr folder that teacher-cache printed"; now the same line as a local path where nothing is."""
    for url in ("memory://nothing/x.zarr", f"file://{root / 'nothing' / 'x.zarr'}"):
        for args in (["verify", url], ["inspect", url], ["repair", url], ["train-student", "--cache", url]):
            res = runner.invoke(app, args)
            assert res.exit_code == 2 and f"no cache at {url}; run `kdcache teacher-cache` first" in res.stderr, \
                (args, res.output)


def test_a_store_whose_own_metadata_is_not_json_is_called_damaged(root, teacher_file):
    """The group's zarr.json truncated or overwritten: every command said the store (the folder teacher-cache printed)
    "is not a kdcache store; pass the .zarr folder that teacher-cache printed" or "choose another --out", and --force
    still refused it. Now each says the store is damaged and to delete it; another folder is still not a store."""
    path = run_teacher_cache(cfg(teacher_file), log=lambda *_: None)
    (Path(path) / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    args = ["--data", SYN, "--weights", str(teacher_file), "--layer", "layer2", "--chunk-samples", "64",
            "--batch-size", "32"]
    for command in (["verify", path], ["inspect", path], ["repair", path], ["train-student", "--cache", path],
                    ["teacher-cache", *args], ["teacher-cache", *args, "--force"]):
        res = runner.invoke(app, command)
        line = res.stderr.strip().splitlines()[-1]  # (--force logs that it rebuilds first)
        assert res.exit_code == 2 and "metadata (zarr.json) is not valid JSON" in line and "delete it" in line, \
            (command, res.output)
    res = runner.invoke(app, ["ls"])
    assert res.exit_code == 0 and "is not valid JSON" in res.stdout, res.output
    assert Path(path, "logits").is_dir()  # nothing deleted
    line = _one_line(runner.invoke(app, ["verify", str(Path(path) / "logits")]))  # an array's folder: not a store
    assert "is not a kdcache Zarr v3 store (ContainsArrayError)" in line, line


def test_a_view_manifest_no_policy_parser_makes_is_refused(root, teacher_file):
    """The views' policy and seed rebuild every view's box when verify checks `aug/box` and when train-student reads
    them: a hand-edited crop of one number, a ratio of text, a seed or shift past int64 passed check_manifest and
    failed verify as a numpy IndexError, TypeError or OverflowError (found by fuzzing the manifest)."""
    path = run_teacher_cache(cfg(teacher_file, views=2, augment="crop=0.5-1,translate=2,flip"), log=lambda *_: None)
    g = st.open_group(path, "r+")
    manifest = dict(g.attrs[st.MANIFEST_KEY])
    views = manifest["views"]
    for change in ({"augment": dict(views["augment"], crop=[0.5])}, {"augment": dict(views["augment"], ratio=["a", 1])},
                   {"augment": dict(views["augment"], crop=[0.9, 0.5])}, {"seed": 2**64},
                   {"augment": dict(views["augment"], translate=10**20)}):
        g.attrs[st.MANIFEST_KEY] = dict(manifest, views=dict(views, **change))
        res = runner.invoke(app, ["verify", path])
        assert res.exit_code == 2 and "its manifest has a malformed views" in res.stderr, (change, res.output)
    g.attrs[st.MANIFEST_KEY] = dict(manifest, data=dict(manifest["data"], native_shape=[1, 0, 16]))
    res = runner.invoke(app, ["verify", path])
    assert res.exit_code == 2 and "its manifest has a malformed data" in res.stderr, res.output
    g.attrs[st.MANIFEST_KEY] = manifest
    assert runner.invoke(app, ["verify", path]).exit_code == 0



KILLED_IN_ZARR_WRITE = """
import os, pathlib, sys
from pipeline import store as st
from pipeline.teacher_cache import CacheConfig, run_teacher_cache
real, calls = pathlib.Path.replace, []
def replace(self, target):  # zarr's rename of its temporary: the process dies just before the third marker's
    if self.name.endswith(".partial") and st.COMMIT in self.parts:
        calls.append(self)
        if len(calls) == 3:
            os._exit(9)  # as SIGKILL: no clean-up runs
    return real(self, target)
pathlib.Path.replace = replace
run_teacher_cache(CacheConfig(data=sys.argv[1], weights=sys.argv[2], layers=["layer2"], chunk_samples=64,
                              batch_size=32, writers=1, out="s.zarr"), log=lambda *_: None)
"""


def test_a_kill_inside_zarrs_own_write_leaves_no_temporary_after_resume(root, teacher_file):
    """zarr writes the _commit markers, _stats rows and metadata to `<name>.<hex>.partial`, then renames it; a run
    killed between the two left that file in the store for good: the resume removed only kdcache's own chunk
    temporaries."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", KILLED_IN_ZARR_WRITE, SYN, str(teacher_file)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 9, res.stderr
    assert list(Path("s.zarr").rglob("*.partial")), "the simulated kill must leave zarr's temporary behind"
    said = []
    assert run_teacher_cache(cfg(teacher_file, out="s.zarr"), log=said.append) == "s.zarr"
    assert any("already cached" in str(x) for x in said), said
    assert not list(Path("s.zarr").rglob("*.partial"))
    assert runner.invoke(app, ["verify", "s.zarr"]).exit_code == 0
