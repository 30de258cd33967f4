"""The class-attribute table of :class:`~gzsl_dvae.GZSLClassifier`: rows keyed to labels (private)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.utils import check_array, column_or_1d

__all__ = ["ClassTable", "build_class_table"]


@dataclass(frozen=True)
class ClassTable:
    """Every class the estimator can predict, with its attribute row.

    Attributes:
        classes: ``(C,)`` sorted labels (seen and unseen), the estimator's ``classes_``.
        attributes: ``(C, A)`` float64 attribute rows, row ``k`` for ``classes[k]``.
        rows: ``(N,)`` index into ``classes`` of each training label.
    """

    classes: np.ndarray
    attributes: np.ndarray
    rows: np.ndarray


def build_class_table(y: np.ndarray, class_attributes: Any, classes: Any) -> ClassTable:
    """Key the attribute rows to labels and index ``y`` into them.

    Args:
        y: ``(N,)`` training labels (any sortable hashable labels: integers, strings).
        class_attributes: ``(C, A)`` array, one row per class, or ``"onehot"`` (one-hot rows of the classes in
            ``y`` only: no unseen class, a seen-class classifier — the GZSL "seen-only" control).
        classes: ``(C,)`` the label of each row of ``class_attributes``; ``None`` means ``0 .. C-1``.

    Raises:
        ValueError: for a missing table, a table with NaN/inf, ``classes`` of the wrong length, repeated or
            mutually unsortable labels, or labels of ``y`` with no attribute row.
    """
    if class_attributes is None:
        raise ValueError(
            "GZSLClassifier needs `class_attributes`: pass the (n_classes, n_attributes) array to the "
            "constructor, GZSLClassifier(class_attributes=A, classes=labels_of_rows), or 'onehot' for a "
            "seen-class classifier without side information"
        )
    if isinstance(class_attributes, str):
        if class_attributes != "onehot":
            raise ValueError(f"`class_attributes` must be an array or 'onehot', got {class_attributes!r}")
        if classes is not None:
            raise ValueError("`classes` must be None with class_attributes='onehot' (the classes are y's)")
        labels, rows = np.unique(y, return_inverse=True)
        return ClassTable(labels, np.eye(labels.size), rows.reshape(-1))
    table = check_array(class_attributes, dtype=np.float64, input_name="class_attributes")
    if classes is None:
        labels = np.arange(table.shape[0])
    else:
        labels = column_or_1d(np.asarray(classes))
        if labels.shape[0] != table.shape[0]:
            raise ValueError(
                f"`classes` must hold one label per row of `class_attributes` ({table.shape[0]}), "
                f"got {labels.shape[0]}"
            )
    try:
        order = np.argsort(labels, kind="stable")
    except TypeError as err:
        raise ValueError(f"`classes` must be mutually sortable labels, got {labels[:5].tolist()}") from err
    labels, table = labels[order], table[order]
    if labels.size > 1 and np.any(labels[1:] == labels[:-1]):
        raise ValueError("`classes` must hold one distinct label per row of `class_attributes`")
    known = np.isin(y, labels)
    if not known.all():
        missing = list(dict.fromkeys(y[~known].tolist()))[:10]
        hint = " (labels are rows 0..C-1 unless `classes` is given)" if classes is None else ""
        raise ValueError(
            f"`class_attributes` is missing class(es) {missing} that occur in `y`; every class needs an "
            f"attribute row{hint}"
        )
    return ClassTable(labels, table, np.searchsorted(labels, y))
