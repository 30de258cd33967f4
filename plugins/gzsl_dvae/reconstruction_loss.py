"""Reconstruction loss of the VAEs (and of the cross-modal reconstruction)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from ._reduction import Reduction, check_reduction, reduce
from ._validation import check_all_finite, check_same_shape, check_tensor

__all__ = ["ReconstructionLoss"]


class ReconstructionLoss(nn.Module):
    r"""Per-sample L1 (or squared L2) reconstruction error, summed over features.

    The negative log-likelihood term of each VAE, :math:`-\mathbb{E}_q[\log p(x \mid z)]`, under a Laplace
    (``norm="l1"``) or Gaussian (``norm="l2"``) decoder with unit scale, up to constants; and the
    cross-reconstruction :math:`L_{CR} = \lvert x - D_v(E_s(c)) \rvert + \lvert c - D_s(E_v(x)) \rvert` when
    the decoder is fed the other modality's latent (Disentangled-VAE, Li et al., AAAI 2021,
    https://ojs.aaai.org/index.php/AAAI/article/view/16292; CADA-VAE, Schonfeld et al., CVPR 2019,
    https://arxiv.org/abs/1812.01784, which uses ``norm="l1"``, ``reduction="sum"``):

    .. math::
        \ell(\hat{x}, x) = \sum_{j=1}^{D} \lvert \hat{x}_j - x_j \rvert^{p}, \qquad p \in \{1, 2\}.

    Args:
        norm: ``"l1"`` (:math:`p = 1`) or ``"l2"`` (:math:`p = 2`). (default: ``"l1"``)
        reduction: ``"sum"``, ``"mean"`` or ``"none"`` over the batch. (default: ``"sum"``)
        validate_args: reject non-finite inputs with a ``ValueError`` (one host-device synchronisation per
            call on a GPU; ``False`` skips it, as in ``torch.distributions``). (default: ``True``)

    Shapes:
        - **reconstruction**, **target**: :math:`(N, D)`.
        - **output**: scalar, or :math:`(N,)` with ``reduction="none"``.

    Raises:
        ValueError: for an unknown ``norm`` or ``reduction``, non-2-D inputs, mismatched shapes, or (with
            ``validate_args``) non-finite inputs.
        TypeError: for non-floating-point inputs.
    """

    def __init__(
        self, norm: Literal["l1", "l2"] = "l1", reduction: Reduction = "sum", validate_args: bool = True
    ) -> None:
        super().__init__()
        if norm not in ("l1", "l2"):
            raise ValueError(f"`norm` must be 'l1' or 'l2', got {norm!r}")
        self.norm = norm
        self.reduction: Reduction = check_reduction(reduction)
        self.validate_args = validate_args

    def forward(self, reconstruction: Tensor, target: Tensor) -> Tensor:
        """Return the error of ``reconstruction`` against ``target``, reduced over the batch."""
        check_tensor("reconstruction", reconstruction, ndim=2)
        check_tensor("target", target, ndim=2)
        check_same_shape(("reconstruction", "target"), (reconstruction, target))
        if self.validate_args:
            check_all_finite(type(self).__name__, ("reconstruction", "target"), (reconstruction, target))
        diff = reconstruction - target
        per_sample = diff.abs().sum(dim=1) if self.norm == "l1" else diff.pow(2).sum(dim=1)
        return reduce(per_sample, self.reduction)

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``repr``."""
        return f"norm={self.norm!r}, reduction={self.reduction!r}"
