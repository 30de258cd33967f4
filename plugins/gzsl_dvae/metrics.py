"""Generalized zero-shot evaluation: per-class accuracy on seen (S), unseen (U) classes, harmonic mean H."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from ._validation import check_disjoint, check_labels

__all__ = ["GZSLScores", "evaluate_gzsl", "harmonic_mean", "per_class_accuracy"]


@dataclass(frozen=True)
class GZSLScores:
    """Result of :func:`evaluate_gzsl`: accuracies in ``[0, 1]``.

    Attributes:
        seen: :math:`S`, mean per-class accuracy over the seen classes that have test samples.
        unseen: :math:`U`, the same over unseen classes.
        harmonic: :math:`H = 2US/(U+S)` (0 when both are 0).
        per_class: accuracy of each evaluated class, keyed by label.
    """

    seen: float
    unseen: float
    harmonic: float
    per_class: dict[int, float] = field(default_factory=dict, repr=False)

    def as_percent(self) -> tuple[float, float, float]:
        """``(U, S, H)`` in percent, the order of the literature's tables."""
        return 100 * self.unseen, 100 * self.seen, 100 * self.harmonic


def harmonic_mean(unseen: float, seen: float) -> float:
    r""":math:`H = 2US/(U+S)` of two accuracies in ``[0, 1]``, defined as 0 when :math:`U + S = 0`.

    Raises:
        ValueError: if ``unseen`` or ``seen`` is NaN, infinite or outside ``[0, 1]`` (a metric raises rather
            than returning NaN, docs/reliability.md rule 2).
    """
    for name, value in (("unseen", unseen), ("seen", seen)):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"harmonic_mean: `{name}` must be an accuracy in [0, 1], got {value}")
    return 0.0 if unseen + seen == 0 else 2.0 * unseen * seen / (unseen + seen)


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, classes: np.ndarray) -> dict[int, float]:
    """Accuracy of the samples of each class in ``classes`` that occurs in ``y_true`` (others are skipped)."""
    result = {}
    for cls in classes:
        mask = y_true == cls
        if mask.any():
            result[int(cls)] = float(np.mean(y_pred[mask] == cls))
    return result


def evaluate_gzsl(
    y_true: Sequence[int] | np.ndarray | Tensor,
    y_pred: Sequence[int] | np.ndarray | Tensor,
    seen_classes: Sequence[int] | np.ndarray | Tensor,
    unseen_classes: Sequence[int] | np.ndarray | Tensor,
) -> GZSLScores:
    r"""Score generalized zero-shot predictions made over the joint label space seen ∪ unseen.

    The protocol of Xian et al. ("Zero-Shot Learning — A Comprehensive Evaluation of the Good, the Bad and the
    Ugly", TPAMI 2018, https://arxiv.org/abs/1707.00600), used by CADA-VAE and Disentangled-VAE:

    .. math::
        S = \frac{1}{|\mathcal{Y}^S|} \sum_{c \in \mathcal{Y}^S}
            \frac{\#\{i : y_i = c,\ \hat{y}_i = c\}}{\#\{i : y_i = c\}}, \qquad
        U = \text{the same over } \mathcal{Y}^U, \qquad H = \frac{2 U S}{U + S},

    where the averages run over the classes that have test samples, and a prediction counts only if it is the
    exact label (predicting another class, seen or unseen, is an error). If no test sample belongs to a seen
    (unseen) class, that group's accuracy and :math:`H` are undefined and reported as NaN (a split of one
    group only, e.g. a cross-validation fold of seen classes); empty input raises.

    Args:
        y_true: :math:`(N,)` true labels; each must be in ``seen_classes`` or ``unseen_classes``.
        y_pred: :math:`(N,)` predicted labels (any integers).
        seen_classes: labels of the seen classes :math:`\mathcal{Y}^S`.
        unseen_classes: labels of the unseen classes :math:`\mathcal{Y}^U`, disjoint from the seen ones.

    Returns:
        :class:`GZSLScores` with ``seen`` :math:`S`, ``unseen`` :math:`U`, ``harmonic`` :math:`H` and
        ``per_class``.

    Raises:
        ValueError: if the label arrays are empty, not 1-D or differ in length, the class sets overlap, or a
            true label is in neither class set.
        TypeError: for non-integer labels.

    Examples:
        >>> scores = evaluate_gzsl([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], seen_classes=[0, 1], unseen_classes=[2])
        >>> scores.seen, scores.unseen  # S = (1/2 + 1/1) / 2, U = 1/2
        (0.75, 0.5)
    """
    true = check_labels("y_true", y_true)
    pred = check_labels("y_pred", y_pred, n_samples=true.shape[0])
    seen = np.unique(check_labels("seen_classes", np.asarray(seen_classes).reshape(-1)))
    unseen = np.unique(check_labels("unseen_classes", np.asarray(unseen_classes).reshape(-1)))
    check_disjoint("seen_classes", seen, "unseen_classes", unseen)
    stray = np.setdiff1d(true, np.concatenate([seen, unseen]))
    if stray.size:
        raise ValueError(
            f"`y_true` holds labels in neither `seen_classes` nor `unseen_classes`: {stray[:10].tolist()}"
        )
    if true.size == 0:
        raise ValueError("evaluate_gzsl: `y_true` is empty; expected at least one test sample")
    seen_acc = per_class_accuracy(true, pred, seen)
    unseen_acc = per_class_accuracy(true, pred, unseen)
    s = float(np.mean(list(seen_acc.values()))) if seen_acc else float("nan")
    u = float(np.mean(list(unseen_acc.values()))) if unseen_acc else float("nan")
    h = harmonic_mean(u, s) if seen_acc and unseen_acc else float("nan")
    return GZSLScores(seen=s, unseen=u, harmonic=h, per_class={**seen_acc, **unseen_acc})
