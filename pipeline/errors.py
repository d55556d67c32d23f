"""The one exception type users see.

Every failure a user can cause (bad flag, missing file, wrong store) raises `KDCacheError` with a
one-line message that names the problem and the fix; the CLI prints it as `error: ...` and exits 2
instead of showing a traceback.
"""


class KDCacheError(Exception):
    """A user-facing error: the message is one line naming the problem and how to fix it."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of the message of an exception raised by code we do not own (a user's model, torch), short
    enough to sit inside a one-line KDCacheError."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else ""
