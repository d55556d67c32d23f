"""Shared fixtures: every test runs in its own data root with a tiny, seeded, randomly initialised teacher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.models import TeacherNet

SYN = "synthetic:192:1x16x16:4"        # small, labelled, deterministic
SYN_TEST = "synthetic:64:1x16x16:4:1"   # another seed: disjoint samples
REPO = Path(__file__).resolve().parents[1]


def run_ranks(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """`args` (a script and its arguments, or `-m pipeline ...`) under torchrun as 2 CPU ranks (gloo), one thread
    each, importing this checkout; its output captured as text."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


def save_teacher(path: Path, in_channels: int = 1, num_classes: int = 4, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = TeacherNet(num_classes=num_classes, in_channels=in_channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(),
                "meta": {"arch": "default-teacher", "num_classes": num_classes, "in_channels": in_channels}}, path)
    return path


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A fresh data root (KDCACHE_DATA) and working directory."""
    monkeypatch.setenv("KDCACHE_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def teacher_file(root):
    return save_teacher(root / "teacher.pt")
