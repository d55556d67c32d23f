"""The one exception type users see.

Every failure a user can cause (bad flag, missing file, wrong store) raises `KDCacheError` with a
one-line message that names the problem and the fix; the CLI prints it as `error: ...` and exits 2
instead of showing a traceback.
"""

import signal
import threading
from contextlib import contextmanager


class KDCacheError(Exception):
    """A user-facing error: the message is one line naming the problem and how to fix it."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of the message of an exception raised by code we do not own (a user's model, torch), short
    enough to sit inside a one-line KDCacheError."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else ""


class Terminated(KeyboardInterrupt):
    """SIGTERM, what a scheduler (Slurm, Kubernetes) sends before SIGKILL on pre-emption or a time limit, and what
    `kill PID` sends: an interruption like Ctrl-C. A KeyboardInterrupt, so every `except KeyboardInterrupt` clean-up
    (writers finishing their units, locks released, train-student's --resume advice) runs as it does for Ctrl-C; the
    CLI then says "terminated (SIGTERM)" and exits 143 (128 + 15) instead of "interrupted" and 130. Raised only
    where the CLI installed its handler (`on_sigterm`): library use keeps the process's own SIGTERM."""


_sigterm = {"installed": False, "raised": False}


def _raise_terminated(*_) -> None:
    raise _terminated()


def _terminated() -> Terminated:
    """The one Terminated a CLI run raises. SIGTERM after it is ignored (SIG_IGN, which also holds while the
    interpreter shuts down, where Python resets its own handlers to the default): one request often arrives twice
    (a scheduler signals every process of a job, and torchrun forwards its own to the ranks as well), and a second
    Terminated raised inside the first's clean-up would cut it short (a lock half released, a traceback instead of
    the one line, exit -15). SIGKILL, which the scheduler sends after its grace period, and Ctrl-C still stop the
    process."""
    _sigterm["raised"] = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return Terminated()


def on_sigterm() -> None:
    """Make SIGTERM raise `Terminated` in the main thread: the CLI's entry calls this, never the library. Not where
    the process's SIGTERM is already someone's (ignored, or a handler of the program that embeds us)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_terminated)
        _sigterm.update(installed=True, raised=False)  # a terminated earlier run (main() again) is not this one


def off_sigterm() -> None:
    """Undo `on_sigterm` (the CLI's entry, returning), unless a SIGTERM came: then later ones stay ignored while
    the interpreter finishes (writer threads completing their units)."""
    if _sigterm["installed"] and not _sigterm["raised"] and signal.getsignal(signal.SIGTERM) is _raise_terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _sigterm["installed"] = False


def quiet_worker_sigterm(cli: bool | None = None) -> None:
    """In a DataLoader worker of a CLI run: ignore SIGTERM. A scheduler sends it to the whole process group,
    workers included. A worker dying of it (torch's default), or exiting on it, could be seen gone by the training
    process before that process handled its own SIGTERM: it then failed with "DataLoader worker (pid N) exited
    unexpectedly" (or "is killed by signal: Terminated") instead of saying it was terminated and how to resume.
    Ignoring it, the worker goes on until the training process, terminated, shuts its workers down as on Ctrl-C;
    if that process is killed outright, torch's watchdog ends the worker when it sees its parent gone.

    `cli`: whether the loader was made in a CLI run (`cli_sigterm()` there, passed along with the worker's init):
    a worker started by 'spawn' or 'forkserver' (macOS's default, Linux's from Python 3.14) imports this module
    afresh, so its own `_sigterm` says no CLI run. None: this process's own state (a forked worker's copy)."""
    if _sigterm["installed"] if cli is None else cli:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def cli_sigterm() -> bool:
    """Whether the CLI's entry made SIGTERM an interruption in this process (`on_sigterm`)."""
    return _sigterm["installed"]


@contextmanager
def hold_interrupts():
    """Hold Ctrl-C (SIGINT), and SIGTERM where the CLI made it an interruption (`on_sigterm`), for the block, then
    raise the KeyboardInterrupt (`Terminated` for SIGTERM) once it is done. For the moments where
    one raised at once is lost or fatal: while torch's C++ initialisation calls back into Python during its
    import (a KeyboardInterrupt there aborts the process: "terminate called after throwing an instance of
    'pybind11::error_already_set'"), and while DataLoader workers are forked (raised inside an at-fork hook, such
    as logging's, it is printed as "Exception ignored" and dropped: training went on as if never interrupted).
    Only the main thread sets signal handlers; elsewhere, or where Ctrl-C is ignored, the block runs as is."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    olds = {}
    if signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None):
        olds[signal.SIGINT] = signal.signal(signal.SIGINT, lambda *_: held.append(signal.SIGINT))
    if signal.getsignal(signal.SIGTERM) is _raise_terminated:
        olds[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: held.append(signal.SIGTERM))
    try:
        yield
    finally:
        for signum, old in olds.items():
            signal.signal(signum, old)
    if signal.SIGTERM in held:
        raise _terminated()
    if held:
        raise KeyboardInterrupt
