"""Counting the centres a SoftTriple class really uses once the regulariser has merged the redundant ones."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["effective_center_counts"]


def effective_center_counts(centers: torch.Tensor, threshold: float = 0.99) -> torch.Tensor:
    r"""Per-class number of distinct centres, merging centres whose cosine similarity is >= ``threshold``.

    Merging is transitive within a class: centres :math:`w_c^t, w_c^s` belong to the same group when a
    chain of centres of class :math:`c` links them, each consecutive pair with
    :math:`\hat w^\top \hat w' \geq` ``threshold``; the count is the number of groups (connected
    components). This is the quantity the SoftTriple paper plots to show that its regulariser
    (:class:`~pml_softtriple.SparseCentersRegularizer`) leaves a few centres per class out of :math:`K`.
    The paper gives no threshold; ``0.99`` (an angle of about 8 degrees, a regulariser term
    :math:`\sqrt{2 - 2\cos} \approx 0.14`) is this library's default. Cost: :math:`C K^2 (d + K \log K)`.

    Args:
        centers: shape ``(C, K, d)``; need not be normalised (e.g. ``SoftTripleLoss.get_centers()``).
        threshold: cosine similarity in ``[-1, 1]`` at or above which two centres count as one
            (default: ``0.99``).

    Returns:
        int64 tensor of shape ``(C,)`` with values in ``[1, K]``.

    Raises:
        ValueError: if ``centers`` is not 3-D with ``K >= 1`` or ``threshold`` is outside ``[-1, 1]``.
    """
    if centers.ndim != 3 or centers.shape[1] < 1:
        raise ValueError(
            f"effective_center_counts: centers must have shape (num_classes, centers_per_class, d), "
            f"got {tuple(centers.shape)}"
        )
    if isinstance(threshold, bool) or not (isinstance(threshold, numbers.Real) and -1.0 <= threshold <= 1.0):
        raise ValueError(
            f"effective_center_counts: threshold must be a cosine similarity in [-1, 1], got {threshold!r}"
        )
    k = centers.shape[1]
    with torch.no_grad():
        unit = F.normalize(centers.double(), dim=2)
        reach = torch.bmm(unit, unit.transpose(1, 2)) >= threshold
        reach |= torch.eye(k, dtype=torch.bool, device=centers.device)
        for _ in range(max(1, math.ceil(math.log2(k)))):  # transitive closure by repeated squaring
            step = reach.double()
            reach = torch.bmm(step, step) > 0
        earlier = torch.ones(k, k, dtype=torch.bool, device=centers.device).tril(-1)
        first_of_group = ~(reach & earlier).any(2)  # no earlier centre in the same group
        return first_of_group.sum(1)
