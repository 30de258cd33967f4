"""Loader for the xlsa17 format (Xian et al., TPAMI 2018): ``res101.mat`` features and ``att_splits.mat``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import GZSLData

__all__ = ["AttSplits", "load_att_splits", "load_xlsa17"]

_LOCATIONS = ("trainval_loc", "test_seen_loc", "test_unseen_loc")


def _loadmat(path: str | Path) -> dict[str, np.ndarray]:
    from scipy.io import loadmat  # scipy is an optional dependency (the [gzsl] extra)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such .mat file: {path}")
    return loadmat(str(path))


def _name(entry: object) -> str:
    while isinstance(entry, np.ndarray):
        entry = entry.item() if entry.size == 1 else entry[0]
    return str(entry)


@dataclass(frozen=True)
class AttSplits:
    """Contents of an xlsa17 ``att_splits.mat``, converted to 0-based indices and one row per class.

    Attributes:
        attributes: :math:`(C, A)` class attributes (the file stores ``A x C``; ``att`` has L2-normalised
            columns, ``original_att`` the raw values).
        class_names: the ``C`` names of ``allclasses_names``.
        trainval_loc: 0-based image indices of the seen-class training images.
        test_seen_loc: 0-based indices of held-out seen-class test images.
        test_unseen_loc: 0-based indices of the unseen-class test images.
        train_loc: 0-based indices of xlsa17's validation-protocol training images (``None`` if absent).
        val_loc: 0-based indices of xlsa17's validation-class images (``None`` if absent).
    """

    attributes: np.ndarray
    class_names: list[str]
    trainval_loc: np.ndarray
    test_seen_loc: np.ndarray
    test_unseen_loc: np.ndarray
    train_loc: np.ndarray | None = None
    val_loc: np.ndarray | None = None

    @property
    def num_images(self) -> int:
        """Number of images the locations refer to (largest index + 1)."""
        return int(
            max(int(loc.max()) for loc in (self.trainval_loc, self.test_seen_loc, self.test_unseen_loc)) + 1
        )


def load_att_splits(path: str | Path, attribute_key: str = "att") -> AttSplits:
    """Read an xlsa17 ``att_splits.mat`` (1-based MATLAB locations become 0-based).

    Args:
        path: the ``att_splits.mat`` file.
        attribute_key: ``"att"`` (L2-normalised, used by CADA-VAE) or ``"original_att"``. (default: ``"att"``)

    Returns:
        :class:`AttSplits`.

    Raises:
        FileNotFoundError: if the file does not exist.
        KeyError: if a required variable is missing.
        ValueError: if the attribute matrix and class names disagree, a location is < 1 (not 1-based), or the
            trainval / test-seen / test-unseen locations overlap.
    """
    mat = _loadmat(path)
    missing = [k for k in (attribute_key, "allclasses_names", *_LOCATIONS) if k not in mat]
    if missing:
        raise KeyError(f"{path}: missing variable(s) {missing}; is this an xlsa17 att_splits.mat?")
    attributes = np.asarray(mat[attribute_key], dtype=np.float64).T
    names = [_name(entry) for entry in np.asarray(mat["allclasses_names"]).reshape(-1)]
    if attributes.shape[0] != len(names):
        raise ValueError(
            f"{path}: `{attribute_key}` has {attributes.shape[0]} class columns but allclasses_names "
            f"has {len(names)}"
        )
    locs: dict[str, np.ndarray | None] = {}
    for key in (*_LOCATIONS, "train_loc", "val_loc"):
        if key not in mat:
            locs[key] = None
            continue
        loc = np.asarray(mat[key]).reshape(-1).astype(np.int64)
        if loc.size and loc.min() < 1:
            raise ValueError(f"{path}: `{key}` holds index {loc.min()} < 1; xlsa17 locations are 1-based")
        locs[key] = loc - 1
    for i, a in enumerate(_LOCATIONS):
        for b in _LOCATIONS[i + 1 :]:
            common = np.intersect1d(locs[a], locs[b])  # type: ignore[arg-type]
            if common.size:
                raise ValueError(
                    f"{path}: `{a}` and `{b}` overlap in {common.size} image(s), e.g. {common[0] + 1}"
                )
    return AttSplits(
        attributes=attributes,
        class_names=names,
        trainval_loc=locs["trainval_loc"],  # type: ignore[arg-type]
        test_seen_loc=locs["test_seen_loc"],  # type: ignore[arg-type]
        test_unseen_loc=locs["test_unseen_loc"],  # type: ignore[arg-type]
        train_loc=locs["train_loc"],
        val_loc=locs["val_loc"],
    )


def load_xlsa17(res101_path: str | Path, att_splits_path: str | Path, attribute_key: str = "att") -> GZSLData:
    r"""Load an xlsa17 benchmark (``res101.mat`` + ``att_splits.mat``) as a :class:`~gzsl_dvae.GZSLData`.

    ``res101.mat`` holds ``features`` (:math:`2048 \times N`) and 1-based ``labels`` (:math:`N \times 1`);
    labels become 0-based rows of the attribute matrix. Features are returned unscaled; call
    :meth:`GZSLData.minmax_scaled` for CADA-VAE's [0, 1] scaling.

    Args:
        res101_path: the ``res101.mat`` file.
        att_splits_path: the ``att_splits.mat`` file.
        attribute_key: ``"att"`` or ``"original_att"``. (default: ``"att"``)

    Returns:
        :class:`~gzsl_dvae.GZSLData` with the proposed-split trainval / test-seen / test-unseen sets.

    Raises:
        FileNotFoundError: if a file is missing.
        KeyError: if a required variable is missing.
        ValueError: if labels are not 1-based class indices of the attribute matrix, locations point past the
            features, features hold NaN/inf, or seen and unseen classes overlap.
    """
    splits = load_att_splits(att_splits_path, attribute_key)
    mat = _loadmat(res101_path)
    for key in ("features", "labels"):
        if key not in mat:
            raise KeyError(f"{res101_path}: missing variable `{key}`; is this an xlsa17 res101.mat?")
    features = np.asarray(mat["features"], dtype=np.float32).T
    labels = np.asarray(mat["labels"]).reshape(-1).astype(np.int64)
    if features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{res101_path}: `features` has {features.shape[0]} columns (images) but `labels` has "
            f"{labels.shape[0]}"
        )
    if labels.size and labels.min() < 1:
        raise ValueError(f"{res101_path}: label {labels.min()} < 1; xlsa17 labels are 1-based")
    labels = labels - 1
    if splits.num_images > features.shape[0]:
        raise ValueError(
            f"{att_splits_path} refers to image {splits.num_images} but {res101_path} has {features.shape[0]}"
        )
    return GZSLData(
        train_features=features[splits.trainval_loc],
        train_labels=labels[splits.trainval_loc],
        test_seen_features=features[splits.test_seen_loc],
        test_seen_labels=labels[splits.test_seen_loc],
        test_unseen_features=features[splits.test_unseen_loc],
        test_unseen_labels=labels[splits.test_unseen_loc],
        class_attributes=splits.attributes,
        class_names=splits.class_names,
    )
