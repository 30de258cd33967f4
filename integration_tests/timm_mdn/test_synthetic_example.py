"""The data behind examples/mdn_synthetic.py: the paper's generator, its accuracy limits, the IDX reader."""

import gzip
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from integration_tests.helpers.examples import load_example


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load_example("mdn_synthetic.py")


def test_gaussian_blob_is_normalised_and_symmetric(example: ModuleType) -> None:
    blob = example.gaussian_kernel()
    assert blob.shape == (16, 16)
    assert float(blob.sum()) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(blob, blob.T)
    torch.testing.assert_close(blob, blob.flip(0))
    assert float(blob[7:9, 7:9].min()) == pytest.approx(float(blob.max()), rel=1e-12)  # peak in the centre


def test_synthetic_images_follow_the_paper(example: ModuleType) -> None:
    data = example.synthetic_split(400, seed=3)
    x, y, cf, mf = data["x"], data["y"], data["cf"], data["mf"]
    assert x.shape == (800, 1, 32, 32) and y[:400].eq(0).all() and y[400:].eq(1).all()
    for values in (cf, mf):  # group 0 ~ U(1, 4), group 1 ~ U(3, 6)
        assert 1 <= float(values[:400].min()) and float(values[:400].max()) <= 4
        assert 3 <= float(values[400:].min()) and float(values[400:].max()) <= 6
    # A quadrant's sum is its blob's intensity (the blob sums to 1) plus 256 noise pixels of std 0.01.
    torch.testing.assert_close(x[:, 0, :16, :16].sum((1, 2)), mf, atol=1.0, rtol=0)
    torch.testing.assert_close(x[:, 0, :16, :16].sum((1, 2)), x[:, 0, 16:, 16:].sum((1, 2)), atol=1.0, rtol=0)
    torch.testing.assert_close(x[:, 0, 16:, :16].sum((1, 2)), cf, atol=1.0, rtol=0)
    assert float(x[:, 0, :16, 16:].std()) == pytest.approx(0.01, rel=0.05)  # empty quadrant: noise only


def test_accuracy_limits_match_the_generator(example: ModuleType) -> None:
    data = example.synthetic_split(20000, seed=0)
    y, cf, mf = data["y"], data["cf"], data["mf"]
    bayes_mf = ((mf > 3.5).float() == y).float().mean()  # the best rule on the true effect alone
    both = torch.where((mf > 4) | (cf > 4), 1.0, torch.where((mf < 3) | (cf < 3), 0.0, (mf + cf > 7).float()))
    bayes_both = (both == y).float().mean()  # in [3, 4]^2 both groups are equally likely
    assert float(bayes_mf) == pytest.approx(example.LIMIT_FREE, abs=0.01)
    assert float(bayes_both) == pytest.approx(example.LIMIT_USING, abs=0.01)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_and_colour_confounder(example: ModuleType, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 240), ("t10k", 120)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    np.testing.assert_array_equal(
        example.read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz"), np.arange(120) % 10
    )
    data = example.fashion_mnist_confounded(tmp_path, seed=0)
    train = data["train"]
    assert train["x"].shape[1:] == (3, 28, 28) and len(train["y"]) + len(data["val"]["y"]) == 48
    red = train["x"][:, 0]
    torch.testing.assert_close(train["x"][:, 1], red * (1 - 0.7 * train["cf"])[:, None, None])
    same, reversed_ = data["test"], data["test_reversed"]
    assert float(same["cf"][same["y"] == 0].max()) <= 0.6
    assert float(same["cf"][same["y"] == 1].min()) >= 0.4
    assert float(reversed_["cf"][reversed_["y"] == 1].max()) <= 0.6
    torch.testing.assert_close(same["x"][:, 0], reversed_["x"][:, 0])  # same garments, other tint
