"""Reduction of per-sample losses shared by the loss modules (private)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

__all__ = ["REDUCTIONS", "Reduction", "check_reduction", "reduce"]

Reduction = Literal["sum", "mean", "none"]
REDUCTIONS: tuple[str, ...] = ("sum", "mean", "none")


def check_reduction(reduction: str) -> Reduction:
    """Return ``reduction`` if it is one of ``"sum"``, ``"mean"``, ``"none"``, else raise ``ValueError``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def reduce(per_sample: Tensor, reduction: Reduction) -> Tensor:
    """Reduce a ``(N,)`` tensor of per-sample losses: sum over the batch, batch mean, or unreduced."""
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    return per_sample
