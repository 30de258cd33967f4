"""CADA-VAE: cross- and distribution-aligned VAEs (the baseline of Disentangled-VAE)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._validation import check_all_finite, check_module_dtype, check_tensor
from .kl_loss import GaussianKLLoss
from .mlp import GaussianMLPEncoder, MLPDecoder, reparameterize
from .reconstruction_loss import ReconstructionLoss
from .warmup import LinearWarmup
from .wasserstein_loss import GaussianWassersteinLoss

__all__ = ["CADAVAE", "check_pair"]

CADA_KL_WARMUP = LinearWarmup(0.25, 0, 93)
CADA_CROSS_RECONSTRUCTION_WARMUP = LinearWarmup(2.37, 21, 75)
CADA_DISTANCE_WARMUP = LinearWarmup(8.13, 6, 22)


def check_pair(
    x: Tensor,
    c: Tensor,
    visual_dim: int,
    attribute_dim: int,
    module: nn.Module | None = None,
    validate_args: bool = False,
) -> None:
    """Check a batch of visual features ``x`` and their class attributes ``c`` (same rows, right widths).

    With ``module``, their dtype must be its parameters' (outside autocast); with ``validate_args``, they must
    be finite (one host-device synchronisation).
    """
    check_tensor("x", x, ndim=2)
    check_tensor("c", c, ndim=2)
    if module is not None:
        check_module_dtype("x", x, module)
        check_module_dtype("c", c, module)
    if x.shape[1] != visual_dim:
        raise ValueError(f"`x` must have visual_dim={visual_dim} columns, got {x.shape[1]}")
    if c.shape[1] != attribute_dim:
        raise ValueError(f"`c` must have attribute_dim={attribute_dim} columns, got {c.shape[1]}")
    if x.shape[0] != c.shape[0]:
        raise ValueError(f"`x` and `c` must have the same number of rows, got {x.shape[0]} and {c.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("`x` and `c` must hold at least one sample, got an empty batch (0 rows)")
    if validate_args:
        check_all_finite(type(module).__name__ if module is not None else "check_pair", ("x", "c"), (x, c))


class CADAVAE(nn.Module):
    r"""CADA-VAE, the cross- and distribution-aligned VAE baseline, with its published recipe.

    "Generalized Zero- and Few-Shot Learning via Aligned Variational Autoencoders" (Schonfeld, Ebrahimi,
    Sinha,
    Darrell, Akata, CVPR 2019, https://arxiv.org/abs/1812.01784). One VAE per modality (visual :math:`x`,
    semantic :math:`c`) shares a latent space; with :math:`z_v \sim q(z|x)`, :math:`z_s \sim q(z|c)`:

    .. math::
        L = \underbrace{|x - D_v(z_v)| + |c - D_s(z_s)|}_{\text{reconstruction}}
        + w_{KL}(e)\,\big[D_{KL}(q(z|x) \| p) + D_{KL}(q(z|c) \| p)\big]
        + w_{CR}(e)\,\underbrace{\big[|x - D_v(z_s)| + |c - D_s(z_v)|\big]}_{\text{cross-reconstruction}}
        + w_{DD}(e)\,W_2\big(q(z|x), q(z|c)\big),

    each term summed over the batch, with linear warm-ups :math:`w(e)` over the 0-based epoch :math:`e`
    (published: :math:`w_{KL}`: 0→0.25 over epochs 0–93, :math:`w_{CR}`: 0→2.37 over 21–75, :math:`w_{DD}`:
    0→8.13 over 6–22). Published architecture: image VAE 2048→1560→64, 64→1660→2048; attribute VAE
    A→1450→64, 64→665→A; Adam (lr 1.5e-4, AMSGrad), 100 epochs, batch 50 (see :func:`~gzsl_dvae.train_vae`).

    Differences from the official code, on purpose: the latent is sampled as
    :math:`\mu + e^{\log\sigma^2/2}\epsilon` with independent :math:`\epsilon` per dimension (the code uses
    :math:`e^{\log\sigma^2}` and one :math:`\epsilon` per row), see :func:`~gzsl_dvae.reparameterize`.

    Args:
        visual_dim: visual feature size :math:`D_1` (2048 for ResNet-101).
        attribute_dim: class attribute size :math:`D_2`.
        latent_dim: latent size. (default: ``64``)
        visual_hidden: ``(encoder, decoder)`` hidden sizes of the visual VAE. (default: ``(1560, 1660)``)
        attribute_hidden: ``(encoder, decoder)`` hidden sizes of the semantic VAE. (default: ``(1450, 665)``)
        kl_warmup: :math:`w_{KL}`. (default: ``LinearWarmup(0.25, 0, 93)``)
        cross_reconstruction_warmup: :math:`w_{CR}`. (default: ``LinearWarmup(2.37, 21, 75)``)
        distance_warmup: :math:`w_{DD}`. (default: ``LinearWarmup(8.13, 6, 22)``)
        reconstruction_norm: ``"l1"`` (published) or ``"l2"``. (default: ``"l1"``)
        validate_args: reject non-finite ``x`` or ``c`` with a ``ValueError`` before any layer runs, so an
            optimizer step never sees a gradient from them (one host-device synchronisation per call on a
            GPU; ``False`` skips it, and the returned loss is then the caller's to check, e.g. with
            ``GradScaler``). (default: ``True``)

    Shapes:
        - **x**: :math:`(N, D_1)`; **c**: :math:`(N, D_2)`, the attributes of each sample's class.
        - **output** of :meth:`forward`: a dict of scalars, ``"loss"`` (the total) and each weighted-in term
          unweighted (``"reconstruction"``, ``"kl"``, ``"cross_reconstruction"``, ``"distance"``).

    Raises:
        ValueError: for sizes < 1, inputs of the wrong shape, an empty batch, or (with ``validate_args``)
            non-finite inputs.
        TypeError: for non-floating inputs, or floating inputs of another dtype than the parameters.
    """

    def __init__(
        self,
        visual_dim: int,
        attribute_dim: int,
        latent_dim: int = 64,
        visual_hidden: tuple[int, int] = (1560, 1660),
        attribute_hidden: tuple[int, int] = (1450, 665),
        kl_warmup: LinearWarmup = CADA_KL_WARMUP,
        cross_reconstruction_warmup: LinearWarmup = CADA_CROSS_RECONSTRUCTION_WARMUP,
        distance_warmup: LinearWarmup = CADA_DISTANCE_WARMUP,
        reconstruction_norm: str = "l1",
        validate_args: bool = True,
    ) -> None:
        super().__init__()
        self.validate_args = validate_args
        self.visual_dim = visual_dim
        self.attribute_dim = attribute_dim
        self.latent_dim = latent_dim
        self.visual_hidden = tuple(visual_hidden)
        self.attribute_hidden = tuple(attribute_hidden)
        self.kl_warmup = kl_warmup
        self.cross_reconstruction_warmup = cross_reconstruction_warmup
        self.distance_warmup = distance_warmup
        self.visual_encoder = GaussianMLPEncoder(visual_dim, visual_hidden[0], latent_dim)
        self.visual_decoder = MLPDecoder(latent_dim, visual_hidden[1], visual_dim)
        self.semantic_encoder = GaussianMLPEncoder(attribute_dim, attribute_hidden[0], latent_dim)
        self.semantic_decoder = MLPDecoder(latent_dim, attribute_hidden[1], attribute_dim)
        # the inputs are checked once in forward; the terms need no check of their own
        self.reconstruction_loss = ReconstructionLoss(
            reconstruction_norm,  # type: ignore[arg-type]
            reduction="sum",
            validate_args=False,
        )
        self.kl_loss = GaussianKLLoss(reduction="sum", validate_args=False)
        self.distance_loss = GaussianWassersteinLoss(reduction="sum", validate_args=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise every layer like CADA-VAE (Xavier-uniform, gain 0.5; zero bias)."""
        for module in (
            self.visual_encoder,
            self.visual_decoder,
            self.semantic_encoder,
            self.semantic_decoder,
        ):
            module.reset_parameters()

    def encode_visual(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior ``(mu, logvar)`` of visual features ``x``, each ``(N, latent_dim)``."""
        return self.visual_encoder(x)

    def encode_semantic(self, c: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior ``(mu, logvar)`` of class attributes ``c``, each ``(N, latent_dim)``."""
        return self.semantic_encoder(c)

    def forward(
        self, x: Tensor, c: Tensor, labels: Tensor | None = None, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        """Return the CADA-VAE loss terms of one batch at ``epoch`` (``labels`` are not used)."""
        check_pair(x, c, self.visual_dim, self.attribute_dim, self, self.validate_args)
        mu_v, logvar_v = self.visual_encoder(x)
        mu_s, logvar_s = self.semantic_encoder(c)
        z_v = reparameterize(mu_v, logvar_v)
        z_s = reparameterize(mu_s, logvar_s)
        reconstruction = self.reconstruction_loss(self.visual_decoder(z_v), x) + self.reconstruction_loss(
            self.semantic_decoder(z_s), c
        )
        cross = self.reconstruction_loss(self.visual_decoder(z_s), x) + self.reconstruction_loss(
            self.semantic_decoder(z_v), c
        )
        kl = self.kl_loss(mu_v, logvar_v) + self.kl_loss(mu_s, logvar_s)
        distance = self.distance_loss(mu_v, logvar_v, mu_s, logvar_s)
        loss = (
            reconstruction
            + self.kl_warmup(epoch) * kl
            + self.cross_reconstruction_warmup(epoch) * cross
            + self.distance_warmup(epoch) * distance
        )
        return {
            "loss": loss,
            "reconstruction": reconstruction.detach(),
            "kl": kl.detach(),
            "cross_reconstruction": cross.detach(),
            "distance": distance.detach(),
        }

    @torch.no_grad()
    def generate_visual(self, c: Tensor) -> Tensor:
        """Decode visual features from the posterior mean of attributes ``c`` (for inspection)."""
        mu, _ = self.semantic_encoder(c)
        return self.visual_decoder(mu)

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``repr``."""
        return (
            f"visual_dim={self.visual_dim}, attribute_dim={self.attribute_dim}, "
            f"latent_dim={self.latent_dim}, "
            f"visual_hidden={self.visual_hidden}, attribute_hidden={self.attribute_hidden},\n"
            f"kl_warmup={self.kl_warmup}, cross_reconstruction_warmup={self.cross_reconstruction_warmup}, "
            f"distance_warmup={self.distance_warmup}"
        )
