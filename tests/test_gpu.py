"""The CUDA paths (autocast, channels_last, pinned copies on a side stream, pinned loader batches), checked against
the CPU. Skipped where no GPU is present (CI); run on a GPU machine with `python -m pytest tests/test_gpu.py`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from pipeline.evaluate import EvalConfig, run_eval
from pipeline.online import OnlineConfig, run_online_kd
from pipeline.teacher_cache import CacheConfig, run_teacher_cache
from pipeline.teacher_train import TeacherTrainConfig, run_teacher_train
from pipeline.train_student import StudentConfig, run_train_student
from pipeline.verify import verify_store
from tests.conftest import SYN, SYN_TEST

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
quiet = dict(log=lambda *_: None)


def _pair(teacher_file, **kw):
    """The same cache made on the CPU (float32, exact) and on the GPU (float16 autocast, async copies)."""
    common = dict(data=SYN, weights=str(teacher_file), layers=["layer2", "avgpool"], chunk_samples=48,
                  batch_size=20, **kw)  # batches that do not divide the chunks: partial batches on both paths
    return (run_teacher_cache(CacheConfig(device="cpu", out="cpu.zarr", **common), **quiet),
            run_teacher_cache(CacheConfig(device="cuda", out="gpu.zarr", **common), **quiet))


@pytest.mark.parametrize("views", [0, 3])
def test_a_gpu_cache_holds_what_the_cpu_computes(root, teacher_file, views):
    kw = dict(views=views, augment="crop=0.5-1,flip") if views else {}
    cpu_path, gpu_path = _pair(teacher_file, **kw)
    cpu, gpu = zarr.open_group(cpu_path, mode="r"), zarr.open_group(gpu_path, mode="r")
    man = gpu.attrs["kdcache"]
    assert man["complete"] and man["device"].startswith("cuda")
    # What does not depend on the device is bitwise equal: rows, labels, the views' parameters.
    for name in ["index", "labels"] + (["aug/box", "aug/flip"] if views else []):
        np.testing.assert_array_equal(gpu[name][:], cpu[name][:], err_msg=name)
    for name in ["logits", "features/layer2", "features/avgpool"]:
        a, b = (np.asarray(g[name][:], dtype=np.float32) for g in (gpu, cpu))
        assert a.shape == b.shape and np.isfinite(a).all(), name
        # float16 autocast through the teacher: within verify's GPU tolerance (relative, absolute below 1)
        assert (np.abs(a - b) / np.maximum(np.abs(b), 1)).max() < 1e-2, name
        assert np.abs(a - b).max() > 0, name  # it really ran in reduced precision, not on the CPU
    # verify re-runs the teacher on the CPU and accepts the GPU-made store; a tampered one is caught
    rep = verify_store(gpu_path, recompute=24)
    assert rep.ok, rep.to_dict()
    arr = zarr.open_array(f"{gpu_path}/logits", mode="r+")
    arr[:4] = np.asarray(arr[:4]) + 1.0
    assert not verify_store(gpu_path, recompute=arr.shape[0]).recompute["ok"]


def test_a_student_learns_on_the_gpu_from_a_gpu_cache(root):
    """Teacher trained on the GPU, cached on the GPU, its soft targets alone (labels hidden) teach a GPU student;
    the student file then evaluates on the CPU to the accuracy the run reported."""
    run_teacher_train(TeacherTrainConfig(data=SYN, test_data=SYN_TEST, epochs=8, batch_size=32, lr=0.05,
                                         out="t.pt", device="cuda"), **quiet)
    path = run_teacher_cache(CacheConfig(data=SYN, weights="t.pt", layers=["layer2", "avgpool"], chunk_samples=64,
                                         device="cuda"), **quiet)
    s = run_train_student(StudentConfig(cache=path, loss="kd=1", no_labels=True, epochs=10, batch_size=32, lr=0.05,
                                        test_data=SYN_TEST, workers=2, device="cuda", out="run"), **quiet)
    assert s["test_acc"] > 0.6  # 4 classes: chance is 0.25
    ev = run_eval(EvalConfig(weights="run/student.pt", data=SYN_TEST), **quiet)
    assert ev["top1"] == pytest.approx(s["test_acc"], abs=2 / 64)  # bf16 training autocast vs float32 on the CPU
    # every loss on the GPU path, pinned batches from two workers: finite parts, one row per epoch
    s = run_train_student(StudentConfig(cache=path, loss="kd=1,fitnets=1,rkd=1", fitnets_hint="layer2",
                                        fitnets_guided="block1", fitnets_schedule="single", epochs=2,
                                        batch_size=32, test_data=SYN_TEST, workers=2, device="cuda",
                                        out="run-all"), **quiet)
    rows = [json.loads(x) for x in open("run-all/metrics.jsonl")]
    assert len(rows) == 2 and set(rows[0]["losses"]) == {"kd_soft", "kd_hard", "fitnets", "rkd_distance",
                                                         "rkd_angle"}
    assert all(np.isfinite(v) for r in rows for v in r["losses"].values())


def test_online_kd_runs_on_the_gpu(root, teacher_file):
    s = run_online_kd(OnlineConfig(data=SYN, teacher="default-teacher", weights=str(teacher_file),
                                   loss="kd=1,fitnets=1", fitnets_hint="layer2", fitnets_guided="block1",
                                   fitnets_schedule="single", augment="crop=0.5-1,flip", epochs=2, batch_size=32,
                                   workers=2, device="cuda", test_data=SYN_TEST, out="online"), **quiet)
    rows = [json.loads(x) for x in open("online/metrics.jsonl")]
    assert len(rows) == 2 and all(np.isfinite(v) for r in rows for v in r["losses"].values())
    assert 0 <= s["test_acc"] <= 1
