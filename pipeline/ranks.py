"""Several processes on one store: `torchrun --nproc_per_node R -m pipeline teacher-cache ...` fills it, and
`torchrun ... train-student ...` trains one student from it (`average_gradients`: one all-reduce a step).

Why this is small: the store's design already does the hard part. Every unit of commit (a block of rows in one
view) is one chunk per array plus its own `_commit` and `_stats` chunks, arrays are created at full size, and no
counter is shared, so ranks that own disjoint units never touch the same file. What the ranks still have to agree
on is who creates the store (rank 0, before anyone writes), which units each one owns (every R-th of the missing
ones, a pure function of the store's commit markers read after that point), and that `complete` is set once, by
rank 0, after every rank's units are committed. Those three meetings are all the communication teacher-cache
needs: the data goes to the store, never between ranks, so the process group is gloo (CPU) even when the teachers
run on GPUs. A student's ranks each read their own share of the store's chunks; they start from rank 0's weights
(`broadcast`), average their gradients before every step and sum each epoch's numbers, over the same gloo group.

A failure on one rank (a KDCacheError, a full disk) reaches the others at the next meeting and every rank stops
with the same one-line error; committed units stay, and re-running the command resumes.
"""

from __future__ import annotations

import datetime
import importlib
import os
from dataclasses import dataclass

from pipeline.errors import KDCacheError, first_line

# Ranks meet at the end of their shares; the shares are equal, so the wait is about one unit's time, but a slow
# or oversubscribed machine must not turn it into a timeout that throws the finished work's completion away.
MEETING_TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False      # this process initialised the process group, so it tears it down

    @classmethod
    def from_env(cls) -> Ranks:
        """The ranks torchrun (or any launcher setting WORLD_SIZE, RANK, MASTER_ADDR/PORT) started; one otherwise."""
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return cls()
        rank = _env_int("RANK", None)
        if rank is not None and not 0 <= rank < world:
            # torch's rendezvous would wait (for hours: MEETING_TIMEOUT) for ranks that can never all arrive
            raise KDCacheError(f"RANK={rank} is not a rank of WORLD_SIZE={world} (0 to {world - 1}); start the "
                               "ranks with torchrun --nproc_per_node N, or unset WORLD_SIZE for one process")
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            # Before the group exists: torch.distributed.nn.functional's collectives take `group=group.WORLD` as a
            # default argument, evaluated when the module is first imported. Imported later (torchvision imports it,
            # through torch._dynamo and FSDP, and kdcache imports torchvision after the group is up: store.versions,
            # augment's roi_align), ten function defaults keep the group alive, so destroy_process_group in `close`
            # cannot free it and its gloo worker threads outlive it. A worker that has just finished the closing
            # barrier then drops the barrier's work, which frees the previous all_gather's tensors; those belong to
            # Python objects, so it takes the GIL, and if the main thread is already finalising the interpreter that
            # ends the thread inside a noexcept destructor: std::terminate, SIGABRT ("terminate called without an
            # active exception") on a rank whose work was complete: 4 of 150 two-rank runs on a 2-core machine (the
            # core dump's backtrace). Imported now, those defaults are None and the group dies with
            # destroy_process_group, which joins its threads.
            importlib.import_module("torch.distributed.nn")

            try:
                dist.init_process_group("gloo", timeout=MEETING_TIMEOUT)
            except ValueError as e:  # WORLD_SIZE set without the rest of a launcher's variables (RANK, MASTER_ADDR)
                raise KDCacheError(f"WORLD_SIZE={world}, but {first_line(e).rpartition(': ')[2] or first_line(e)}; "
                                   "start the ranks with torchrun --nproc_per_node N, or unset WORLD_SIZE for one "
                                   "process") from None
            except dist.DistError as e:  # the rendezvous itself: MASTER_PORT held by another program, say
                raise KDCacheError(f"cannot start the process group of WORLD_SIZE={world} ranks "
                                   f"({type(e).__name__}: {first_line(e).rpartition('message: ')[2] or first_line(e)})"
                                   "; check MASTER_ADDR and MASTER_PORT (another program may hold the port), or start "
                                   "the ranks with torchrun --nproc_per_node N") from None
        return cls(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), owns)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's part of `items` (every world-th, from its rank): the same list on every rank gives disjoint
        parts that cover it."""
        return items[self.rank::self.world]

    def together(self, fn, *args, leader_only: bool = False):
        """Run `fn(*args)` on every rank (or on rank 0 alone), then meet; return this rank's result (rank 0's,
        which must pickle, with `leader_only`). If any rank raised, every rank raises: its own error, or the first
        failing rank's one-line message as a KDCacheError, so no rank waits forever for one that gave up."""
        error, result = None, None
        if self.leader or not leader_only:
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised below, once the others have heard of it
                error = e
        if self.world == 1:
            if error is not None:
                raise error
            return result
        reports = self.gather((None if error is None else _one_line(error),
                               result if leader_only and self.leader and error is None else None))
        if error is not None:
            raise error
        for r, (msg, _) in enumerate(reports):
            if msg is not None:
                raise KDCacheError(f"rank {r} of {self.world} failed: {msg}")
        return reports[0][1] if leader_only else result

    def first_other(self, value, by=lambda v: v) -> tuple[list, int | None]:
        """Every rank's `value` (`gather`) and the first rank whose `by(value)` is not rank 0's (None: all agree):
        the same on every rank, so all refuse together."""
        seen = self.gather(value)
        return seen, next((r for r, v in enumerate(seen) if by(v) != by(seen[0])), None)

    def gather(self, value) -> list:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, tensors: list) -> None:
        """Rank 0's values into every rank's `tensors` (in place)."""
        if self.world > 1:
            import torch.distributed as dist

            for t in tensors:
                dist.broadcast(t.data, 0)

    def average_gradients(self, params: list) -> None:
        """Replace each gradient by its mean over ranks: one all-reduce of them all, flattened. Every rank has the
        same parameters without a gradient (the same graph), so the flattened buffers line up."""
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum_numbers(self, sums: dict, seen: int, correct) -> tuple[dict, int, float]:
        """An epoch's loss sums, sample count and correct count, summed over ranks (same keys on every rank)."""
        if self.world == 1:
            return sums, seen, correct
        import torch
        import torch.distributed as dist

        keys = sorted(sums)
        values = [float(sums[k]) for k in keys] + [float(seen), float(correct)]
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        out = t.tolist()
        return dict(zip(keys, out[:len(keys)])), int(out[-2]), int(out[-1])

    def device(self, device):
        """One GPU per rank on a node (LOCAL_RANK); a CPU device, or a device named by index, as it is."""
        import torch

        if self.world > 1 and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        return device

    def close(self, clean: bool = True) -> None:
        """Tear the group down. After a run that ended well on every rank, first meet: rank 0 still evaluates and
        writes while the others are done, and a gloo group torn down on one rank while a peer is still busy in it
        was seen to abort that rank at exit ("terminate called without an active exception", about one CI run in
        four). After an error there is no meeting: the others may never come. destroy_process_group frees the group
        and joins its gloo threads only if nothing else holds it (see the import before init_process_group in
        `from_env`): threads left running at interpreter exit abort the process the same way."""
        if self.owns_group:
            import torch.distributed as dist

            if clean and self.world > 1:
                try:
                    dist.barrier()
                except Exception:  # noqa: BLE001 - a peer gone: nothing left to wait for
                    pass
            dist.destroy_process_group()


def launched_ranks() -> int:
    """How many ranks a launcher (torchrun) started this process among: 1 without one."""
    return max(1, _env_int("WORLD_SIZE", 1))


def one_process_only(message: str) -> None:
    """Refuse, before it does anything, a command with no rank machinery that torchrun started as several ranks:
    each would do the whole of it (and write the same outputs). `message` says so, "{ranks}" standing for their
    count."""
    world = launched_ranks()
    if world > 1:
        raise KDCacheError(message.replace("{ranks}", str(world)))


def _env_int(name: str, default):
    """A launcher's variable as an integer (`default` when unset or empty); anything else is one line, not int()'s
    ValueError traceback."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise KDCacheError(f"{name}={value!r} is not a whole number; start the ranks with torchrun --nproc_per_node "
                           "N, or unset WORLD_SIZE for one process") from None


def _one_line(e: BaseException) -> str:
    return first_line(e, limit=300) if isinstance(e, KDCacheError) else f"{type(e).__name__}: {first_line(e)}"
