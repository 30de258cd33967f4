r"""Concentration :math:`\phi` of each cluster, PCL's per-prototype temperature."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["concentration"]


def concentration(
    distances: Tensor,
    assignments: Tensor,
    num_clusters: int,
    temperature: float = 0.2,
    alpha: float = 10.0,
    percentiles: tuple[float, float] = (0.1, 0.9),
) -> Tensor:
    r"""Estimate the concentration of every cluster, as in PCL [0] (Eq. 12 and the official code).

    For cluster :math:`c` with :math:`Z_c` members at L2 distances :math:`D_i` from its centroid:

    .. math::
        \phi_c = \frac{\frac{1}{Z_c}\sum_{i \in c} D_i}{\log(Z_c + \alpha)} \quad (Z_c > 1), \qquad
        \phi_c = \max_{c' : Z_{c'} > 1} \phi_{c'} \quad (Z_c \le 1),

    then :math:`\phi \leftarrow \operatorname{clip}(\phi, p_{10}(\phi), p_{90}(\phi))` (linearly interpolated
    percentiles over all ``K`` clusters, like ``numpy.percentile``) and
    :math:`\phi \leftarrow \tau\,\phi / \operatorname{mean}(\phi)`, so the mean concentration equals the
    instance temperature. A small :math:`\phi` marks a tight cluster whose logits are sharpened.

    Symbols to arguments: :math:`D` = ``distances``, cluster of each point = ``assignments``,
    :math:`K` = ``num_clusters``, :math:`\alpha` = ``alpha``, :math:`\tau` = ``temperature``,
    :math:`(p_{10}, p_{90})` = ``percentiles``.

    - [0] PCL, 2021, https://arxiv.org/abs/2005.04966

    Args:
        distances: ``(N,)`` L2 (not squared) distance of every point to its cluster's centroid.
        assignments: ``(N,)`` integer cluster index of every point, in ``[0, num_clusters)``.
        num_clusters: ``K``; empty clusters count as singletons.
        temperature: Target mean :math:`\tau` (default: ``0.2``).
        alpha: Smoothing :math:`\alpha` that keeps small clusters from getting a tiny :math:`\phi`
            (default: ``10``).
        percentiles: Quantiles (in ``[0, 1]``) of the clipping range (default: ``(0.1, 0.9)``).

    Returns:
        ``(K,)`` float32 concentrations on ``distances``' device, computed in float64. If every cluster has
        at most one member or all distances are zero, :math:`\phi` cannot be estimated and every cluster gets
        ``temperature`` (with a warning) instead of a division by zero.

    Raises:
        ValueError: For mismatched or non-1-D inputs, non-finite or negative distances, labels outside
            ``[0, K)``, ``temperature <= 0``, ``alpha <= 0`` (a singleton's :math:`\log(1+\alpha)` must be
            positive), or percentiles outside ``0 <= low <= high <= 1``.
    """
    if distances.dim() != 1 or assignments.shape != distances.shape:
        raise ValueError(
            f"distances and assignments must be 1-D of equal length, got {tuple(distances.shape)} and "
            f"{tuple(assignments.shape)}"
        )
    if assignments.is_floating_point() or assignments.dtype == torch.bool:
        raise ValueError(f"assignments must be an integer tensor, got {assignments.dtype}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    if temperature <= 0 or alpha <= 0:
        raise ValueError(f"temperature and alpha must be > 0, got {temperature} and {alpha}")
    low, high = percentiles
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"percentiles must satisfy 0 <= low <= high <= 1, got {percentiles}")
    if assignments.numel() and (int(assignments.min()) < 0 or int(assignments.max()) >= num_clusters):
        raise ValueError(f"assignments must lie in [0, {num_clusters})")
    dist64 = distances.detach().double()
    if not bool(torch.isfinite(dist64).all()):
        raise ValueError("distances contains non-finite values (nan or inf); expected finite L2 distances")
    if (dist64 < 0).any():
        raise ValueError("distances must be non-negative L2 distances")

    labels = assignments.long()
    counts = torch.bincount(labels, minlength=num_clusters).double()
    sums = torch.zeros(num_clusters, dtype=torch.float64, device=dist64.device).index_add_(0, labels, dist64)
    estimable = counts > 1
    phi = torch.zeros(num_clusters, dtype=torch.float64, device=dist64.device)
    phi[estimable] = sums[estimable] / counts[estimable] / torch.log(counts[estimable] + alpha)
    phi_max = phi.max() if estimable.any() else phi.new_zeros(())
    phi = torch.where(estimable, phi, phi_max)
    bounds = torch.quantile(phi, torch.tensor([low, high], dtype=torch.float64, device=phi.device))
    phi = phi.clamp(bounds[0], bounds[1])
    mean = phi.mean()
    if not bool(mean > 0):
        warnings.warn(
            "cluster concentrations are all zero (singleton clusters or duplicate points); using "
            f"phi = temperature = {temperature} for every cluster",
            stacklevel=2,
        )
        return torch.full((num_clusters,), temperature, dtype=torch.float32, device=distances.device)
    return (temperature * phi / mean).to(torch.float32)
