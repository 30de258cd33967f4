"""Input checks shared by the layers (docs/reliability.md, section 3)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_float_input", "check_index"]


def check_float_input(owner: str, name: str, value: Tensor, weight: Tensor) -> None:
    """Refuse integer features, and floating features of another precision than ``weight`` (outside autocast).

    Raises:
        TypeError: naming ``owner``, the argument, both dtypes and the fix (``module.to(dtype)``).
    """
    if not value.is_floating_point():
        raise TypeError(
            f"{owner}: '{name}' must be a floating tensor (got {value.dtype}); convert it with .float()"
        )
    if value.dtype != weight.dtype and not torch.is_autocast_enabled(value.device.type):
        raise TypeError(
            f"{owner}: '{name}' is {value.dtype} but the module's parameters are {weight.dtype}; convert the "
            f"input with .to({weight.dtype}) or the module with module.to({value.dtype})"
        )


def check_index(owner: str, name: str, value: Tensor) -> None:
    """Refuse floating or boolean index tensors.

    Raises:
        TypeError: naming ``owner``, the argument and its dtype.
    """
    if value.is_floating_point() or value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{owner}: '{name}' must be an integer tensor (torch.long) (got {value.dtype})")
