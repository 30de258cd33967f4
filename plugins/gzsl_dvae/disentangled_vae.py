"""Disentangled-VAE: category-distilling and category-dispersing factors for generalized zero-shot."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ._validation import check_index_range, check_positive
from .cada_vae import CADA_CROSS_RECONSTRUCTION_WARMUP, CADA_DISTANCE_WARMUP, CADA_KL_WARMUP, check_pair
from .kl_loss import GaussianKLLoss
from .mlp import GaussianMLPEncoder, MLPDecoder, reparameterize
from .reconstruction_loss import ReconstructionLoss
from .shuffling_classification_loss import ShufflingClassificationLoss
from .warmup import LinearWarmup
from .wasserstein_loss import GaussianWassersteinLoss

__all__ = ["DisentangledVAE"]

Factor = Literal["t", "p"]


class DisentangledVAE(nn.Module):
    r"""Disentangled-VAE: parallel visual and semantic VAEs with latents split into :math:`z^t`, :math:`z^p`.

    "Generalized Zero-Shot Learning via Disentangled Representation" (Xiangyu Li, Zhe Xu, Kun Wei, Cheng Deng,
    AAAI 2021, https://ojs.aaai.org/index.php/AAAI/article/view/16292). Each encoder :math:`E_m`,
    :math:`m \in \{v, s\}`, outputs a category-distilling factor :math:`z^t_m` and a category-dispersing
    factor :math:`z^p_m` (diagonal Gaussians); each decoder :math:`D_m` reconstructs from the sum
    :math:`z^t_m + z^p_m`. With :math:`x` an image feature, :math:`c` its class attributes and :math:`e` the
    0-based epoch, the loss of a batch is

    .. math::
        L &= L_{VAE} + \gamma L_{SC} + \lambda L_{MA}, \\
        L_{VAE} &= \sum_{m} |m - D_m(z^t_m + z^p_m)|
            + w_{KL}(e) \big[ D_{KL}(q(z^t_m|m) \| p) + \alpha D_{KL}(q(z^p_m|m) \| p) \big], \\
        L_{SC} &= \sum_m \sum_i \operatorname{CE}(F_m(z^t_{m,i} + z^p_{m,i}), y_i)
            + \operatorname{CE}(F_m(z^t_{m,i} + \tilde{z}^p_{m,i}), y_i), \\
        \lambda L_{MA} &= w_{CR}(e) \big[ |x - D_v(z^t_s + z^p_s)| + |c - D_s(z^t_v + z^p_v)| \big]
            + w_{DD}(e) \big[ W_2(q(z^t_v), q(z^t_s)) + W_2(q(z^p_v), q(z^p_s)) \big],

    where :math:`\tilde{z}^p` re-combines the batch (rows of :math:`z^p` shuffled, :math:`z^t` kept; see
    :class:`~gzsl_dvae.ShufflingClassificationLoss`) and every term is summed over the batch. The paper's
    :math:`\lambda` and :math:`\beta` (:math:`L_{MA} = L_{CR} + \beta L_{DD}`) are
    :math:`\lambda = w_{CR}` and :math:`\lambda\beta = w_{DD}`; the paper did not publish per-dataset weights,
    so they start from CADA-VAE's warm-ups (:math:`w_{KL}`: 0→0.25 over epochs 0–93, :math:`w_{CR}`: 0→2.37
    over 21–75, :math:`w_{DD}`: 0→8.13 over 6–22; pass ``LinearWarmup.constant(1.0)`` as ``kl_warmup`` for the
    paper's unit KL weight). Encoders and decoders are 2-layer MLPs, latent size 64 per factor.

    Classification uses :math:`z^t` only (:meth:`encode_visual` / :meth:`encode_semantic` with
    ``factor="t"``); ``factor="p"`` gives the category-dispersing factor for the paper's discriminability
    ablation.

    Symbols → arguments: :math:`\alpha` = ``alpha``, :math:`\gamma` = ``gamma``, :math:`w_{KL}` =
    ``kl_warmup``, :math:`\lambda` = ``cross_reconstruction_warmup``, :math:`\lambda\beta` =
    ``distance_warmup``, :math:`F_m` = ``visual_classification_loss.classifier`` /
    ``semantic_classification_loss.classifier``.

    Args:
        visual_dim: visual feature size :math:`D_1`.
        attribute_dim: class attribute size :math:`D_2`.
        num_classes: number of seen (training) classes, the outputs of :math:`F_v` and :math:`F_s`.
        latent_dim: size of each factor :math:`z^t`, :math:`z^p`. (default: ``64``)
        visual_hidden: ``(encoder, decoder)`` hidden sizes of the visual VAE. (default: ``(1560, 1660)``)
        attribute_hidden: ``(encoder, decoder)`` hidden sizes of the semantic VAE. (default: ``(1450, 665)``)
        alpha: weight :math:`\alpha` of the KL term of :math:`z^p`; larger pulls :math:`z^p` to the prior.
            (default: ``1.0``)
        gamma: weight :math:`\gamma` of :math:`L_{SC}`. (default: ``1.0``)
        kl_warmup: :math:`w_{KL}`. (default: ``LinearWarmup(0.25, 0, 93)``)
        cross_reconstruction_warmup: :math:`\lambda`. (default: ``LinearWarmup(2.37, 21, 75)``)
        distance_warmup: :math:`\lambda\beta`. (default: ``LinearWarmup(8.13, 6, 22)``)
        reconstruction_norm: ``"l1"`` or ``"l2"``. (default: ``"l1"``)
        validate_args: reject non-finite ``x`` or ``c`` and ``labels`` outside ``[0, num_classes)`` with a
            ``ValueError`` before any layer runs, so an optimizer step never sees a gradient from them
            (host-device synchronisations on a GPU; ``False`` skips them, and the returned loss is then the
            caller's to check, e.g. with ``GradScaler``, which skips the step on a non-finite gradient).
            (default: ``True``)

    Shapes:
        - **x**: :math:`(N, D_1)`; **c**: :math:`(N, D_2)` (each sample's class attributes); **labels**:
          :math:`(N,)` in ``[0, num_classes)``.
        - **output** of :meth:`forward`: dict of scalars, ``"loss"`` (the total) and the unweighted terms
          ``"reconstruction"``, ``"kl_t"``, ``"kl_p"``, ``"classification"``, ``"cross_reconstruction"``,
          ``"distance_t"``, ``"distance_p"``.

    Raises:
        ValueError: for sizes < 1, ``num_classes < 2``, negative ``alpha``/``gamma``, wrongly shaped inputs,
            an empty batch, or (with ``validate_args``) non-finite inputs or labels out of range.
        TypeError: for non-floating ``x``/``c``, floating ones of another dtype than the parameters (outside
            autocast; fix with ``module.to(dtype)``), or non-integer labels.
    """

    def __init__(
        self,
        visual_dim: int,
        attribute_dim: int,
        num_classes: int,
        latent_dim: int = 64,
        visual_hidden: tuple[int, int] = (1560, 1660),
        attribute_hidden: tuple[int, int] = (1450, 665),
        alpha: float = 1.0,
        gamma: float = 1.0,
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
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.visual_hidden = tuple(visual_hidden)
        self.attribute_hidden = tuple(attribute_hidden)
        self.alpha = check_positive("alpha", alpha, allow_zero=True)
        self.gamma = check_positive("gamma", gamma, allow_zero=True)
        self.kl_warmup = kl_warmup
        self.cross_reconstruction_warmup = cross_reconstruction_warmup
        self.distance_warmup = distance_warmup
        self.visual_encoder = GaussianMLPEncoder(visual_dim, visual_hidden[0], latent_dim, num_factors=2)
        self.visual_decoder = MLPDecoder(latent_dim, visual_hidden[1], visual_dim)
        self.semantic_encoder = GaussianMLPEncoder(
            attribute_dim, attribute_hidden[0], latent_dim, num_factors=2
        )
        self.semantic_decoder = MLPDecoder(latent_dim, attribute_hidden[1], attribute_dim)
        # forward checks its inputs once; the terms, fed by the layers, need no check of their own
        self.visual_classification_loss = ShufflingClassificationLoss(
            num_classes, latent_dim, validate_args=False
        )
        self.semantic_classification_loss = ShufflingClassificationLoss(
            num_classes, latent_dim, validate_args=False
        )
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
            self.visual_classification_loss,
            self.semantic_classification_loss,
        ):
            module.reset_parameters()

    @staticmethod
    def _split(mu: Tensor, logvar: Tensor, factor: Factor) -> tuple[Tensor, Tensor]:
        if factor not in ("t", "p"):
            raise ValueError(
                f"`factor` must be 't' (category-distilling) or 'p' (category-dispersing), got {factor!r}"
            )
        index = 0 if factor == "t" else 1
        return mu.chunk(2, dim=1)[index], logvar.chunk(2, dim=1)[index]

    def encode_visual(self, x: Tensor, factor: Factor = "t") -> tuple[Tensor, Tensor]:
        """Posterior ``(mu, logvar)``, each ``(N, latent_dim)``, of :math:`z^t_v` (or :math:`z^p_v`)."""
        mu, logvar = self.visual_encoder(x)
        return self._split(mu, logvar, factor)

    def encode_semantic(self, c: Tensor, factor: Factor = "t") -> tuple[Tensor, Tensor]:
        """Posterior ``(mu, logvar)``, each ``(N, latent_dim)``, of :math:`z^t_s` (or :math:`z^p_s`)."""
        mu, logvar = self.semantic_encoder(c)
        return self._split(mu, logvar, factor)

    def forward(self, x: Tensor, c: Tensor, labels: Tensor, epoch: float = 0.0) -> dict[str, Tensor]:
        """Return the Disentangled-VAE loss terms of one batch at ``epoch``."""
        check_pair(x, c, self.visual_dim, self.attribute_dim, self, self.validate_args)
        if not isinstance(labels, Tensor) or labels.shape != (x.shape[0],):
            raise ValueError(
                f"`labels` must be a tensor of shape ({x.shape[0]},), got "
                f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}"
            )
        if self.validate_args:
            check_index_range("labels", labels, self.num_classes)
        mu_v, logvar_v = self.visual_encoder(x)
        mu_s, logvar_s = self.semantic_encoder(c)
        z_v = reparameterize(mu_v, logvar_v)
        z_s = reparameterize(mu_s, logvar_s)
        zt_v, zp_v = z_v.chunk(2, dim=1)
        zt_s, zp_s = z_s.chunk(2, dim=1)
        h_v = zt_v + zp_v  # the decoders see the sum of the two factors
        h_s = zt_s + zp_s

        reconstruction = self.reconstruction_loss(self.visual_decoder(h_v), x) + self.reconstruction_loss(
            self.semantic_decoder(h_s), c
        )
        cross = self.reconstruction_loss(self.visual_decoder(h_s), x) + self.reconstruction_loss(
            self.semantic_decoder(h_v), c
        )
        # both factors of both modalities in one pass: columns [:d] are z^t, [d:] are z^p
        d = self.latent_dim
        kl = self.kl_loss.per_dimension(torch.cat([mu_v, mu_s]), torch.cat([logvar_v, logvar_s]))
        kl_t, kl_p = kl[:, :d].sum(), kl[:, d:].sum()
        squared = self.distance_loss.squared_terms(mu_v, logvar_v, mu_s, logvar_s)
        distance_t = self.distance_loss.root(squared[:, :d].sum(dim=1)).sum()
        distance_p = self.distance_loss.root(squared[:, d:].sum(dim=1)).sum()
        classification = self.visual_classification_loss(
            zt_v, zp_v, labels
        ) + self.semantic_classification_loss(zt_s, zp_s, labels)
        loss = (
            reconstruction
            + self.kl_warmup(epoch) * (kl_t + self.alpha * kl_p)
            + self.gamma * classification
            + self.cross_reconstruction_warmup(epoch) * cross
            + self.distance_warmup(epoch) * (distance_t + distance_p)
        )
        return {
            "loss": loss,
            "reconstruction": reconstruction.detach(),
            "kl_t": kl_t.detach(),
            "kl_p": kl_p.detach(),
            "classification": classification.detach(),
            "cross_reconstruction": cross.detach(),
            "distance_t": distance_t.detach(),
            "distance_p": distance_p.detach(),
        }

    @torch.no_grad()
    def generate_visual(self, c: Tensor) -> Tensor:
        """Decode visual features from the posterior means of attributes ``c`` (:math:`z^t_s + z^p_s`)."""
        mu, _ = self.semantic_encoder(c)
        zt, zp = mu.chunk(2, dim=1)
        return self.visual_decoder(zt + zp)

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``repr``."""
        return (
            f"visual_dim={self.visual_dim}, attribute_dim={self.attribute_dim}, "
            f"num_classes={self.num_classes}, "
            f"latent_dim={self.latent_dim}, visual_hidden={self.visual_hidden}, "
            f"attribute_hidden={self.attribute_hidden}, alpha={self.alpha}, gamma={self.gamma},\n"
            f"kl_warmup={self.kl_warmup}, cross_reconstruction_warmup={self.cross_reconstruction_warmup}, "
            f"distance_warmup={self.distance_warmup}"
        )
