from __future__ import annotations

import numpy as np
import pytest
import torch
from gzsl_dvae import GaussianKLLoss
from torch.distributions import Normal, kl_divergence


def _reference(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """Per-sample KL(N(mu, diag(exp(logvar))) || N(0, I)) written from the formula, float64."""
    out = np.zeros(mu.shape[0])
    for i in range(mu.shape[0]):
        for j in range(mu.shape[1]):
            var = np.exp(logvar[i, j])
            out[i] += 0.5 * (mu[i, j] ** 2 + var - np.log(var) - 1.0)
    return out


def _inputs(n: int = 5, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, d, generator=g, dtype=torch.float64)
    logvar = torch.randn(n, d, generator=g, dtype=torch.float64)
    return mu.requires_grad_(), logvar.requires_grad_()


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_values_match_float64_reference(reduction: str) -> None:
    mu, logvar = _inputs()
    ref = _reference(mu.detach().numpy(), logvar.detach().numpy())
    expected = {"sum": ref.sum(), "mean": ref.mean(), "none": ref}[reduction]
    out = GaussianKLLoss(reduction)(mu, logvar)  # type: ignore[arg-type]
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-12)


def test_gradients_match_closed_form() -> None:
    # d/dmu = mu, d/dlogvar = (exp(logvar) - 1) / 2 for the summed KL
    mu, logvar = _inputs()
    GaussianKLLoss()(mu, logvar).backward()
    torch.testing.assert_close(mu.grad, mu.detach())
    torch.testing.assert_close(logvar.grad, 0.5 * (logvar.detach().exp() - 1.0))


def test_matches_torch_distributions() -> None:
    mu, logvar = _inputs(seed=3)
    std = torch.exp(0.5 * logvar)
    anchor = kl_divergence(Normal(mu, std), Normal(torch.zeros_like(mu), torch.ones_like(std))).sum(1)
    ours = GaussianKLLoss("none")(mu, logvar)
    torch.testing.assert_close(ours, anchor)
    g_anchor = torch.autograd.grad(anchor.sum(), (mu, logvar))
    g_ours = torch.autograd.grad(ours.sum(), (mu, logvar))
    for a, b in zip(g_ours, g_anchor, strict=True):
        torch.testing.assert_close(a, b)


def test_zero_at_prior_and_positive_elsewhere() -> None:
    loss = GaussianKLLoss("none")
    assert torch.equal(loss(torch.zeros(3, 2), torch.zeros(3, 2)), torch.zeros(3))
    mu, logvar = _inputs()
    assert (loss(mu, logvar) > 0).all()


def test_float32_close_to_float64() -> None:
    mu, logvar = _inputs()
    out64 = GaussianKLLoss()(mu, logvar)
    out32 = GaussianKLLoss()(mu.float(), logvar.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=1e-5, atol=1e-5)


def test_errors_and_repr() -> None:
    with pytest.raises(ValueError, match="reduction"):
        GaussianKLLoss("max")  # type: ignore[arg-type]
    loss = GaussianKLLoss()
    with pytest.raises(ValueError, match="equal shapes"):
        loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="`mu` must have 2 dimensions"):
        loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(TypeError, match="`logvar` must be a floating-point"):
        loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    assert str(loss) == "GaussianKLLoss(reduction='sum')"
