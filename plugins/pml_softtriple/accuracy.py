"""Recall@K, the retrieval metric of the SoftTriple paper, as a PML ``AccuracyCalculator`` metric."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from pytorch_metric_learning.utils.accuracy_calculator import (
    AccuracyCalculator,
    maybe_get_avg_of_avgs,
    nan_accuracy,
    try_getting_not_lone_labels,
)

__all__ = ["RecallAtKAccuracyCalculator"]


class RecallAtKAccuracyCalculator(AccuracyCalculator):
    """PML's ``AccuracyCalculator`` plus ``recall_at_<k>`` metrics (Recall@K of Song et al., CVPR 2016).

    Recall@K is the fraction of queries with at least one same-class item among their K nearest references
    (the query itself excluded when the reference set contains it); Recall@1 equals ``precision_at_1``.
    Queries whose class has no other reference are skipped, as PML does for its k-NN metrics. All of
    PML's metrics remain available, and ``include``/``exclude`` accept the new names.

    Args:
        recall_ks: the K values (default: ``(1, 2, 4, 8)``, the paper's CUB-200 / Cars196 columns; use
            ``(1, 10, 100)`` for Stanford Online Products).
        **kwargs: forwarded to :class:`~pytorch_metric_learning.utils.accuracy_calculator.AccuracyCalculator`
            (``include``, ``exclude``, ``k``, ``avg_of_avgs``, ``return_per_class``, ``knn_func``, ...). The
            number of neighbours retrieved is raised to ``max(recall_ks)`` when ``k`` is smaller.

    Raises:
        ValueError: if ``recall_ks`` is empty or holds a value that is not a positive int.

    Example:
        >>> calc = RecallAtKAccuracyCalculator(include=("recall_at_1", "recall_at_8"), k="max_bin_count")
    """

    def __init__(self, recall_ks: Sequence[int] = (1, 2, 4, 8), **kwargs: Any) -> None:
        ks = tuple(recall_ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in ks):
            raise ValueError(
                f"RecallAtKAccuracyCalculator: recall_ks must be positive ints, got {recall_ks!r}"
            )
        self.recall_ks = tuple(sorted({int(k) for k in ks}))
        for k in self.recall_ks:  # AccuracyCalculator finds metrics by their "calculate_" attribute names
            setattr(self, f"calculate_recall_at_{k}", partial(self._recall_at, k=k))
        super().__init__(**kwargs)

    def requires_knn(self) -> list[str]:
        """PML's k-NN metrics plus the ``recall_at_<k>`` metrics."""
        return [*super().requires_knn(), *(f"recall_at_{k}" for k in self.recall_ks)]

    def determine_k(
        self, bin_counts: torch.Tensor, num_reference_embeddings: int, ref_includes_query: bool
    ) -> int:
        """PML's number of neighbours, raised to the largest requested Recall@K."""
        k = super().determine_k(bin_counts, num_reference_embeddings, ref_includes_query)
        wanted = [int(m.rsplit("_", 1)[1]) for m in self.get_curr_metrics() if m.startswith("recall_at_")]
        available = num_reference_embeddings - int(ref_includes_query)
        return max(k, min(max(wanted, default=1), available))

    def _recall_at(
        self,
        knn_labels: torch.Tensor,
        query_labels: torch.Tensor,
        not_lone_query_mask: torch.Tensor,
        label_counts: Any,
        k: int,
        **kwargs: Any,
    ) -> float | list[float]:
        knn_labels, query_labels = try_getting_not_lone_labels(knn_labels, query_labels, not_lone_query_mask)
        if knn_labels is None:
            return nan_accuracy(label_counts[0], self.return_per_class)
        same = self.label_comparison_fn(query_labels[:, None], knn_labels[:, :k])
        hit = same.reshape(same.shape[0], same.shape[1], -1).all(2).any(1).to(torch.float64)
        return maybe_get_avg_of_avgs(hit, query_labels[:, None], self.avg_of_avgs, self.return_per_class)
