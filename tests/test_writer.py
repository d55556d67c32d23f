"""The parallel block writer: chunks encoded by kdcache equal zarr's own, and a parallel write equals a serial one."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from pipeline import store as st

N, ROWS = 200, 64  # 4 blocks, the last one partial (an edge chunk)


def _make(path: Path):
    rng = np.random.default_rng(0)
    specs = {"index": ((N,), "int64"), "logits": ((N, 7), "float16"), "features/x": ((N, 3, 5, 5), "float16")}
    values = {"index": np.arange(N, dtype=np.int64),
              "logits": rng.standard_normal((N, 7)).astype(np.float16),
              "features/x": rng.standard_normal((N, 3, 5, 5)).astype(np.float16)}
    manifest = {"chunk_samples": ROWS, "codecs": st.codecs_config(1), "data": {"num_samples": N}}
    group = st.create_store(path, manifest, specs, ROWS)
    return group, values


def _chunk_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and "/c/" in str(p.relative_to(path)).replace("\\", "/") and st.COMMIT not in str(p)}


def test_direct_chunks_equal_zarr_written_chunks(tmp_path):
    ours, values = _make(tmp_path / "ours.zarr")
    theirs, _ = _make(tmp_path / "theirs.zarr")
    for b, (s, e) in enumerate(st.block_ranges(N, ROWS)):
        st.write_block(ours, b, s, {k: v[s:e] for k, v in values.items()})
        for k, v in values.items():   # zarr's own write path
            theirs[k][s:e] = v[s:e]
    a, b = _chunk_files(tmp_path / "ours.zarr"), _chunk_files(tmp_path / "theirs.zarr")
    assert a.keys() == b.keys() and len(a) == 12
    for name in a:
        assert a[name] == b[name], name  # byte for byte, edge chunk padding included
    g = zarr.open_group(str(tmp_path / "ours.zarr"), mode="r")
    for k, v in values.items():
        np.testing.assert_array_equal(g[k][:], v)


def test_parallel_write_equals_serial_write(tmp_path):
    serial, values = _make(tmp_path / "serial.zarr")
    parallel, _ = _make(tmp_path / "parallel.zarr")
    blocks = st.block_ranges(N, ROWS)
    for b, (s, e) in enumerate(blocks):
        st.write_block(serial, b, s, {k: v[s:e] for k, v in values.items()})
    with ThreadPoolExecutor(4) as pool:  # reversed order, four threads at once
        list(pool.map(lambda b: st.write_block(parallel, b, blocks[b][0],
                                               {k: v[blocks[b][0]:blocks[b][1]] for k, v in values.items()}),
                      reversed(range(len(blocks)))))
    assert _chunk_files(tmp_path / "serial.zarr") == _chunk_files(tmp_path / "parallel.zarr")
    assert st.committed_blocks(parallel).all()
    assert not list((tmp_path / "parallel.zarr").rglob("*.tmp"))  # no temporary file left behind
