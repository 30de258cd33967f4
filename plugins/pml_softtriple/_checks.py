"""Argument checks: hyperparameters (Python or NumPy scalars, as PML takes), inputs (docs/reliability.md)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = [
    "check_embeddings",
    "check_float",
    "check_indices_tuple",
    "check_int",
    "check_labels",
    "check_values",
]


def check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    """``value`` as a Python ``int`` (``int`` or a NumPy integer such as ``np.int64``), at least ``minimum``.

    Raises:
        TypeError: for ``bool`` and anything that is not an integral number (``2.5``, ``"3"``, a tensor).
        ValueError: below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_float(owner: str, name: str, value: Any, *, positive: bool) -> float:
    """``value`` as a finite Python ``float`` (any real number, NumPy's included), ``> 0`` or ``>= 0``.

    Raises:
        TypeError: for ``bool`` and anything that is not a real number.
        ValueError: for NaN, infinities, and values out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
    if (number <= 0) if positive else (number < 0):
        raise ValueError(f"{owner}: {name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return number


def check_embeddings(owner: str, embeddings: Any, embedding_size: int) -> None:
    """A floating ``(B, d)`` tensor with ``B >= 1``: metadata only, no pass over the data."""
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"{owner}: embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if not embeddings.is_floating_point():
        raise TypeError(f"{owner}: embeddings must be a floating tensor, got dtype {embeddings.dtype}")
    if embeddings.ndim != 2 or embeddings.shape[1] != embedding_size:
        raise ValueError(
            f"{owner}: embeddings must have shape (batch_size, embedding_size={embedding_size}), got "
            f"{tuple(embeddings.shape)}"
        )
    if embeddings.shape[0] == 0:
        raise ValueError(f"{owner}: embeddings is an empty batch (batch_size = 0)")


def check_labels(owner: str, labels: Any, batch: int) -> None:
    """An integer ``(B,)`` tensor: metadata only (the range is :func:`check_values`' job)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{owner}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{owner}: labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(
            f"{owner}: labels must have shape (batch_size={batch},) like the embeddings, got "
            f"{tuple(labels.shape)}"
        )


def check_values(owner: str, embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """Finite embeddings and labels in ``[0, num_classes)``: one host synchronisation on a GPU."""
    # One reduction over the embeddings for the finiteness check: a sum is non-finite whenever an element
    # is (a finite overflow is told apart by the exact check below).
    checks = [embeddings.detach().sum(), *torch.aminmax(labels)]
    if embeddings.device.type == "cpu":
        total, low, high = (float(c) for c in checks)
    else:
        total, low, high = torch.stack([c.to(torch.float64) for c in checks]).tolist()
    if not math.isfinite(total) and not bool(torch.isfinite(embeddings).all()):
        raise ValueError(f"{owner}: embeddings contain NaN or Inf")
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{owner}: labels must lie in [0, num_classes={num_classes}), got values in "
            f"[{int(low)}, {int(high)}]"
        )


def check_indices_tuple(owner: str, indices_tuple: Any, batch: int, values: bool) -> None:
    """A miner's output: integer index tensors, with ``values`` in ``[0, batch)`` (one synchronisation).

    PML's ``convert_to_weights`` would wrap a negative index around and raise a bare ``IndexError`` on a
    too large one.
    """
    if not isinstance(indices_tuple, (tuple, list)) or not all(
        isinstance(t, torch.Tensor) for t in indices_tuple
    ):
        raise TypeError(f"{owner}: indices_tuple must be a tuple of index tensors (a miner's output)")
    for tensor in indices_tuple:
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise TypeError(f"{owner}: indices_tuple must hold integer tensors, got dtype {tensor.dtype}")
    if values and any(t.numel() for t in indices_tuple):
        low, high = torch.cat([t.reshape(-1) for t in indices_tuple]).aminmax()
        low_value, high_value = torch.stack([low, high]).tolist()
        if low_value < 0 or high_value >= batch:
            raise ValueError(
                f"{owner}: indices_tuple must index the batch, values in [0, batch_size={batch}), got values "
                f"in [{low_value}, {high_value}]"
            )
