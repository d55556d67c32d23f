"""The one exception type users see.

Every failure a user can cause (bad flag, missing file, wrong store) raises `KDCacheError` with a
one-line message that names the problem and the fix; the CLI prints it as `error: ...` and exits 2
instead of showing a traceback.
"""


class KDCacheError(Exception):
    """A user-facing error: the message is one line naming the problem and how to fix it."""
