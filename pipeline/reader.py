"""Streaming a store back for the student: chunk-level shuffling, one read per chunk, inputs rebuilt by index.

`CacheStream` is an IterableDataset yielding whole batches (`make_loader` wraps it in the DataLoader we train with):
- each epoch, the order of blocks (one block = one chunk of every array) is a permutation seeded by (seed, epoch);
  with R ranks (torchrun) of W DataLoader workers each, worker w of rank r takes blocks r*W + w, r*W + w + R*W, ...
  of that order, so every sample is visited exactly once per epoch for any worker and rank count;
- with augmented views, each block reads the view `augment.select_view` picks for (seed, epoch, block): one chunk
  per array, the stored parameters of that view, and the input rebuilt from them exactly as the teacher saw it;
- a worker reads `buffer_chunks` blocks at a time (one read per chunk per array), rebuilds their inputs from the data
  source by stored index with the transform from the manifest, shuffles rows inside that buffer, and cuts batches;
  while one buffer's batches are handed out, a thread loads the next (and after the last, the next epoch's first);
- arrays under 64 MiB (index, labels, logits and view parameters, in most stores) are read whole once per worker
  and kept in memory; larger ones are read chunk by chunk with the buffer;
- the store is opened lazily inside each worker (never shared across processes).
Batches carry the stored parts of each target (`logits`, or `features/x` and `features/x.scale`, ...): the training
loop decodes them on its device with the target's codec.

Shuffle quality trades against memory: a sample can only move within its buffer, so larger buffers are closer to a
uniform shuffle (`shuffle_quality` measures it; see the README's performance section). The default buffer holds as
many chunks as fit in 256 MiB per worker (2 to 64); rows are stored in a fixed random order (`augment.row_order`), so
even a small buffer draws batches from random samples of the data.
"""

from __future__ import annotations

import math
import sys
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.augment import select_view, stored_params
from pipeline.codecs import fill_value, is_missing
from pipeline.data import Source, Transform
from pipeline.errors import KDCacheError, cli_sigterm, hold_interrupts, quiet_worker_sigterm
from pipeline.loops import batch_bounds
from pipeline.store import CacheStore, block_ranges, metadata_damage

SMALL_ARRAY_BYTES = 64 << 20  # arrays under this are loaded whole, per worker
BUFFER_BYTES = 256 << 20      # the default shuffle buffer per worker (--buffer-chunks 0)


def _settle_pending_reads(timeout: float = 30.0) -> None:
    """Let zarr finish the reads still in flight before we raise. One failed chunk fails the whole slice read, but
    its sibling chunks' reads stay queued on zarr's event loop; a process that exits on our error would then close
    that loop under them, and asyncio prints dozens of "Task was destroyed" / "Event loop is closed" tracebacks
    below the one-line error."""
    import asyncio

    from zarr.core.sync import sync

    async def settle():
        me = asyncio.current_task()
        await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not me), return_exceptions=True)

    try:
        sync(settle(), timeout=timeout)
    except Exception:  # noqa: BLE001 - best effort: the error being raised is what matters
        pass


class SharedEpoch:
    """The epoch number in shared memory.

    Persistent DataLoader workers keep the copy of the dataset they were started with, so a plain `self.epoch = e`
    in the main process never reaches them and every epoch would replay epoch 0's order (and its views). The
    datasets here keep their epoch in this shared value instead: `set_epoch` writes it in the main process and each
    worker reads it when it starts the next epoch's iteration.
    """

    def __init__(self, epoch: int = 0):
        import multiprocessing as mp

        self._value = mp.RawValue("q", epoch)

    @property
    def value(self) -> int:
        return int(self._value.value)

    @value.setter
    def value(self, epoch: int) -> None:
        self._value.value = int(epoch)


def worker_init(_worker_id: int, cli: bool | None = None) -> None:
    """Loader workers decode and index; one intra-op thread each leaves the cores to the training process. `cli`:
    whether the loader was made in a CLI run (`make_loader` says; see `quiet_worker_sigterm`)."""
    torch.set_num_threads(1)
    sys.excepthook = _quiet_lost_connection(sys.excepthook)
    quiet_worker_sigterm(cli)  # a CLI run's workers: SIGTERM to the process group ends them without a word


def _quiet_lost_connection(hook):
    """A worker hands its batches' tensors over by file descriptor, served from a thread (multiprocessing's resource
    sharer) that reports any failure through sys.excepthook. A training process stopped mid-transfer (SIGINT sent
    to it alone, e.g. `kill -INT`, while its workers go on) resets that connection, and each worker would print a
    ConnectionResetError / BrokenPipeError traceback under the one-line 'interrupted' message. A lost connection
    to the training process is no error of the worker's: nothing is left to serve, so this hook drops it."""
    def hook_(kind, value, tb):
        if issubclass(kind, (ConnectionError, EOFError)):
            return
        hook(kind, value, tb)

    return hook_


def make_loader(stream: IterableDataset, workers: int, pin_memory: bool = False) -> DataLoader:
    """The DataLoader both training paths use: whole batches from the stream, persistent workers (stores and
    in-memory arrays opened once per worker), one intra-op thread per worker."""
    # Its own generator: the workers' base seed is otherwise drawn from torch's global RNG whenever workers start,
    # which would shift a resumed run's dropout masks away from an uninterrupted run's (the streams here seed
    # everything they shuffle themselves).
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, worker_init_fn=partial(worker_init, cli=cli_sigterm()),
                      generator=torch.Generator().manual_seed(0))


def stop_workers(loader) -> None:
    """End a loader's worker processes now, however the run ends. Persistent workers live as long as the loader's
    iterator, and a run that fails or is interrupted leaves its frames (hence the loader) in the exception's
    traceback: from Python, where IPython / Jupyter keep that as sys.last_traceback, the workers (each holding up to
    256 MiB of buffered chunks) and their pipes stayed alive until a later error replaced it. The CLI's process exits,
    so only library callers saw this. `loader`: a DataLoader, or `SingleRowsJoined` around one; any other iterable
    of batches has no workers."""
    loader = loader.loader if isinstance(loader, SingleRowsJoined) else loader
    if not isinstance(loader, DataLoader):
        return
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):  # torch's own clean-up, as its __del__ runs it
        it._shutdown_workers()
    loader._iterator = None


class CacheStream(IterableDataset):
    def __init__(self, store: CacheStore, source: Source, targets: list[str], batch_size: int, *,
                 use_labels: bool, shuffle: bool = True, buffer_chunks: int = 0, seed: int = 0,
                 drop_last: bool = False, view_policy: str = "cycle", rank: int = 0, world: int = 1):
        self.store, self.source = store, source
        self.rank, self.world = rank, world
        self.targets = list(targets)  # the teacher targets this stream serves
        self.arrays = [part for t in targets for part in store.targets[t]["parts"]]  # stored arrays to stream
        self.batch_size, self.use_labels, self.shuffle = batch_size, use_labels, shuffle
        self.seed, self.drop_last = seed, drop_last
        self.buffer_chunks = buffer_chunks if buffer_chunks > 0 else self.auto_buffer_chunks()
        self.view_policy, self.views = view_policy, store.views
        if self.views:
            select_view(view_policy, seed, 0, 0, self.views)  # an unknown policy fails here, not in a worker
        self.transform = Transform.from_dict(store.manifest["transform"])
        self.blocks = block_ranges(store.num_samples, store.chunk_samples)
        self._epoch = SharedEpoch()  # see SharedEpoch: persistent workers must see set_epoch
        self._group = None
        self._memory: dict[str, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def row_bytes(self) -> int:
        """Bytes one row occupies in a buffer: its rebuilt input plus the arrays not held in memory."""
        tf = self.store.manifest["transform"]
        total = int(tf["channels"]) * int(np.prod(tf["size"]))
        for name in self.arrays:
            a = self.store.arrays[name]
            itemsize = np.dtype(a["dtype"]).itemsize
            if int(np.prod(a["shape"])) * itemsize > SMALL_ARRAY_BYTES:
                per_row = int(np.prod(a["shape"][1:])) * itemsize
                total += per_row // max(1, self.store.views) if a["view_axis"] else per_row
        return total

    def auto_buffer_chunks(self) -> int:
        """As many chunks as fit in BUFFER_BYTES per worker, between 2 and 64: mixing close to uniform for small
        rows, bounded memory for large feature maps."""
        chunk_bytes = max(1, self.row_bytes() * self.store.chunk_samples)
        return int(min(64, max(2, BUFFER_BYTES // chunk_bytes)))

    def __len__(self) -> int:  # batches per epoch when read by a single worker
        return self.batches_per_epoch(1)

    def batches_per_epoch(self, num_workers: int, everyone: bool = False, epoch: int | None = None) -> int:
        """Batches epoch `epoch` (default: the current one) delivers through a DataLoader with `num_workers` workers:
        each worker cuts its own blocks into batches and ends with its own partial batch, so there can be more than
        with one worker, and the count can change from epoch to epoch as the blocks are dealt out anew (the
        learning-rate schedule counts every epoch's own). `everyone`: the fewest any rank gets (what every rank can
        step)."""
        def of_rank(rank: int) -> int:
            sizes = []  # each worker's batches, as row counts
            for w in range(max(1, num_workers)):
                rows = sum(self.blocks[b][1] - self.blocks[b][0]
                           for b in self.block_order(w, max(1, num_workers), rank, epoch))
                sizes.append([self.batch_size] * (rows // self.batch_size) if self.drop_last
                             else [e - s for s, e in batch_bounds(rows, self.batch_size)])
            delivered = []  # in the order the DataLoader takes them: from its workers in turn
            while any(sizes):
                delivered += [q.pop(0) for q in sizes if q]
            return len(list(join_single_rows(delivered, self.batch_size, rows=int, merge=lambda a, b: a + b)))

        return min(of_rank(r) for r in range(self.world)) if everyone else of_rank(self.rank)

    def _open(self):
        if self._group is None:  # lazily, in the worker process that reads
            self._group = self.store.open_group()
            # labels only when used: --no-labels reads none (a damaged labels chunk cannot stop such a run)
            wanted = {"index", "aug/box", "aug/flip", *self.arrays, *(["labels"] if self.use_labels else [])}
            for name in wanted & set(self.store.arrays):
                shape, itemsize = self.store.shape(name), np.dtype(self.store.arrays[name]["dtype"]).itemsize
                if int(np.prod(shape)) * itemsize <= SMALL_ARRAY_BYTES:
                    try:
                        self._memory[name] = self._fetch(name, 0, shape[0])
                    except KDCacheError:  # name the chunk that fails (and its view), not the whole array
                        for start, end in self.blocks:
                            for v in range(self.views) if self.store.arrays[name]["view_axis"] else [None]:
                                self._fetch(name, start, end, v)
                        raise
        return self._group

    def _fetch(self, name: str, start: int, end: int, view: int | None = None) -> np.ndarray:
        try:
            arr = self._group[name]
        except Exception as e:  # noqa: BLE001 - its metadata deleted or damaged: beyond a chunk repair
            raise KDCacheError(f"array {name} of {self.store.path} is missing outright ({type(e).__name__}); "
                               "rebuild the store with `kdcache teacher-cache --force`") from None
        try:
            return np.asarray(arr[start:end] if view is None else arr[start:end, view])
        except Exception as e:  # crc32c mismatch or undecodable chunk
            _settle_pending_reads()
            where = f" (view {view})" if view is not None else ""
            raise KDCacheError(f"cannot read {name} rows {start}-{end - 1}{where} from {self.store.path} "
                               f"({type(e).__name__}); run `kdcache verify` then `kdcache repair`") from None

    def _read(self, name: str, start: int, end: int, view: int) -> np.ndarray:
        """Rows start:end of a stored array (of `view` when the array has a view axis): one chunk."""
        v = view if self.store.arrays[name]["view_axis"] else None
        if name in self._memory:
            values = self._memory[name][start:end] if v is None else self._memory[name][start:end, v]
        else:
            values = self._fetch(name, start, end, v)
        # A chunk that was never written (or was deleted) reads as the fill value: refuse it, never train on it.
        if is_missing(values, fill_value(values.dtype)):
            where = f" (view {v})" if v is not None else ""
            raise KDCacheError(f"{name} rows {start}-{end - 1}{where} in {self.store.path} are missing; "
                               "run `kdcache verify` then `kdcache repair`")
        return values

    def view_of(self, block: int, epoch: int | None = None) -> int:
        epoch = self.epoch if epoch is None else epoch
        return select_view(self.view_policy, self.seed, epoch, block, self.views) if self.views else 0

    def block_order(self, worker: int = 0, num_workers: int = 1, rank: int | None = None, epoch: int | None = None
                    ) -> list[int]:
        """The blocks worker `worker` (of `num_workers`) of rank `rank` (default: this stream's) reads in epoch
        `epoch` (default: the current one)."""
        order = np.arange(len(self.blocks))
        if self.shuffle:
            epoch = self.epoch if epoch is None else epoch
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
        rank = self.rank if rank is None else rank
        return [int(b) for b in order[rank * num_workers + worker::self.world * num_workers]]

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        self._open()
        # In a loader worker the next buffer loads in a thread while this one's batches are handed out; in the
        # training process itself (workers=0) a thread would only compete with the training step for the cores.
        yield from self._batches(worker, num_workers, self._load_buffer, prefetch=info is not None)

    def epoch_rows(self, num_workers: int = 1) -> np.ndarray:
        """The store rows of one epoch in the order a DataLoader with `num_workers` workers delivers them
        (batches taken from the workers in turn), computed by the same code as `__iter__` without reading data."""
        def rows_only(blocks, _epoch):
            return {"row": torch.cat([torch.arange(*self.blocks[b]) for b in blocks])}

        workers = max(1, num_workers)
        per_worker = [[b["row"].numpy() for b in self._batches(w, workers, rows_only, key="row")]
                      for w in range(workers)]
        out, k = [], 0
        while any(per_worker):  # the DataLoader's round robin over its workers
            q = per_worker[k % len(per_worker)]
            if q:
                out.append(q.pop(0))
            k += 1
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _batches(self, worker: int, num_workers: int, load, key: str = "index", prefetch: bool = False):
        mine = self.block_order(worker, num_workers)
        groups = [mine[g:g + self.buffer_chunks] for g in range(0, len(mine), self.buffer_chunks)]
        epoch = self.epoch
        carry: dict[str, torch.Tensor] | None = None
        # Each batch is handed out one step late, so that a last batch of a single row can join the one before it
        # (see loops.batch_bounds) even when that one came from the previous buffer.
        held: dict[str, torch.Tensor] | None = None
        buffers = (self._prefetched(groups, load, epoch, worker, num_workers) if prefetch else
                   ((group, load(group, epoch)) for group in groups))
        for group, buf in buffers:
            # Rows left over from the previous buffer start the next batch: the buffer's rows are (carry, loaded),
            # shuffled together. Each column is written once, straight to its shuffled place (index_copy_), not
            # concatenated and then gathered: a buffer costs one copy instead of three.
            c = len(carry[key]) if carry is not None else 0
            n = c + len(buf[key])
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch, group[0]]).permutation(n)
                dest = torch.from_numpy(np.argsort(perm))  # row r of (carry, loaded) goes to position dest[r]
                for k in list(buf):
                    buf[k] = _place_rows(carry[k] if c else None, buf[k], dest)
            elif c:
                for k in list(buf):
                    buf[k] = torch.cat([carry[k], buf[k]])
            full = n - n % self.batch_size
            for s in range(0, full, self.batch_size):
                if held is not None:
                    yield held
                held = {k: v[s:s + self.batch_size] for k, v in buf.items()}
            # Copies, not views: the whole buffer is freed as soon as the next one replaces it.
            if held is not None:
                held = {k: v.clone() for k, v in held.items()}
            carry = {k: v[full:].clone() for k, v in buf.items()} if full < n else None
        if carry is not None and not self.drop_last:
            if held is not None and len(carry[key]) == 1 and self.batch_size > 1:
                held = {k: torch.cat([held[k], carry[k]]) for k in held}
            else:
                if held is not None:
                    yield held
                held = carry
        if held is not None:
            yield held

    def _prefetched(self, groups: list[list[int]], load, epoch: int, worker: int, num_workers: int):
        """(group, buffer) for each group, each buffer loaded in a thread while the previous one's batches are
        handed out (numpy gathers, zstd and file reads release the GIL). Without it a worker stalls the loader at
        every buffer boundary: the DataLoader takes batches from its workers in turn, so the whole step waits for
        the one worker that is reading. The last buffer's turn also starts the next epoch's first buffer, so a
        persistent worker has it ready when that epoch begins (used only if that epoch does come next)."""
        from concurrent.futures import ThreadPoolExecutor

        if getattr(self, "_pool", None) is None:  # created in the worker process, never shared across a fork
            self._pool = ThreadPoolExecutor(1)
        ahead, self._ahead = getattr(self, "_ahead", None), None
        for i, group in enumerate(groups):
            if i == 0 and ahead is not None and ahead[:2] == (epoch, tuple(group)):
                future = ahead[2]
            elif i == 0:
                future = self._pool.submit(load, group, epoch)
            buf = future.result()
            if i + 1 < len(groups):
                future = self._pool.submit(load, groups[i + 1], epoch)
            else:
                nxt = self.block_order(worker, num_workers, epoch=epoch + 1)[:self.buffer_chunks]
                if nxt:
                    self._ahead = (epoch + 1, tuple(nxt), self._pool.submit(load, nxt, epoch + 1))
            yield group, buf


    def _load_buffer(self, blocks: list[int], epoch: int) -> dict[str, torch.Tensor]:
        names = ["index", *self.arrays] + (["labels"] if self.use_labels else []) + (
            ["aug/box", "aug/flip"] if self.views else [])
        total = sum(self.blocks[b][1] - self.blocks[b][0] for b in blocks)
        arrays: dict[str, np.ndarray] = {}
        picked = np.empty(total, dtype=np.int64)
        pos = 0
        params = stored_params(self.store.manifest) if self.views else None
        for b in blocks:
            start, end = self.blocks[b]
            view = self.view_of(b, epoch)
            picked[pos:pos + end - start] = view
            for name in names:  # each chunk read straight into its place: no list of chunks to concatenate
                values = self._read(name, start, end, view)
                if name not in arrays:
                    arrays[name] = np.empty((total, *values.shape[1:]), dtype=values.dtype)
                arrays[name][pos:pos + end - start] = values
            if self.views:  # a view-parameter chunk swapped with another's passes its checksum: the hash tells
                want = params(arrays["index"][pos:pos + end - start], view)
                for name, values in want.items():
                    if not np.array_equal(arrays[name][pos:pos + end - start], values):
                        raise KDCacheError(f"{name} rows {start}-{end - 1} (view {view}) in {self.store.path} "
                                           "are not this view's parameters; run `kdcache verify` then `kdcache "
                                           "repair`")
            pos += end - start
        index = arrays["index"]
        if self.views:  # the exact view the teacher saw, from its stored parameters
            x = self.source.load_view(index, self.transform, arrays.pop("aug/box"), arrays.pop("aug/flip"))
        else:
            x = self.source.load_raw(index, self.transform)
        out = {k: torch.from_numpy(v) for k, v in arrays.items()}
        out["view"] = torch.from_numpy(picked)  # which view each row is (0 without views)
        out["x"] = x  # uint8: normalised on the device
        return out


class SingleRowsJoined:
    """The loader's batches, a batch of a single row joined to the next one (see `join_single_rows`): what the
    student stage trains on. `CacheStream.batches_per_epoch` counts these."""

    def __init__(self, loader: DataLoader, batch_size: int):
        self.loader, self.batch_size = loader, batch_size

    def __iter__(self):
        with hold_interrupts():  # the loader's workers are forked here (see hold_interrupts)
            batches = iter(self.loader)
        return join_single_rows(batches, self.batch_size)


def join_single_rows(batches, batch_size: int, rows=lambda b: len(b["index"]),
                     merge=lambda a, b: {k: torch.cat([a[k], b[k]]) for k in a}):
    """The batches, each one of a single row joined to the batch after it (the last one: to the batch before).
    Each worker joins its own last single row to its own batch before (`_batches`), but a worker whose whole share
    of an epoch is one row (a store's 1-row last chunk dealt to a worker with no other chunk) has none to join it
    to: BatchNorm cannot train on it (torch raises on a 1x1 map), and the run would stop in whichever epoch dealt
    the chunk so. A batch size of 1 is the user's choice and kept."""
    if batch_size <= 1:
        yield from batches
        return
    held = single = None
    for b in batches:
        if single is not None:
            b, single = merge(single, b), None
        if rows(b) == 1:
            single = b
            continue
        if held is not None:
            yield held
        held = b
    if single is not None:
        held = single if held is None else merge(held, single)
    if held is not None:
        yield held


def _place_rows(head: torch.Tensor | None, tail: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """torch.cat([head, tail])[perm] without building the concatenation: row r of (head, tail) is written to
    position dest[r] (dest = argsort(perm)), so the result is the only new buffer."""
    signed = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}.get(tail.dtype)
    if signed is not None:  # bfloat16 is stored as uint16 bits, and index_copy_ has no unsigned 16-64-bit kernels
        return _place_rows(None if head is None else head.view(signed), tail.view(signed), dest).view(tail.dtype)
    h = 0 if head is None else len(head)
    out = torch.empty((h + len(tail), *tail.shape[1:]), dtype=tail.dtype)
    if h:
        out.index_copy_(0, dest[:h], head)
    out.index_copy_(0, dest[h:], tail)
    return out


def check_rows(store: CacheStore, source: Source, use_labels: bool) -> None:
    """Refuse a store with an array gone, or whose `index` does not hold, row by row, the samples its row order
    says, or whose `labels` are not the data's labels of them. A chunk swapped with another, or copied from
    another store of the same shape, passes every checksum and would pair inputs with another sample's targets:
    the student would train on wrong targets without a word. Both arrays are small (8 bytes a sample) and read
    whole, once."""
    from pipeline.augment import row_order

    group = store.open_group()
    for name in store.arrays:  # metadata only: an array deleted or damaged outright is beyond a chunk repair
        try:
            arr = group[name]
        except Exception as e:  # noqa: BLE001
            raise KDCacheError(f"array {name} of {store.path} is missing outright ({type(e).__name__}); rebuild "
                               "the store with `kdcache teacher-cache --force`") from None
        damage = metadata_damage(arr, store.arrays[name])
        if damage:  # else a numpy broadcast error (or wrong rows) part-way through an epoch
            raise KDCacheError(f"array {name} of {store.path}: {damage}; rebuild the store with `kdcache "
                               "teacher-cache --force`")
    blocks = block_ranges(store.num_samples, store.chunk_samples)
    expect = row_order(store.num_samples, store.manifest.get("row_order", "source"))
    checks = [("index", expect)]
    if use_labels and "labels" in store.arrays:
        checks.append(("labels", source.labels(expect)))
    for name, want in checks:
        try:
            got = np.asarray(group[name][:])
        except Exception as e:  # noqa: BLE001 - a chunk failing its checksum, or the array gone
            raise KDCacheError(f"cannot read {name} of {store.path} ({type(e).__name__}); run `kdcache verify "
                               f"{store.path}` then `kdcache repair {store.path}`") from None
        wrong = np.flatnonzero(got != want)
        if wrong.size:
            b = int(wrong[0]) // store.chunk_samples
            start, end = blocks[b]
            repair = f"run `kdcache verify {store.path}` then `kdcache repair {store.path}`"
            if name == "index":
                raise KDCacheError(f"{store.path}: index rows {start}-{end - 1} (chunk {b}) do not hold the samples "
                                   f"they should; {repair}")
            # Labels differ either because the store's were damaged or swapped (repair rewrites them), or because
            # the data's labels changed while its fingerprint, hence the cache key, did not (a hand-edited
            # manifest): then the teacher's outputs may not be this data's either, and a plain teacher-cache would
            # take the store as a hit.
            raise KDCacheError(f"{store.path}: labels rows {start}-{end - 1} (chunk {b}) differ from the data's "
                               f"labels ({source.spec}); either the store's labels were damaged or swapped: {repair}; "
                               "or the data's labels changed under the same fingerprint (e.g. an edited manifest): "
                               "rebuild the store from this data with `kdcache teacher-cache --force`")


def _expected_distinct_chunks(num_samples: int, chunk_samples: int, batch: int) -> float:
    """E[distinct chunks in a batch of `batch` rows drawn uniformly without replacement] (hypergeometric)."""
    def log_comb(n, k):
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) if 0 <= k <= n else -math.inf

    total = 0.0
    for start in range(0, num_samples, chunk_samples):
        c = min(chunk_samples, num_samples - start)
        p_none = math.exp(log_comb(num_samples - c, batch) - log_comb(num_samples, batch))
        total += 1.0 - p_none
    return total


def shuffle_quality(rows: np.ndarray, chunk_samples: int, batch_size: int) -> dict:
    """How far an epoch's order of store rows is from a uniform shuffle; 1.0 = as good as uniform, 0 = sequential.

    - `neighbour_spread`: mean |epoch position of row r - that of row r+1| over rows stored next to each other,
      divided by its value under a uniform shuffle, (N + 1) / 3. Chunk shuffling keeps neighbours within one buffer.
    - `batch_chunks`: mean number of distinct chunks a batch draws from, divided by its expectation under a uniform
      shuffle. Low values mean batches made of few chunks, i.e. correlated samples.
    """
    n = len(rows)
    pos = np.empty(n, dtype=np.int64)
    pos[rows] = np.arange(n)
    spread = float(np.abs(np.diff(pos)).mean() / ((n + 1) / 3)) if n > 1 else 1.0
    chunks = rows // chunk_samples
    distinct = [len(np.unique(chunks[s:s + batch_size])) for s in range(0, n - batch_size + 1, batch_size)]
    expect = _expected_distinct_chunks(n, chunk_samples, batch_size)
    return {"neighbour_spread": spread, "batch_chunks": float(np.mean(distinct) / expect) if distinct else 1.0,
            "distinct_chunks_per_batch": float(np.mean(distinct)) if distinct else 0.0,
            "uniform_distinct_chunks_per_batch": expect}
