"""The example's Fashion-MNIST idx reader, on small files written here in the same format."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from integration_tests.helpers.examples import load_example


@pytest.fixture(scope="module")
def example():
    return load_example("pcl_fashion_mnist.py")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trips_images_and_labels(example, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _write_idx(tmp_path / "i.gz", images)
    _write_idx(tmp_path / "l.gz", labels)
    np.testing.assert_array_equal(example.read_idx(tmp_path / "i.gz"), images)
    np.testing.assert_array_equal(example.read_idx(tmp_path / "l.gz"), labels)


def test_read_idx_rejects_other_formats(example, tmp_path):
    with gzip.open(tmp_path / "bad.gz", "wb") as handle:
        handle.write(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\x00\x00\x00\x00")  # float32 idx
    with pytest.raises(ValueError, match="not an unsigned-byte idx file"):
        example.read_idx(tmp_path / "bad.gz")


def test_missing_dataset_names_the_debian_package(example, tmp_path):
    with pytest.raises(SystemExit, match="dataset-fashion-mnist"):
        example.load_fashion_mnist(tmp_path)


def test_quick_data_is_the_upsampled_digits(example):
    x_tr, _, x_te, y_te = example.load_digits_upsampled()
    assert x_tr.shape[1:] == (16, 16) and x_tr.dtype == np.uint8
    assert len(x_tr) + len(x_te) == 1797 and set(np.unique(y_te)) == set(range(10))


@pytest.mark.dataset
def test_debian_fashion_mnist_is_complete(example):
    if not example.FASHION_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    x_tr, y_tr, x_te, y_te = example.load_fashion_mnist(example.FASHION_DIR)
    assert x_tr.shape == (60000, 28, 28) and x_te.shape == (10000, 28, 28)
    assert np.bincount(y_tr).tolist() == [6000] * 10 and np.bincount(y_te).tolist() == [1000] * 10
