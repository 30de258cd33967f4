"""A generalized zero-shot split in memory: checks, min-max scaling, validation classes carved from it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ._validation import check_disjoint, check_labels, check_matrix

__all__ = ["GZSLData", "carve_validation_split"]


@dataclass(frozen=True)
class GZSLData:
    r"""Features, labels and class attributes of one generalized zero-shot benchmark split.

    Labels are 0-based rows of ``class_attributes``. Seen classes are those of ``train_labels``; unseen
    classes those of ``test_unseen_labels``; the label space at test time is seen ∪ unseen.

    Args:
        train_features: :math:`(N, D)` training features (seen classes only).
        train_labels: :math:`(N,)`.
        test_seen_features: :math:`(N_s, D)` held-out features of seen classes.
        test_seen_labels: :math:`(N_s,)`.
        test_unseen_features: :math:`(N_u, D)` features of unseen classes.
        test_unseen_labels: :math:`(N_u,)`.
        class_attributes: :math:`(C, A)` one attribute vector per class.
        class_names: optional names of the ``C`` classes.

    Raises:
        ValueError: if features are not 2-D, have different widths or hold NaN/inf; if a label has no row in
            ``class_attributes`` (the attribute matrix is missing a class); if seen and unseen classes
            overlap; or if a test-seen label is not a training class.
    """

    train_features: np.ndarray
    train_labels: np.ndarray
    test_seen_features: np.ndarray
    test_seen_labels: np.ndarray
    test_unseen_features: np.ndarray
    test_unseen_labels: np.ndarray
    class_attributes: np.ndarray
    class_names: list[str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        attributes = check_matrix("class_attributes", self.class_attributes)
        object.__setattr__(self, "class_attributes", attributes)
        width = None
        for part in ("train", "test_seen", "test_unseen"):
            feats = check_matrix(f"{part}_features", getattr(self, f"{part}_features"), columns=width)
            width = feats.shape[1]
            labels = check_labels(f"{part}_labels", getattr(self, f"{part}_labels"), n_samples=feats.shape[0])
            if labels.size and (labels.min() < 0 or labels.max() >= attributes.shape[0]):
                raise ValueError(
                    f"`{part}_labels` range [{labels.min()}, {labels.max()}] does not index the "
                    f"{attributes.shape[0]} rows of `class_attributes`: the attribute "
                    "matrix is missing a class"
                )
            object.__setattr__(self, f"{part}_features", feats.astype(np.float32))
            object.__setattr__(self, f"{part}_labels", labels)
        check_disjoint(
            "seen classes (train_labels)", self.seen_classes, "unseen classes", self.unseen_classes
        )
        stray = np.setdiff1d(self.test_seen_labels, self.seen_classes)
        if stray.size:
            raise ValueError(
                f"`test_seen_labels` holds classes with no training sample: {stray[:10].tolist()}"
            )
        if self.class_names is not None and len(self.class_names) != attributes.shape[0]:
            raise ValueError(
                f"`class_names` must name the {attributes.shape[0]} classes, "
                f"got {len(self.class_names)} names"
            )

    @property
    def seen_classes(self) -> np.ndarray:
        """Sorted labels of the training classes."""
        return np.unique(self.train_labels)

    @property
    def unseen_classes(self) -> np.ndarray:
        """Sorted labels of the unseen test classes."""
        return np.unique(self.test_unseen_labels)

    def minmax_scaled(self) -> GZSLData:
        """Scale every feature column to ``[0, 1]`` on the training features (test sets reuse that fit).

        CADA-VAE's loader fits a separate scaler on each test set; fitting on training data only keeps test
        statistics out of the model.
        """
        low = self.train_features.min(axis=0)
        span = self.train_features.max(axis=0) - low
        span[span == 0] = 1.0
        return replace(
            self,
            train_features=(self.train_features - low) / span,
            test_seen_features=(self.test_seen_features - low) / span,
            test_unseen_features=(self.test_unseen_features - low) / span,
        )

    def summary(self) -> str:
        """One line: class and sample counts."""
        return (
            f"{len(self.seen_classes)} seen / {len(self.unseen_classes)} unseen classes; train "
            f"{len(self.train_labels)}, test seen {len(self.test_seen_labels)}, test unseen "
            f"{len(self.test_unseen_labels)}; features {self.train_features.shape[1]}-d, attributes "
            f"{self.class_attributes.shape[1]}-d"
        )


def carve_validation_split(
    data: GZSLData,
    num_validation_classes: int | None = None,
    validation_fraction: float = 0.2,
    test_seen_fraction: float = 0.2,
    seed: int = 0,
) -> GZSLData:
    """Carve a validation GZSL problem out of the seen classes, for honest hyperparameter choice.

    A random subset of seen classes plays the unseen classes (all their training samples become
    ``test_unseen``); of every remaining seen class a ``test_seen_fraction`` of samples is held out as
    ``test_seen``. The true unseen classes and all test samples of ``data`` are not used at all.

    Args:
        data: the full split.
        num_validation_classes: how many seen classes become validation-unseen. (default: ``None``, i.e.
            ``round(validation_fraction * n_seen)``, at least 1)
        validation_fraction: used when ``num_validation_classes`` is ``None``. (default: ``0.2``)
        test_seen_fraction: held-out fraction of each remaining seen class (at least one sample each when a
            class has two or more). (default: ``0.2``)
        seed: RNG seed. (default: ``0``)

    Returns:
        A :class:`GZSLData` on the seen classes only.

    Raises:
        ValueError: if fewer than two seen classes would remain, or the fractions are outside ``(0, 1)``.
    """
    seen = data.seen_classes
    if not 0 < validation_fraction < 1 or not 0 < test_seen_fraction < 1:
        raise ValueError("`validation_fraction` and `test_seen_fraction` must lie in (0, 1)")
    n_val = (
        num_validation_classes
        if num_validation_classes is not None
        else round(validation_fraction * len(seen))
    )
    n_val = max(int(n_val), 1)
    if len(seen) - n_val < 2:
        raise ValueError(
            f"carving {n_val} validation classes from {len(seen)} seen classes leaves fewer than 2"
        )
    rng = np.random.default_rng(seed)
    val_classes = np.sort(rng.choice(seen, size=n_val, replace=False))
    is_val = np.isin(data.train_labels, val_classes)
    train_idx, held_idx = [], []
    for cls in np.setdiff1d(seen, val_classes):
        rows = rng.permutation(np.flatnonzero(data.train_labels == cls))
        n_held = round(test_seen_fraction * len(rows))
        n_held = min(max(n_held, 1 if len(rows) >= 2 else 0), len(rows) - 1)
        held_idx.append(rows[:n_held])
        train_idx.append(rows[n_held:])
    train = np.sort(np.concatenate(train_idx))
    held = np.sort(np.concatenate(held_idx))
    return GZSLData(
        train_features=data.train_features[train],
        train_labels=data.train_labels[train],
        test_seen_features=data.train_features[held],
        test_seen_labels=data.train_labels[held],
        test_unseen_features=data.train_features[is_val],
        test_unseen_labels=data.train_labels[is_val],
        class_attributes=data.class_attributes,
        class_names=data.class_names,
    )
