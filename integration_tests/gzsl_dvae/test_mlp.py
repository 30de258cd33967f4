from __future__ import annotations

import pytest
import torch
from gzsl_dvae import GaussianMLPEncoder, MLPDecoder, reparameterize


def test_encoder_shapes_and_repr() -> None:
    enc = GaussianMLPEncoder(12, 20, latent_dim=5, num_factors=2)
    mu, logvar = enc(torch.randn(3, 12))
    assert mu.shape == logvar.shape == (3, 10)
    assert str(enc).startswith(
        "GaussianMLPEncoder(\n  in_features=12, hidden_features=20, latent_dim=5, num_factors=2"
    )


def test_cada_initialisation() -> None:
    enc = GaussianMLPEncoder(100, 50)
    bound = 0.5 * (6 / (100 + 50)) ** 0.5  # xavier_uniform with gain 0.5
    w = enc.hidden[0].weight
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    assert torch.count_nonzero(enc.hidden[0].bias) == 0
    dec = MLPDecoder(4, 8, 6)
    assert dec(torch.randn(2, 4)).shape == (2, 6)
    assert torch.count_nonzero(dec[2].bias) == 0


def test_reparameterize_statistics() -> None:
    mu = torch.tensor([[1.0, -2.0]]).expand(20000, 2)
    logvar = torch.tensor([[0.0, 2.0 * torch.log(torch.tensor(3.0))]]).expand(20000, 2)
    z = reparameterize(mu, logvar, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(0), torch.tensor([1.0, -2.0]), atol=0.06, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 3.0]), atol=0.06, rtol=0)
    # dimensions get independent noise (CADA-VAE's code shares one draw per row)
    assert abs(torch.corrcoef(z.T)[0, 1]) < 0.05


def test_reparameterize_gradient() -> None:
    mu = torch.zeros(4, 3, requires_grad=True)
    logvar = torch.zeros(4, 3, requires_grad=True)
    z = reparameterize(mu, logvar, generator=torch.Generator().manual_seed(1))
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones(4, 3))
    eps = reparameterize(torch.zeros(4, 3), torch.zeros(4, 3), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logvar.grad, 0.5 * eps)


@pytest.mark.parametrize("args", [(0, 4, 2), (4, 0, 2), (4, 4, 0)])
def test_size_errors(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        GaussianMLPEncoder(*args)
    with pytest.raises(ValueError, match="must be >= 1"):
        MLPDecoder(*args)
