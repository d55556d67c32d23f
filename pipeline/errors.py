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


@contextmanager
def hold_interrupts():
    """Hold Ctrl-C (SIGINT) for the block, then raise the KeyboardInterrupt once it is done. For the moments where
    one raised at once is lost or fatal: while torch's C++ initialisation calls back into Python during its
    import (a KeyboardInterrupt there aborts the process: "terminate called after throwing an instance of
    'pybind11::error_already_set'"), and while DataLoader workers are forked (raised inside an at-fork hook, such
    as logging's, it is printed as "Exception ignored" and dropped: training went on as if never interrupted).
    Only the main thread sets signal handlers; elsewhere, or where Ctrl-C is ignored, the block runs as is."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) in (
            signal.SIG_IGN, None):
        yield
        return
    old = signal.signal(signal.SIGINT, lambda *_: held.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if held:
        raise KeyboardInterrupt
