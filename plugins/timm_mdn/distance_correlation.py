r"""Bias-corrected squared distance correlation, the paper's measure of how much features depend on metadata.

Székely & Rizzo, "Partial distance correlation with methods for dissimilarities", Ann. Statist. 2014
(https://arxiv.org/abs/1310.2926); used by Metadata Normalization (https://arxiv.org/abs/2104.09052) per class
on validation features ("dcor²", lower is better, 0 for independence). Equal to
``dcor.u_distance_correlation_sqr``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["distance_correlation_sqr", "u_distance_covariance_sqr"]


def _as_samples(values: Tensor, name: str) -> Tensor:
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() == 1:
        values = values.unsqueeze(1)
    if values.dim() != 2:
        raise ValueError(f"{name} must have shape (n,) or (n, features), got {tuple(values.shape)}")
    return values


def _pair_sums(x: Tensor, y: Tensor, block_size: int) -> tuple[Tensor, ...]:
    r"""One pass over row blocks of the distance matrices :math:`a_{ij} = \|x_i - x_j\|`, :math:`b_{ij}`.

    Returns :math:`\sum a b`, :math:`\sum a^2`, :math:`\sum b^2` over all pairs and the row sums of :math:`a,
    b`. Peak memory is a few :math:`\text{block} \times n` matrices, never :math:`n \times n`.
    """
    n = x.shape[0]
    sq_x, sq_y = (x * x).sum(1), (y * y).sum(1)
    zero = x.new_zeros(())
    s_ab, s_aa, s_bb = zero.clone(), zero.clone(), zero.clone()
    row_a, row_b = x.new_empty(n), x.new_empty(n)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        a = _distances(x[start:stop], x, sq_x[start:stop], sq_x, start)
        b = _distances(y[start:stop], y, sq_y[start:stop], sq_y, start)
        s_ab += (a * b).sum()
        s_aa += (a * a).sum()
        s_bb += (b * b).sum()
        row_a[start:stop] = a.sum(1)
        row_b[start:stop] = b.sum(1)
    return s_ab, s_aa, s_bb, row_a, row_b


def _distances(rows: Tensor, points: Tensor, sq_rows: Tensor, sq_points: Tensor, offset: int) -> Tensor:
    if points.shape[1] == 1:  # exact for a scalar variable (the usual confounder)
        return (rows - points.T).abs_()
    d2 = torch.addmm(sq_rows.unsqueeze(1) + sq_points.unsqueeze(0), rows, points.T, alpha=-2.0)
    d2.clamp_(min=0)
    diagonal = torch.arange(rows.shape[0], device=rows.device)
    d2[diagonal, diagonal + offset] = 0  # a_ii = 0 exactly
    return d2.sqrt_()


def _u_dcov(s_ab: Tensor, row_a: Tensor, row_b: Tensor, n: int) -> Tensor:
    # (Ã·B̃) for U-centred distance matrices without forming them (Székely & Rizzo 2014, Prop. 1):
    # [Σ_{i≠j} a_ij b_ij − 2/(n−2) Σ_i a_i· b_i· + a·· b··/((n−1)(n−2))] / (n(n−3))
    cross = (row_a * row_b).sum()
    total = row_a.sum() * row_b.sum()
    return (s_ab - 2.0 * cross / (n - 2) + total / ((n - 1) * (n - 2))) / (n * (n - 3))


def _prepare(x: Tensor, y: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    x = _as_samples(x, "x").detach()
    y = _as_samples(y, "y").detach()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 4:
        raise ValueError(f"the bias-corrected estimator needs at least 4 samples, got {x.shape[0]}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    for name, values in (("x", x), ("y", y)):  # a metric raises rather than returning NaN
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            raise ValueError(f"{name} contains non-finite values (nan or inf); expected finite samples")
    x, y = x.to(dtype), y.to(device=x.device, dtype=dtype)
    # Centring changes no distance and keeps the Gram-matrix trick accurate.
    return x - x.mean(0), y - y.mean(0)


def _block(n: int, block_size: int | None) -> int:
    if block_size is None:
        return max(1, min(n, (1 << 22) // n))  # ~4M entries per block matrix: 32 MB in float64
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return block_size


def u_distance_covariance_sqr(
    x: Tensor, y: Tensor, *, block_size: int | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    r"""Bias-corrected squared distance covariance :math:`(\tilde A \cdot \tilde B)` of two samples.

    Args:
        x: shape :math:`(n,)` or :math:`(n, p)`.
        y: shape :math:`(n,)` or :math:`(n, q)`.
        block_size: rows of the distance matrices held at once (default: ``None``, about 4M entries per
            block).
        dtype: computation dtype (default: ``torch.float64``).

    Returns:
        A 0-dim tensor of ``dtype`` (it can be slightly negative: the estimator is unbiased).

    Raises:
        ValueError: on a sample-count mismatch, fewer than 4 samples, inf/NaN in ``x`` or ``y``, or a
            non-positive ``block_size``.
    """
    x, y = _prepare(x, y, dtype)
    n = x.shape[0]
    s_ab, _, _, row_a, row_b = _pair_sums(x, y, _block(n, block_size))
    return _u_dcov(s_ab, row_a, row_b, n)


def distance_correlation_sqr(
    x: Tensor, y: Tensor, *, block_size: int | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    r"""Bias-corrected squared distance correlation :math:`\mathcal{R}^{*2}_n(x, y)`.

    .. math::
        \mathcal{R}^{*2}_n(x, y) = \frac{(\tilde A \cdot \tilde B)}{\sqrt{(\tilde A \cdot \tilde A)
        (\tilde B \cdot \tilde B)}}, \qquad
        (\tilde A \cdot \tilde B) = \frac{1}{n(n-3)} \sum_{i \neq j} \tilde A_{ij} \tilde B_{ij},

    with :math:`\tilde A` the U-centred distance matrix of ``x``
    (:math:`\tilde A_{ij} = a_{ij} - \frac{a_{i\cdot}}{n-2} - \frac{a_{\cdot j}}{n-2}
    + \frac{a_{\cdot\cdot}}{(n-1)(n-2)}`). Computed in one pass over row blocks of the distance matrices, so
    memory grows with :math:`n \cdot \text{block}` rather than :math:`n^2` (or :math:`n^2 p`). Returns 0 when
    the denominator is 0, as ``dcor.u_distance_correlation_sqr``.

    Args:
        x: shape :math:`(n,)` or :math:`(n, p)`, e.g. learned features of one class.
        y: shape :math:`(n,)` or :math:`(n, q)`, e.g. the confounder of the same samples.
        block_size: rows of the distance matrices held at once (default: ``None``, about 4M entries per
            block).
        dtype: computation dtype (default: ``torch.float64``; float32 loses about 4 digits here).

    Returns:
        A 0-dim tensor of ``dtype`` in about :math:`[-1, 1]`.

    Raises:
        ValueError: on a sample-count mismatch, fewer than 4 samples, inf/NaN in ``x`` or ``y``, or a
            non-positive ``block_size``.
        TypeError: if ``x``/``y`` are not tensors or ``dtype`` is not floating.
    """
    x, y = _prepare(x, y, dtype)
    n = x.shape[0]
    s_ab, s_aa, s_bb, row_a, row_b = _pair_sums(x, y, _block(n, block_size))
    cov_xy = _u_dcov(s_ab, row_a, row_b, n)
    var_x = _u_dcov(s_aa, row_a, row_a, n)
    var_y = _u_dcov(s_bb, row_b, row_b, n)
    denominator = (var_x * var_y).abs().sqrt()
    if float(denominator) == 0.0:
        return torch.zeros_like(cov_xy)
    return cov_xy / denominator
