"""The chunk-shuffling reader: every sample exactly once per epoch for any worker count; shuffle quality numbers."""

from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.augment import row_order
from pipeline.data import open_source
from pipeline.reader import CacheStream, _expected_distinct_chunks, make_loader, shuffle_quality, worker_init
from pipeline.store import CacheStore, open_store
from pipeline.teacher_cache import CacheConfig, run_teacher_cache

DATA = "synthetic:300:1x8x8:4"   # 300 rows in chunks of 64: the last chunk is partial


def _fake_store(n: int, chunk: int) -> CacheStore:
    """Enough of a manifest to plan an epoch's order (no arrays are read)."""
    return CacheStore(path="-", manifest={"data": {"num_samples": n}, "chunk_samples": chunk, "targets": {},
                                          "transform": {"size": [8, 8], "channels": 1, "mean": [0.5], "std": [0.5]}})


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
@pytest.mark.parametrize("batch,buffer", [(32, 4), (50, 1), (7, 3), (299, 2), (9, 1)])
def test_every_sample_exactly_once_per_epoch(root, teacher_file, workers, batch, buffer):
    path = run_teacher_cache(CacheConfig(data=DATA, weights=str(teacher_file), chunk_samples=64, device="cpu"),
                             log=lambda *_: None)
    store = open_store(path)
    stream = CacheStream(store, open_source(DATA), ["logits"], batch, use_labels=True, buffer_chunks=buffer, seed=3)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=worker_init)
    orders = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        batches = [b["index"] for b in loader]
        seen = torch.cat(batches).numpy()
        assert len(seen) == 300 and sorted(seen) == list(range(300)), (epoch, workers)
        # the count the learning-rate schedule plans with: each worker ends on its own partial batch
        assert len(batches) == stream.batches_per_epoch(workers), (epoch, workers)
        assert min(len(b) for b in batches) > 1  # a lone last row joins the batch before it (BatchNorm needs 2)
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1])  # a new order each epoch


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_the_schedule_counts_each_epochs_own_batches(root, teacher_file, monkeypatch):
    """With 2 loader workers the batches an epoch gives change with the blocks dealt to each worker (13, 13, 14, ...
    here): the cosine schedule must span exactly the steps taken, ending at 0, never climbing back past its end."""
    from pipeline import train_student as ts
    from pipeline.train_student import StudentConfig, run_train_student

    path = run_teacher_cache(CacheConfig(data=DATA, weights=str(teacher_file), chunk_samples=64, device="cpu"),
                             log=lambda *_: None)
    stream = CacheStream(open_store(path), open_source(DATA), ["logits"], 24, use_labels=True, seed=0)
    counts = [stream.batches_per_epoch(2, epoch=e) for e in range(4)]
    assert len(set(counts)) > 1, counts  # the case this test is about
    calls = []
    real = ts.cosine_lr
    monkeypatch.setattr(ts, "cosine_lr", lambda opt, lr, step, total, **kw: (calls.append((step, total)),
                                                                            real(opt, lr, step, total, **kw)))
    run_train_student(StudentConfig(cache=path, loss="kd=1", epochs=4, batch_size=24, workers=2, seed=0,
                                    buffer_chunks=1, out="run"), log=lambda *_: None)
    assert [step for step, _ in calls] == list(range(sum(counts)))
    assert {total for _, total in calls} == {sum(counts)}
    # FitNets' two stages each have their own schedule: it restarts at 0 and spans that stage's batches alone
    calls.clear()
    path = run_teacher_cache(CacheConfig(data=DATA, weights=str(teacher_file), chunk_samples=64, device="cpu",
                                         layers=["layer3"]), log=lambda *_: None)
    run_train_student(StudentConfig(cache=path, loss="fitnets=1", fitnets_hint_epochs=1, epochs=3, batch_size=24,
                                    workers=0, seed=0, out="run2"), log=lambda *_: None)
    per_epoch = len(CacheStream(open_store(path), open_source(DATA), ["logits"], 24, use_labels=True, seed=0))
    assert calls == [(i, per_epoch) for i in range(per_epoch)] + [(i, 2 * per_epoch) for i in range(2 * per_epoch)]


def test_epoch_rows_is_the_order_the_loader_delivers(root, teacher_file):
    path = run_teacher_cache(CacheConfig(data=DATA, weights=str(teacher_file), chunk_samples=64, device="cpu"),
                             log=lambda *_: None)
    store = open_store(path)
    index = np.asarray(store.open_group()["index"][:])
    for workers in (0, 2):
        stream = CacheStream(store, open_source(DATA), ["logits"], 32, use_labels=True, seed=1)
        stream.set_epoch(2)
        got = torch.cat([b["index"] for b in DataLoader(stream, batch_size=None, num_workers=workers)]).numpy()
        np.testing.assert_array_equal(got, index[stream.epoch_rows(workers)])


def test_fixed_row_order_mixes_a_sorted_source():
    sorted_labels = np.repeat(np.arange(10), 100)           # a class-sorted source, as an image folder is
    rows = row_order(1000, "shuffled", 0)
    assert sorted(rows) == list(range(1000)) and np.array_equal(rows, row_order(1000, "shuffled", 0))
    chunk_classes = [len(set(sorted_labels[rows[s:s + 100]])) for s in range(0, 1000, 100)]
    assert min(chunk_classes) == 10                           # every chunk holds every class
    assert [len(set(sorted_labels[s:s + 100])) for s in range(0, 1000, 100)] == [1] * 10  # "source" would not
    assert np.array_equal(row_order(5, "source"), np.arange(5))


def test_expected_distinct_chunks_matches_simulation():
    rng = np.random.default_rng(0)
    n, c, b = 1000, 64, 40
    sim = np.mean([len(np.unique(rng.choice(n, b, replace=False) // c)) for _ in range(4000)])
    assert math.isclose(_expected_distinct_chunks(n, c, b), sim, rel_tol=0.01)
    assert _expected_distinct_chunks(100, 10, 100) == pytest.approx(10.0)


def test_shuffle_quality_numbers():
    n, c, b = 4096, 256, 64
    seq = shuffle_quality(np.arange(n), c, b)
    uni = shuffle_quality(np.random.default_rng(0).permutation(n), c, b)
    assert seq["neighbour_spread"] < 0.01 and seq["distinct_chunks_per_batch"] == 1.0
    assert 0.95 < uni["neighbour_spread"] < 1.05 and 0.97 < uni["batch_chunks"] < 1.03
    # Hand example: rows visited 2, 0, 3, 1 -> positions of rows 0..3 are 1, 3, 0, 2; mean |diff| = 7/3; /(5/3).
    q = shuffle_quality(np.array([2, 0, 3, 1]), 2, 2)
    assert q["neighbour_spread"] == pytest.approx((7 / 3) / (5 / 3))
    assert q["distinct_chunks_per_batch"] == 2.0   # batches {2, 0} and {3, 1} each span chunks 0 and 1
    # A last partial batch is left out: it would be compared with the expectation for a full one.
    assert shuffle_quality(np.array([2, 0, 3, 1, 4]), 2, 2)["distinct_chunks_per_batch"] == 2.0
    # The reader sits in between, and a larger buffer is closer to uniform.
    qs = [shuffle_quality(CacheStream(_fake_store(n, c), None, [], b, use_labels=False, buffer_chunks=k,
                                      seed=0).epoch_rows(), c, b) for k in (1, 4, 16)]
    assert qs[0]["neighbour_spread"] < qs[1]["neighbour_spread"] < qs[2]["neighbour_spread"] <= 1.05
    assert qs[0]["distinct_chunks_per_batch"] == 1.0 and qs[2]["batch_chunks"] > 0.9


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_persistent_workers_follow_set_epoch(root, teacher_file, workers):
    """The loader training uses keeps its workers across epochs; each epoch must still get its own order and, with
    views, its own views. Workers load the next epoch's first buffer ahead: a jump (a resumed run) must not use it."""
    path = run_teacher_cache(CacheConfig(data=DATA, weights=str(teacher_file), chunk_samples=64, device="cpu",
                                         views=3, augment="crop=0.5-1,flip"), log=lambda *_: None)
    store = open_store(path)
    group = store.open_group()
    index = np.asarray(group["index"][:])
    boxes = np.asarray(group["aug/box"][:])
    row_of = {int(i): r for r, i in enumerate(index)}
    stream = CacheStream(store, open_source(DATA), ["logits"], 32, use_labels=True, buffer_chunks=2, seed=0,
                         view_policy="random")
    loader = make_loader(stream, workers)

    def first_groups(e):  # the first buffer each worker reads in epoch e
        return [stream.block_order(w, max(1, workers), epoch=e)[:2] for w in range(max(1, workers))]

    # A jump whose epoch starts with the very buffers the epoch after the previous one would (what a worker has
    # loaded ahead): only the epoch in the prefetch's key tells them apart, and their views differ.
    jump = next(e for e in range(6, 5000) if first_groups(e) == first_groups(5))
    orders = []
    for epoch in [0, 1, 2, 7, 3, 4, jump]:
        stream.set_epoch(epoch)
        batches = list(loader)
        got = torch.cat([b["index"] for b in batches]).numpy()
        np.testing.assert_array_equal(got, index[stream.epoch_rows(workers)])  # this epoch's planned order
        rows = np.array([row_of[int(i)] for i in got])
        views = torch.cat([b["view"] for b in batches]).numpy()
        planned = np.array([stream.view_of(r // 64, epoch) for r in rows])
        np.testing.assert_array_equal(views, planned)  # each block's view of this epoch, not of the one before
        # and the input rebuilt is that view's: its box is the one stored for (row, view)
        x = torch.cat([b["x"] for b in batches])
        src = open_source(DATA)
        from pipeline.data import Transform
        tf = Transform.from_dict(store.manifest["transform"])
        flips = np.asarray(group["aug/flip"][:])[rows, views]
        expect = src.load_view(got, tf, boxes[rows, views], flips)
        assert torch.equal(x, expect)
        orders.append(tuple(got))
    assert len(set(orders)) == 7


@pytest.mark.parametrize("views", [0, 3])
def test_streaming_from_disk_gives_the_batches_held_in_memory_give(root, teacher_file, monkeypatch, views):
    """Arrays above SMALL_ARRAY_BYTES (a real layer3 hint) are read chunk by chunk from the store, of the epoch's
    view; the batches must be exactly those of the in-memory path."""
    import pipeline.reader as rd

    extra = {"views": views, "augment": "crop=0.6-1,flip"} if views else {}
    path = run_teacher_cache(CacheConfig(data=DATA, weights=str(teacher_file), chunk_samples=64, layers=["layer2"],
                                         device="cpu", **extra), log=lambda *_: None)
    store = open_store(path)

    def epochs(small_bytes):
        monkeypatch.setattr(rd, "SMALL_ARRAY_BYTES", small_bytes)
        stream = CacheStream(store, open_source(DATA), ["logits", "features/layer2"], 32, use_labels=True,
                             buffer_chunks=2, seed=5)
        out = []
        for epoch in (0, 1):
            stream.set_epoch(epoch)
            out.append(list(stream))
        return stream, out

    memory_stream, in_memory = epochs(rd.SMALL_ARRAY_BYTES)
    disk_stream, from_disk = epochs(0)
    assert set(memory_stream._memory) >= {"logits", "features/layer2"} and not disk_stream._memory
    for a, b in zip(in_memory, from_disk):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for k in x:
                torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, equal_nan=False, msg=k)
    if views:  # and what was read is each block's view of that epoch, not view 0
        assert len({int(v) for e in from_disk for b in e for v in b["view"]}) > 1


def test_block_order_changes_every_epoch():
    stream = CacheStream(_fake_store(64 * 40, 64), None, [], 32, use_labels=False, buffer_chunks=1, seed=0)
    orders = []
    for epoch in range(3):
        stream.set_epoch(epoch)
        orders.append(stream.block_order())
    assert all(sorted(o) == list(range(40)) for o in orders)
    assert orders[0] != orders[1] and orders[1] != orders[2]
    # Rows move within their buffer anew each epoch too: a store of one chunk (one buffer, the same block order every
    # epoch) is still read in a new order every epoch.
    one = CacheStream(_fake_store(64, 64), None, [], 16, use_labels=False, seed=0)
    rows = []
    for epoch in range(3):
        one.set_epoch(epoch)
        rows.append(one.epoch_rows())
    assert all(sorted(r) == list(range(64)) for r in rows)
    assert not np.array_equal(rows[0], rows[1]) and not np.array_equal(rows[1], rows[2])


@pytest.mark.parametrize("world,workers", [(2, 1), (3, 2), (4, 3)])
def test_ranks_and_workers_share_every_block_once(world, workers):
    streams = [CacheStream(_fake_store(64 * 23, 64), None, [], 32, use_labels=False, buffer_chunks=1, seed=1,
                           rank=r, world=world) for r in range(world)]
    for epoch in (0, 1):
        for s in streams:
            s.set_epoch(epoch)
        shares = [s.block_order(w, workers) for s in streams for w in range(workers)]
        assert sorted(b for share in shares for b in share) == list(range(23))
        # the steps every rank can take: the fewest batches any rank's workers actually cut
        def cut(s):
            def rows_only(blocks, _epoch):
                return {"row": torch.cat([torch.arange(*s.blocks[b]) for b in blocks])}
            return sum(1 for w in range(workers) for _ in s._batches(w, workers, rows_only, key="row"))

        assert streams[0].batches_per_epoch(workers, everyone=True) == min(cut(s) for s in streams)


@pytest.mark.parametrize("n,batch", [(129, 64), (130, 64), (65, 64), (1, 64), (128, 1)])
def test_a_lone_last_row_joins_the_batch_before_it(n, batch):
    """Blocks of 64, 64 and 1 rows, one per buffer: the last row arrives in a buffer of its own and still joins the
    previous buffer's last batch; no batch is of one row unless the worker has only one row; every row once."""
    stream = CacheStream(_fake_store(n, 64), None, [], batch, use_labels=False, buffer_chunks=1, shuffle=False)

    def rows_only(blocks, _epoch):
        return {"row": torch.cat([torch.arange(*stream.blocks[b]) for b in blocks])}

    sizes = [len(b["row"]) for b in stream._batches(0, 1, rows_only, key="row")]
    expect = {(129, 64): [64, 65], (130, 64): [64, 64, 2], (65, 64): [65], (1, 64): [1], (128, 1): [1] * 128}
    assert sizes == expect[(n, batch)]
    assert len(sizes) == stream.batches_per_epoch(1)


@pytest.mark.parametrize("small_bytes", [0, 64 << 20])
def test_a_lost_or_damaged_chunk_stops_the_stream_instead_of_training_on_it(root, teacher_file, monkeypatch,
                                                                           small_bytes):
    """A chunk deleted after the store was completed reads as the fill value; an int8 map's fill (-128) would decode
    to plausible-looking numbers (-128 * scale), so the reader itself must refuse it, from memory and from disk. A
    flipped byte fails the chunk's crc32c: refused too, naming the rows."""
    import pipeline.reader as rd
    from pipeline.errors import KDCacheError

    monkeypatch.setattr(rd, "SMALL_ARRAY_BYTES", small_bytes)
    path = run_teacher_cache(CacheConfig(data=DATA, weights=str(teacher_file), chunk_samples=64, layers=["layer2"],
                                         feature_codec="int8", device="cpu"), log=lambda *_: None)
    chunks = root / path / "features" / "layer2" / "c"

    def stream():
        return CacheStream(open_store(path), open_source(DATA), ["logits", "features/layer2"], 32, use_labels=True,
                           buffer_chunks=2, seed=0)

    assert len(list(stream())) > 0  # intact: streams
    (chunks / "2" / "0" / "0" / "0").unlink()
    with pytest.raises(KDCacheError, match=r"features/layer2 rows 128-191 in .* are missing"):
        list(stream())
    if small_bytes:  # read whole per worker: the other case's damage is the same array read chunk by chunk
        return
    from typer.testing import CliRunner

    from pipeline.cli import app
    assert CliRunner().invoke(app, ["repair", path]).exit_code == 0
    f = chunks / "1" / "0" / "0" / "0"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(KDCacheError, match=r"cannot read features/layer2 rows 64-127 from .*kdcache verify"):
        list(stream())


def test_worker_is_quiet_when_the_training_process_drops_a_transfer():
    """A loader worker serves its batches' file descriptors from multiprocessing's resource-sharer thread. A
    training process stopped by SIGINT sent to it alone (`kill -INT PID`) drops the connection mid-handshake, and
    each worker printed a BrokenPipeError / ConnectionResetError traceback under the one-line 'interrupted'. Here
    the dropped connection is made by hand, in a process set up as worker_init sets up a loader worker."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = """
import os, socket, time
from multiprocessing import resource_sharer
from pipeline.reader import worker_init
worker_init(0)
r, _ = os.pipe()
address, _key = resource_sharer.DupFd(r)._id   # this process's resource-sharer server, as a batch handed over
s = socket.socket(socket.AF_UNIX)
s.connect(address)
s.close()                                       # the training process gone mid-handshake
time.sleep(0.5)                                 # the server thread meets the broken connection
print("done")
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "done" in out.stdout, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_workers_single_row_share_joins_another_batch(root, teacher_file):
    """129 rows in chunks of 64 leave a last chunk of one row. With two loader workers, an epoch that deals that
    chunk to a worker alone gave a batch of a single row: a student with BatchNorm on a 1x1 map (torchvision's
    MobileNetV3) stopped there, mid-run. The student stage joins it to another worker's batch, counts the batches
    it gets (the cosine schedule spans them), and still sees every sample once an epoch."""
    from pipeline.reader import SingleRowsJoined

    data = "synthetic:129:1x8x8:4"
    path = run_teacher_cache(CacheConfig(data=data, weights=str(teacher_file), chunk_samples=64, device="cpu"),
                             log=lambda *_: None)
    stream = CacheStream(open_store(path), open_source(data), ["logits"], 32, use_labels=True, seed=3)
    loader = SingleRowsJoined(make_loader(stream, 2), 32)
    alone = 0
    for epoch in range(4):  # seed 3 deals it so in epochs 2 and 3
        stream.set_epoch(epoch)
        alone += [stream.blocks[b] for b in stream.block_order(1, 2)] == [(128, 129)]
        batches = [b["index"] for b in loader]
        assert min(len(b) for b in batches) > 1
        assert sorted(torch.cat(batches).tolist()) == list(range(129))
        assert len(batches) == stream.batches_per_epoch(2)
    assert alone  # some epoch did deal the 1-row chunk to worker 1 alone
    # sizes alone: a single row joins the batch after it, the last one the batch before; batch size 1 is kept
    from pipeline.reader import join_single_rows

    def sizes(s, batch=32):
        return list(join_single_rows(s, batch, rows=int, merge=lambda a, b: a + b))

    assert sizes([32, 1, 32, 5]) == [32, 33, 5]
    assert sizes([32, 5, 1]) == [32, 6]
    assert sizes([1, 1, 32]) == [2, 32]
    assert sizes([1]) == [1]
    assert sizes([1, 1], batch=1) == [1, 1]


_interrupt_at_fork: list[int] = []  # armed by the test below only: at-fork hooks cannot be unregistered
os.register_at_fork(after_in_parent=lambda: _interrupt_at_fork and (_interrupt_at_fork.pop(),
                                                                    signal.raise_signal(signal.SIGINT)))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_ctrl_c_while_the_loader_forks_its_workers_stops_the_run(root, teacher_file):
    """Ctrl-C landing while DataLoader workers are forked raised its KeyboardInterrupt inside an at-fork hook
    (logging registers one), where Python prints "Exception ignored" and drops it: training went on as if never
    interrupted (seen sending SIGINT to train-student at random moments). The student stage's loader holds it
    across the forks and raises it after them. Simulated: a SIGINT raised from an at-fork hook in the parent."""
    import threading

    from pipeline.reader import SingleRowsJoined

    path = run_teacher_cache(CacheConfig(data=DATA, weights=str(teacher_file), chunk_samples=64, device="cpu"),
                             log=lambda *_: None)
    stream = CacheStream(open_store(path), open_source(DATA), ["logits"], 32, use_labels=True)
    before = signal.getsignal(signal.SIGINT)
    assert threading.current_thread() is threading.main_thread() and before not in (signal.SIG_IGN, None)
    _interrupt_at_fork.append(1)
    try:
        with pytest.raises(KeyboardInterrupt):
            iter(SingleRowsJoined(make_loader(stream, 2), 32))
    finally:
        _interrupt_at_fork.clear()
    assert signal.getsignal(signal.SIGINT) is before  # the usual Ctrl-C again afterwards
    assert sum(len(b["index"]) for b in SingleRowsJoined(make_loader(stream, 2), 32)) == stream.store.num_samples


class _WorkersSigterm(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield {"quiet": signal.getsignal(signal.SIGTERM) == signal.SIG_IGN}


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_cli_runs_loader_workers_ignore_sigterm_however_started(method, monkeypatch):
    """A CLI run's loader workers ignore SIGTERM (`quiet_worker_sigterm`): the training process, terminated too,
    shuts them down. They learnt that they were a CLI run's from their copy of the process's state, which a worker
    started by 'spawn' or 'forkserver' (macOS's default, Linux's from Python 3.14) does not have: it kept torch's
    handling and died by the signal. Outside a CLI run the workers keep it."""
    import pipeline.errors as errors

    monkeypatch.setattr(errors, "_sigterm", {"installed": False, "raised": False})
    before = signal.getsignal(signal.SIGTERM)
    try:
        errors.on_sigterm()
        loader = make_loader(_WorkersSigterm(), 1)
        loader.multiprocessing_context = method
        assert [b["quiet"] for b in loader] == [True]
    finally:
        errors.off_sigterm()
        signal.signal(signal.SIGTERM, before)
    loader = make_loader(_WorkersSigterm(), 1)
    loader.multiprocessing_context = method
    assert [b["quiet"] for b in loader] == [False]


def test_a_second_cli_run_in_one_process_leaves_sigterm_as_it_found_it(monkeypatch):
    """The CLI's entry called twice in one process (a script running commands, the tests): once the first had been
    terminated, the second left its own SIGTERM handler installed for whatever ran after it."""
    import pipeline.errors as errors

    monkeypatch.setattr(errors, "_sigterm", {"installed": False, "raised": False})
    before = signal.getsignal(signal.SIGTERM)
    try:
        errors.on_sigterm()
        with pytest.raises(errors.Terminated):
            signal.raise_signal(signal.SIGTERM)
        errors.off_sigterm()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # (while the interpreter finishes)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        errors.on_sigterm()
        errors.off_sigterm()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)
