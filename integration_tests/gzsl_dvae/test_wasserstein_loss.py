from __future__ import annotations

import numpy as np
import pytest
import torch
from gzsl_dvae import GaussianWassersteinLoss
from scipy.linalg import sqrtm


def _w2_full_covariance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """General 2-Wasserstein distance of Gaussians (Dowson & Landau), independent of the diagonal form."""
    root1 = sqrtm(cov1)
    cross = sqrtm(root1 @ cov2 @ root1)
    squared = np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2.0 * np.real(cross))
    return float(np.sqrt(max(squared, 0.0)))


def _inputs(n: int = 4, d: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(4)]


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_values_match_full_covariance_formula(reduction: str) -> None:
    mu1, lv1, mu2, lv2 = _inputs()
    ref = np.array(
        [
            _w2_full_covariance(
                mu1[i].detach().numpy(),
                np.diag(lv1[i].detach().exp().numpy()),
                mu2[i].detach().numpy(),
                np.diag(lv2[i].detach().exp().numpy()),
            )
            for i in range(mu1.shape[0])
        ]
    )
    expected = {"sum": ref.sum(), "mean": ref.mean(), "none": ref}[reduction]
    out = GaussianWassersteinLoss(reduction)(mu1, lv1, mu2, lv2)  # type: ignore[arg-type]
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-9)


def test_gradients_match_closed_form() -> None:
    # W = sqrt(|mu1 - mu2|^2 + |s1 - s2|^2), s = exp(logvar / 2):
    # dW/dmu1 = (mu1 - mu2) / W, dW/dlogvar1 = (s1 - s2) * s1 / (2 W), antisymmetric in the two Gaussians
    mu1, lv1, mu2, lv2 = _inputs(seed=1)
    GaussianWassersteinLoss()(mu1, lv1, mu2, lv2).backward()
    s1, s2 = (0.5 * lv1.detach()).exp(), (0.5 * lv2.detach()).exp()
    w = torch.sqrt(((mu1 - mu2) ** 2).sum(1) + ((s1 - s2) ** 2).sum(1)).detach()[:, None]
    torch.testing.assert_close(mu1.grad, (mu1 - mu2).detach() / w)
    torch.testing.assert_close(mu2.grad, -(mu1 - mu2).detach() / w)
    torch.testing.assert_close(lv1.grad, (s1 - s2) * s1 / (2 * w))
    torch.testing.assert_close(lv2.grad, -(s1 - s2) * s2 / (2 * w))


def test_gradcheck() -> None:
    inputs = _inputs(n=2, d=2, seed=2)
    assert torch.autograd.gradcheck(GaussianWassersteinLoss(), tuple(inputs))


def test_symmetric_zero_on_equal_and_finite_gradient_there() -> None:
    mu1, lv1, mu2, lv2 = _inputs(seed=4)
    loss = GaussianWassersteinLoss("none")
    torch.testing.assert_close(loss(mu1, lv1, mu2, lv2), loss(mu2, lv2, mu1, lv1))
    same = loss(mu1, lv1, mu1.detach().clone(), lv1.detach().clone())
    assert same.max() <= 1e-6
    same.sum().backward()
    assert torch.isfinite(mu1.grad).all() and torch.isfinite(lv1.grad).all()


def test_shift_by_constant() -> None:
    mu = torch.zeros(2, 3)
    out = GaussianWassersteinLoss()(mu, mu, mu + 3.0, mu)
    assert out.item() == pytest.approx(2 * np.sqrt(27.0), rel=1e-6)


def test_errors_and_repr() -> None:
    with pytest.raises(ValueError, match="eps"):
        GaussianWassersteinLoss(eps=0.0)
    loss = GaussianWassersteinLoss()
    with pytest.raises(ValueError, match="equal shapes"):
        loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 3), torch.zeros(2, 3))
    assert str(loss) == "GaussianWassersteinLoss(reduction='sum', eps=1e-12)"
