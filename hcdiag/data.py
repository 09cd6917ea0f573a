"""Dataset loaders: every data matrix hcdiag analyses enters here (paper section 5.1.1).

``load(spec)`` turns a dataset name or a file path into a :class:`Dataset` whose ``x`` is a
validated data matrix of shape (n, N): float32, finite, |x| <= 1e15, 2-D, at least two rows (checked by
:func:`hcdiag.validation.as_data_matrix`, so a bad input gets the same one-line message as
anywhere else). Names and suffixes are looked up in registries, not an if-chain:

==================  ==========================================================================
``synthetic``       8-component GMM in 32 dims, 50,000 samples (generated; labels and means kept)
``fashion-mnist``   IDX files, 2x2 area pooling to 14x14 = 196 dims, scaled to [0, 1]
``mnist``           same format and preprocessing, from ``data_dir``
``cifar10``         python pickle batches, ITU-R 601 grayscale, 4x4 area pooling to 8x8 = 64 dims
``digits``          scikit-learn's 8x8 digits (1797 x 64), scaled to [0, 1]
a path              ``.npy`` (memory-mapped), ``.npz``, ``.pt`` (tensor), ``.csv``
==================  ==========================================================================

Pixel data is scaled to [0, 1] (``/255``; digits ``/16``); ``preprocessing`` records every step.
CIFAR-10 batches are pickles: they are read with a restricted unpickler that admits only numpy's
array-reconstruction globals, so a batch asking for anything else is refused before it can run.
"""

from __future__ import annotations

import _compat_pickle
import gzip
import math
import os
import pickle
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from hcdiag.errors import InputError, flag
from hcdiag.validation import as_data_matrix, physical_memory

DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
"""Where the Debian package ``dataset-fashion-mnist`` installs the IDX files
(``$HCDIAG_FASHION_DIR`` overrides it, as in the test fixtures)."""

SPLITS = ("train", "test", "all")
PATH_SUFFIXES = (".npy", ".npz", ".pt", ".csv")
_ARRAY_KEYS = ("x", "X", "data")
_MAX_DROPPED_LISTED = 100


@dataclass(frozen=True, eq=False)
class Dataset:
    """A data matrix and what was done to produce it.

    Attributes
    ----------
    x : ndarray of shape (n, N)
        float32 (pixels in [0, 1]); for a ``.npy`` path a read-only ``np.memmap`` in the file's
        own numeric dtype (not copied, not converted: cast the chunks you read).
    name : str
        'synthetic', 'fashion-mnist', 'mnist', 'cifar10', 'digits', or the file name.
    split : str
        'train' | 'test' | 'all' | 'file'.
    image_shape : tuple (H, W) or None
        Shape of one grayscale image (row-major in ``x``), None for non-image data.
    preprocessing : dict
        JSON-able record of every step (pooling, scaling, grayscale weights, dropped rows, ...).
    source : str
        Folder or file read, or 'generated'.
    labels : ndarray of shape (n,) int64, or None
    means : ndarray of shape (K, N) float64, or None
        True component means (synthetic only).
    """

    x: np.ndarray = field(repr=False)
    name: str
    split: str
    image_shape: tuple | None
    preprocessing: dict
    source: str
    labels: np.ndarray | None = field(default=None, repr=False)
    means: np.ndarray | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        """Number of samples (rows of ``x``)."""
        return int(self.x.shape[0])

    @property
    def d(self) -> int:
        """Data dimension N (columns of ``x``)."""
        return int(self.x.shape[1])

    def to_dict(self) -> dict:
        """Metadata only (no arrays), JSON-able.

        >>> sorted(synthetic(n=10, dim=3, k=2).to_dict())[:4]
        ['d', 'dtype', 'has_labels', 'has_means']
        """
        return {
            "name": self.name,
            "split": self.split,
            "n": self.n,
            "d": self.d,
            "dtype": str(self.x.dtype),
            "memory_mapped": isinstance(self.x, np.memmap),
            "image_shape": list(self.image_shape) if self.image_shape is not None else None,
            "has_labels": self.labels is not None,
            "n_classes": int(len(np.unique(self.labels))) if self.labels is not None else None,
            "has_means": self.means is not None,
            "preprocessing": dict(self.preprocessing),
            "source": self.source,
        }


# --------------------------------------------------------------------------------------------
# argument checks (one message per argument, naming allowed values and what was given)

def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"The '{name}' parameter must be an integer >= {minimum}. Got {value!r}.")
    return int(value)


def _check_float(value, name: str, *, strict: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if isinstance(value, bool) or not np.isfinite(v) or v < 0 or (strict and v == 0):
        raise InputError(f"The '{name}' parameter must be a float {'>' if strict else '>='} 0. Got {value!r}.")
    return v


def _check_split(split, name: str, has_splits: bool) -> None:
    if split not in SPLITS:
        raise InputError(f"The 'split' parameter must be train, test or all. Got {split!r}.")
    if not has_splits and split == "test":
        raise InputError(f"The {name} data has no test split; use split 'train' or 'all' (both give every row).")


def _check_resize(resize, side: int, name: str) -> int:
    """``resize`` must divide the image side ``side`` (area pooling by an integer factor)."""
    valid = [s for s in range(1, side + 1) if side % s == 0]
    if isinstance(resize, bool) or not isinstance(resize, (int, np.integer)) or int(resize) not in valid:
        raise InputError(f"The 'resize' parameter for {name} must divide {side} (area pooling): one of "
                         f"{', '.join(map(str, valid))}. Got {resize!r}.")
    return int(resize)


def _check_readable(path: Path, what: str, howto: str = "check the path") -> None:
    """Open ``path`` once so that a missing, special or unreadable file is one message before any reader runs.

    A FIFO or device is refused before it is opened (opening a FIFO waits for a writer forever).
    """
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a FIFO, socket or device)"
        raise InputError(f"The {what} {path} is {kind}; pass a regular file.")
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise InputError(f"The {what} {path} does not exist; {howto}.") from None
    except PermissionError:
        raise InputError(f"The {what} {path} cannot be read (permission denied); fix its permissions (chmod u+r) "
                         "or copy it somewhere readable.") from None
    except OSError as exc:
        raise InputError(f"The {what} {path} cannot be read ({exc.strerror or _one_line(exc)}); "
                         "check the file and the disk.") from None


# --------------------------------------------------------------------------------------------
# pure kernels

def area_pool(images: np.ndarray, size: int, *, scale: float = 1.0, chunk: int = 8192) -> np.ndarray:
    """Mean over non-overlapping f x f blocks, f = H / size, times ``scale``.

    images : array of shape (n, H, W) with H == W divisible by ``size`` (any numeric dtype).
    Returns float32 of shape (n, size * size), row-major (``(n, size, size)`` flattened).

    >>> area_pool(np.arange(16).reshape(1, 4, 4), 2).reshape(2, 2).tolist()
    [[2.5, 4.5], [10.5, 12.5]]
    """
    n, h, w = images.shape
    f = h // size
    out = np.empty((n, size * size), dtype=np.float32)
    for start in range(0, n, chunk):
        block = np.asarray(images[start:start + chunk], dtype=np.float64)
        block = block.reshape(-1, size, f, size, f).mean(axis=(2, 4))  # (b, size, size)
        out[start:start + chunk] = (block * scale).reshape(-1, size * size)
    return out


# ITU-R BT.601 luma weights for (R, G, B); the grayscale of Li et al. (2024), paper 5.1.1.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def cifar_gray(data: np.ndarray) -> np.ndarray:
    """Grayscale CIFAR rows: ``data`` uint8 (n, 3072) channel-major RGB -> float64 (n, 32, 32) in [0, 255]."""
    rgb = np.asarray(data, dtype=np.float64).reshape(-1, 3, 32, 32)  # (n, channel, H, W)
    return np.tensordot(rgb, np.asarray(GRAY_WEIGHTS), axes=([1], [0]))  # (n, H, W)


# --------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


#: deflate expands at most about 1032:1, so a gzip file of S bytes holds at most 1032 S bytes
_GZIP_MAX_RATIO = 1032


def _count_rest(fh, chunk: int = 1 << 20) -> int:
    n = 0
    while block := fh.read(chunk):
        n += len(block)
    return n


def read_idx(path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw; detected from the content, not the name).

    Returns the array of the shape in its header, in native byte order (uint8 for MNIST images,
    shape (n, 28, 28); labels shape (n,)). A truncated, corrupt or non-IDX file is one InputError.
    The size the header claims is checked against what the file can hold before anything is
    allocated (a header claiming (2^31, 2^31, 4) in a 100-byte file is refused, not reshaped).
    """
    path = Path(path)
    _check_readable(path, "IDX file", f"check the path or pass {_DATA_DIR}")
    gz = False
    try:
        with open(path, "rb") as raw_fh:
            gz = raw_fh.read(2) == b"\x1f\x8b"
            raw_fh.seek(0)
            size = os.fstat(raw_fh.fileno()).st_size
            fh = gzip.GzipFile(fileobj=raw_fh, mode="rb") if gz else raw_fh
            head = fh.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
                raise InputError(f"The file {path} is not an IDX file (bad magic number {head.hex() or 'none'}); "
                                 "expected MNIST-style files such as train-images-idx3-ubyte.gz.")
            ndim = head[3]
            dims = fh.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise InputError(f"The IDX file {path} is truncated inside its header ({4 + len(dims)} bytes); "
                                 "re-download it.")
            header = 4 + 4 * ndim
            shape = tuple(int.from_bytes(dims[4 * i:4 * i + 4], "big") for i in range(ndim))
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
            can_hold = _GZIP_MAX_RATIO * size if gz else size - header
            payload = fh.read(expected) if expected <= can_hold else b""
            found = len(payload) + _count_rest(fh)
    except InputError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        if gz:
            raise InputError(f"The IDX file {path} is a corrupt gzip file ({_one_line(exc)}); re-download it.") from None
        raise InputError(f"The IDX file {path} cannot be read ({_one_line(exc)}); check the file and the disk.") from None
    if found != expected:
        what = "truncated" if found < expected else "longer than its header says"
        raise InputError(f"The IDX file {path} is {what}: header shape {shape} needs {expected} data bytes, "
                         f"found {found}; re-download it.")
    try:
        arr = np.frombuffer(payload, dtype=dtype).reshape(shape)
    except ValueError:  # more dimensions than numpy supports
        raise InputError(f"The IDX file {path} claims {ndim} dimensions, more than numpy holds; re-download it.") from None
    return arr.astype(dtype.newbyteorder("="), copy=False) if dtype.byteorder == ">" else arr


def _idx_candidates(folder: Path, stem: str) -> list[Path]:
    # the Debian package ships .gz; LeCun's site and some mirrors give raw or 'train-images.idx3-ubyte'
    dotted = stem.replace("-idx", ".idx")
    return [folder / f"{stem}.gz", folder / stem, folder / f"{dotted}.gz", folder / dotted]


def _find_idx(folder: Path, stem: str) -> Path | None:
    return next((p for p in _idx_candidates(folder, stem) if p.is_file()), None)


_IDX_STEMS = {"train": "train", "test": "t10k"}


def _read_idx_images(name: str, folder: Path, split: str, resize: int, howto: str) -> Dataset:
    parts = ["train", "test"] if split == "all" else [split]
    found = {p: _find_idx(folder, f"{_IDX_STEMS[p]}-images-idx3-ubyte") for p in parts}
    missing = [p for p in parts if found[p] is None]
    if missing:
        looked = ", ".join(str(folder / f"{_IDX_STEMS[p]}-images-idx3-ubyte.gz") for p in missing)
        raise InputError(f"{_PRETTY[name]} not found: looked for {looked} (or the same without .gz); {howto}.")
    images, labels, label_files = [], [], []
    for p in parts:
        img = read_idx(found[p])
        if img.ndim != 3 or img.shape[1] != img.shape[2]:
            raise InputError(f"The IDX file {found[p]} holds shape {img.shape}; expected square images (n, H, W).")
        # float IDX files: refuse values beyond float32 before pooling casts them to inf (NaN rows are left to _finish)
        as_data_matrix(img.reshape(img.shape[0], -1), name=f"IDX file {found[p]}", drop_nonfinite=True, min_rows=0)
        images.append(img)
        lab_path = _find_idx(folder, f"{_IDX_STEMS[p]}-labels-idx1-ubyte")
        if lab_path is not None:
            lab = read_idx(lab_path)
            if lab.shape != (img.shape[0],):
                raise InputError(f"The label file {lab_path} holds shape {lab.shape}; expected ({img.shape[0]},) "
                                 f"to match {found[p].name}.")
            labels.append(lab.astype(np.int64))
        label_files.append(str(lab_path) if lab_path is not None else None)
    sides = {img.shape[1:] for img in images}
    if len(sides) > 1:
        raise InputError(f"The {name} train and test images differ in size ({sorted(sides)}); use one split.")
    side = images[0].shape[1]
    size = _check_resize(side // 2 if resize is None else resize, side, name)
    raw = images[0] if len(images) == 1 else np.concatenate(images)
    x = area_pool(raw, size, scale=1.0 / 255.0)
    f = side // size
    return Dataset(
        x=x, name=name, split=split, image_shape=(size, size), source=str(folder),
        labels=np.concatenate(labels) if len(labels) == len(parts) else None,
        preprocessing={
            "files": [str(found[p]) for p in parts],
            "label_files": label_files,
            "from_shape": [side, side],
            "to_shape": [size, size],
            "pooling": f"{f}x{f} area mean" if f > 1 else "none",
            "scale": "pixel / 255",
        },
    )


def _data_dir(data_dir, name: str, howto: str) -> Path:
    if data_dir is None:
        raise InputError(f"The {name} dataset needs {flag('--data-dir (data_dir=)', 'data_dir')}: {howto}.")
    return Path(data_dir).expanduser()


_DATA_DIR = flag("--data-dir", "data_dir")
_DATA_DIR_FOLDER = flag("--data-dir FOLDER", "data_dir=FOLDER")
_FASHION_HOWTO = f"apt-get install dataset-fashion-mnist, or pass {_DATA_DIR_FOLDER} holding these files"
_MNIST_HOWTO = (f"pass {_DATA_DIR_FOLDER} holding the IDX files train-images-idx3-ubyte.gz, "
                "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz "
                "(from https://yann.lecun.com/exdb/mnist/ or a mirror; nothing is downloaded here)")


def _read_fashion(data_dir=None, *, split="train", resize=None) -> Dataset:
    folder = Path(data_dir or os.environ.get("HCDIAG_FASHION_DIR") or DEFAULT_FASHION_DIR).expanduser()
    return _read_idx_images("fashion-mnist", folder, split, resize, _FASHION_HOWTO)


def _read_mnist(data_dir=None, *, split="train", resize=None) -> Dataset:
    folder = _data_dir(data_dir, "mnist", _MNIST_HOWTO)
    return _read_idx_images("mnist", folder, split, resize, _MNIST_HOWTO)


# --------------------------------------------------------------------------------------------
# CIFAR-10 python batches, read with a restricted unpickler

def _numpy_globals() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray, numeric
    import _codecs

    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _codecs.encode}
    # pickles name numpy's modules as numpy 1 (numpy.core) or numpy 2 (numpy._core) wrote them
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):
            allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array-reconstruction globals (and ``_codecs.encode``).

    Every global a pickle names goes through :meth:`find_class` before anything is called, so a
    pickle whose reduce asks for ``os.system``, ``builtins.eval``, ... is refused and nothing runs.
    """

    _allowed: dict | None = None

    def find_class(self, module, name):
        # Python-2 names (__builtin__, copy_reg, ...) as pickle's own find_class maps them
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _numpy_globals()
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


_CIFAR_HOWTO = ("download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract it "
                f"and pass {_DATA_DIR_FOLDER} (nothing is downloaded here)")
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def read_cifar_batch(path) -> dict:
    """One CIFAR-10 python batch as ``{'data': uint8 (n, 3072), 'labels': int64 (n,)}``.

    ``data`` rows are channel-major RGB (1024 R, 1024 G, 1024 B; each 32x32 row-major). Read with
    :class:`RestrictedUnpickler` and ``encoding='bytes'`` (the originals are Python-2 pickles).
    """
    path = Path(path)
    _check_readable(path, "CIFAR-10 batch", _CIFAR_HOWTO)
    try:
        with open(path, "rb") as fh:
            obj = RestrictedUnpickler(fh, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if msg.startswith("global "):
            raise InputError(f"The CIFAR-10 batch {path} asks for the {msg.split()[1]} global, which a data batch never "
                             "needs; refused (nothing in it was run). Use the original cifar-10-python files.") from None
        raise InputError(f"The CIFAR-10 batch {path} is corrupt ({_one_line(exc)}); re-download it.") from None
    except FileNotFoundError:
        raise InputError(f"The CIFAR-10 batch {path} does not exist; {_CIFAR_HOWTO}.") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError, OSError,
            OverflowError, RecursionError) as exc:
        raise InputError(f"The CIFAR-10 batch {path} is truncated or corrupt ({_one_line(exc)}); re-download it.") from None
    if not isinstance(obj, dict):
        raise InputError(f"The CIFAR-10 batch {path} holds a {type(obj).__name__}, not a dict with b'data' and "
                         "b'labels'; use the original cifar-10-python files.")
    data = next((obj[k] for k in (b"data", "data") if k in obj), None)
    labels = next((obj[k] for k in (b"labels", "labels") if k in obj), None)
    if data is None or labels is None:
        keys = ", ".join(repr(k) for k in obj)
        raise InputError(f"The CIFAR-10 batch {path} lacks b'data' or b'labels' (keys: {keys}); "
                         "use the original cifar-10-python files.")
    try:
        data = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # ragged or nested lists
        raise InputError(f"The CIFAR-10 batch {path} holds b'data' that is not a rectangular array "
                         f"({_one_line(exc)}); expected uint8 (n, 3072): use the original cifar-10-python files.") from None
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise InputError(f"The CIFAR-10 batch {path} holds data of shape {data.shape} and dtype {data.dtype}; "
                         "expected uint8 (n, 3072) (32x32 RGB, channel-major).")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise InputError(f"The CIFAR-10 batch {path} holds b'labels' that are not a list of integers "
                         f"({_one_line(exc)}); re-download it.") from None
    if labels.shape[0] != data.shape[0]:
        raise InputError(f"The CIFAR-10 batch {path} holds {labels.shape[0]} labels for {data.shape[0]} images; "
                         "re-download it.")
    return {"data": data, "labels": labels}


def _read_cifar10(data_dir=None, *, split="train", resize=None) -> Dataset:
    root = _data_dir(data_dir, "cifar10", _CIFAR_HOWTO)
    size = _check_resize(8 if resize is None else resize, 32, "cifar10")
    names = _CIFAR_FILES["train"] + _CIFAR_FILES["test"] if split == "all" else _CIFAR_FILES[split]
    folders = [root, root / "cifar-10-batches-py"]
    folder = next((f for f in folders if all((f / b).is_file() for b in names)), None)
    if folder is None:
        looked = ", ".join(str(root / b) for b in names)
        raise InputError(f"CIFAR-10 not found: looked for {looked} (also under {folders[1]}); {_CIFAR_HOWTO}.")
    xs, ys = [], []
    for b in names:
        batch = read_cifar_batch(folder / b)
        # grayscale per batch (10,000 x 1024 float64 at a time), then 32/size area pooling
        xs.append(area_pool(cifar_gray(batch["data"]), size, scale=1.0 / 255.0))
        ys.append(batch["labels"])
    f = 32 // size
    return Dataset(
        x=np.concatenate(xs) if len(xs) > 1 else xs[0], name="cifar10", split=split, image_shape=(size, size),
        source=str(folder), labels=np.concatenate(ys),
        preprocessing={
            "files": [str(folder / b) for b in names],
            "grayscale": {"weights_rgb": list(GRAY_WEIGHTS), "standard": "ITU-R BT.601"},
            "from_shape": [32, 32],
            "to_shape": [size, size],
            "pooling": f"{f}x{f} area mean" if f > 1 else "none",
            "scale": "pixel / 255",
        },
    )


# --------------------------------------------------------------------------------------------
# synthetic GMM and scikit-learn digits

def _generate_synthetic(n=50_000, dim=32, k=8, *, spread=0.5, separation=1.0, seed=0) -> Dataset:
    n = _check_int(n, "n", 2)
    dim = _check_int(dim, "dim", 1)
    k = _check_int(k, "k", 1)
    spread = _check_float(spread, "spread", strict=True)
    separation = _check_float(separation, "separation", strict=False)
    seed = _check_int(seed, "seed", 0)
    need = n * (8 + 28 * dim) + 8 * k * dim  # labels, three float64 (n, dim) temporaries, the float32 result, means
    memory = physical_memory()
    if memory is not None and need > memory:
        raise InputError(f"The synthetic data of {n} rows x {dim} dims needs about {need / 2**30:.3g} GiB to generate, "
                         f"more than this machine's memory ({memory / 2**30:.3g} GiB); ask for fewer rows "
                         f"({flag('--n-samples', 'n_samples')}) or dims.")
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, separation, size=(k, dim))  # (K, N), mu_k ~ N(0, separation^2 I)
    labels = rng.integers(0, k, size=n, dtype=np.int64)  # equal weights 1/K
    x = means[labels] + spread * rng.standard_normal((n, dim))  # (n, N), component cov spread^2 I
    return Dataset(
        x=x.astype(np.float32), name="synthetic", split="all", image_shape=None, source="generated",
        labels=labels, means=means,
        preprocessing={"generator": "numpy default_rng", "seed": seed, "n": n, "dim": dim, "k": k,
                       "weights": "equal", "spread": spread, "separation": separation,
                       "component_cov": f"{spread ** 2:g} * I", "mean_prior": f"N(0, {separation ** 2:g} I)"},
    )


def _read_digits(data_dir=None, *, split="all", resize=None) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    size = _check_resize(8 if resize is None else resize, 8, "digits")
    x = area_pool(bunch.images, size, scale=1.0 / 16.0)  # pixels are 0..16
    return Dataset(x=x, name="digits", split="all", image_shape=(size, size), source="sklearn.datasets.load_digits",
                   labels=np.asarray(bunch.target, dtype=np.int64),
                   preprocessing={"from_shape": [8, 8], "to_shape": [size, size],
                                  "pooling": f"{8 // size}x{8 // size} area mean" if size < 8 else "none",
                                  "scale": "pixel / 16"})


# --------------------------------------------------------------------------------------------
# files

def _pick_array(arrays: dict, path: Path, what: str):
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    key = next((k for k in _ARRAY_KEYS if k in arrays), None)
    if key is None:
        keys = ", ".join(map(str, arrays)) or "none"
        raise InputError(f"The {what} {path} holds several arrays ({keys}) and none is named x, X or data; "
                         "save the data matrix alone or under the key 'x'.")
    return arrays[key]


def _read_npy(path: Path):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        if "mmap length is greater than file size" in str(exc):
            raise InputError(f"The .npy file {path} is truncated: its header claims more data than the file holds; "
                             "re-create it with np.save.") from None
        raise InputError(f"The .npy file {path} cannot be memory-mapped ({_one_line(exc)}); save a numeric array "
                         "with np.save(path, x.astype('float32')).") from None


def _check_npz_claims(zf: zipfile.ZipFile, path: Path) -> None:
    """Each member's header shape against the bytes the member holds, before numpy allocates the shape."""
    memory = physical_memory()
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            continue
        with zf.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(fh)
            header = fh.tell()
        if dtype.hasobject:
            continue  # refused by np.load(allow_pickle=False) below, with its own message
        claimed = math.prod(shape) * dtype.itemsize
        key = info.filename[:-4]
        if claimed != info.file_size - header:
            raise InputError(f"The .npz file {path} is corrupt: its array {key!r} claims shape {shape} "
                             f"({claimed} bytes) but holds {info.file_size - header}; re-create it with np.savez.")
        if memory is not None and claimed > memory:
            raise InputError(f"The .npz file {path} holds an array {key!r} of {claimed / 2**30:.3g} GiB, more than "
                             f"this machine's memory ({memory / 2**30:.3g} GiB); save it as .npy (memory-mapped).")


def _read_npz(path: Path):
    try:
        with zipfile.ZipFile(path) as zf:
            _check_npz_claims(zf, path)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except InputError:
        raise
    except ValueError as exc:
        if "pickle" not in str(exc):
            raise InputError(f"The .npz file {path} is corrupt ({_one_line(exc)}); re-create it with np.savez.") from None
        raise InputError(f"The .npz file {path} cannot be read without pickle ({_one_line(exc)}); store numeric "
                         "arrays only.") from None
    except (zipfile.BadZipFile, OSError, zlib.error, EOFError, NotImplementedError) as exc:
        raise InputError(f"The .npz file {path} is corrupt ({_one_line(exc)}); re-create it with np.savez.") from None
    return _pick_array(arrays, path, ".npz file")


def _read_pt(path: Path):
    import torch

    try:
        with warnings.catch_warnings():  # e.g. "ComplexHalf support is experimental": the validator decides
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        m = re.search(r"GLOBAL ([\w.]+)", str(exc))
        asks = f"it asks for the {m.group(1)} global" if m else "it is not a plain torch.save file of tensors"
        raise InputError(f"The .pt file {path} is refused by torch.load(weights_only=True) ({asks}); "
                         "save the data as a tensor with torch.save(x, path).") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            MemoryError, OverflowError, RecursionError) as exc:
        raise InputError(f"The .pt file {path} is not a readable torch file ({_one_line(exc)}); "
                         "save the data as a tensor with torch.save(x, path).") from None
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()) and obj:
        obj = _pick_array(obj, path, ".pt file")
    if not isinstance(obj, torch.Tensor):
        raise InputError(f"The .pt file {path} holds a {type(obj).__name__}, not a tensor; "
                         "save the data as a tensor with torch.save(x, path).")
    return obj  # converted (bfloat16 -> float32) or refused (complex) by as_data_matrix


def _read_csv(path: Path):
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as fh:
            first = fh.readline()
        try:
            [float(c) for c in first.strip().split(",")]
            header = 0
        except ValueError:
            header = 1  # one header row (column names)
        with warnings.catch_warnings():  # an empty file is refused below (0 rows), not warned about
            warnings.simplefilter("ignore", UserWarning)
            return np.loadtxt(path, delimiter=",", skiprows=header, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise InputError(f"The CSV file {path} is not numeric ({_one_line(exc)}); keep only numbers, "
                         "comma-separated, with at most one header row.") from None
    except OSError as exc:
        raise InputError(f"The CSV file {path} cannot be read ({exc.strerror or _one_line(exc)}); "
                         "check the file and the disk.") from None


_FILE_READERS: dict[str, Callable[[Path], object]] = {".npy": _read_npy, ".npz": _read_npz, ".pt": _read_pt,
                                                      ".csv": _read_csv}


def _read_path(path, *, drop_nonfinite=False) -> Dataset:
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in _FILE_READERS:
        raise InputError(f"The data file {path} has suffix {suffix or '(none)'!r}; accepted suffixes: "
                         f"{', '.join(PATH_SUFFIXES)}.")
    _check_readable(path, "data file")
    x = _FILE_READERS[suffix](path)
    prep = {"reader": suffix.lstrip("."), "stored_dtype": str(getattr(x, "dtype", "unknown")).replace("torch.", "")}
    if isinstance(x, np.memmap):
        prep["memory_mapped"] = True  # kept as stored, not converted (the point of .npy: no copy)
    # other arrays become float32 in _finish, after validation (a float64 1e300 must be refused, not cast to inf)
    return Dataset(x=x, name=path.name, split="file", image_shape=None, preprocessing=prep, source=str(path.resolve()))


# --------------------------------------------------------------------------------------------
# registry and the one entry point

@dataclass(frozen=True)
class _Source:
    read: Callable[..., Dataset]
    options: tuple[str, ...] = ()   # extra keyword options ``load`` forwards
    image: bool = True              # takes ``resize``
    splits: bool = True             # has train/test files


_PRETTY = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST"}

DATASETS: dict[str, _Source] = {
    "synthetic": _Source(_generate_synthetic, options=("dim", "k", "spread", "separation"), image=False, splits=False),
    "fashion-mnist": _Source(_read_fashion),
    "mnist": _Source(_read_mnist),
    "cifar10": _Source(_read_cifar10),
    "digits": _Source(_read_digits, splits=False),
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar_10": "cifar10"}


def _finish(ds: Dataset, *, n_samples=None, drop_nonfinite=False) -> Dataset:
    """Keep the first ``n_samples`` rows, then validate (and maybe drop non-finite rows)."""
    x, labels, prep = ds.x, ds.labels, dict(ds.preprocessing)
    if n_samples is not None and ds.name != "synthetic":
        n_samples = _check_int(n_samples, "n_samples", 2)
        if x.ndim >= 1 and n_samples > x.shape[0]:
            raise InputError(f"The 'n_samples' parameter asks for {n_samples} rows but {ds.name} ({ds.split}) has "
                             f"{x.shape[0]}; use at most {x.shape[0]}.")
        x = x[:n_samples]
        labels = labels[:n_samples] if labels is not None else None
        prep["first_n"] = n_samples
    x, dropped = as_data_matrix(x, name=f"data ({ds.name})", drop_nonfinite=drop_nonfinite)
    if not isinstance(x, np.memmap) and x.dtype != np.float32:
        x = x.astype(np.float32)  # values within the validator's bound (1e15) are finite in float32
    if dropped.size:
        prep["dropped_nonfinite"] = {"count": int(dropped.size),
                                     "rows": dropped[:_MAX_DROPPED_LISTED].tolist(),
                                     "rows_truncated": bool(dropped.size > _MAX_DROPPED_LISTED)}
        if labels is not None:
            labels = np.delete(labels, dropped)
    return Dataset(x=x, name=ds.name, split=ds.split, image_shape=ds.image_shape, preprocessing=prep,
                   source=ds.source, labels=labels, means=ds.means)


def load(spec: str, *, data_dir=None, resize=None, split="train", n_samples=None, seed=0,
         drop_nonfinite=False, **options) -> Dataset:
    """Load a dataset by name (case-insensitive) or by a file path's suffix.

    spec : 'synthetic' | 'fashion-mnist' (alias 'fashion_mnist') | 'mnist' | 'cifar10' | 'digits' |
        a path to an existing .npy/.npz/.pt/.csv file holding a 2-D array (n, N).
    resize : image side after area pooling (must divide the original side); None = paper default.
    split : 'train' | 'test' | 'all'. Datasets without splits (synthetic, digits) accept 'train'
        and 'all', both meaning every row; files ignore it.
    n_samples : keep the first N rows (synthetic: generate N).
    seed : seed of the synthetic data (ignored by the others).
    options : extra options of a source (synthetic: dim, k, spread, separation).

    >>> load('synthetic', n_samples=100, dim=4, k=2).x.shape
    (100, 4)
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise InputError(f"The dataset must be a name or a path. Got {spec!r}.")
    key = str(spec).strip().lower()
    key = _ALIASES.get(key, key)
    src = DATASETS.get(key)
    if src is None:
        path = Path(spec).expanduser()
        if path.suffix.lower() in _FILE_READERS or path.is_file():
            if options:
                raise InputError(f"The option(s) {', '.join(sorted(options))} do not apply to a data file; drop them.")
            if resize is not None:
                raise InputError(f"The 'resize' option applies to image datasets only, not to the file {path}. "
                                 f"Got {resize!r}.")
            _check_split(split, "file", True)
            return _finish(_read_path(path), n_samples=n_samples, drop_nonfinite=drop_nonfinite)
        raise InputError(f"Unknown dataset {str(spec)!r}: use one of {', '.join(DATASETS)}, or a path to an existing "
                         f"{'/'.join(PATH_SUFFIXES)} file.")
    unknown = sorted(set(options) - set(src.options))
    if unknown:
        accepted = ", ".join(src.options) or "none"
        raise InputError(f"The option(s) {', '.join(unknown)} are not understood by the {key} loader; it accepts: "
                         f"{accepted}.")
    _check_split(split, key, src.splits)
    if key == "synthetic":
        if resize is not None:
            raise InputError(f"The 'resize' option applies to image datasets only, not to synthetic. Got {resize!r}.")
        n = 50_000 if n_samples is None else _check_int(n_samples, "n_samples", 2)
        ds = src.read(n, seed=seed, **options)
    else:
        ds = src.read(data_dir, split=split if src.splits else "all", resize=resize, **options)
    return _finish(ds, n_samples=n_samples, drop_nonfinite=drop_nonfinite)


# --------------------------------------------------------------------------------------------
# public per-dataset loaders (validated like ``load``)

def synthetic(n=50_000, dim=32, k=8, *, spread=0.5, separation=1.0, seed=0) -> Dataset:
    """The paper's synthetic GMM (section 5.1.1): ``n`` samples, ``k`` components in ``dim`` dims.

    Equal weights 1/k; means mu_k ~ N(0, separation^2 I) (drawn once per seed); each component is
    N(mu_k, spread^2 I), so every component variance is spread^2 = 0.25 by default (the paper's
    "component variances controlled to be below a threshold"). Deterministic for ``seed`` (numpy
    ``default_rng``). Returns float32 x (n, dim), labels (n,) and the true means (k, dim).

    With the defaults the data covariance is spread^2 I plus the rank <= k-1 between-component
    covariance: lambda_max is about 7.5 (5%-95% over seeds: 6.1 to 9.2), and dim - k + 1 = 25
    eigenvalues equal spread^2 = 0.25 up to sampling noise.

    >>> ds = synthetic(n=1000, seed=3)
    >>> ds.x.shape, ds.means.shape, ds.x.dtype
    ((1000, 32), (8, 32), dtype('float32'))
    """
    return _finish(_generate_synthetic(n, dim, k, spread=spread, separation=separation, seed=seed))


def fashion_mnist(data_dir=None, *, split="train", resize=14) -> Dataset:
    """Fashion-MNIST from IDX files (gz or raw) in ``data_dir`` or :data:`DEFAULT_FASHION_DIR`.

    Default as the paper: 2x2 area pooling 28x28 -> 14x14 (N = 196), pixels / 255 in [0, 1].
    ``split``: train (60,000), test (10,000), all (70,000, train first). ``resize`` must divide 28
    (28 keeps full size, N = 784). Labels (n,) int64 when the label files are present.
    """
    _check_split(split, "fashion-mnist", True)
    return _finish(_read_fashion(data_dir, split=split, resize=resize))


def mnist(data_dir, *, split="train", resize=14) -> Dataset:
    """MNIST from IDX files in ``data_dir`` (required; same format and preprocessing as Fashion-MNIST)."""
    _check_split(split, "mnist", True)
    return _finish(_read_mnist(data_dir, split=split, resize=resize))


def cifar10(data_dir, *, split="train", resize=8) -> Dataset:
    """CIFAR-10 python batches in ``data_dir`` or ``data_dir/cifar-10-batches-py``.

    Grayscale 0.299 R + 0.587 G + 0.114 B (ITU-R 601), area pooling 32 -> ``resize`` (default 8,
    N = 64, 4x4 means), pixels / 255. ``split``: train (50,000), test (10,000), all (60,000).
    """
    _check_split(split, "cifar10", True)
    return _finish(_read_cifar10(data_dir, split=split, resize=resize))


def digits() -> Dataset:
    """scikit-learn's handwritten digits: x (1797, 64) = 8x8 pixels / 16 in [0, 1], labels 0..9."""
    return _finish(_read_digits())


def from_path(path, *, drop_nonfinite=False) -> Dataset:
    """A 2-D array from ``.npy`` (read-only memmap), ``.npz``, ``.pt`` (tensor) or ``.csv`` (numeric)."""
    return _finish(_read_path(path), drop_nonfinite=drop_nonfinite)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200] + ("..." if len(text) > 200 else "")
