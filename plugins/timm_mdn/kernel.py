r"""The metadata kernel :math:`(X^\top X)^{-1}` that every Metadata Normalization layer shares.

Metadata Normalization (Lu et al., CVPR 2021, https://arxiv.org/abs/2104.09052) regresses each feature on a
design matrix :math:`X \in \mathbb{R}^{N \times K}` built from the *whole* training set's metadata. Because
:math:`X` does not depend on the network, :math:`\Sigma^{-1} = (X^\top X)^{-1}` is computed once, here, in
float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MetadataKernel"]


def _as_2d(values: Tensor, name: str) -> Tensor:
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() == 1:
        return values.unsqueeze(1)
    if values.dim() != 2:
        raise ValueError(f"{name} must have shape (N,) or (N, q), got {tuple(values.shape)}")
    return values


def _check_full_rank(gram: Tensor, design: Tensor) -> None:
    """Raise ``ValueError`` when the columns of ``design`` are (numerically) linearly dependent."""
    norms = design.norm(dim=0)
    if bool((norms == 0).any()):
        zero = [int(i) for i in torch.nonzero(norms == 0).flatten()]
        raise ValueError(f"metadata: X^T X is singular, column(s) {zero} are all zeros")
    scaled = design / norms  # column scaling changes neither rank nor the residual
    rank = int(torch.linalg.matrix_rank(scaled))
    if rank < design.shape[1]:
        raise ValueError(
            f"metadata: X^T X is singular (rank {rank} < {design.shape[1]} columns); the columns are "
            "linearly dependent, e.g. a full one-hot block together with an intercept column: drop one level"
        )
    if not bool(torch.isfinite(gram).all()):
        raise ValueError("metadata: X^T X is not finite; the metadata hold inf or NaN")


@dataclass(frozen=True)
class MetadataKernel:
    r"""The shared part of Metadata Normalization: :math:`(X^\top X)^{-1}` and the removed columns.

    The design matrix holds every metadata column the regression uses: confounders, the label column(s) (the
    paper's "confounding effects" case: regressing on the label too keeps the true signal) and an intercept.
    Only the ``remove`` columns are subtracted from the features; the official code removes the confounders
    and the intercept and keeps the label.

    Build it once from the full training metadata, either from a ready design matrix::

        kernel = MetadataKernel.from_design(X_train, remove=[1, 2])

    or from named parts, which also fixes the column order used by :meth:`design` for every batch::

        kernel = MetadataKernel.from_columns(confounders=cf_train, labels=y_train)  # X = [labels, cf, 1]
        metadata = kernel.design(cf_batch, y_batch)                                  # (b, K) rows

    Integer confounders/labels are categorical and get treatment coding (one column per level but the first,
    so :math:`X^\top X` stays invertible with the intercept); floating ones are used as they are.

    Attributes:
        inverse: :math:`(X^\top X)^{-1}`, float64, shape :math:`(K, K)`.
        remove: indices of the removed columns (confounders and, by default, the intercept).
        num_samples: :math:`N`, the number of training rows; the per-batch estimate is scaled by :math:`N/b`.
        label_levels / confounder_levels: categorical levels of each part (``0`` for a continuous part); set
            by :meth:`from_columns` and used by :meth:`design`.
    """

    inverse: Tensor
    remove: tuple[int, ...]
    num_samples: int
    label_levels: tuple[int, ...] = ()
    confounder_levels: tuple[int, ...] = ()
    intercept: bool = True

    def __post_init__(self) -> None:
        if self.inverse.dim() != 2 or self.inverse.shape[0] != self.inverse.shape[1]:
            raise ValueError(f"inverse must be a square (K, K) matrix, got {tuple(self.inverse.shape)}")
        k = self.inverse.shape[0]
        if not self.remove:
            raise ValueError("remove must name at least one column to remove")
        if any(not 0 <= i < k for i in self.remove) or len(set(self.remove)) != len(self.remove):
            raise ValueError(f"remove must be distinct column indices in [0, {k}), got {list(self.remove)}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")

    @property
    def num_columns(self) -> int:
        """:math:`K`, the number of metadata columns."""
        return int(self.inverse.shape[0])

    @property
    def remove_mask(self) -> Tensor:
        """Boolean mask of shape :math:`(K,)`, ``True`` for the removed columns."""
        mask = torch.zeros(self.num_columns, dtype=torch.bool)
        mask[list(self.remove)] = True
        return mask

    @classmethod
    def from_design(cls, design: Tensor, remove: Sequence[int]) -> MetadataKernel:
        r"""Compute :math:`(X^\top X)^{-1}` from the full training design matrix.

        Args:
            design: :math:`X`, shape :math:`(N, K)`, every training sample's metadata row.
            remove: the columns to remove from the features (confounders, usually the intercept too).

        Raises:
            ValueError: if ``design`` is not 2-D, has fewer rows than columns, or :math:`X^\top X` is
                singular.
        """
        design = _as_2d(design, "design")
        n, k = design.shape
        if n < k:
            raise ValueError(f"design must have at least as many rows as columns, got shape {(n, k)}")
        x = design.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("design: the metadata hold inf or NaN")
        gram = x.T @ x
        _check_full_rank(gram, x)
        inverse = torch.linalg.inv(gram)
        return cls(inverse=inverse, remove=tuple(int(i) for i in remove), num_samples=n)

    @classmethod
    def from_columns(
        cls, confounders: Tensor, labels: Tensor | None = None, intercept: bool = True
    ) -> MetadataKernel:
        r"""Build :math:`X = [\text{labels}, \text{confounders}, 1]` from the training set and its kernel.

        Args:
            confounders: shape :math:`(N,)` or :math:`(N, q)`; removed from the features.
            labels: shape :math:`(N,)` or :math:`(N, l)`; kept in the regression, never removed
                (default: ``None``, no label columns).
            intercept: append a column of ones, removed with the confounders (default: ``True``).

        Raises:
            ValueError: on mismatched lengths, an integer part with a single level, or a singular
                :math:`X^\top X`.
        """
        confounders = _as_2d(confounders, "confounders")
        label_levels = _levels(labels, "labels") if labels is not None else ()
        confounder_levels = _levels(confounders, "confounders")
        probe = cls(
            inverse=torch.eye(1, dtype=torch.float64),
            remove=(0,),
            num_samples=1,
            label_levels=label_levels,
            confounder_levels=confounder_levels,
            intercept=intercept,
        )
        design = probe.design(confounders, labels)
        kernel = cls.from_design(design, remove=probe._remove_columns())
        return cls(
            inverse=kernel.inverse,
            remove=kernel.remove,
            num_samples=kernel.num_samples,
            label_levels=label_levels,
            confounder_levels=confounder_levels,
            intercept=intercept,
        )

    def _remove_columns(self) -> tuple[int, ...]:
        start = sum(max(level - 1, 1) for level in self.label_levels)
        width = sum(max(level - 1, 1) for level in self.confounder_levels) + int(self.intercept)
        return tuple(range(start, start + width))

    def design(self, confounders: Tensor, labels: Tensor | None = None) -> Tensor:
        """Metadata rows :math:`X_b` for a batch, in the column order of :meth:`from_columns`.

        Args:
            confounders: shape :math:`(b,)` or :math:`(b, q)`, as given to :meth:`from_columns`.
            labels: shape :math:`(b,)` or :math:`(b, l)`. ``None`` fills the label columns with zeros, which
                is fine in evaluation (only the removed columns are used there) but not in training.

        Returns:
            Float tensor of shape :math:`(b, K)` on the confounders' device.

        Raises:
            ValueError: if this kernel was not built by :meth:`from_columns`, or on a shape mismatch.
        """
        if not self.confounder_levels:
            raise ValueError("design() needs a kernel built with MetadataKernel.from_columns")
        confounders = _as_2d(confounders, "confounders")
        b = confounders.shape[0]
        dtype = confounders.dtype if confounders.is_floating_point() else torch.get_default_dtype()
        parts = []
        if self.label_levels:
            if labels is None:
                width = sum(max(level - 1, 1) for level in self.label_levels)
                parts.append(confounders.new_zeros((b, width), dtype=dtype))
            else:
                labels = _as_2d(labels, "labels")
                if labels.shape[0] != b:
                    raise ValueError(f"labels must have {b} rows like confounders, got {labels.shape[0]}")
                parts.append(_encode(labels, self.label_levels, "labels", dtype))
        elif labels is not None:
            raise ValueError("labels given, but the kernel was built without label columns")
        parts.append(_encode(confounders, self.confounder_levels, "confounders", dtype))
        if self.intercept:
            parts.append(confounders.new_ones((b, 1), dtype=dtype))
        return torch.cat(parts, dim=1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_columns={self.num_columns}, remove={list(self.remove)}, "
            f"num_samples={self.num_samples})"
        )


def _levels(values: Tensor, name: str) -> tuple[int, ...]:
    values = _as_2d(values, name)
    if values.is_floating_point():
        return tuple(0 for _ in range(values.shape[1]))
    levels = []
    for column in values.T:
        if bool((column < 0).any()):
            raise ValueError(f"{name}: integer (categorical) columns must hold levels 0..L-1, got negatives")
        count = int(column.max()) + 1
        if count < 2:
            raise ValueError(f"{name}: a categorical column needs at least 2 levels, got {count}")
        levels.append(count)
    return tuple(levels)


def _encode(values: Tensor, levels: tuple[int, ...], name: str, dtype: torch.dtype) -> Tensor:
    if values.shape[1] != len(levels):
        raise ValueError(
            f"{name} must have {len(levels)} column(s) like the training data, got {values.shape[1]}"
        )
    columns = []
    for column, count in zip(values.T, levels, strict=True):
        if count == 0:
            if not column.is_floating_point():
                raise ValueError(f"{name}: the training column was continuous (float), got an integer column")
            columns.append(column.to(dtype).unsqueeze(1))
            continue
        if column.is_floating_point():
            raise ValueError(f"{name}: the training column was categorical (integer), got a float column")
        if bool((column < 0).any() | (column >= count).any()):
            raise ValueError(f"{name}: categorical levels must lie in [0, {count}) as in the training data")
        if count == 2:
            columns.append(column.to(dtype).unsqueeze(1))
        else:  # treatment coding: level 0 is the reference
            onehot = torch.nn.functional.one_hot(column.long(), count).to(dtype)
            columns.append(onehot[:, 1:])
    return torch.cat(columns, dim=1)
