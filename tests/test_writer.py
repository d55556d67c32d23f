"""The parallel block writer: chunks encoded by kdcache equal zarr's own, and a parallel write equals a serial one."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from pipeline import store as st

N, ROWS, K = 200, 64, 3  # 4 blocks, the last one partial (an edge chunk); 3 views


def _make(path: Path):
    rng = np.random.default_rng(0)
    specs = {"index": st.array_spec((N,), "int64", ROWS, False),
             "logits": st.array_spec((N, 7), "float16", ROWS, False),
             "features/x": st.array_spec((N, 3, 5, 5), "int8", ROWS, False),
             "features/v": st.array_spec((N, K, 2, 3), "float32", ROWS, True)}   # a view axis
    values = {"index": np.arange(N, dtype=np.int64),
              "logits": rng.standard_normal((N, 7)).astype(np.float16),
              "features/x": rng.integers(-127, 128, (N, 3, 5, 5)).astype(np.int8),
              "features/v": rng.standard_normal((N, K, 2, 3)).astype(np.float32)}
    manifest = {"chunk_samples": ROWS, "codecs": st.codecs_config(1), "data": {"num_samples": N}, "views": {"count": K}}
    group = st.create_store(path, manifest, specs, (len(st.block_ranges(N, ROWS)), K), [])
    return group, values


def _unit(values, b, v):
    """Unit (b, v): one view of the view arrays; view 0 also owns the sample-level arrays."""
    s, e = st.block_ranges(N, ROWS)[b]
    out = {"features/v": values["features/v"][s:e, v]}
    if v == 0:
        out.update({k: values[k][s:e] for k in ("index", "logits", "features/x")})
    return s, out


def _units():
    return [(b, v) for b in range(len(st.block_ranges(N, ROWS))) for v in range(K)]


def _chunk_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and "/c/" in str(p.relative_to(path)).replace("\\", "/") and st.COMMIT not in str(p)}


def test_direct_chunks_equal_zarr_written_chunks(tmp_path):
    ours, values = _make(tmp_path / "ours.zarr")
    theirs, _ = _make(tmp_path / "theirs.zarr")
    for b, v in _units():
        s, arrays = _unit(values, b, v)
        st.write_unit(ours, b, v, s, arrays)
        for k, a in arrays.items():   # zarr's own write path
            theirs[k][(slice(s, s + len(a)), v) if k == "features/v" else slice(s, s + len(a))] = a
    a, b = _chunk_files(tmp_path / "ours.zarr"), _chunk_files(tmp_path / "theirs.zarr")
    assert a.keys() == b.keys() and len(a) == 4 * 3 + 4 * K
    for name in a:
        assert a[name] == b[name], name  # byte for byte, edge chunk padding included
    g = zarr.open_group(str(tmp_path / "ours.zarr"), mode="r")
    for k, v in values.items():
        np.testing.assert_array_equal(g[k][:], v)


def test_parallel_write_equals_serial_write(tmp_path):
    serial, values = _make(tmp_path / "serial.zarr")
    parallel, _ = _make(tmp_path / "parallel.zarr")
    for b, v in _units():
        st.write_unit(serial, b, v, *_unit(values, b, v))
    with ThreadPoolExecutor(4) as pool:  # reversed order, four threads at once
        list(pool.map(lambda u: st.write_unit(parallel, u[0], u[1], *_unit(values, *u)), reversed(_units())))
    assert _chunk_files(tmp_path / "serial.zarr") == _chunk_files(tmp_path / "parallel.zarr")
    assert st.committed_units(parallel).all()
    g = zarr.open_group(str(tmp_path / "parallel.zarr"), mode="r")
    for k, v in values.items():
        np.testing.assert_array_equal(g[k][:], v)
    assert not list((tmp_path / "parallel.zarr").rglob("*.tmp"))  # no temporary file left behind


def test_teacher_cache_writer_pool_equals_one_writer(root, teacher_file):
    """The stage's own pool: 4 writer threads, many units in flight, produce the bytes one writer does."""
    from pipeline.teacher_cache import CacheConfig, run_teacher_cache
    from tests.conftest import SYN

    def cache(writers):
        return run_teacher_cache(CacheConfig(data=SYN, weights=str(teacher_file), layers=["layer2"], chunk_samples=16,
                                             batch_size=16, writers=writers, out=f"w{writers}.zarr"),
                                 log=lambda *_: None)

    one, four = Path(cache(1)), Path(cache(4))
    assert zarr.open_group(str(four), mode="r").attrs["kdcache"]["stats"]["writers"] == 4
    def chunks(store):
        return sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file() and "c" in p.relative_to(store).parts)

    files = chunks(one)
    assert len(files) > 40 and files == chunks(four)
    for f in files:  # _stats too: each unit's distortion sums are computed by that unit alone, in one order
        assert (one / f).read_bytes() == (four / f).read_bytes(), f


def test_a_chunk_too_large_for_memory_gets_a_note_with_a_chunk_size(root, teacher_file, monkeypatch):
    """Chunks over the threshold (256 MiB; lowered here) are named with their size and a --chunk-samples that would
    make them ~128 MiB (scaled down here too), in whole batches; smaller chunks get no note."""
    import pipeline.teacher_cache as tc
    from tests.conftest import SYN

    lines = []
    tc.run_teacher_cache(tc.CacheConfig(data=SYN, weights=str(teacher_file), layers=["layer2"], chunk_samples=64,
                                        batch_size=16, out="small.zarr"), log=lines.append)
    assert not any(line.startswith("note: each") for line in lines)
    g = zarr.open_group("small.zarr", mode="r")
    chunk = int(np.prod(g["features/layer2"].chunks)) * g["features/layer2"].dtype.itemsize  # the largest array
    assert chunk > int(np.prod(g["logits"].chunks)) * g["logits"].dtype.itemsize
    monkeypatch.setattr(tc, "LARGE_CHUNK_BYTES", chunk - 1)
    lines = []
    tc.run_teacher_cache(tc.CacheConfig(data=SYN, weights=str(teacher_file), layers=["layer2"], chunk_samples=64,
                                        batch_size=16, out="large.zarr"), log=lines.append)
    import re

    note = [line for line in lines if line.startswith("note: each")]
    assert len(note) == 1 and note[0].startswith("note: each features/layer2 chunk is ") and "(64 rows of " in note[0]
    suggest = int(re.search(r"--chunk-samples (\d+) ", note[0]).group(1))
    row = chunk / 64  # bytes per row of the largest array, from the store's own metadata
    assert suggest % 16 == 0 and suggest * row <= 128 << 20 < (suggest + 16) * row  # whole batches, ~128 MiB


def test_the_progress_bar_counts_this_processs_share_and_ends_full(root, teacher_file, monkeypatch):
    """Under torchrun rank 0's bar showed the whole store but advanced by its own share only, so it ended short
    of 100% (half-way with two ranks). Here one process given half the units (every other one, as rank 0 of 2
    gets them): the bar's total is its share, and it ends full; the store is then refused as incomplete, naming
    its folder (not zarr's `file://<relative path>`)."""
    import pytest

    import pipeline.teacher_cache as tc
    from pipeline.errors import KDCacheError
    from pipeline.ranks import Ranks

    bars, real = [], tc._progress

    def spy(*a, **k):
        bars.append(real(*a, **k))
        return bars[-1]

    monkeypatch.setattr(tc, "_progress", spy)
    monkeypatch.setattr(Ranks, "share", lambda self, items: items[0::2])
    not_full = rf"^2 unit\(s\) of {root}/data/cache/[0-9a-f]{{16}}\.zarr are not committed"
    with pytest.raises(KDCacheError, match=not_full):
        tc.run_teacher_cache(tc.CacheConfig(data="synthetic:256:1x16x16:4", weights=str(teacher_file),
                                            chunk_samples=64), log=lambda *_: None)
    (prog, _task), = bars
    assert (prog.tasks[0].total, prog.tasks[0].completed) == (128, 128)
