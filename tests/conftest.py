"""Shared test helpers: small MNIST-format IDX files, written by the tests themselves.

    from conftest import write_idx, write_idx_set   # plain functions, usable from any test
    def test_x(mnist_raw, mnist_csv): ...            # fixtures: a raw IDX folder / a CSV folder
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 00 00 08 ndim, big-endian dims, the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + array.tobytes()


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write `array` as IDX to `path`, gzip-compressed when the name ends in .gz."""
    path = Path(path)
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def make_split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels uint8 [n] cycling 0..9, images uint8 [n, 28, 28] of random pixels 0..255)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return labels, images


def write_idx_set(folder: str | Path, n_train: int = 30, n_test: int = 20, gz: bool = True,
                  seed: int = 0) -> dict[str, str]:
    """Write the four MNIST files (NAME.gz if gz) into folder.

    Returns {name: md5 of the decompressed content}, the table `aebench.download.download` takes as
    `files=` (the real MNIST md5 values cannot match generated data).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md5s = {}
    for i, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        labels, images = make_split(n, seed + i)
        image_name, label_name = IDX_NAMES[split]
        for name, array in ((image_name, images), (label_name, labels)):
            write_idx(folder / (name + (".gz" if gz else "")), array)
            md5s[name] = hashlib.md5(idx_bytes(array)).hexdigest()
    return md5s


@pytest.fixture
def mnist_raw(tmp_path: Path) -> Path:
    """A folder with the four decompressed IDX files (30 train, 20 test images), as `download`
    leaves data/raw."""
    write_idx_set(tmp_path / "raw", gz=False)
    return tmp_path / "raw"


@pytest.fixture
def mnist_csv(mnist_raw: Path) -> Path:
    """A folder with mnist_train.csv (30 rows) and mnist_test.csv (20 rows), as `convert` writes."""
    from aebench.data import convert

    convert(mnist_raw, mnist_raw.parent / "csv")
    return mnist_raw.parent / "csv"
