"""Datasets as one spec string, and the declarative transform the teacher and the student share.

Specs:
- `fashion-mnist[:train|:test]`  the folder KDCACHE_FASHION_MNIST_DIR names when set, else Debian's
  dataset-fashion-mnist when present, else data/datasets/ (downloaded there by torchvision when missing), else a
  clear error saying how to get it.
- `imagefolder:DIR`  class sub-folders give labels; a flat folder of images is unlabelled.
- `synthetic:N:CxHxW[:CLASSES[:SEED]]`  deterministic, learnable images for tests and benchmarks.

Every sample has a stable integer index (its position in the source's fixed order); the store and the student join
on it. Sources return uint8 images for a *batch* of indices so loading is vectorised (no per-sample Python for
tensor-backed sources). The `Transform` is a plain dict in the manifest, so the student stage rebuilds exactly the
input the teacher saw.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import unicodedata
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.augment import resize, splitmix64
from pipeline.errors import KDCacheError, first_line
from pipeline.store import enclosing_store, is_url, local_path

# Explicit, not Pillow's registered_extensions(): that also names documents and containers (.pdf, .eps needing
# Ghostscript, .h5, .mpeg) that hold no image Pillow can decode by itself. These are the common image formats its
# bundled codecs read; a file of another extension is skipped, so each spelling of one of them is listed (.jfif, .jpe
# and .dib files were skipped silently).
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".webp", ".tif", ".tiff", ".pgm",
                    ".ppm", ".pbm", ".pnm", ".tga"}
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def plain_fields(cfg) -> None:
    """A config's fields as the CLI would give them, or one line saying which is wrong. From Python (a notebook) the
    values come as they are computed: numpy scalars (`for seed in np.arange(3)`, `epochs=np.int64(...)`) are no JSON
    (json.dumps raised a TypeError only after the whole training, when writing the summary or the teacher's metadata,
    or when keying a cache) and no seed torch.Generator takes; pathlib.Path for a file; None for the layers. Those
    become the plain values; a value of the wrong kind (epochs=1.5, loss={'kd': 1}) is refused here, not met as a
    bare TypeError or AttributeError deep in the run. Annotations are read as text (the config modules use
    `from __future__ import annotations`)."""
    from dataclasses import MISSING, fields

    for f in fields(cfg):
        value, kind = getattr(cfg, f.name), str(f.type)
        optional, base = kind.endswith(" | None"), kind.removesuffix(" | None")
        if isinstance(value, np.generic):  # np.int64, np.float32, np.bool_, np.str_
            value = value.item()
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        shown = f"{type(cfg).__name__}.{f.name}"  # the field: its CLI flag is not always its name (--layer)
        if value is None and base == "str" and f.default == "":  # '' is this field's "not given": None says the same
            value = ""
        if value is None and base == "list[str]":
            value = []
        if value is None and optional:
            pass
        elif base == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise KDCacheError(f"{shown} must be a whole number (got {value!r}, a {type(value).__name__})")
        elif base == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise KDCacheError(f"{shown} must be a number (got {value!r}, a {type(value).__name__})")
            value = float(value)
        elif base == "bool" and not isinstance(value, bool):
            raise KDCacheError(f"{shown} must be True or False (got {value!r}, a {type(value).__name__})")
        elif base == "str" and not isinstance(value, str):
            example = f" such as {f.default!r}" if f.default not in (MISSING, None, "") else ""
            raise KDCacheError(f"{shown} must be text{example}, as on the command line (got {value!r}, a "
                               f"{type(value).__name__})")
        elif base == "list[str]":
            value = [value] if isinstance(value, (str, os.PathLike)) else value  # one name without a list
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, np.str_)) for v in value):
                raise KDCacheError(f"{shown} must be a list of names, e.g. ['layer3'] (got {value!r})")
            value = [str(v) for v in value]
        setattr(cfg, f.name, value)


def refuse_blank(path: str | None, flag: str, empty_too: bool = False) -> None:
    """A path of blanks alone (`--out " "`) is a typo, not a name: it made a file or folder named ' ' in the current
    one and printed it as nothing ("saved  "); pathlib read `--weights " "` as the current folder ("weights file not
    found: <cwd>/"). `empty_too`: '' (an empty shell variable) is refused as well, where taking it for "not given"
    would quietly pick another file (the default teacher, or the one a store records)."""
    if (path or (empty_too and path is not None)) and not str(path).strip():
        raise KDCacheError(f"{flag} {str(path)!r} is only blanks; name a file or folder (or leave {flag} out for the "
                           "default)")


def local_output(path: str, flag: str) -> str:
    """The folder or file on this disk that a command's own output `path` names (run folders, teacher weights, bench
    results, the data root): the path itself, or a file:// URL's. Only caches live on object storage: any other URL is
    refused, since Path() would fold memory://x or s3://b/x into a local folder named "memory:" or "s3:"."""
    refuse_blank(path, flag)
    local = local_path(path)
    if local or not is_url(path):  # (a bare file:// names no folder)
        return local
    raise KDCacheError(f"{flag} {path}: only caches (teacher-cache --cache-dir / --out) can be an fsspec URL; give a "
                       "folder on this machine")


def data_root() -> Path:
    """Root of everything the pipeline writes (datasets, teachers, caches, runs)."""
    # Set but empty (`make DATA=`, `KDCACHE_DATA= kdcache ...`) is unset: Path("") is the current folder, which
    # would scatter cache/, runs/ and teachers/ through it.
    named = os.environ.get("KDCACHE_DATA")
    root = Path(local_output(named, "KDCACHE_DATA") if named else "data")
    if root.is_file():  # else every error downstream names a path under it and a flag the user never passed
        raise KDCacheError(f"the data folder {root} is a file; set KDCACHE_DATA to a folder (default: data/)"
                           if named else f"{root} is a file; kdcache keeps its data in a "
                           "folder of that name: move the file, or set KDCACHE_DATA to another folder")
    inside = enclosing_store(root)
    if inside is not None:  # run directories and teachers written there by default would go with its --force rebuild
        raise KDCacheError(f"the data folder {root.absolute()}{' (KDCACHE_DATA)' if named else ''} is inside the cache "
                           f"store {inside}, whose --force rebuild would delete the runs, teachers and caches kdcache "
                           "keeps there; set KDCACHE_DATA to a folder outside it")
    return root


# --------------------------------------------------------------------------------------------- transform
@dataclass
class Transform:
    """uint8 (n, C, H, W) -> float32 normalised. Resizing and channel conversion happen at load time."""

    size: list[int]                      # [H, W] the model sees
    channels: int                        # 1 or 3; grayscale is repeated to 3, RGB reduced to luminance for 1
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Transform":
        return cls(size=list(d["size"]), channels=int(d["channels"]), mean=list(d["mean"]), std=list(d["std"]))

    @staticmethod
    def problem(d) -> str | None:
        """What makes a recorded transform (a weights file's meta, a store's manifest) not one (None: nothing), so
        that a hand-edited or damaged record is refused by name instead of failing as a TypeError, or feeding a
        model a 1x6 input (size "16") or one divided by a std of 0."""
        if not isinstance(d, dict) or not {"size", "channels", "mean", "std"} <= set(d):
            return f"is not a {{size, channels, mean, std}} record (it is {str(d)[:60]!r})"
        def number(v):
            # math, not numpy: an int past int64 (a hand edit) made np.isfinite raise a bare TypeError
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        size, channels, mean, std = d["size"], d["channels"], d["mean"], d["std"]
        if channels not in (1, 3) or isinstance(channels, bool):
            return f"has channels {channels!r}, not 1 or 3"
        if not (isinstance(size, (list, tuple)) and len(size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 for v in size)):
            return f"has size {size!r}, not [height, width] in pixels"
        if not all(isinstance(v, (list, tuple)) and len(v) == channels and all(map(number, v)) for v in (mean, std)) \
                or min(std) <= 0:
            return f"has mean {mean!r} and std {std!r}, not {channels} finite number(s) each with stds positive"
        return None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # Works on any device: the student stage ships uint8 to the GPU (4x fewer bytes) and normalises there.
        x = images.float().div_(255.0)
        mean, std = _channel_stats(tuple(self.mean), tuple(self.std), x.device)
        return (x - mean) / std


@functools.lru_cache(maxsize=16)
def _channel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (1, C, 1, 1) tensors on `device`, made once: building them per batch would be a blocking
    host-to-device copy on a GPU, stalling the queue of forwards every batch."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))


def default_transform(source: "Source", size: int | None = None, channels: int | None = None) -> Transform:
    c, h, w = source.native_shape
    channels = channels or c
    hw = [size, size] if size else [h, w]
    mean, std = source.default_stats
    if len(mean) != channels:  # stats were for the native channel count
        mean, std = [float(np.mean(mean))] * channels, [float(np.mean(std))] * channels
    return Transform(size=hw, channels=channels, mean=list(mean), std=list(std))


NORMALIZE_PRESETS = {"imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}  # torchvision's trained weights


def parse_normalize(spec: str, channels: int | None) -> tuple[list[float], list[float]]:
    """`--normalize`: a preset (`imagenet`) or `MEAN/STD`, each one value or one per channel (`0.5/0.25`,
    `0.485,0.456,0.406/0.229,0.224,0.225`): the normalisation the teacher was trained with. `channels` None: the
    syntax only (before the data says how many channels there are)."""
    fix = ("use imagenet or MEAN/STD with one value or one per channel, e.g. 0.5/0.25 or, per channel, "
           "0.485,0.456,0.406/0.229,0.224,0.225")
    if spec in NORMALIZE_PRESETS:
        mean, std = NORMALIZE_PRESETS[spec]
    else:
        try:
            m, s = spec.split("/")
            mean, std = [float(v) for v in m.split(",")], [float(v) for v in s.split(",")]
        except ValueError:
            raise KDCacheError(f"cannot read --normalize '{spec}'; {fix}") from None
    given = len(mean), len(std)
    n = channels or max(given)
    mean, std = (v * n if len(v) == 1 else v for v in (mean, std))
    if len(mean) != n or len(std) != n:
        raise KDCacheError(f"--normalize '{spec}' gives {given[0]} mean(s) and {given[1]} std(s)"
                           + (f" for {n}-channel inputs" if channels else "") + f"; {fix}")
    if not all(np.isfinite(mean)) or not all(np.isfinite(v) and v > 0 for v in std):
        raise KDCacheError(f"--normalize '{spec}': means must be finite and stds positive; {fix}")
    # and so in float32, the inputs' type: a std of 1e-300 is 0 there (1e300 as a mean, inf), so the inputs were
    # inf, and the error said to store float32 logits (teacher-cache) or to lower --lr (teacher)
    tiny, most = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
    if not all(abs(v) <= most for v in mean) or not all(tiny <= v <= most for v in std):
        raise KDCacheError(f"--normalize '{spec}': means must be finite and stds positive in float32, the inputs' "
                           f"type (stds from {tiny:.2g}, both up to {most:.2g}); {fix}")
    return list(mean), list(std)


def check_input_flags(image_size: int | None, channels: int | None) -> None:
    """`--image-size` and `--channels`, checked before any data is opened."""
    if image_size is not None and not 0 < image_size <= 4096:
        raise KDCacheError(f"--image-size must be from 1 to 4096 (got {image_size})")
    if channels not in (None, 1, 3):
        raise KDCacheError(f"--channels must be 1 or 3 (got {channels})")


def resolve_transform(source: "Source", meta: dict, image_size: int | None = None, channels: int | None = None,
                      normalize: str | None = None) -> Transform:
    """The input a model gets: the transform its weights file records (what it was trained on), with only what a
    flag names changed (`--image-size`, `--channels`: the recorded statistics stay, carried across a change of
    channel count; `--normalize`: the statistics); without a record, the data's native size and default statistics."""
    check_input_flags(image_size, channels)
    if "transform" in meta:
        tf = Transform.from_dict(meta["transform"])
        if image_size is not None:
            tf.size = [image_size, image_size]
        if channels is not None and channels != tf.channels:
            m, sd = float(np.mean(tf.mean)), float(np.mean(tf.std))  # grey <-> RGB: one statistic for all
            tf.channels, tf.mean, tf.std = channels, [m] * channels, [sd] * channels
    else:
        tf = default_transform(source, image_size, channels)
    if normalize is not None:
        tf.mean, tf.std = parse_normalize(normalize, tf.channels)
    return tf


def _convert_channels(images: torch.Tensor, tf: Transform) -> torch.Tensor:
    if images.shape[1] != tf.channels:
        if tf.channels == 3 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif tf.channels == 1 and images.shape[1] == 3:
            wts = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * wts).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        else:
            raise KDCacheError(f"cannot convert {images.shape[1]}-channel images to {tf.channels} channels (only "
                               f"1 and 3 convert into each other); use --channels {images.shape[1]}, the data's own")
    return images


def _fit(images: torch.Tensor, tf: Transform) -> torch.Tensor:
    """Resize and convert channels of a uint8 (n, C, H, W) batch to what `tf` asks for."""
    return resize(_convert_channels(images, tf), tf.size).contiguous()  # the same resize as a plain0 view's


def refuse_one_class(source: "Source") -> None:
    """Training data with a single class teaches nothing (every label the same, accuracy trivially 1)."""
    if source.num_classes == 1:
        raise KDCacheError(f"{source.spec} has a single class ({source.classes[0]}); give the folder holding every "
                           "class folder, or a flat folder of images for unlabelled data")


def class_map(test: "Source", classes: list[str] | None, flag: str = "--test-data",
              owner: str = "the training data") -> np.ndarray | None:
    """Test labels -> the training data's class numbers, matched by class name (None: already the same).

    Image folders number their classes by sorted folder name, so a test folder lacking one class (or holding
    another) would shift every later label: accuracy would be silently wrong. A class the training data does not
    have cannot be scored and is refused; a folder of the test data with no images holds nothing to score, and is
    not (its number maps to -1, which no sample's label is)."""
    if test.classes is None or classes is None or list(test.classes) == list(classes):
        return None
    # By the names' composed (NFC) form: a folder copied from macOS spells `ñ` as n + a combining tilde (NFD),
    # another string that prints the same, and was refused as a class the training data lacks.
    pos = {unicodedata.normalize("NFC", c): i for i, c in enumerate(classes)}
    # A test folder with no images holds no sample to score, so it needs no training class (the training data's own
    # image-less folders are still classes: they take class numbers).
    empty = set(test.empty_classes)
    unknown = [c for c in test.classes if unicodedata.normalize("NFC", c) not in pos and c not in empty]
    if unknown:
        raise KDCacheError(f"test data {test.spec} has class(es) {', '.join(map(repr, unknown[:5]))} that "
                           f"{owner} lacks (it has {', '.join(map(repr, classes[:10]))}"
                           f"{' ...' if len(classes) > 10 else ''}); pass a {flag} with the same classes")
    return np.asarray([pos.get(unicodedata.normalize("NFC", c), -1) for c in test.classes], dtype=np.int64)


# --------------------------------------------------------------------------------------------- sources
def teacher_label_map(data: list[str] | None, teacher: list[str] | None) -> np.ndarray | None:
    """The data's class number -> the teacher's output number, by name, where every class of the data is one the
    teacher's weights record but not at the same position (a folder holding some of its classes): paired by
    position, the teacher's top-1 and KD's hard-label term would pair each label with another class's output. None
    where the positions agree, or where a name is not the teacher's (then they pair by position: `class_note`)."""
    if not data or not teacher or list(data) == list(teacher[:len(data)]):
        return None
    pos = {unicodedata.normalize("NFC", c): i for i, c in enumerate(teacher)}
    named = [pos.get(unicodedata.normalize("NFC", c)) for c in data]
    return None if None in named else np.asarray(named, dtype=np.int64)


def class_note(data: list[str] | None, teacher: list[str] | None) -> list[str]:
    """Labels pair with the teacher's outputs by name where the data's classes are all the teacher's
    (`teacher_label_map`), else by position (label i = output i) in its top-1 and in KD's hard-label term. Data
    whose class names differ from the ones the teacher's weights record may be ordered differently: said, not
    refused, since names can differ while positions agree (an image folder of `0`..`9` for Fashion-MNIST). Said by
    teacher-cache, and by each train-student whose losses use the labels."""
    if not data or not teacher or list(data) == teacher[:len(data)]:
        return []

    def show(names):
        return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")

    if teacher_label_map(data, teacher) is not None:
        return [f"note: the data's {len(data)} classes ({show(data)}) are among the teacher's {len(teacher)} "
                f"({show(teacher)}) at other positions; each label is paired with the teacher's output of its name"]
    return [f"note: the data's classes ({show(data)}) are not the teacher's ({show(teacher)}); label i is taken to "
            "mean the teacher's output i (its top-1 and KD's hard-label term pair them so): check the data's order, "
            "or use train-student --no-labels"]


class Source:
    """A dataset with a stable order. Subclasses fill the attributes and `_load`."""

    spec: str
    num_samples: int
    native_shape: tuple[int, int, int]
    classes: list[str] | None
    default_stats: tuple[list[float], list[float]] = ([0.5], [0.5])

    @property
    def labelled(self) -> bool:
        return self.classes is not None

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None

    @property
    def empty_classes(self) -> list[str]:
        """Classes that hold no sample (an image folder's class folders without images); they keep their numbers."""
        return getattr(self, "_empty_classes", [])

    def labels(self, idx: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError

    def _load(self, idx: np.ndarray, channels: int | None = None) -> torch.Tensor:
        """uint8 (n, C, H, W) at native size. `channels`: what the transform will convert to (a source that decodes
        files may decode straight to it)."""
        raise NotImplementedError

    def load_raw(self, idx: np.ndarray, tf: Transform) -> torch.Tensor:
        """uint8 (n, C, H, W) at the transform's size and channels, not yet normalised (`tf(...)` finishes it)."""
        idx = np.asarray(idx, dtype=np.int64)
        self._check(idx)
        return _fit(self._load(idx, tf.channels), tf)

    def load_view(self, idx: np.ndarray, tf: Transform, box: np.ndarray, flip: np.ndarray) -> torch.Tensor:
        """uint8 (n, C, h, w): the augmented views with parameters `box` (n, 4) and `flip` (n,) (see augment.py)."""
        from pipeline.augment import apply_views

        idx = np.asarray(idx, dtype=np.int64)
        self._check(idx)
        return apply_views(_convert_channels(self._load(idx, tf.channels), tf), box, flip, tf.size).contiguous()

    def _check(self, idx: np.ndarray) -> None:
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise KDCacheError(f"sample index out of range for {self.spec} ({self.num_samples} samples); "
                               "the store was made from other data: re-run teacher-cache on this data")

    def load(self, idx: np.ndarray, tf: Transform) -> torch.Tensor:
        """The model input for samples `idx` (any order): float32 (n, C, H, W)."""
        return tf(self.load_raw(idx, tf))

    def fingerprint(self) -> str:
        raise NotImplementedError

    def content_fingerprint(self, n: int | None = None) -> str:
        """A hash of the content of the first `n` samples (all by default). Most sources' `fingerprint` already is
        one; an image folder's is cheaper (file times), and this is what recognises a copy of it (`data_differs`)."""
        return self.fingerprint()

    def test_spec(self) -> str | None:
        """The matching test split's spec, when the dataset has one."""
        return None

    def describe(self) -> dict:
        return {"spec": self.spec, "num_samples": self.num_samples, "labelled": self.labelled,
                "classes": self.classes, "native_shape": list(self.native_shape),
                "fingerprint": self.fingerprint()}


def _read_idx_gz(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `ndim` dimensions (3: images, 1: labels). A truncated, damaged or swapped
    file is one line naming it: a truncated gzip's EOFError read as 'interrupted' (click takes EOFError for Ctrl-D),
    others failed as numpy tracebacks."""
    why = None
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        why = f"{type(e).__name__}: {first_line(e)}"
    else:
        magic = int.from_bytes(raw[0:4], "big")
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        if magic != 0x0800 + ndim:
            why = f"no IDX header of {ndim}-D unsigned bytes (magic {magic:#x}, not {0x0800 + ndim:#x})"
        elif len(raw) != 4 + 4 * ndim + int(np.prod(dims)):
            why = f"{len(raw) - 4 - 4 * ndim} bytes of data where its header says {dims}"
    if why:
        raise KDCacheError(f"cannot read Fashion-MNIST file {path} ({why}); replace it with an intact copy, e.g. "
                           "`apt-get install --reinstall dataset-fashion-mnist`, or point KDCACHE_FASHION_MNIST_DIR "
                           "at one")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find_fashion_mnist() -> Path | None:
    """The folder Fashion-MNIST's four IDX files are read from: KDCACHE_FASHION_MNIST_DIR when set (refused if it
    lacks any of them, rather than silently reading another copy), else Debian's, else data/datasets/."""
    files = [f for pair in FASHION_MNIST_FILES.values() for f in pair]
    chosen = os.environ.get("KDCACHE_FASHION_MNIST_DIR", "")
    if chosen:
        missing = [f for f in files if not (Path(chosen) / f).exists()]
        if missing:
            raise KDCacheError(f"KDCACHE_FASHION_MNIST_DIR={chosen} lacks {', '.join(missing)}; point it at a "
                               "folder holding Fashion-MNIST's four IDX .gz files, or unset it")
        return Path(chosen)
    for c in [*FASHION_MNIST_DIRS, str(data_root() / "datasets" / "FashionMNIST" / "raw")]:
        if all((Path(c) / f).exists() for f in files):
            return Path(c)
    return None


class FashionMNIST(Source):
    default_stats = ([0.2860], [0.3530])

    def __init__(self, split: str):
        if split not in FASHION_MNIST_FILES:
            raise KDCacheError(f"unknown Fashion-MNIST split '{split}'; use fashion-mnist:train or fashion-mnist:test")
        root = find_fashion_mnist() or self._download()
        img_file, lbl_file = FASHION_MNIST_FILES[split]
        self.spec = f"fashion-mnist:{split}"
        self.split = split
        self._files = [root / img_file, root / lbl_file]
        self._images = torch.from_numpy(_read_idx_gz(self._files[0], 3).copy()).unsqueeze(1)  # (n,1,28,28)
        self._labels = _read_idx_gz(self._files[1], 1).astype(np.int64)
        if self._images.shape[1:] != (1, 28, 28) or len(self._images) != len(self._labels):
            raise KDCacheError(f"Fashion-MNIST files {self._files[0]} and {self._files[1]} hold {len(self._images)} "
                               f"images of {tuple(self._images.shape[2:])} pixels and {len(self._labels)} labels, not "
                               "one 28x28 image per label; replace them with an intact pair (mixed train/test?)")
        self.num_samples = len(self._labels)
        self.native_shape = (1, 28, 28)
        self.classes = list(FASHION_MNIST_CLASSES)
        self._fp: str | None = None

    @staticmethod
    def _download() -> Path:
        target = data_root() / "datasets"
        try:
            from torchvision.datasets import FashionMNIST as TVFashionMNIST

            TVFashionMNIST(str(target), train=True, download=True)
            TVFashionMNIST(str(target), train=False, download=True)
        except Exception as e:  # no network, mirror down, ...
            raise KDCacheError(
                "Fashion-MNIST not found and could not be downloaded "
                f"({type(e).__name__}); install it with `apt-get install dataset-fashion-mnist` "
                "or set KDCACHE_FASHION_MNIST_DIR to a folder holding its four IDX .gz files") from None
        found = find_fashion_mnist()
        if found is None:
            raise KDCacheError("Fashion-MNIST download left no IDX files; set KDCACHE_FASHION_MNIST_DIR")
        return found

    def labels(self, idx):
        return self._labels[np.asarray(idx, dtype=np.int64)]

    def _load(self, idx, channels=None):
        return self._images[torch.from_numpy(np.asarray(idx, dtype=np.int64))]

    def fingerprint(self):
        if self._fp is None:  # content hash: the same data from another path is the same data
            h = hashlib.sha256(self.spec.encode())
            h.update(self._images.numpy().tobytes())
            h.update(self._labels.tobytes())
            self._fp = h.hexdigest()[:16]
        return self._fp

    def test_spec(self):
        return "fashion-mnist:test"


class Synthetic(Source):
    """`synthetic:N:CxHxW[:CLASSES[:SEED]]`: class template plus per-sample noise (learnable, cheap).

    Templates depend only on the class; labels and noise on (SEED, index), so another SEED is a disjoint sample of
    the same distribution (the default test split uses SEED + 1000, modulo SEEDS).
    """

    NOISE_POOL = 512
    MAX_BYTES = 2 * 2**30
    # The seed enters the uint64 hash keys shifted left by 40 bits, so seeds 2**24 apart gave the very same
    # images and labels under another fingerprint (and from 2**64 on, an OverflowError): they are refused.
    SEEDS = 2**24

    def __init__(self, spec: str, n: int, shape: tuple[int, int, int], num_classes: int, seed: int = 0):
        self.spec, self.num_samples, self.native_shape, self.seed = spec, n, shape, seed
        held = (self.NOISE_POOL + num_classes) * int(np.prod(shape))  # noise pool + class templates, uint8
        if 8 * n > self.MAX_BYTES:  # the stages hold int64 arrays of N (row order, index, labels) in memory
            raise KDCacheError(f"{spec} has {n:,} samples: every per-sample array (row order, index, labels) would "
                               f"take {8 * n / 2**30:.1f} GiB in memory; use at most {self.MAX_BYTES // 8:,} samples")
        if held > self.MAX_BYTES:
            raise KDCacheError(f"{spec} would hold {held / 2**30:.1f} GiB of noise patterns and class templates "
                               f"(({self.NOISE_POOL} + {num_classes} classes) x {shape[0]}x{shape[1]}x{shape[2]}); "
                               f"use smaller images or fewer classes (at most {self.MAX_BYTES // 2**30} GiB)")
        # only after the size checks: CLASSES 10**10 spent minutes building this list before being refused
        self.classes = [str(i) for i in range(num_classes)]
        # Class templates are coarse (a 4x4-pixel grid of random levels, upsampled), so small translations keep
        # them recognisable, as real images are.
        c, h, w = shape
        gh, gw = -(-h // 4), -(-w // 4)
        with np.errstate(over="ignore"):
            key = (np.arange(num_classes, dtype=np.uint64)[:, None] << np.uint64(32)) + np.arange(
                c * gh * gw, dtype=np.uint64)
            coarse = (splitmix64(key + np.uint64(1 << 62)) % np.uint64(256)).astype(np.float32)
        coarse = coarse.reshape(num_classes, c, gh, gw).repeat(4, axis=2).repeat(4, axis=3)[:, :, :h, :w]
        self._templates = torch.from_numpy((0.6 * coarse.reshape(num_classes, -1)).astype(np.uint8))
        # Per-sample noise comes from a pool of NOISE_POOL patterns chosen by hash(seed, index): loading is two
        # gathers and an add, so even 224x224 inputs are cheap enough not to bound a GPU benchmark.
        d = c * h * w
        noise = np.empty((self.NOISE_POOL, d), dtype=np.uint8)
        with np.errstate(over="ignore"):
            for row in range(self.NOISE_POOL):  # a row at a time: the uint64 keys of all rows would be 8x the pool
                key = np.uint64(row * d) + np.arange(d, dtype=np.uint64) + (np.uint64(seed + 1) << np.uint64(48))
                noise[row] = (0.4 * (splitmix64(key) % np.uint64(256))).astype(np.uint8)
        self._noise = torch.from_numpy(noise)

    def _key(self, idx) -> np.ndarray:
        return np.asarray(idx, dtype=np.uint64) + (np.uint64(self.seed) << np.uint64(40))

    def labels(self, idx):
        with np.errstate(over="ignore"):
            return (splitmix64(self._key(idx)) % np.uint64(len(self.classes))).astype(np.int64)

    def _load(self, idx, channels=None):
        idx = np.asarray(idx, dtype=np.int64)
        with np.errstate(over="ignore"):
            pick = (splitmix64(self._key(idx) ^ np.uint64(0x5DEECE66D)) % np.uint64(self.NOISE_POOL)).astype(np.int64)
        # numpy's uint8 gather and in-place add: ~7x faster than torch's for 224x224 batches (one thread), so the
        # GPU benchmark's loader workers keep up with the GPU (values never exceed 255: 0.6*255 + 0.4*255)
        img = self._templates.numpy()[self.labels(idx)]
        img += self._noise.numpy()[pick]
        return torch.from_numpy(img).view(len(idx), *self.native_shape)

    def fingerprint(self):
        # The content is a function of these numbers alone: hash them in one canonical form, so that
        # `synthetic:64:1x28x28:10` and `synthetic:64:1X28x28:10:0` (the same images) are the same data.
        c, h, w = self.native_shape
        canonical = f"synthetic:{self.num_samples}:{c}x{h}x{w}:{len(self.classes)}:{self.seed}"
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def test_spec(self):
        c, h, w = self.native_shape
        return f"synthetic:{max(self.num_samples // 4, 1)}:{c}x{h}x{w}:{len(self.classes)}:{(self.seed + 1000) % self.SEEDS}"


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and not p.is_dir()


def _not_data(name: str) -> bool:
    """A folder that is never a class: hidden (.ipynb_checkpoints), or the `__MACOSX` folder of `._name` resource
    forks a zip made on macOS unpacks beside the class folders (else class 0, with no images)."""
    return name.startswith(".") or name == "__MACOSX"


def _images_under(folder: Path) -> list[Path]:
    """Every image under a class folder at any depth, hidden files and folders skipped, sorted. Links to folders
    are followed, as a linked class folder is (Path.rglob before Python 3.13 does not follow them: images under
    such a link were silently left out); each real folder is walked once, so a link to an ancestor cannot loop."""
    seen, found = set(), []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not _not_data(d)]
        found += [p for p in (Path(dirpath, f) for f in filenames) if _is_image(p)]
    return sorted(found)


# A dataset's split folders, in the order a training split (then a test split) is picked from them to name.
SPLIT_NAMES = ("train", "valid", "val", "validation", "test")


def _refuse_split_folders(root: Path, subdirs: list[Path]) -> None:
    """DIR/train/<class>/... beside DIR/test/<class>/... (or val/, valid/, validation/) read as class folders is a
    2-class dataset "test"/"train" (a class folder's images count at any depth): a model taught to tell the splits
    apart, silently. Only where every folder is a split name and one holds class folders with images: folders so
    named that hold their images directly are a real dataset's classes."""
    names = {d.name.lower(): d for d in subdirs}
    if not set(names) <= set(SPLIT_NAMES) or not any(
            _images_under(c) for d in subdirs for c in sorted(d.iterdir()) if c.is_dir() and not _not_data(c.name)):
        return
    train = next(names[n] for n in SPLIT_NAMES if n in names)
    test = next((names[n] for n in reversed(SPLIT_NAMES) if n in names and names[n] != train), None)
    listed = " and ".join(", ".join(f"{d.name}/" for d in subdirs).rsplit(", ", 1))
    split = (f"split into {listed} folders, each holding" if len(subdirs) > 1 else
             f"whose {listed} split folder holds")
    raise KDCacheError(f"{root} looks like a dataset {split} the class folders, not a folder of classes; use "
                       f"imagefolder:{train}" + (f" (and --test-data imagefolder:{test})" if test else ""))


class ImageFolder(Source):
    """`imagefolder:DIR`: DIR/<class>/<image> is labelled (classes sorted by name); DIR/<image> is unlabelled."""

    def __init__(self, spec: str, root: Path):
        if root.exists() and not root.is_dir():
            raise KDCacheError(f"imagefolder:{root} is a file, not a folder; pass imagefolder:DIR with the folder "
                               "that holds the images (or their class folders)")
        if not root.is_dir():
            raise KDCacheError(f"image folder not found: {root}; pass imagefolder:DIR with an existing folder")
        self.spec, self.root = spec, root
        # Hidden files and folders (.ipynb_checkpoints, macOS's ._name resource forks) and __MACOSX are not data.
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not _not_data(p.name))
        loose = [p for p in root.iterdir() if _is_image(p)]
        if subdirs and loose:  # neither reading is safe: dropping the loose images, or making them a class
            raise KDCacheError(f"{root} holds class folders and also {len(loose)} image(s) directly inside it (e.g. "
                               f"{loose[0].name}); move them into a class folder, or give a folder of only images "
                               "for unlabelled data")
        if subdirs:
            _refuse_split_folders(root, subdirs)
            self.classes = [p.name for p in subdirs]
            files, labels, empty = [], [], []
            for ci, d in enumerate(subdirs):
                fs = _images_under(d)
                files += fs
                labels += [ci] * len(fs)
                if not fs:
                    empty.append(d.name)
        else:
            self.classes = None
            files, labels, empty = sorted(loose), [], []
        # A class folder without images still takes a class number and shifts every later class's: the
        # fingerprints name these folders, which no image path does, so adding or removing one is another cache.
        self._empty_classes = empty
        if not files:
            raise KDCacheError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
        self.files = files
        self._labels = np.asarray(labels, dtype=np.int64) if labels else None
        self.num_samples = len(files)
        first = self._decode(files[0])
        self.native_shape = (first.shape[0], first.shape[1], first.shape[2])
        self._mode = "L" if first.shape[0] == 1 else "RGB"
        self._fp: str | None = None
        self._content_fp: str | None = None

    def _decode(self, path: Path, mode: str | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()
                if im.mode == "F":
                    raise KDCacheError(f"image {path} holds floating-point pixels, which have no 8-bit meaning "
                                       "kdcache could assume; convert it to 8- or 16-bit")
                if im.mode.startswith("I"):  # 16-bit (I;16*) or 32-bit integer grey: 0-65535 onto 0-255, not clipped
                    im = Image.fromarray((np.asarray(im, dtype=np.float64).clip(0, 65535) / 257).round()
                                         .astype(np.uint8), mode="L")
                if mode is None:
                    mode = "L" if im.mode in ("L", "1", "LA") else "RGB"
                im = im.convert(mode)
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            raise KDCacheError(f"cannot read image {path}: {e.__class__.__name__}; fix or remove the file") from None
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    def labels(self, idx):
        return None if self._labels is None else self._labels[np.asarray(idx, dtype=np.int64)]

    def _load(self, idx, channels=None):
        # Images may differ in size: decode each to the native size of the first one; `_fit` then resizes.
        size = self.native_shape[1:]
        # ... and in mode: the first one's, unless the model wants 3 channels, when each is decoded as RGB. Decoded
        # grey and repeated to 3, a colour image in a folder whose first image is grey would lose its colour; a grey
        # image comes out the same either way (PIL's L -> RGB repeats it), so grey folders are unchanged.
        mode = "RGB" if channels == 3 else self._mode
        return torch.from_numpy(np.stack([self._decode(self.files[i], mode, size) for i in idx]))

    def content_fingerprint(self, n: int | None = None):
        """Relative paths and the bytes of the first `n` files (a store made with --limit uses those alone; read in
        threads: hashing releases the GIL). A copy of the folder made without keeping file times (cp, scp, git) has
        another `fingerprint` but this same one. Read once when a store is created, and by a student stage only
        where the quick fingerprint differs."""
        n = self.num_samples if n is None else min(n, self.num_samples)
        if self._content_fp is None or self._content_fp[0] != n:
            from concurrent.futures import ThreadPoolExecutor

            def digest(f: Path) -> bytes:
                h = hashlib.blake2b(digest_size=16)
                try:
                    with open(f, "rb") as fh:
                        for block in iter(lambda: fh.read(1 << 20), b""):
                            h.update(block)
                except OSError as e:
                    raise KDCacheError(f"cannot read image {f} ({e.strerror}); fix or remove the file") from None
                return h.digest()

            h = hashlib.sha256()
            self._hash_empty_classes(h)
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                for f, d in zip(self.files[:n], pool.map(digest, self.files[:n])):
                    h.update(f"{f.relative_to(self.root)}\0".encode("utf-8", "surrogateescape") + d)
            self._content_fp = (n, h.hexdigest()[:16])
        return self._content_fp[1]

    def _hash_empty_classes(self, h) -> None:
        # Nothing for a folder without empty classes, so its fingerprints (and cache keys) are what they were.
        for name in self._empty_classes:
            h.update(f"{name}/\0empty class\n".encode("utf-8", "surrogateescape"))  # as file names (below)

    def fingerprint(self):
        if self._fp is None:  # paths, sizes and modification times: cheap, and any edit changes it
            h = hashlib.sha256()
            self._hash_empty_classes(h)
            for f in self.files:
                try:
                    st = f.stat()
                except OSError as e:  # e.g. a link to a file that is gone
                    raise KDCacheError(f"cannot read image {f} ({e.strerror}); fix or remove the file") from None
                # A name's own bytes: one not in UTF-8 (a latin-1 `caf\xe9.png`) holds surrogates that .encode()
                # refused with a UnicodeEncodeError; UTF-8 names give the same bytes either way (the same keys).
                h.update(f"{f.relative_to(self.root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(
                    "utf-8", "surrogateescape"))
            self._fp = h.hexdigest()[:16]
        return self._fp


def data_differs(source: Source, recorded: dict) -> str | None:
    """None when `source` holds the data a manifest's `recorded` data section was made from; else how it differs.
    The fingerprints first; where only an image folder's (file times) differs, its content decides, when the store
    recorded its content fingerprint: the content of the samples the store holds (its first `num_samples`), and
    only where teacher-cache, with the store's --limit, would take as many from this data. A folder grown by an
    image that sorts last still begins with the store's files, but a store of all of it no longer holds all of it."""
    if source.fingerprint() == recorded["fingerprint"]:
        return None
    content, n, limit = recorded.get("content_fingerprint"), recorded.get("num_samples"), recorded.get("limit")
    taken = min(source.num_samples, limit) if limit else source.num_samples
    if n is not None and taken != n:
        return (f"{source.num_samples} samples{f' (the first {taken} with --limit {limit})' if limit else ''} where "
                f"the cache holds {n}")
    if (content and content != recorded["fingerprint"]
            and source.content_fingerprint(n) == content):
        return None
    return f"fingerprint {source.fingerprint()} vs {recorded['fingerprint']}"


def absolute_spec(spec: str) -> str:
    """The spec with a local folder made absolute, so a store's manifest names its data from any working directory."""
    kind, _, rest = spec.partition(":")
    if kind == "imagefolder" and rest and not is_url(rest):
        return f"imagefolder:{os.path.abspath(rest)}"
    return spec


def open_source(spec: str) -> Source:
    """Parse a data spec string into a Source; errors name the accepted forms."""
    kind, _, rest = spec.partition(":")
    if kind == "fashion-mnist":
        return FashionMNIST(rest or "train")
    if kind == "imagefolder":
        if not rest:
            raise KDCacheError("imagefolder needs a folder: imagefolder:DIR")
        return ImageFolder(spec, Path(rest))
    if kind == "synthetic":
        parts = rest.split(":")
        try:
            n = int(parts[0])
            c, h, w = (int(v) for v in parts[1].lower().split("x"))
            classes = int(parts[2]) if len(parts) > 2 else 10
            seed = int(parts[3]) if len(parts) > 3 else 0
            if n <= 0 or min(c, h, w) <= 0 or classes <= 1 or not 0 <= seed < Synthetic.SEEDS or len(parts) > 4:
                raise ValueError
        except (ValueError, IndexError):
            raise KDCacheError(f"bad synthetic spec '{spec}': N, C, H and W must be whole numbers from 1, CLASSES "
                               f"from 2 (default 10), SEED from 0 to {Synthetic.SEEDS - 1}; use synthetic:N:CxHxW[:CLASSES[:SEED]], e.g. "
                               "synthetic:512:1x28x28:10") from None
        return Synthetic(spec, n, (c, h, w), classes, seed)
    raise KDCacheError(f"unknown data spec '{spec}'; use fashion-mnist[:train|:test], imagefolder:DIR "
                       "or synthetic:N:CxHxW[:CLASSES]")
