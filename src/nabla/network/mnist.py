"""Read MNIST handwritten digits for the classic network.

Three sources, each giving images as a float matrix (one 28x28 image per row,
flattened to 784 values in [0, 1]) and labels as integers 0 to 9:

- the standard IDX files of LeCun's site (train-images-idx3-ubyte and so on,
  gzipped or not), read by `read_idx`;
- Michael Nielsen's `mnist.pkl.gz`, the file the book's code loads;
- the 10,000 MNIST test images shipped inside nabla (assets/mnist/), so that
  `nabla mnist` works offline after a plain install: the first 8,000 train,
  the last 2,000 are held out.

`as_pairs` turns a matrix and labels into the book's list of (x, y) pairs.
Left out: downloading, data augmentation, other data sets.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

from nabla.errors import NablaError


class DataError(NablaError, ValueError):
    """A data file is missing, truncated or not in the format expected."""


# IDX header: two zero bytes, a type code, the number of dimensions, then each
# dimension as a big-endian uint32.  Images are 0x00000803, labels 0x00000801.
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
PICKLE_NAME = "mnist.pkl.gz"
BUNDLED_TRAIN = 8000  # of the 10,000 bundled test images; the other 2,000 are held out


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """The array stored in the bytes of an IDX file (gzipped or not)."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(f"{name}: broken or truncated gzip file ({e}); download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES or raw[3] == 0:
        raise DataError(
            f"{name}: not an IDX file (magic number {raw[:4].hex(' ')}, expected 00 00 08 03 for images "
            "or 00 00 08 01 for labels)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated inside its header ({len(raw)} bytes); download it again")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_TYPES[raw[2]])
    count = int(np.prod(shape))
    expected, found = count * dtype.itemsize, len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "longer than its header says"
        raise DataError(
            f"{name}: {what}: shape {shape} needs {expected} bytes of data, the file has {found}; "
            "download it again"
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in an IDX file (gzipped or not)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    return parse_idx(raw, str(path))


def images_and_labels(images: np.ndarray, labels: np.ndarray, names=("images", "labels")):
    """Check arrays read from an images and a labels IDX file, and return
    (images as floats in [0, 1], one flattened image per row; labels as int64)."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{names[0]}: expected an images file (unsigned bytes, n x rows x cols), "
                        f"got shape {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{names[1]}: expected a labels file (unsigned bytes, one per image), got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{names[0]} has {len(images)} images but {names[1]} has {len(labels)} labels; they must match")
    if len(labels) and labels.max() > 9:
        raise DataError(f"{names[1]}: labels must be digits 0 to 9, found {labels.max()}")
    return images.reshape(len(images), -1) / 255.0, labels.astype(np.int64)


def load_idx(images_path: str | os.PathLike, labels_path: str | os.PathLike):
    """(images, labels) from a pair of IDX files; see `images_and_labels`."""
    return images_and_labels(read_idx(images_path), read_idx(labels_path), (str(images_path), str(labels_path)))


class RefusedPickle(pickle.UnpicklingError):
    """A pickle that names something other than NumPy arrays."""


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds NumPy arrays (and the tuples and strings around them) and nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how Python 3 pickles the bytes inside an array

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise RefusedPickle(f"it names {module}.{name}, and only NumPy arrays are read from this file "
                                "(a real mnist.pkl.gz holds nothing else)")
        return super().find_class(module, name)


def load_pickle(path: str | os.PathLike):
    """(training, validation, test) from Nielsen's mnist.pkl.gz, each a pair
    (images, labels) of 50,000, 10,000 and 10,000 digits.

    Unpickling can run code, so the file is read by `_ArraysOnly`, which
    admits NumPy arrays and tuples and refuses anything else a pickle names.
    Pickle is used here for that legacy file and nowhere else."""
    try:
        with gzip.open(path, "rb") as f:
            data = _ArraysOnly(f, encoding="latin1").load()
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise DataError(f"cannot read {path}: no such file") from None
        raise DataError(f"{path}: not a gzipped pickle ({e})") from None
    except RefusedPickle as e:
        raise DataError(f"{path}: not read: {e}") from None
    except (EOFError, pickle.UnpicklingError, zlib.error, ValueError, AttributeError, ImportError) as e:
        raise DataError(f"{path}: broken or truncated pickle ({e}); download mnist.pkl.gz again") from None
    try:
        sets = [(np.asarray(x, dtype=float), np.asarray(y)) for x, y in data]
    except (TypeError, ValueError):
        sets = []
    if len(sets) != 3 or any(x.ndim != 2 or y.ndim != 1 or len(x) != len(y) for x, y in sets):
        raise DataError(f"{path}: expected Nielsen's (training, validation, test) sets of (images, labels)")
    if any(len(y) and not (np.issubdtype(y.dtype, np.integer) and 0 <= y.min() and y.max() <= 9) for _, y in sets):
        raise DataError(f"{path}: labels must be digits 0 to 9")
    return tuple((x, y.astype(np.int64)) for x, y in sets)


def load_bundled():
    """(train, held_out) from the MNIST test set shipped with nabla: the first
    8,000 images train, the last 2,000 are held out."""
    folder = resources.files("nabla").joinpath("assets", "mnist")
    arrays = [parse_idx(folder.joinpath(name + ".gz").read_bytes(), name) for name in IDX_FILES["test"]]
    return _split(*images_and_labels(*arrays), BUNDLED_TRAIN)


def load_data(data: str | os.PathLike | None = None):
    """(train, held_out) pairs of (images, labels).

    `data` None: the bundled images (see `load_bundled`).  A folder: its
    train-* and t10k-* IDX files (train on the first, hold out the second); a
    folder without both train-* files is split like the bundled ones (first
    80% of t10k train); a folder with mnist.pkl.gz, or that file itself: its
    training and test sets."""
    if data is None:
        return load_bundled()
    path = Path(data)
    if path.is_file():
        training, _, test = load_pickle(path)
        return training, test
    if not path.is_dir():
        raise DataError(f"--data {data}: no such folder; give a folder of MNIST IDX files or a {PICKLE_NAME}")
    found = {which: [_find(path, name) for name in names] for which, names in IDX_FILES.items()}
    if any(found["test"]) and not all(found["test"]):
        missing = [name for name, p in zip(IDX_FILES["test"], found["test"]) if p is None]
        raise DataError(f"{data}: found part of the t10k set but not {', '.join(missing)}[.gz]")
    if all(found["test"]):
        test = load_idx(*found["test"])
        if all(found["train"]):
            return load_idx(*found["train"]), test
        return _split(*test, len(test[1]) * BUNDLED_TRAIN // 10000)
    if (path / PICKLE_NAME).is_file():
        training, _, test = load_pickle(path / PICKLE_NAME)
        return training, test
    raise DataError(
        f"{data}: no MNIST data found; expected t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] "
        f"(and optionally the train-* pair), or {PICKLE_NAME}"
    )


def as_pairs(images: np.ndarray, labels: np.ndarray, one_hot: bool = False) -> list:
    """The book's format: a list of (x, y), x a column of 784 values, y the
    digit, or with `one_hot` a column of 10 with a 1.0 at the digit."""
    xs = images[:, :, None]  # (n, 784, 1): each x a view, no copy
    if not one_hot:
        return list(zip(xs, labels.tolist()))
    ys = np.zeros((len(labels), 10, 1))
    ys[np.arange(len(labels)), labels, 0] = 1.0
    return list(zip(xs, ys))


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _split(images, labels, n_train):
    return (images[:n_train], labels[:n_train]), (images[n_train:], labels[n_train:])
