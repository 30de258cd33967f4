"""2-Wasserstein distance between diagonal Gaussians (CADA-VAE's distribution alignment)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._reduction import Reduction, check_reduction, reduce
from ._validation import check_all_finite, check_positive, check_same_shape, check_tensor

__all__ = ["GaussianWassersteinLoss"]


class GaussianWassersteinLoss(nn.Module):
    r"""2-Wasserstein distance between two diagonal Gaussians, per sample pair.

    The distribution-distance term :math:`L_{DD}` of Disentangled-VAE ("Generalized Zero-Shot Learning via
    Disentangled Representation", Li et al., AAAI 2021,
    https://ojs.aaai.org/index.php/AAAI/article/view/16292),
    applied to each factor (:math:`z^t` and :math:`z^p`), and the distribution alignment of CADA-VAE
    (Schonfeld et al., CVPR 2019, https://arxiv.org/abs/1812.01784). For
    :math:`q_1 = \mathcal{N}(\mu_1, \Sigma_1)`, :math:`q_2 = \mathcal{N}(\mu_2, \Sigma_2)` with diagonal
    covariances the closed form is

    .. math::
        W_2(q_1, q_2) = \left( \lVert \mu_1 - \mu_2 \rVert_2^2
        + \lVert \Sigma_1^{1/2} - \Sigma_2^{1/2} \rVert_F^2 \right)^{1/2},
        \qquad \Sigma^{1/2} = \operatorname{diag}(e^{\log\sigma^2 / 2}).

    The square root is taken per sample (then summed over the batch with ``reduction="sum"``), as in the
    paper's :math:`L_{DD}` and CADA-VAE's official code.

    Symbols: :math:`\mu_1, \log\sigma_1^2, \mu_2, \log\sigma_2^2` = ``mu1, logvar1, mu2, logvar2``.

    Args:
        reduction: ``"sum"``, ``"mean"`` or ``"none"`` over the batch. (default: ``"sum"``)
        eps: floor of the squared distance inside the square root, so the gradient stays finite when the two
            Gaussians coincide (the value then reads :math:`\sqrt{\epsilon}` instead of 0).
            (default: ``1e-12``)
        validate_args: reject non-finite inputs with a ``ValueError`` (one host-device synchronisation per
            call on a GPU; ``False`` skips it, as in ``torch.distributions``). (default: ``True``)

    Shapes:
        - **mu1**, **logvar1**, **mu2**, **logvar2**: :math:`(N, d)`.
        - **output**: scalar, or :math:`(N,)` with ``reduction="none"``.

    Raises:
        ValueError: for an unknown ``reduction``, ``eps <= 0``, non-2-D inputs, mismatched shapes, or (with
            ``validate_args``) non-finite inputs.
        TypeError: for non-floating-point inputs.

    Examples:
        >>> loss = GaussianWassersteinLoss()
        >>> mu = torch.zeros(2, 3)
        >>> float(loss(mu, mu, mu + 3.0, mu))  # shift by 3 in 3 dims: sqrt(27) per sample, 2 samples
        10.392304420471191
    """

    def __init__(self, reduction: Reduction = "sum", eps: float = 1e-12, validate_args: bool = True) -> None:
        super().__init__()
        self.reduction: Reduction = check_reduction(reduction)
        self.eps = check_positive("eps", eps)
        self.validate_args = validate_args

    def forward(self, mu1: Tensor, logvar1: Tensor, mu2: Tensor, logvar2: Tensor) -> Tensor:
        """Return :math:`W_2(N(mu1, exp(logvar1)), N(mu2, exp(logvar2)))` per row, reduced."""
        names = ("mu1", "logvar1", "mu2", "logvar2")
        tensors = (mu1, logvar1, mu2, logvar2)
        for name, tensor in zip(names, tensors, strict=True):
            check_tensor(name, tensor, ndim=2)
        check_same_shape(names, tensors)
        if self.validate_args:
            check_all_finite(type(self).__name__, names, tensors)
        squared = self.squared_terms(mu1, logvar1, mu2, logvar2).sum(dim=1)
        return reduce(self.root(squared), self.reduction)

    @staticmethod
    def squared_terms(mu1: Tensor, logvar1: Tensor, mu2: Tensor, logvar2: Tensor) -> Tensor:
        r"""Unsummed terms :math:`(\mu_{1j} - \mu_{2j})^2 + (\sigma_{1j} - \sigma_{2j})^2`, like ``mu1``."""
        return (mu1 - mu2).pow(2) + (torch.exp(0.5 * logvar1) - torch.exp(0.5 * logvar2)).pow(2)

    def root(self, squared: Tensor) -> Tensor:
        """Per-sample :math:`W_2` from per-sample squared distances, with the ``eps`` floor."""
        return torch.sqrt(squared.clamp_min(self.eps))

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``repr``."""
        return f"reduction={self.reduction!r}, eps={self.eps}"
