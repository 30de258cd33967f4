from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gzsl_dvae import load_att_splits, load_xlsa17
from scipy.io import savemat


def write_xlsa17(
    tmp_path: Path, seed: int = 0, **overrides: object
) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """Write a tiny res101.mat + att_splits.mat in the xlsa17 layout: 5 classes (3 seen), 1-based indices."""
    rng = np.random.default_rng(seed)
    labels0 = np.repeat(np.arange(5), 4)  # 20 images, 0-based truth
    features = rng.random((20, 7)).astype(np.float32)
    seen_rows = np.flatnonzero(labels0 < 3)
    trainval = seen_rows[np.arange(seen_rows.size) % 4 != 0]
    test_seen = seen_rows[np.arange(seen_rows.size) % 4 == 0]
    test_unseen = np.flatnonzero(labels0 >= 3)
    att = rng.random((6, 5))
    att /= np.linalg.norm(att, axis=0, keepdims=True)
    splits = {
        "att": att,
        "original_att": att * 100,
        "allclasses_names": np.array([[np.array([f"class_{i}"])] for i in range(5)], dtype=object),
        "trainval_loc": (trainval + 1)[:, None].astype(np.uint16),
        "test_seen_loc": (test_seen + 1)[:, None].astype(np.uint16),
        "test_unseen_loc": (test_unseen + 1)[:, None].astype(np.uint16),
    }
    res = {"features": features.T, "labels": (labels0 + 1)[:, None].astype(np.int16)}
    for key, value in overrides.items():
        target = res if key in res else splits
        if value is None:
            target.pop(key)
        else:
            target[key] = value
    savemat(tmp_path / "res101.mat", res)
    savemat(tmp_path / "att_splits.mat", splits)
    truth = {
        "features": features,
        "labels": labels0,
        "trainval": trainval,
        "test_seen": test_seen,
        "test_unseen": test_unseen,
        "att": att,
    }
    return tmp_path / "res101.mat", tmp_path / "att_splits.mat", truth


def test_round_trip_of_written_files(tmp_path: Path) -> None:
    res, splits, truth = write_xlsa17(tmp_path)
    data = load_xlsa17(res, splits)
    np.testing.assert_array_equal(data.train_labels, truth["labels"][truth["trainval"]])
    np.testing.assert_allclose(data.train_features, truth["features"][truth["trainval"]])
    np.testing.assert_allclose(data.test_unseen_features, truth["features"][truth["test_unseen"]])
    np.testing.assert_array_equal(data.seen_classes, [0, 1, 2])
    np.testing.assert_array_equal(data.unseen_classes, [3, 4])
    np.testing.assert_allclose(data.class_attributes, truth["att"].T)
    assert data.class_names == [f"class_{i}" for i in range(5)]
    original = load_att_splits(splits, attribute_key="original_att")
    np.testing.assert_allclose(original.attributes, truth["att"].T * 100)


def test_locations_are_converted_from_one_based(tmp_path: Path) -> None:
    _, splits, truth = write_xlsa17(tmp_path)
    loaded = load_att_splits(splits)
    np.testing.assert_array_equal(loaded.trainval_loc, truth["trainval"])
    assert loaded.train_loc is None and loaded.val_loc is None
    assert loaded.num_images == 20


def test_zero_based_locations_are_rejected(tmp_path: Path) -> None:
    _, splits, _truth = write_xlsa17(tmp_path, trainval_loc=truth_trainval_zero_based())
    with pytest.raises(ValueError, match="1-based"):
        load_att_splits(splits)


def truth_trainval_zero_based() -> np.ndarray:
    return np.array([[0], [1], [2]], dtype=np.uint16)


def test_overlapping_locations(tmp_path: Path) -> None:
    _, splits, _ = write_xlsa17(tmp_path, test_seen_loc=np.array([[2], [17]], dtype=np.uint16))
    with pytest.raises(ValueError, match="overlap"):
        load_att_splits(splits)


def test_overlapping_seen_and_unseen_classes(tmp_path: Path) -> None:
    # an image of class 3 (unseen) listed in trainval makes class 3 both seen and unseen
    res, splits, truth = write_xlsa17(tmp_path)
    trainval = np.concatenate([truth["trainval"], truth["test_unseen"][:1]])
    unseen = truth["test_unseen"][1:]
    res, splits, _ = write_xlsa17(
        tmp_path,
        trainval_loc=(trainval + 1)[:, None].astype(np.uint16),
        test_unseen_loc=(unseen + 1)[:, None].astype(np.uint16),
    )
    with pytest.raises(ValueError, match="disjoint"):
        load_xlsa17(res, splits)


def test_attribute_matrix_missing_a_class(tmp_path: Path) -> None:
    res, splits, truth = write_xlsa17(tmp_path)
    res, splits, _ = write_xlsa17(
        tmp_path,
        att=truth["att"][:, :4],
        original_att=truth["att"][:, :4],
        allclasses_names=np.array([[np.array([f"class_{i}"])] for i in range(4)], dtype=object),
    )
    with pytest.raises(ValueError, match="missing a class"):
        load_xlsa17(res, splits)


def test_non_finite_features(tmp_path: Path) -> None:
    features = np.ones((7, 20), dtype=np.float32)
    features[2, 5] = np.nan
    res, splits, _ = write_xlsa17(tmp_path, features=features)
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_xlsa17(res, splits)


def test_zero_based_labels_and_missing_variables(tmp_path: Path) -> None:
    res, splits, _ = write_xlsa17(tmp_path, labels=np.repeat(np.arange(5), 4)[:, None])
    with pytest.raises(ValueError, match="1-based"):
        load_xlsa17(res, splits)
    res, splits, _ = write_xlsa17(tmp_path, test_unseen_loc=None)
    with pytest.raises(KeyError, match="test_unseen_loc"):
        load_att_splits(splits)
    with pytest.raises(FileNotFoundError):
        load_att_splits(tmp_path / "nope.mat")


# Split sizes of the real xlsa17 files (CADA-VAE's README / the method notes).
REAL_SIZES = {
    "AWA1": (85, 50, 19832, 4958, 5685),
    "AWA2": (85, 50, 23527, 5882, 7913),
    "CUB": (312, 200, 7057, 1764, 2967),
    "SUN": (102, 717, 10320, 2580, 1440),
}


@pytest.mark.parametrize("name", sorted(REAL_SIZES))
def test_real_att_splits(shared_data: Path, name: str) -> None:
    path = shared_data / "gzsl" / f"{name}_att_splits.mat"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    splits = load_att_splits(path)
    n_att, n_classes, n_trainval, n_test_seen, n_test_unseen = REAL_SIZES[name]
    assert splits.attributes.shape == (n_classes, n_att)
    assert len(splits.class_names) == n_classes
    assert (splits.trainval_loc.size, splits.test_seen_loc.size, splits.test_unseen_loc.size) == (
        n_trainval,
        n_test_seen,
        n_test_unseen,
    )
    np.testing.assert_allclose(np.linalg.norm(splits.attributes, axis=1), 1.0, atol=1e-6)
    everything = np.concatenate([splits.trainval_loc, splits.test_seen_loc, splits.test_unseen_loc])
    assert everything.min() == 0  # converted from 1-based
    np.testing.assert_array_equal(np.sort(everything), np.arange(splits.num_images))
