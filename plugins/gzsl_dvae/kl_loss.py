"""KL divergence of a diagonal Gaussian posterior from the standard normal prior."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._reduction import Reduction, check_reduction, reduce
from ._validation import check_all_finite, check_same_shape, check_tensor

__all__ = ["GaussianKLLoss"]


class GaussianKLLoss(nn.Module):
    r"""KL divergence :math:`D_{KL}(q(z|x)\,\|\,\mathcal{N}(0, I))` of a diagonal Gaussian, per sample.

    The VAE regulariser of Disentangled-VAE ("Generalized Zero-Shot Learning via Disentangled Representation",
    Li et al., AAAI 2021, https://ojs.aaai.org/index.php/AAAI/article/view/16292) and of CADA-VAE
    (Schonfeld et al., CVPR 2019, https://arxiv.org/abs/1812.01784). For
    :math:`q = \mathcal{N}(\mu, \operatorname{diag}(\sigma^2))` with :math:`\log\sigma^2` = ``logvar``:

    .. math::
        D_{KL}\big(q \,\|\, \mathcal{N}(0, I)\big)
        = \frac{1}{2} \sum_{j=1}^{d} \left(\mu_j^2 + \sigma_j^2 - \log \sigma_j^2 - 1\right).

    Disentangled-VAE applies it to both factors with weight 1 on :math:`z^t` and :math:`\alpha` on
    :math:`z^p`; CADA-VAE to its single latent. Both weight it with a linear warm-up (see
    :class:`~gzsl_dvae.LinearWarmup`).

    Symbols: :math:`\mu` = ``mu``, :math:`\log\sigma^2` = ``logvar``, :math:`d` = ``mu.shape[1]``.

    Args:
        reduction: ``"sum"`` over the batch (CADA-VAE's ``size_average=False``), ``"mean"`` over the batch, or
            ``"none"`` for the ``(N,)`` per-sample values. (default: ``"sum"``)
        validate_args: reject non-finite ``mu``/``logvar`` with a ``ValueError`` (one host-device
            synchronisation per call on a GPU; ``False`` skips it and returns whatever the inputs give, as in
            ``torch.distributions``). (default: ``True``)

    Shapes:
        - **mu**, **logvar**: :math:`(N, d)`.
        - **output**: scalar, or :math:`(N,)` with ``reduction="none"``.

    Raises:
        ValueError: for an unknown ``reduction``, non-2-D inputs, inputs of different shapes, or (with
            ``validate_args``) non-finite inputs.
        TypeError: for non-floating-point inputs.

    Examples:
        >>> loss = GaussianKLLoss()
        >>> float(loss(torch.zeros(4, 8), torch.zeros(4, 8)))  # the prior itself
        0.0
    """

    def __init__(self, reduction: Reduction = "sum", validate_args: bool = True) -> None:
        super().__init__()
        self.reduction: Reduction = check_reduction(reduction)
        self.validate_args = validate_args

    def forward(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """Return the KL divergence of ``N(mu, exp(logvar))`` from ``N(0, I)``, reduced over the batch."""
        check_tensor("mu", mu, ndim=2)
        check_tensor("logvar", logvar, ndim=2)
        check_same_shape(("mu", "logvar"), (mu, logvar))
        if self.validate_args:
            check_all_finite(type(self).__name__, ("mu", "logvar"), (mu, logvar))
        return reduce(self.per_dimension(mu, logvar).sum(dim=1), self.reduction)

    @staticmethod
    def per_dimension(mu: Tensor, logvar: Tensor) -> Tensor:
        r"""Unsummed terms :math:`(\mu_j^2 + \sigma_j^2 - \log\sigma_j^2 - 1) / 2`, shaped like ``mu``."""
        return 0.5 * (mu.pow(2) + torch.exp(logvar) - logvar - 1.0)

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``repr``."""
        return f"reduction={self.reduction!r}"
