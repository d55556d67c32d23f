"""The cache store: one Zarr v3 group per (teacher, data, transform, views, layers, codecs).

Layout (every array has the sample axis first and is chunked along it in blocks of `chunk_samples` rows):

    <key>.zarr/
      zarr.json                 group attributes: {"kdcache": manifest}
      index                     (N,)      int64    the sample's stable index in its data source (the join key)
      labels                    (N,)      int64    only when the data is labelled
      logits                    (N, C)    float16  raw teacher logits (the temperature is a student-stage choice)
      features/<module.path>    (N, ...)           output of the teacher module at that dotted path
      _commit                   (B, V)    uint8    one element (= one file) per unit, set after the unit's chunks
      _stats                    (B, V, S) float64  per-unit sums of the codecs' measured distortion

With `--views K` every teacher output (and `aug/box` (N, K, 4), `aug/flip` (N, K): each view's parameters) has a
view axis after the sample axis, chunked one view per chunk: a student reading one view reads one chunk. A lossy
codec may store a target as several arrays (see codecs.py); the manifest's `targets` maps each target to them.

Why this shape:
- The unit of commit is one block of rows in one view: exactly one chunk in every array it touches, written whole
  by one owner, then marked in `_commit` (chunks of one element, so each unit's marker is its own file). No writer
  rewrites a shared counter, and arrays are created at full size up front (no append/resize), so several processes
  can fill disjoint units of one store at once (torchrun: ranks.py) and a killed run resumes by skipping committed
  units. Separate runs on one local store are kept apart by a lock file beside it (`<key>.zarr.lock`).
- `complete` in the manifest is set only after every unit is committed; readers refuse a store without it.
- Every array's fill value is one its writer never produces (NaN for floats, -1 or the dtype's minimum for
  signed integers, the maximum for unsigned ones), so a chunk that was never written can never pass for data.
- Codecs: zstd then crc32c over the compressed bytes, so a flipped byte on disk is detected on read.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import FORMAT_VERSION, __version__
from pipeline.codecs import fill_value
from pipeline.errors import KDCacheError, first_line

MANIFEST_KEY = "kdcache"
COMMIT = "_commit"
STATS = "_stats"
TEACHER_TOP1 = "teacher:top1"   # the stats column counting the teacher's correct predictions (labelled data)


def is_url(path) -> bool:
    """An fsspec URL (s3://, gs://, file://, memory:// ...) rather than a local path."""
    return "://" in str(path)


def local_root(group) -> str | None:
    """The folder of a store on this machine's disk, or None for an object store. A file:// URL is such a folder
    too (`open_group` opens it as one; a chained URL such as simplecache::file:// goes through fsspec's local file
    system): its chunks get the same temporary-then-rename writes, fsyncs and lost-unit checks as a plain path's, so
    `complete` vouches for the same."""
    store = group.store
    root = getattr(store, "root", None)
    if root is not None:
        return str(root)
    from fsspec.implementations.local import LocalFileSystem

    fs = getattr(store, "fs", None)
    return store.path if isinstance(getattr(fs, "sync_fs", fs), LocalFileSystem) else None


def join(folder, name: str) -> str:
    """`folder/name` for a local folder or a URL (a protocol's root too: memory:// gives memory://name)."""
    if not is_url(folder):
        return str(Path(folder) / name)
    base = str(folder).rstrip("/")
    if base.endswith(":"):  # the slashes taken were the protocol's: memory:/name was a local folder "memory:"
        if str(folder) == "file://":  # (file:/// is the root folder, file://x a relative one)
            raise KDCacheError(f"{folder} names no folder; give one, e.g. file:///data/caches")
        base += "/"
    return f"{base}/{name}"


def open_group(path, mode: str, **kw):
    """Open a Zarr v3 group at a local path or an fsspec URL. A file:// URL is opened as the folder it names: zarr's
    own local store replaces each metadata file by a rename (fsspec's local file system rewrites it in place, so a
    kill while the manifest is rewritten, e.g. as it is marked complete, could leave a store no one can open)."""
    import zarr

    path = str(path)
    if path.startswith("file://"):
        path = local_path(path) or "."  # file:// alone: the current folder, as for --out .
    elif is_url(path):
        require_backend(path)
    return zarr.open_group(path, mode=mode, zarr_format=3, **kw)


def require_backend(url: str) -> None:
    """fsspec knows s3://, gs://, ... but each needs its own package (s3fs, gcsfs, ...), which kdcache does not
    install: say which one is missing instead of failing later as if the store were something else."""
    import fsspec

    for part in url.split("::"):  # a chained URL (simplecache::s3://...) needs every one of its protocols
        protocol = part.split("://", 1)[0]
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as e:
            raise KDCacheError(f"{url}: {protocol}:// needs a package kdcache does not install "
                               f"({first_line(e)}); pip install it into kdcache's environment") from None
        except ValueError:
            raise KDCacheError(f"{url}: fsspec knows no protocol '{protocol}://'; use a local path or a URL such as "
                               "s3://bucket/folder or file:///folder") from None


# Errors reaching a store rather than reading it (no credentials, access denied, the network): fsspec backends raise
# these (s3fs: AccessDenied -> PermissionError), and they say nothing about what the store holds.
ACCESS_ERRORS = (PermissionError, ConnectionError, TimeoutError)


@contextmanager
def reaching(path):
    """Inside it, a store that cannot be reached (ACCESS_ERRORS) is the one line of `access_error` naming `path`."""
    try:
        yield
    except ACCESS_ERRORS as e:
        raise access_error(path, e) from None


def filesystem(url: str):
    """(fsspec file system, path within it) for a URL (or a local path). Making the file system is the first touch
    of an object store (s3fs and the like check credentials there), so a refusal is already `access_error`'s line."""
    import fsspec

    if is_url(url):
        require_backend(str(url))
    with reaching(url):
        return fsspec.core.url_to_fs(str(url))


def access_error(path, e: BaseException) -> KDCacheError:
    """One line for a store that could not be reached: never reported as "not a kdcache store" (teacher-cache would
    then say to choose another --out for a bucket it may not read)."""
    return KDCacheError(f"cannot read {path} ({type(e).__name__}: {first_line(e)}); check that this machine may read "
                        "and write it (for a URL: its credentials, permissions and network)")


def local_path(path) -> str | None:
    """The folder on this disk that `path` names: itself, or a file:// URL's path; None for other URLs."""
    path = str(path)
    if path.startswith("file://"):
        return path[len("file://"):]
    return None if is_url(path) else path


def enclosing_store(path) -> Path | None:
    """The Zarr store at or above `path` (the top of the run of folders holding a zarr.json that begins nearest
    it: a group or an array is inside its store): whatever is written inside it, that store's `--force` rebuild
    deletes with it. None when there is none, and for a URL other than file:// (an object store)."""
    local = local_path(path)
    if local is None:
        return None
    p = Path(os.path.abspath(local or "."))  # normalised: the parents of x/.. are not x
    folders = (p, *p.parents)
    nearest = next((i for i, f in enumerate(folders) if (f / "zarr.json").exists()), None)
    if nearest is None:
        return None
    top = nearest
    while top + 1 < len(folders) and (folders[top + 1] / "zarr.json").exists():
        top += 1
    return folders[top]


def refuse_inside_store(out, what: str, folder=None) -> None:
    """Refuse an --out (a run directory, teacher weights) anywhere inside a cache store: that store's
    `teacher-cache --force` rebuild would delete `what` with its own folder. `folder`: where `out` lies, when that is
    not `out` itself (a file's parent)."""
    inside = enclosing_store(out if folder is None else folder)
    if inside is not None:
        raise KDCacheError(f"--out {out} is inside the cache store {inside}, whose --force rebuild would delete the "
                           f"{what}; choose another --out outside that store")


def feature_array(layer: str) -> str:
    """The one name a cached module output has everywhere: hook key `layer2` -> array `features/layer2`."""
    return f"features/{layer}"


def versions() -> dict:
    import numcodecs
    import torch
    import torchvision
    import zarr

    # torchvision too: it builds torchvision:NAME models and replays the views' crops (roi_align)
    return {"kdcache": __version__, "format": FORMAT_VERSION, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__, "numpy": np.__version__}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def codecs_config(level: int) -> dict:
    return {"compressor": "zstd", "level": level, "checksum": "crc32c"}


def _compressors(codecs: dict):
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=int(codecs["level"])), Crc32cCodec()]


def block_ranges(num_samples: int, chunk_samples: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_samples, num_samples)) for s in range(0, num_samples, chunk_samples)]


def array_spec(shape: tuple[int, ...], dtype: str, chunk_samples: int, view_axis: bool) -> dict:
    """One stored array: full shape, dtype, chunk shape (one view per chunk); its fill is `fill_value(dtype)`."""
    chunks = [chunk_samples, 1, *shape[2:]] if view_axis else [chunk_samples, *shape[1:]]
    return {"shape": list(shape), "dtype": dtype, "chunks": chunks, "view_axis": view_axis}


def create_store(path: Path | str, manifest: dict, arrays: dict[str, dict], num_units: tuple[int, int],
                 stat_columns: list[str]):
    """Create the group and every array at full size, with `complete: false`. Overwrites what is at `path`."""
    manifest = dict(manifest, complete=False, format_version=FORMAT_VERSION, arrays=arrays,
                    stat_columns=stat_columns)
    # The manifest goes in first and `_commit` last: a creation cut short is recognisable and simply redone.
    group = open_group(path, "w", attributes={MANIFEST_KEY: manifest})
    compressors = _compressors(manifest["codecs"])
    for name, a in arrays.items():
        group.create_array(name, shape=a["shape"], dtype=a["dtype"], chunks=a["chunks"], compressors=compressors,
                           fill_value=fill_value(a["dtype"]))
    if stat_columns:  # checksummed too: repair and completion rebuild the manifest's distortion from these
        from zarr.codecs import Crc32cCodec

        group.create_array(STATS, shape=(*num_units, len(stat_columns)), dtype="float64",
                           chunks=(1, 1, len(stat_columns)), compressors=[Crc32cCodec()], fill_value=np.nan)
    group.create_array(COMMIT, shape=num_units, dtype="uint8", chunks=(1, 1), compressors=None, fill_value=0)
    return group


def encode_chunk(values: np.ndarray, chunk_shape: list[int], codecs: dict) -> tuple[bytes, bytes]:
    """One chunk exactly as zarr's [bytes(little), zstd, crc32c] pipeline stores it (edge chunks padded), as its
    two parts: the compressed bytes and their crc32c (written one after the other, never concatenated: a copy).

    Why not `array[a:b] = values`: zarr's write path serialises on its event loop (measured on a 16-core host:
    ~170 MB/s for 200 MB chunks with or without compression, 1 or 8 threads; on 2 cores 209 vs 508 MB/s with
    2 threads), while encoding here runs in our writer threads in parallel (numcodecs zstd releases the GIL).
    zstd reads the array's own memory (no `tobytes()` copy: on a 206 MB feature chunk that copy cost half as long
    as the compression). The result is read back by zarr like any other chunk; tests compare both paths byte for
    byte.
    """
    import google_crc32c
    import numcodecs

    values = values.reshape(len(values), *chunk_shape[1:])
    if len(values) < chunk_shape[0]:  # zarr stores edge chunks at full chunk shape, padded with the fill value
        pad = np.full((chunk_shape[0] - len(values), *values.shape[1:]), fill_value(values.dtype), dtype=values.dtype)
        values = np.concatenate([values, pad])
    raw = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))  # no copy when already so
    comp = numcodecs.Zstd(level=int(codecs["level"])).encode(raw.reshape(-1).view(np.uint8))
    return comp, np.uint32(google_crc32c.value(comp)).astype("<u4").tobytes()


def chunk_file(root: Path, name: str, spec: dict, block: int, view: int) -> Path:
    ndim = len(spec["shape"])
    grid = [block, view, *[0] * (ndim - 2)] if spec["view_axis"] else [block, *[0] * (ndim - 1)]
    return root.joinpath(*name.split("/"), "c", *map(str, grid))


def write_unit(group, block: int, view: int, start: int, arrays: dict[str, np.ndarray],
               stats: np.ndarray | None = None) -> None:
    """Write one unit (a block of rows, one view) in every array it owns, whole chunks only, then commit it.

    `arrays` holds per-view values without the view axis (rows, *shape) for view arrays and the sample-level
    arrays (index, labels) for the unit that owns them (view 0). The caller owns (block, view). On a local store
    each chunk file is written to a temporary name and renamed into place, so a killed writer never leaves a
    half-written chunk under a real name; the commit marker is written last.
    """
    root = local_root(group)
    manifest = group.attrs[MANIFEST_KEY]
    specs = manifest["arrays"]
    if root is None:  # remote stores (fsspec): zarr's own write path
        for name, values in arrays.items():
            sel = (slice(start, start + len(values)), view) if specs[name]["view_axis"] else slice(
                start, start + len(values))
            group[name][sel] = values
    else:
        refuse_folders(group, block, view, list(arrays))
        for name, values in arrays.items():
            spec = specs[name]
            path = chunk_file(Path(root), name, spec, block, view)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                parts = encode_chunk(np.asarray(values, dtype=spec["dtype"]), spec["chunks"], manifest["codecs"])
                with open(tmp, "wb") as f:
                    for part in parts:
                        f.write(part)
                    f.flush()
                    # On the disk before it is committed: the disk writes behind the next units' compute instead of
                    # all at the end (sync_store) and dirty memory stays flat. (A power cut can still lose the
                    # rename; a resumed run finds such units by their missing files and redoes them.)
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:  # a full disk, say: leave no partial temporary behind
                tmp.unlink(missing_ok=True)
                raise
    if stats is not None:
        group[STATS][block, view] = stats
    group[COMMIT][block, view] = 1


def refuse_folders(group, block: int, view: int, names: list[str]) -> None:
    """Refuse a folder where a file of unit (block, view) belongs (put there by hand): the writer's rename failed
    with "Is a directory" naming a temporary file, and zarr deletes a folder under a chunk it clears. Such a folder
    is never written into, nor deleted: it may hold someone's files. Local stores only."""
    root = local_root(group)
    if root is None:
        return
    specs = group.attrs[MANIFEST_KEY]["arrays"]
    own = [(chunk_file(Path(root), name, specs[name], block, view), f"chunk {block} of {name}") for name in names]
    own += [(Path(root, COMMIT, "c", str(block), str(view)), f"the commit marker of unit {block}/{view}"),
            (Path(root, STATS, "c", str(block), str(view), "0"), f"the _stats row of unit {block}/{view}")]
    for path, what in own:
        if path.is_dir():
            raise KDCacheError(f"{path} is a folder where {what} belongs (a file); move it out of the store, then "
                               "re-run the same command")


_HELD: dict[str, int] = {}  # lock files this process holds, with how many nested holders (repair -> teacher-cache)


def _lock_file(path) -> str | None:
    """`<store>.lock` beside the store, named from its absolute path: `--out .` locks `../<folder>.lock`, not a
    stray `..lock` in the current folder. A file:// URL is the local folder it names (the same lock as that path);
    other URLs (object stores) have none. Links resolved: a store also reached through a link to it (`ln -s
    data/cache/<key>.zarr fmnist.zarr`) has one lock, not one per name, so two runs cannot write it at once."""
    path = local_path(path)
    return None if path is None else os.path.realpath(path) + ".lock"


def writer(path) -> str | None:
    """Who holds the store's writer lock now ('pid N on HOST'), or None: a store being written is not broken."""
    lock = _lock_file(path)
    if lock is None or not os.path.exists(lock) or _HELD.get(lock):
        return None
    try:
        import fcntl
    except ImportError:
        return None
    # Read-only: a lock file another user's run left (theirs, 0644) or a store on a read-only mount is read by
    # verify and train-student alike; opened for appending, it failed as "Permission denied: <store>.lock".
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            return f.read().strip() or "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


@contextmanager
def writer_lock(path):
    """Hold the store's writer lock (`<path>.lock`, beside the store, so that creating the store cannot delete it)
    for the time one run writes. A second run on the same store would otherwise recreate it or clear the first's
    temporaries under it; it gets a one-line error instead. Object stores (URLs but file://) have no such lock."""
    with exclusive(_lock_file(path), lambda who: f"another run ({who}) is writing {path}; wait for it to end (the "
                                                 "same command is then a cache hit) or choose another --out"):
        yield


LOCK_TRIES = 100  # opening the lock file again after another run removed it (see exclusive)


@contextmanager
def exclusive(lock: str | None, busy: Callable[[str], str]):
    """Hold an exclusive lock on the file `lock` (None: nothing to lock) or raise `busy(holder)`, holder being who has
    it ('pid N on HOST'). Released by the kernel however the holder ends, SIGKILL included, so a killed run never
    leaves a stale lock. Re-entrant within a process (repair runs teacher-cache under its own lock). A run that fails
    or is refused removes the lock file if it created it (a refused `--out DIR` left `DIR.lock` behind); it does so
    while holding the lock, and a run that opened the file before then finds it gone once it has the lock, and locks
    the file at that path now instead, so two runs never hold two files of one name."""
    if lock is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    if _HELD.get(lock):
        _HELD[lock] += 1
        try:
            yield
        finally:
            _HELD[lock] -= 1
        return
    for attempt in range(LOCK_TRIES):
        # Inside the loop: a failed train-student removes the run directory it made along with its lock file, so
        # a run retrying (below) may find the folder gone, or see it go between these two lines. Bounded: a path
        # that never opens (a link to a folder that does not exist) raises its own error, not a hang.
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        try:
            try:
                f, made = open(lock, "x+"), True
            except FileExistsError:
                f, made = open(lock, "a+"), False
        except FileNotFoundError:  # removed since (file or folder): try again
            if attempt == LOCK_TRIES - 1:
                raise
            continue
        with f:
            if not _flock_soon(f):
                f.seek(0)
                raise KDCacheError(busy(f.read().strip() or "unknown process"))
            if not _names(lock, f):  # removed by the failed run that made it, after this one opened it
                continue
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {platform.node()}\n")
            f.flush()
            _HELD[lock] = 1
            try:
                yield
            except BaseException:
                if made:  # still held: no one else has it, and whoever opened it meanwhile retries (`_names`)
                    Path(lock).unlink(missing_ok=True)
                raise
            finally:
                del _HELD[lock]
                fcntl.flock(f, fcntl.LOCK_UN)
            return
    raise KDCacheError(f"cannot hold the lock {lock}: it was replaced every time it was taken; check what else "
                       "writes beside it")


def _flock_soon(f, tries: int = 10, wait: float = 0.02) -> bool:
    """Take the exclusive lock on `f` if it is free within about `tries * wait` seconds. A writer holds it for its
    whole run; `writer()` (a `kdcache ls`, an open of an incomplete store) holds a shared one for an instant to see
    whether anyone writes, and a run starting in that instant was refused as if someone were writing."""
    import fcntl
    import time

    for attempt in range(tries):
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt < tries - 1:
                time.sleep(wait)
    return False


def _names(path: str, f) -> bool:
    """Whether `path` still names the open file `f`."""
    try:
        here, mine = os.stat(path), os.fstat(f.fileno())
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


# zarr's own local writes (metadata, the _commit markers, _stats rows) go to `<name>.<32 hex>.partial` and are then
# renamed; a kill between the two, or a Ctrl-C (zarr removes its temporary on an Exception only), leaves that file.
_ZARR_PARTIAL = re.compile(r".\.[0-9a-f]{32}\.partial$")


def remove_temporaries(group) -> int:
    """Delete the temporary files a killed writer left behind: our chunk temporaries and zarr's own (never under a
    real chunk or metadata name, so they hold no data anyone reads, only disk). Call it only while no writer runs:
    before the writers start (with several writer processes, rank 0 before they meet at a barrier). Returns how many
    were removed."""
    root = local_root(group)
    if root is None:
        return 0
    # one walk over the store (millions of chunk files, for a large one), files only
    stale = [Path(folder, n) for folder, _, files in os.walk(root) for n in files
             if (n.startswith(".") and n.endswith(".tmp")) or _ZARR_PARTIAL.search(n)]
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)


def _object_keys(group, names) -> set[str]:
    """The chunk keys an object store holds under each named array: one listing per array, not one request per
    chunk."""
    from zarr.core.sync import sync

    async def keys(prefix: str) -> list[str]:
        return [k async for k in group.store.list_prefix(prefix)]

    base = f"{group.path}/" if group.path else ""
    return {k[len(base):] for n in names for k in sync(keys(f"{base}{n}/c/"))}


def uncommit_lost_units(group) -> int:
    """Un-commit the units whose chunk files are missing or empty, so a resumed run recomputes them. A kill cannot
    cause this (a chunk is renamed into place before its marker is written), but a power cut can: each chunk's
    data is fsynced before its rename, but the folders (the renames) and the markers only once, at the end. On an
    object store (each chunk one object, put whole) a chunk deleted by hand or by a lifecycle rule under its
    marker would otherwise read as fill values in a store marked complete: there one listing per array finds the
    missing ones. The unit's row of `_stats` is its chunk too (written as unsynced as its marker): lost, the
    manifest's distortion and teacher accuracy would be rebuilt as NaN in a store marked complete. Returns how many
    units were reset."""
    root = local_root(group)
    manifest = group.attrs[MANIFEST_KEY]
    specs = manifest["arrays"]
    stats = bool(manifest.get("stat_columns"))
    done = committed_units(group)
    present = _object_keys(group, [*specs, *[STATS] * stats]) if root is None and done.any() else None
    # Its row of distortion sums read back too: damaged (a checksum error) or not finite, completing the store
    # stopped with a traceback or marked it complete with NaN distortion and teacher accuracy.
    sums = _readable_stats(group, done.shape) if done.any() and stats and has_array(group, STATS) else None
    lost = 0
    for b, v in np.argwhere(done):
        # a unit owns its view's chunk of every view array, and (as view 0) the sample-level arrays' chunk
        names = [n for n, spec in specs.items() if spec["view_axis"] or v == 0]
        keys = [chunk_file(Path(), n, specs[n], int(b), int(v)) for n in names]
        keys += [Path(STATS, "c", str(b), str(v), "0")] * stats
        if present is not None:
            whole = all(k.as_posix() in present for k in keys)
        else:
            files = [Path(root) / k for k in keys]
            whole = all(f.is_file() and f.stat().st_size > 0 for f in files)
        whole = whole and (sums is None or bool(sums[b, v]))
        if not whole:
            group[COMMIT][b, v] = 0
            lost += 1
    return lost


def stored_arrays(manifest: dict) -> list[str]:
    """Every array a store must hold but `_commit` (whose loss a repair redoes: no marker is then trusted): the
    manifest's data arrays and, where it has distortion columns, `_stats`. One deleted outright is beyond a chunk
    repair (`repair` refuses it), so no command may take the store as whole without it."""
    return [*(manifest.get("arrays") or {}), *([STATS] if manifest.get("stat_columns") else [])]


def _readable_stats(group, shape: tuple[int, int]) -> np.ndarray:
    """(B, V) bool: which units' `_stats` rows read back, all finite (a committed unit's always are)."""
    arr = group[STATS]
    try:
        return np.isfinite(np.asarray(arr[:])).all(axis=-1)
    except Exception:  # noqa: BLE001 - a damaged row: read them one by one
        out = np.zeros(shape, dtype=bool)
        for b, v in np.ndindex(*shape):
            try:
                out[b, v] = bool(np.isfinite(np.asarray(arr[b, v])).all())
            except Exception:  # noqa: BLE001
                pass
        return out


def has_array(group, name: str) -> bool:
    """Whether `name` opens as an array: False when it is gone or its metadata cannot be read."""
    try:
        group[name]
        return True
    except Exception:  # noqa: BLE001 - KeyError, or a JSON/metadata error from damaged zarr.json
        return False


def committed_units(group) -> np.ndarray:
    """(B, V) bool: which (block, view) units are written whole. A marker that cannot be read (an emptied or
    damaged chunk file) or that holds any value but the 1 a writer writes (a flipped bit), or a `_commit` array that
    was never created (a creation cut short), counts as not committed: the unit is recomputed, never trusted."""
    man = group.attrs[MANIFEST_KEY]
    shape = (len(block_ranges(man["data"]["num_samples"], man["chunk_samples"])),
             max(1, (man.get("views") or {}).get("count", 1)))
    # Their metadata edited to another shape: markers (and distortion rows) would pair with other units, or index
    # past the end; no marker can be trusted, and neither array is a chunk repair.
    for name, want in ((COMMIT, shape), (STATS, (*shape, len(man.get("stat_columns") or [])))):
        got = tuple(group[name].shape) if has_array(group, name) else want
        if got != want:
            raise KDCacheError(f"{local_root(group) or group.store}: its {name} array's metadata says shape {got}, "
                               f"not the {want} of its blocks and views, so no unit's state can be trusted; rebuild "
                               "the store with `kdcache teacher-cache --force`")
    if not has_array(group, COMMIT):
        return np.zeros(shape, dtype=bool)
    marks = group[COMMIT]
    # A writer writes 1, nothing else: any other value is a damaged marker (a flipped bit), and the unit is redone.
    try:
        return np.asarray(marks[:]) == 1
    except Exception:  # noqa: BLE001 - read them one by one: each unreadable marker is one unit to redo
        out = np.zeros(shape, dtype=bool)
        for b, v in np.ndindex(*shape):
            try:
                out[b, v] = bool(marks[b, v] == 1)
            except Exception:  # noqa: BLE001
                pass
        return out


def distortion_summary(group, manifest: dict) -> dict:
    """Means of the per-unit distortion sums, per target: {"logits": {"kl_t1": ...}, "features/x": {...}}."""
    cols = manifest.get("stat_columns") or []
    if not cols:
        return {}
    sums = np.asarray(group[STATS][:], dtype=np.float64).reshape(-1, len(cols)).sum(0)
    n = manifest["data"]["num_samples"] * max(1, (manifest.get("views") or {}).get("count", 1))
    out: dict = {}
    for c, v in zip(cols, sums):
        target, _, metric = c.rpartition(":")
        out.setdefault(target, {})[metric] = float(v / n)
    return out


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if os.path.isdir(path):
            return  # a platform that cannot open folders (Windows) syncs their entries with the files
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_store(group) -> None:
    """fsync every file and folder of a local store: what `complete` vouches for is on the disk, not only in the
    page cache, so not even a power cut can leave a store marked complete with chunks missing."""
    root = local_root(group)
    if root is None:
        return  # object stores: a finished PUT is durable
    for folder, _dirs, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder)  # the folder itself, so the renames into it are durable too


def mark_complete(group, extra: dict) -> None:
    """Flag the store complete. Call it after every unit is committed and `sync_store` has run: the flag is the
    last write, and it is made durable itself. Refuses if any unit is still uncommitted."""
    missing = int((~committed_units(group)).sum())
    if missing:
        raise KDCacheError(f"{missing} unit(s) of {local_root(group) or group.store} are not committed, so it is not "
                           "marked complete; "
                           "re-run the same teacher-cache command to fill them")
    manifest = dict(group.attrs[MANIFEST_KEY])
    measured = distortion_summary(group, manifest)
    top1 = measured.pop(TEACHER_TOP1.split(":")[0], {}).get("top1")
    if top1 is not None:
        manifest["teacher"] = dict(manifest["teacher"], accuracy={"top1": top1, "on": "the cached inputs, every view"})
    manifest.update(extra, complete=True, completed=now(), distortion=measured)
    group.attrs[MANIFEST_KEY] = manifest
    root = local_root(group)
    if root is not None:
        _fsync(os.path.join(root, "zarr.json"))


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class CacheStore:
    """A read-only view of a store: its manifest and lazily opened arrays (open one per DataLoader worker)."""

    path: str
    manifest: dict

    @property
    def num_samples(self) -> int:
        return int(self.manifest["data"]["num_samples"])

    @property
    def chunk_samples(self) -> int:
        return int(self.manifest["chunk_samples"])

    @property
    def arrays(self) -> dict:
        """Stored arrays: name -> {shape, dtype, chunks, view_axis}."""
        return self.manifest["arrays"]

    @property
    def targets(self) -> dict:
        """Teacher outputs: name -> {shape (per sample and view), codec, parts}."""
        return self.manifest["targets"]

    @property
    def views(self) -> int:
        """K when the store holds augmented views (a view axis), else 0."""
        return int((self.manifest.get("views") or {}).get("count", 0))

    @property
    def labelled(self) -> bool:
        return "labels" in self.arrays

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.arrays[name]["shape"])

    def codec(self, target: str):
        from pipeline.codecs import make_codec

        t = self.targets[target]
        return make_codec(t["codec"], tuple(t["shape"]))

    def open_group(self):
        return open_group(self.path, "r")

    def require(self, names: dict[str, str]) -> None:
        """Refuse a store lacking what a loss needs. `names` maps target (or `labels`) -> the loss that needs it."""
        for name, who in names.items():
            if name in self.targets or name in self.arrays:
                continue
            layer = name[len("features/"):] if name.startswith("features/") else None
            if layer in ("", "logits"):  # no teacher-cache flag can produce these: say what the store offers
                cached = sorted(t[len("features/"):] for t in self.targets if t.startswith("features/"))
                raise KDCacheError(f"loss '{who}' names {'an empty layer' if not layer else 'the logits as a layer'}"
                                   f"; set its layer flag (--fitnets-hint, --rkd-layer) to a cached teacher layer "
                                   f"({', '.join(cached) or 'this store has none'})")
            if layer is not None and layer.startswith("features/"):  # the array's name, as ls and inspect show it
                cached = sorted(t[len("features/"):] for t in self.targets if t.startswith("features/"))
                raise KDCacheError(f"loss '{who}' names the array '{layer}' as its layer; the layer flags "
                                   "(--fitnets-hint, --rkd-layer) take the teacher layer's module path, e.g. "
                                   f"{layer[len('features/'):]} (cached here: {', '.join(cached) or 'none'})")
            if layer is not None:
                fix = f"re-run teacher-cache with --layer {layer}"
            elif name == "labels":
                fix = "the cached data has no labels: use --no-labels or drop the label-based loss"
            else:
                fix = "re-run teacher-cache"
            raise KDCacheError(f"store {self.path} lacks array '{name}' needed by loss '{who}'; {fix} "
                               f"(it has: {', '.join(sorted(self.targets))})")


def marked_complete(manifest: dict) -> bool:
    """Whether the manifest says complete: exactly `true`, as mark_complete writes it. Anything else ("false", "yes",
    1, a hand edit) is not complete, as a damaged marker is not committed: a resume or repair completes it, while a
    truthy "false" would have passed an interrupted store for a complete one."""
    return manifest.get("complete") is True


def is_complete(path, key: str) -> bool:
    """Whether a complete store of this format with cache key `key` is at `path` (anything else: False)."""
    if not is_url(path) and not (Path(path) / "zarr.json").is_file():
        return False
    try:
        group = open_group(str(path), "r")
        manifest = dict(group.attrs.get(MANIFEST_KEY) or {})
        # an array deleted since (_stats too), or its metadata edited (another shape, dtype, chunking or fill):
        # no hit
        whole = all(has_array(group, name) for name in stored_arrays(manifest)) and all(
            metadata_damage(group[name], spec) is None for name, spec in manifest.get("arrays", {}).items())
    except KDCacheError:
        raise  # e.g. a URL whose fsspec backend is not installed
    except Exception:  # noqa: BLE001 - unreadable or no store: not a hit; teacher-cache then says what is wrong
        return False
    if not (manifest.get("key") == key and manifest.get("format_version") == FORMAT_VERSION
            and marked_complete(manifest) and whole):
        return False
    try:  # a manifest every reader refuses is no hit: teacher-cache then says what is wrong with it
        check_manifest(str(path), manifest)
    except KDCacheError:
        return False
    return True


def metadata_damage(arr, spec: dict) -> str | None:
    """How an opened array's own metadata differs from the manifest's spec of it (None: it does not). Edited or
    damaged, its chunks read as another shape or dtype, or split at other rows; with another fill value a missing
    chunk reads as data (zeros, say) that neither verify nor the student can tell from the teacher's: all beyond a
    chunk repair."""
    shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
    if shape != tuple(spec["shape"]) or dtype != np.dtype(spec["dtype"]):
        return (f"its metadata says shape {shape} {dtype}, the manifest {tuple(spec['shape'])} "
                f"{np.dtype(spec['dtype'])}")
    if "chunks" in spec and tuple(arr.chunks) != tuple(spec["chunks"]):
        return f"its metadata says chunks {tuple(arr.chunks)}, the manifest {tuple(spec['chunks'])}"
    fill, want = arr.metadata.fill_value, fill_value(spec["dtype"])
    if not np.array_equal(np.asarray(fill, dtype=dtype), np.asarray(want, dtype=dtype), equal_nan=dtype.kind == "f"):
        return f"its metadata says fill value {fill}, not the {want} a missing chunk must read as"
    # The writer encodes chunks itself (encode_chunk: little-endian bytes, zstd, crc32c) and names their files
    # c/<block>/...: metadata that says other codecs, big-endian bytes or another chunk key makes zarr read them as
    # other values (byte-swapped floats) or not at all, and a repair would rewrite chunks that still read so.
    codecs = arr.metadata.codecs
    endian = getattr(codecs[0], "endian", None) if codecs else None
    names = [type(c).__name__.replace("Codec", "").lower() for c in codecs]
    if names != ["bytes", "zstd", "crc32c"] or getattr(endian, "value", "little") != "little":
        return (f"its metadata says codecs {'+'.join(names) or 'none'}"
                f"{f' ({endian.value}-endian)' if getattr(endian, 'value', None) else ''}, not the "
                "bytes (little-endian)+zstd+crc32c its chunks are written with")
    key = arr.metadata.chunk_key_encoding
    if type(key).__name__ != "DefaultChunkKeyEncoding" or getattr(key, "separator", None) != "/":
        return f"its metadata says its chunk files are named by {key}, not c/<block>/... as they are written"
    return None


def check_manifest(path: str, manifest: dict) -> None:
    """Refuse, in one line, a manifest (of this format) that no reader can trust. Each field every reader relies on,
    and whether its value is of the kind they assume: a hand-edited or damaged manifest would otherwise fail later
    as a bare TypeError or KeyError in ls, verify or train-student (or pass as a cache hit in teacher-cache)."""
    from pipeline.augment import AugmentPolicy
    from pipeline.data import Transform

    def count(v, least: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    def views_ok(v) -> bool:  # the views' count, policy and seed rebuild every view's input
        if v is None:
            return True
        if not (isinstance(v, dict) and count(v.get("count"), 1) and count(v.get("seed"), 0) and v["seed"] < 2**63):
            return False  # (--aug-seed's range: the views' hashes overflow past it)
        try:
            policy = AugmentPolicy.from_dict(v["augment"])
        except (KeyError, TypeError, ValueError, AttributeError):
            return False

        def span(pair, top) -> bool:  # what --augment's parser admits: 0 < lo <= hi <= top (else the views' boxes
            return (len(pair) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in pair)
                    and 0 < pair[0] <= pair[1] <= top and pair[1] < float("inf"))  # fail as a numpy TypeError)

        return (policy.crop is None or span(policy.crop, 1)) and span(policy.ratio, float("inf")) \
            and 0 <= policy.translate < 2**31

    def ints(v) -> bool:
        return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)

    def array_ok(a) -> bool:  # each array's spec: what every reader indexes by (shape, dtype, chunks, view axis)
        if not (isinstance(a, dict) and ints(a.get("shape")) and ints(a.get("chunks"))
                and len(a["chunks"]) == len(a["shape"]) and isinstance(a.get("view_axis"), bool)
                and isinstance(a.get("dtype"), str)):
            return False
        try:
            return bool(np.dtype(a["dtype"]))
        except TypeError:
            return False

    def texts(v, *keys) -> bool:  # printed and sliced by ls (a fingerprint's first 8 characters)
        return isinstance(v, dict) and all(isinstance(v.get(k), str) for k in keys)

    def accuracy_ok(a) -> bool:  # ls prints it as a percentage
        return a is None or (isinstance(a, dict) and isinstance(a.get("top1"), (int, float))
                             and not isinstance(a["top1"], bool))

    fields = {
        "key": lambda v: isinstance(v, str) and bool(v),
        "data": lambda v: texts(v, "spec", "fingerprint") and count(v.get("num_samples"), 1)
        and ints(v.get("native_shape")) and len(v["native_shape"]) == 3  # the views' boxes are drawn in it
        and 1 <= min(v["native_shape"]) and max(v["native_shape"]) < 2**31,
        "arrays": lambda v: isinstance(v, dict) and all(map(array_ok, v.values())),
        "targets": lambda v: isinstance(v, dict) and "logits" in v
        and all(isinstance(t, dict) and ints(t.get("shape")) for t in v.values())  # the student is built from these
        and all(isinstance(t.get("parts", []), list) and all(isinstance(p, str) for p in t.get("parts", []))
                for t in v.values()),  # array names, looked up below
        "transform": lambda v: Transform.problem(v) is None,
        "chunk_samples": lambda v: isinstance(v, int) and v > 0,
        "teacher": lambda v: texts(v, "spec", "fingerprint") and accuracy_ok(v.get("accuracy")),
        "views": views_ok,
        "stat_columns": lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),  # _stats' columns
    }
    lacking = [k for k in fields if k not in manifest and k != "views"]
    malformed = [k for k, ok in fields.items() if k in manifest and not ok(manifest[k])]
    if lacking or malformed:
        what = f"lacks {', '.join(lacking)}" if lacking else f"has a malformed {', '.join(malformed)}"
        raise KDCacheError(f"{path}: its manifest {what}, so it cannot be trusted; rebuild it with "
                           "`kdcache teacher-cache --force`")
    n = manifest["data"]["num_samples"]
    if any(not isinstance(a, dict) or list(a.get("shape") or [None])[:1] != [n] for a in manifest["arrays"].values()):
        raise KDCacheError(f"{path}: its manifest's sample count ({n}) is not the length of the arrays it lists, so "
                           "it cannot be trusted; rebuild it with `kdcache teacher-cache --force`")
    k = (manifest.get("views") or {}).get("count")
    if {a["shape"][1] if len(a["shape"]) > 1 else None for a in manifest["arrays"].values() if a["view_axis"]} != \
            ({k} if k else set()):
        raise KDCacheError(f"{path}: its manifest's view count ({k or 'no views'}) is not the view axis of the arrays "
                           "it lists, so it cannot be trusted; rebuild it with `kdcache teacher-cache --force`")
    if any(part not in manifest["arrays"] for t in manifest["targets"].values() for part in t.get("parts", [])):
        raise KDCacheError(f"{path}: its manifest names targets whose arrays it does not list; rebuild it with "
                           "`kdcache teacher-cache --force`")
    # What every reader assumes of the arrays besides their fields: an index to join on, labels exactly where the
    # data is labelled, one chunking, and each target's arrays the ones its codec and shape make. Else verify passed
    # such a store and train-student failed with a bare KeyError ('index') or a tensor-size RuntimeError, or trained
    # silently without its labels.
    arrays, labelled = manifest["arrays"], manifest["data"].get("labelled")
    what = None
    if "index" not in arrays:
        what = "lists no index array, which every store holds"
    elif isinstance(labelled, bool) and labelled != ("labels" in arrays):
        what = f"says its data is {'' if labelled else 'un'}labelled but lists {'no' if labelled else 'a'} labels array"
    elif any(a["chunks"][0] != manifest["chunk_samples"] for a in arrays.values()):
        what = f"says chunk_samples {manifest['chunk_samples']}, not the chunking of the arrays it lists"
    from pipeline.codecs import make_codec

    for t, spec in manifest["targets"].items():
        if what:
            break
        try:  # an unknown codec name is make_codec's own line
            parts = make_codec(spec["codec"], tuple(spec["shape"])).parts(t, tuple(spec["shape"]))
            want = {p: ([n, k, *shape] if k else [n, *shape], dtype) for p, (shape, dtype) in parts.items()}
            same = sorted(spec.get("parts") or []) == sorted(want) and not any(
                arrays[p]["shape"] != shape or np.dtype(arrays[p]["dtype"]) != np.dtype(dtype)
                or arrays[p]["view_axis"] != bool(k) for p, (shape, dtype) in want.items())
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):  # a codec config no codec makes
            same = False
        if not same:
            what = f"describes target {t} (codec, shape) other than the arrays it lists for it"
    if what:
        raise KDCacheError(f"{path}: its manifest {what}, so it cannot be trusted; rebuild it with "
                           "`kdcache teacher-cache --force`")


def damaged_metadata(path) -> str | None:
    """One line for a local store whose own zarr.json is not JSON (truncated, overwritten): the store is damaged,
    which "not a kdcache store; pass the folder teacher-cache printed" (the very folder) did not say. None when the
    file is JSON, absent, unreadable, or the store is not on this disk."""
    import json

    local = local_path(path)
    meta = None if local is None else Path(local) / "zarr.json"
    try:
        if meta is None or not meta.is_file():
            return None
        json.loads(meta.read_bytes())
        return None
    except ValueError as e:
        why = type(e).__name__
    except OSError:
        return None
    return (f"{path}: its metadata ({meta.name}) is not valid JSON ({why}), so the store is damaged beyond repair; "
            "delete it and re-run teacher-cache (kdcache never deletes a folder it cannot read as its own)")


def _exists(path: str) -> bool:
    """Whether anything is at a local path or an fsspec URL."""
    if not is_url(path):
        return Path(path).exists()
    fs, root = filesystem(path)
    with reaching(path):
        return fs.exists(root)


def open_store(path: Path | str, require_complete: bool = True) -> CacheStore:
    """Open a store read-only and check it is a kdcache store of a format this version reads."""
    path = str(path)
    if not _exists(path):  # a URL too: a mistyped bucket or key is not "not a kdcache store"
        raise KDCacheError(f"no cache at {path}; run `kdcache teacher-cache` first (or `kdcache ls` to list caches)")
    try:
        group = open_group(path, "r")
        manifest = dict(group.attrs.get(MANIFEST_KEY) or {})
    except KDCacheError:
        raise
    except ACCESS_ERRORS as e:
        raise access_error(path, e) from None
    except Exception as e:  # FileNotFoundError, a v2 store, bad JSON ...
        raise KDCacheError(damaged_metadata(path) or f"{path} is not a kdcache Zarr v3 store ({type(e).__name__}); "
                           "pass the .zarr folder that teacher-cache printed") from None
    if not manifest:
        raise KDCacheError(f"{path} is a Zarr group but not a kdcache store (no '{MANIFEST_KEY}' manifest); "
                           "pass the .zarr folder that teacher-cache printed")
    fv = manifest.get("format_version")
    if fv != FORMAT_VERSION:
        raise KDCacheError(f"{path} has store format {fv}, this kdcache reads format {FORMAT_VERSION}; "
                           "rebuild it with `kdcache teacher-cache --force` or use a matching kdcache version")
    check_manifest(path, manifest)
    if require_complete and not marked_complete(manifest):
        who = writer(path)
        if who is not None:
            raise KDCacheError(f"cache {path} is being written now ({who}); train from it when that run has ended")
        raise KDCacheError(f"cache {path} is incomplete (its writer stopped before the last chunk: killed, or "
                           "stopped by an error); re-run the same teacher-cache command to resume it, after fixing "
                           "what stopped it")
    return CacheStore(path=path, manifest=manifest)
