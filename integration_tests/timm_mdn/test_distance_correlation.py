import dcor
import numpy as np
import pytest
import torch
from timm_mdn import distance_correlation_sqr, u_distance_covariance_sqr


def _pair(n: int, p: int, q: int, dependent: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = torch.randn(n, q, generator=g, dtype=torch.float64)
    if dependent:
        y = y * 0.3 + x[:, :1].square()
    return x, y


@pytest.mark.parametrize("block_size", [None, 1, 3])
@pytest.mark.parametrize(
    ("n", "p", "q", "dependent"),
    [(4, 1, 1, False), (5, 3, 1, True), (20, 84, 1, True), (50, 2, 3, False), (101, 84, 2, True)],
)
def test_matches_dcor_package_in_float64(
    n: int, p: int, q: int, dependent: bool, block_size: int | None
) -> None:
    x, y = _pair(n, p, q, dependent, seed=n + p)
    ours = distance_correlation_sqr(x, y, block_size=block_size)
    reference = dcor.u_distance_correlation_sqr(x.numpy(), y.numpy())
    assert ours.dtype == torch.float64
    assert abs(float(ours) - float(reference)) < 1e-8
    cov = u_distance_covariance_sqr(x, y, block_size=block_size)
    assert abs(float(cov) - float(dcor.u_distance_covariance_sqr(x.numpy(), y.numpy()))) < 1e-8


def test_one_dimensional_inputs_and_float32_are_promoted() -> None:
    x, y = _pair(30, 1, 1, True, seed=3)
    ours = distance_correlation_sqr(x[:, 0].float(), y[:, 0].float())
    reference = dcor.u_distance_correlation_sqr(
        x[:, 0].float().double().numpy(), y[:, 0].float().double().numpy()
    )
    assert ours.dtype == torch.float64 and abs(float(ours) - reference) < 1e-8


def test_duplicates_and_constant_inputs_behave_like_dcor() -> None:
    x, y = _pair(24, 5, 1, True, seed=4)
    x[12:] = x[:12]  # duplicated rows: zero distances off the diagonal
    assert (
        abs(float(distance_correlation_sqr(x, y)) - dcor.u_distance_correlation_sqr(x.numpy(), y.numpy()))
        < 1e-8
    )
    constant = torch.ones(24, 1, dtype=torch.float64)
    assert (
        float(distance_correlation_sqr(x, constant))
        == 0.0
        == dcor.u_distance_correlation_sqr(x.numpy(), constant.numpy())
    )


def test_known_values_and_invariances() -> None:
    x, _ = _pair(200, 6, 1, True, seed=5)
    y = x[:, :1].square() + x[:, 1:2]  # dependent, partly non-linearly
    assert float(distance_correlation_sqr(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(distance_correlation_sqr(x, 2.5 * x + 7.0)) == pytest.approx(1.0, abs=1e-12)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    base = distance_correlation_sqr(x, y)
    torch.testing.assert_close(distance_correlation_sqr(x @ rotation + 3.0, 10 * y), base)
    independent = torch.randn(200, 1, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert abs(float(distance_correlation_sqr(x, independent))) < 0.05 < 0.1 < float(base)


@pytest.mark.parametrize(
    ("x", "y", "error", "match"),
    [
        (torch.randn(3, 2), torch.randn(3), ValueError, "at least 4 samples"),
        (torch.randn(5, 2), torch.randn(6), ValueError, "same number of samples"),
        (torch.randn(5, 2, 2), torch.randn(5), ValueError, r"shape \(n,\) or \(n, features\)"),
        (np.ones((5, 2)), torch.randn(5), TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs(x: object, y: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        distance_correlation_sqr(x, y)  # type: ignore[arg-type]


def test_bad_options() -> None:
    x, y = _pair(8, 2, 1, False, seed=1)
    with pytest.raises(ValueError, match="block_size"):
        distance_correlation_sqr(x, y, block_size=0)
    with pytest.raises(TypeError, match="floating dtype"):
        distance_correlation_sqr(x, y, dtype=torch.int64)
