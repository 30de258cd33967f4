"""SoftTriple under PML's ``DistributedLossWrapper``: one process's centre gradient, not world-size times it.

``DistributedLossWrapper(loss)`` gathers every rank's embeddings, computes the loss on the gathered batch on
every rank and returns it multiplied by the world size :math:`W`, so that DDP's averaging of the *model*
gradients (each rank back-propagates only into its own embeddings) gives the single-process gradient. The
loss's own parameters are not under DDP: on every rank the centres get :math:`W` times the gradient of the
gathered batch's loss (for PML's ``SoftTripleLoss`` too). :class:`~pml_softtriple.SoftTripleLoss` recognises
the wrapper (its caller's frame) and scales the centres' gradient by :math:`1/W`, so every rank's centre
gradient equals one process's on the gathered batch, identical across ranks (and unchanged by a DDP average
on top).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

__all__ = ["scale_gradient", "wrapper_world_size"]

_MAX_DEPTH = 12  # frames between the wrapper's forward_regular_loss and the loss's compute_loss: about 6


def wrapper_world_size(loss: torch.nn.Module) -> int:
    """:math:`W` when ``loss`` is running inside PML's ``DistributedLossWrapper``, else 1.

    Free outside an initialised process group (no frame is inspected).

    Raises:
        ValueError: for ``DistributedLossWrapper(loss, efficient=True)``, which passes the gathered batch as
            ``ref_emb``: SoftTriple compares embeddings with centres only, so there is no reference set.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    frame = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            break
        if frame.f_code.co_name == "forward_regular_loss":
            wrapper = frame.f_locals.get("self")
            if isinstance(wrapper, DistributedLossWrapper) and wrapper.loss is loss:
                if wrapper.efficient:
                    raise ValueError(
                        "SoftTripleLoss: DistributedLossWrapper(efficient=True) passes the gathered batch as "
                        "ref_emb, which SoftTriple does not use (it compares embeddings with centres only); "
                        "use DistributedLossWrapper(loss) or wrap the loss in DistributedDataParallel"
                    )
                return int(dist.get_world_size())
        frame = frame.f_back  # type: ignore[assignment]
    return 1


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor`` itself (a view), whose gradient is multiplied by ``factor`` on the way back."""
    out: torch.Tensor = _ScaleGradient.apply(tensor, factor)
    return out
