"""Input checks shared by the modules of :mod:`gzsl_dvae` (private).

Every check raises :class:`ValueError` or :class:`TypeError` whose message names the offending argument and
what was expected, so a user never gets a silent wrong answer or a NaN that poisons the parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "check_all_finite",
    "check_disjoint",
    "check_finite",
    "check_index_range",
    "check_labels",
    "check_matrix",
    "check_module_dtype",
    "check_positive",
    "check_same_shape",
    "check_tensor",
]


def check_tensor(name: str, value: object, ndim: int | None = None) -> Tensor:
    """Return ``value`` if it is a floating-point tensor with ``ndim`` dimensions, else raise."""
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def check_same_shape(names: Sequence[str], values: Sequence[Tensor]) -> None:
    """Raise if the tensors do not all have the same shape."""
    shapes = [tuple(v.shape) for v in values]
    if any(s != shapes[0] for s in shapes[1:]):
        listed = ", ".join(f"`{n}` {s}" for n, s in zip(names, shapes, strict=True))
        raise ValueError(f"expected equal shapes, got {listed}")


def check_finite(name: str, value: Tensor | np.ndarray) -> None:
    """Raise if ``value`` holds NaN or infinite entries."""
    finite = torch.isfinite(value).all() if isinstance(value, Tensor) else np.isfinite(value).all()
    if not bool(finite):
        raise ValueError(f"`{name}` contains NaN or infinite values; clean or impute them first")


def check_all_finite(owner: str, names: Sequence[str], values: Sequence[Tensor]) -> None:
    """Raise if any of ``values`` holds NaN or ±inf, with one host-device synchronisation for all of them.

    This is the ``validate_args`` check of docs/reliability.md: the message names ``owner`` and the argument.
    """
    # Fast path: a sum is finite only if every entry is (NaN and inf propagate), and a sum costs a fraction of
    # an elementwise isfinite().all(). A non-finite sum (or a finite-entry sum that overflowed) falls back to
    # the exact elementwise check, which names the argument.
    sums = torch.stack([v.detach().sum().float() for v in values])
    if bool(torch.isfinite(sums).all()):  # one sync
        return
    flags = torch.stack([torch.isfinite(v).all() for v in values]).tolist()
    for name, finite in zip(names, flags, strict=True):
        if not finite:
            raise ValueError(
                f"{owner}: `{name}` contains non-finite values (nan or inf); expected finite values "
                "(clean or impute them first)"
            )


def check_module_dtype(name: str, value: Tensor, module: nn.Module) -> None:
    """Raise ``TypeError`` if ``value``'s dtype differs from ``module``'s parameters (outside autocast).

    PyTorch's own layers refuse such input with ``mat1 and mat2 must have the same dtype``; this says which
    argument and how to fix it. Under ``torch.autocast`` the mixed dtypes are autocast's to handle.
    """
    param = next(module.parameters(), None)
    if param is None or value.dtype == param.dtype or torch.is_autocast_enabled(value.device.type):
        return
    raise TypeError(
        f"{type(module).__name__}: `{name}` has dtype {value.dtype} but the module's parameters are "
        f"{param.dtype}; cast the input (`{name}.to({param.dtype})`) or the module "
        f"(`module.to({value.dtype})`)"
    )


def check_index_range(name: str, value: Tensor, high: int) -> None:
    """Raise if an integer tensor has entries outside ``[0, high)``, naming the first offending value."""
    if value.is_floating_point() or value.dtype == torch.bool:
        raise TypeError(f"`{name}` must be an integer tensor of class indices, got dtype {value.dtype}")
    if not value.numel():
        return
    bad = (value < 0) | (value >= high)
    if bool(bad.any()):
        first = int(value[bad][0])
        raise ValueError(f"`{name}` must lie in [0, {high}); got {first} (first offending value)")


def check_matrix(name: str, value: object, columns: int | None = None) -> np.ndarray:
    """Return ``value`` as a finite 2-D float64 array (rows = samples), with ``columns`` columns if given."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be a numeric 2-D array, got {type(value).__name__}") from err
    if array.ndim != 2:
        raise ValueError(f"`{name}` must be 2-D (n_samples, n_features), got shape {array.shape}")
    if columns is not None and array.shape[1] != columns:
        raise ValueError(f"`{name}` must have {columns} columns, got {array.shape[1]}")
    check_finite(name, array)
    return array


def check_labels(name: str, value: object, n_samples: int | None = None) -> np.ndarray:
    """Return ``value`` as a 1-D int64 array of class labels (of length ``n_samples`` when given)."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D (n_samples,), got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise TypeError(f"`{name}` must hold integer class labels, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if n_samples is not None and array.shape[0] != n_samples:
        raise ValueError(f"`{name}` must have {n_samples} entries (one per sample), got {array.shape[0]}")
    return array


def check_disjoint(
    name_a: str, a: Sequence[int] | np.ndarray, name_b: str, b: Sequence[int] | np.ndarray
) -> None:
    """Raise if two class sets overlap (GZSL seen and unseen classes must be disjoint)."""
    common = np.intersect1d(np.asarray(a), np.asarray(b))
    if common.size:
        shown = ", ".join(str(int(c)) for c in common[:10])
        raise ValueError(
            f"`{name_a}` and `{name_b}` must be disjoint class sets; {common.size} class(es) are in both: "
            f"{shown}{', ...' if common.size > 10 else ''}"
        )


def check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    """Return ``value`` if it is a finite number > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}")
    ok = value >= 0 if allow_zero else value > 0
    if not (ok and np.isfinite(value)):
        raise ValueError(f"`{name}` must be {'>= 0' if allow_zero else '> 0'} and finite, got {value}")
    return float(value)
