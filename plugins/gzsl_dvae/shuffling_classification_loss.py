"""Shuffling classification loss with batch re-combining (Disentangled-VAE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._reduction import Reduction, check_reduction, reduce
from ._validation import check_all_finite, check_index_range, check_same_shape, check_tensor

__all__ = ["ShufflingClassificationLoss"]


class ShufflingClassificationLoss(nn.Module):
    r"""Shuffling classification loss :math:`L_{SC}` of one modality, with its classifier :math:`F_m`.

    From "Generalized Zero-Shot Learning via Disentangled Representation" (Li, Xu, Wei, Deng, AAAI 2021,
    https://ojs.aaai.org/index.php/AAAI/article/view/16292). Within a batch the category-dispersing factors
    :math:`z^p` are re-combined by a random permutation :math:`\pi` of the rows while the category-distilling
    factors :math:`z^t` are kept, :math:`\tilde{z}^p_i = z^p_{\pi(i)}`, and the classifier must recognise the
    class from both the original and the re-combined sum:

    .. math::
        L_{SC}^{(m)} = \sum_{i=1}^{N} \Big[ \operatorname{CE}\big(F_m(z^t_{m,i} + z^p_{m,i}), y_i\big)
        + \operatorname{CE}\big(F_m(z^t_{m,i} + \tilde{z}^p_{m,i}), y_i\big) \Big],

    so :math:`z^p` cannot carry class information and :math:`z^t` must. The paper sums this over the two
    modalities :math:`m \in \{v, s\}`; use one instance (one :math:`F_m`) per modality.

    Like pytorch-metric-learning's classification losses (``NormalizedSoftmaxLoss``, ``ArcFaceLoss``), the
    loss owns its classifier weights, so add its parameters to the optimiser.

    Symbols: :math:`z^t` = ``z_t``, :math:`z^p` = ``z_p``, :math:`y` = ``labels``, :math:`\pi` =
    ``permutation``, :math:`F_m` = ``classifier`` (default: a linear layer ``latent_dim -> num_classes``).

    Args:
        num_classes: number of training (seen) classes; labels must lie in ``[0, num_classes)``.
        latent_dim: size of :math:`z^t` and :math:`z^p`.
        classifier: :math:`F_m`; maps ``(N, latent_dim)`` to ``(N, num_classes)`` logits. (default: ``None``,
            a fresh ``nn.Linear(latent_dim, num_classes)``)
        reduction: ``"sum"`` over the batch (the paper's :math:`\sum_i`), ``"mean"``, or ``"none"``.
            (default: ``"sum"``)
        validate_args: reject non-finite latents, labels outside ``[0, num_classes)`` and a ``permutation``
            that is not one, with a ``ValueError`` (host-device synchronisations on a GPU; ``False`` skips
            them, as in ``torch.distributions``). (default: ``True``)

    Shapes:
        - **z_t**, **z_p**: :math:`(N, d)` with :math:`d` = ``latent_dim``.
        - **labels**: :math:`(N,)` integers in ``[0, num_classes)``.
        - **permutation** (optional): :math:`(N,)` a permutation of ``range(N)``; drawn from ``generator``
          (or the global RNG) when omitted.
        - **output**: scalar, or :math:`(N,)` with ``reduction="none"`` (the two CE terms of each sample
          added).

    Raises:
        ValueError: for ``num_classes < 2``, ``latent_dim < 1``, an unknown ``reduction``, shape mismatches;
            with ``validate_args``, non-finite latents, labels out of range, or a ``permutation`` that is
            not a permutation of the batch.
        TypeError: for non-floating-point latents or non-integer labels.
    """

    def __init__(
        self,
        num_classes: int,
        latent_dim: int,
        classifier: nn.Module | None = None,
        reduction: Reduction = "sum",
        validate_args: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2, got {num_classes}")
        if latent_dim < 1:
            raise ValueError(f"`latent_dim` must be >= 1, got {latent_dim}")
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.reduction: Reduction = check_reduction(reduction)
        self.validate_args = validate_args
        self.classifier = classifier if classifier is not None else nn.Linear(latent_dim, num_classes)
        self._owns_classifier = classifier is None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise a default linear classifier like CADA-VAE (Xavier-uniform, gain 0.5; zero bias)."""
        if self._owns_classifier and isinstance(self.classifier, nn.Linear):
            nn.init.xavier_uniform_(self.classifier.weight, gain=0.5)
            nn.init.zeros_(self.classifier.bias)

    def forward(
        self,
        z_t: Tensor,
        z_p: Tensor,
        labels: Tensor,
        permutation: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Return :math:`L_{SC}` of this modality for one batch."""
        check_tensor("z_t", z_t, ndim=2)
        check_tensor("z_p", z_p, ndim=2)
        check_same_shape(("z_t", "z_p"), (z_t, z_p))
        n = z_t.shape[0]
        if z_t.shape[1] != self.latent_dim:
            raise ValueError(f"`z_t` must have latent_dim={self.latent_dim} columns, got {z_t.shape[1]}")
        if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.int16):
            raise TypeError("`labels` must be an integer torch.Tensor of class indices")
        if labels.shape != (n,):
            raise ValueError(f"`labels` must have shape ({n},), got {tuple(labels.shape)}")
        if self.validate_args:
            check_all_finite(type(self).__name__, ("z_t", "z_p"), (z_t, z_p))
            check_index_range("labels", labels, self.num_classes)
        if permutation is None:
            device = generator.device if generator is not None else z_p.device
            permutation = torch.randperm(n, generator=generator, device=device).to(z_p.device)
        elif permutation.shape != (n,) or (
            self.validate_args
            and not torch.equal(
                torch.sort(permutation.to(z_p.device)).values, torch.arange(n, device=z_p.device)
            )
        ):
            raise ValueError(f"`permutation` must be a permutation of range({n})")
        labels = labels.long()
        logits = self.classifier(torch.cat([z_t + z_p, z_t + z_p[permutation]], dim=0))
        ce = F.cross_entropy(logits, torch.cat([labels, labels]), reduction="none")
        per_sample = ce[:n] + ce[n:]
        return reduce(per_sample, self.reduction)

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``repr``."""
        return f"num_classes={self.num_classes}, latent_dim={self.latent_dim}, reduction={self.reduction!r}"
