"""Two-layer MLP encoders and decoders of the modality VAEs, and the reparameterisation trick."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GaussianMLPEncoder", "MLPDecoder", "cada_init_", "reparameterize"]


def cada_init_(module: nn.Module) -> None:
    """Initialise every ``nn.Linear`` in ``module`` like CADA-VAE: Xavier-uniform (gain 0.5), zero bias."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight, gain=0.5)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    r"""Draw :math:`z = \mu + e^{\log\sigma^2/2} \odot \epsilon` with :math:`\epsilon \sim \mathcal{N}(0, I)`.

    Note:
        CADA-VAE's official code uses :math:`\sigma = e^{\log\sigma^2}` and one :math:`\epsilon` per row
        shared by all dimensions, which is inconsistent with its own KL term; we sample the Gaussian that the
        KL and Wasserstein terms assume.
    """
    device = generator.device if generator is not None else mu.device  # a CPU generator draws on the CPU
    eps = torch.randn(mu.shape, generator=generator, device=device, dtype=mu.dtype).to(mu.device)
    return mu + torch.exp(0.5 * logvar) * eps


class GaussianMLPEncoder(nn.Module):
    r"""``Linear -> ReLU -> (Linear_mu, Linear_logvar)``: a diagonal Gaussian posterior of ``num_factors``.

    The encoder :math:`E_m` of a modality VAE: one hidden layer, then linear heads for the posterior mean and
    log-variance. CADA-VAE uses one factor; Disentangled-VAE two (:math:`z^t`, :math:`z^p`), returned
    concatenated as ``[z^t | z^p]`` along the feature axis.

    Args:
        in_features: input size :math:`D` (2048 for ResNet-101 features, the attribute count for attributes).
        hidden_features: hidden layer size (CADA-VAE: 1560 for images, 1450 for attributes).
        latent_dim: size of each latent factor. (default: ``64``)
        num_factors: number of latent factors. (default: ``1``)

    Shapes:
        - **input**: :math:`(N, D)`.
        - **output**: ``(mu, logvar)``, each :math:`(N, \text{num\_factors} \cdot \text{latent\_dim})`.

    Raises:
        ValueError: if a size is < 1.
    """

    def __init__(
        self, in_features: int, hidden_features: int, latent_dim: int = 64, num_factors: int = 1
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("hidden_features", hidden_features),
            ("latent_dim", latent_dim),
            ("num_factors", num_factors),
        ):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.latent_dim = latent_dim
        self.num_factors = num_factors
        self.hidden = nn.Sequential(nn.Linear(in_features, hidden_features), nn.ReLU())
        self.mu = nn.Linear(hidden_features, num_factors * latent_dim)
        self.logvar = nn.Linear(hidden_features, num_factors * latent_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise like CADA-VAE (Xavier-uniform, gain 0.5; zero bias)."""
        cada_init_(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return the posterior ``(mu, logvar)`` of ``x``."""
        h = self.hidden(x)
        return self.mu(h), self.logvar(h)

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``repr``."""
        return (
            f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
            f"latent_dim={self.latent_dim}, num_factors={self.num_factors}"
        )


class MLPDecoder(nn.Sequential):
    r"""``Linear -> ReLU -> Linear``: the decoder :math:`D_m` of a modality VAE.

    Args:
        latent_dim: input latent size. (default: ``64``)
        hidden_features: hidden layer size (CADA-VAE: 1660 for images, 665 for attributes).
        out_features: reconstructed feature size :math:`D`.

    Shapes:
        - **input**: :math:`(N, \text{latent\_dim})`; **output**: :math:`(N, D)`.

    Raises:
        ValueError: if a size is < 1.
    """

    def __init__(self, latent_dim: int, hidden_features: int, out_features: int) -> None:
        for name, value in (
            ("latent_dim", latent_dim),
            ("hidden_features", hidden_features),
            ("out_features", out_features),
        ):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")
        super().__init__(
            nn.Linear(latent_dim, hidden_features), nn.ReLU(), nn.Linear(hidden_features, out_features)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise like CADA-VAE (Xavier-uniform, gain 0.5; zero bias)."""
        cada_init_(self)
