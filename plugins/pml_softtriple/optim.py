"""Optimizer parameter groups with the SoftTriple paper's separate learning rate for the centres."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["param_groups"]


def param_groups(
    model: torch.nn.Module | Iterable[torch.nn.Parameter],
    loss: torch.nn.Module,
    lr: float = 1e-4,
    centers_lr: float | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Two parameter groups: the model at ``lr`` and the loss's centres at ``centers_lr``.

    The paper trains the network at ``1e-4`` and the centres 100x faster (``1e-2`` on CUB-200 and Cars196;
    on Stanford Online Products the centre rate is ``1e-1``), with Adam (``eps=0.01``, weight decay
    ``1e-4``). Pass the result to any ``torch.optim`` optimizer; in a PML trainer the centres may instead
    get their own ``"metric_loss_optimizer"``, e.g. ``torch.optim.Adam(loss.parameters(), lr=1e-2)``.

    Args:
        model: the embedding network, or an iterable of its parameters. Parameters that also belong to
            ``loss`` (e.g. when both sit in one ``nn.ModuleDict``) are put only in the centre group.
        loss: the loss module owning the centres (e.g. :class:`~pml_softtriple.SoftTripleLoss`).
        lr: learning rate of the model (default: ``1e-4``).
        centers_lr: learning rate of the centres; ``None`` means ``100 * lr`` (default: ``None``).
        **options: other per-group options (``weight_decay``, ``betas``, ...) set on both groups.

    Returns:
        ``[{"params": model_params, "lr": lr, **options},
        {"params": loss_params, "lr": centers_lr, **options}]``

    Raises:
        ValueError: if a learning rate is not positive or ``loss`` has no trainable parameters.
    """
    centers_lr = 100.0 * lr if centers_lr is None else centers_lr
    for name, value in (("lr", lr), ("centers_lr", centers_lr)):
        if not value > 0:
            raise ValueError(f"param_groups: {name} must be > 0, got {value!r}")
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    if not loss_params:
        raise ValueError(f"param_groups: loss {type(loss).__name__} has no trainable parameters")
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    taken = {id(p) for p in loss_params}
    model_params = [p for p in params if p.requires_grad and id(p) not in taken]
    return [
        {"params": model_params, "lr": lr, **options},
        {"params": loss_params, "lr": centers_lr, **options},
    ]
