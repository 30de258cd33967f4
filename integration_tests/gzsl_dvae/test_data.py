from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from gzsl_dvae import GZSLData, carve_validation_split


def make_data(seed: int = 0, n_classes: int = 10, n_unseen: int = 3, per_class: int = 10) -> GZSLData:
    rng = np.random.default_rng(seed)
    seen = np.arange(n_unseen, n_classes)
    unseen = np.arange(n_unseen)
    train_y = np.repeat(seen, per_class)
    test_seen_y = np.repeat(seen, 2)
    test_unseen_y = np.repeat(unseen, 4)
    return GZSLData(
        train_features=rng.random((train_y.size, 6)),
        train_labels=train_y,
        test_seen_features=rng.random((test_seen_y.size, 6)),
        test_seen_labels=test_seen_y,
        test_unseen_features=rng.random((test_unseen_y.size, 6)),
        test_unseen_labels=test_unseen_y,
        class_attributes=rng.random((n_classes, 5)),
    )


def test_properties_and_summary() -> None:
    data = make_data()
    np.testing.assert_array_equal(data.seen_classes, np.arange(3, 10))
    np.testing.assert_array_equal(data.unseen_classes, np.arange(3))
    assert data.train_features.dtype == np.float32
    assert "7 seen / 3 unseen" in data.summary()


def test_attribute_matrix_missing_a_class() -> None:
    data = make_data()
    with pytest.raises(ValueError, match="missing a class"):
        dataclasses.replace(data, class_attributes=data.class_attributes[:9])


def test_overlapping_seen_and_unseen_classes() -> None:
    data = make_data()
    labels = data.test_unseen_labels.copy()
    labels[0] = 5  # a seen class
    with pytest.raises(ValueError, match="disjoint"):
        dataclasses.replace(data, test_unseen_labels=labels)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features(bad: float) -> None:
    data = make_data()
    feats = data.train_features.copy()
    feats[3, 2] = bad
    with pytest.raises(ValueError, match="`train_features` contains NaN or infinite"):
        dataclasses.replace(data, train_features=feats)


def test_shape_errors() -> None:
    data = make_data()
    with pytest.raises(ValueError, match="`test_seen_features` must have 6 columns"):
        dataclasses.replace(data, test_seen_features=data.test_seen_features[:, :5])
    with pytest.raises(ValueError, match="`train_labels` must have"):
        dataclasses.replace(data, train_labels=data.train_labels[:-1])
    with pytest.raises(ValueError, match="no training sample"):
        dataclasses.replace(
            data,
            test_seen_labels=np.full_like(data.test_seen_labels, 2),
            test_unseen_labels=np.zeros_like(data.test_unseen_labels),
        )


def test_minmax_scaled_fits_on_train_only() -> None:
    data = make_data()
    scaled = data.minmax_scaled()
    assert scaled.train_features.min() == pytest.approx(0.0) and scaled.train_features.max() == pytest.approx(
        1.0
    )
    low = data.train_features.min(0)
    span = data.train_features.max(0) - low
    np.testing.assert_allclose(
        scaled.test_unseen_features, (data.test_unseen_features - low) / span, rtol=1e-6
    )


def test_carve_validation_split_uses_only_seen_training_data() -> None:
    data = make_data(per_class=10)
    val = carve_validation_split(data, num_validation_classes=2, seed=1)
    assert set(val.unseen_classes) <= set(data.seen_classes)
    assert len(val.unseen_classes) == 2
    assert set(val.seen_classes) == set(data.seen_classes) - set(val.unseen_classes)
    assert not set(val.seen_classes) & set(data.unseen_classes)
    # every row comes from the training features and none is used twice
    rows = np.concatenate([val.train_features, val.test_seen_features, val.test_unseen_features])
    assert len(rows) == len(data.train_features)
    assert {r.tobytes() for r in rows} == {r.tobytes() for r in data.train_features}
    # 20 % of each remaining seen class is held out
    assert all(np.sum(val.test_seen_labels == c) == 2 for c in val.seen_classes)
    assert carve_validation_split(data, num_validation_classes=2, seed=1).train_labels.tolist() == (
        val.train_labels.tolist()
    )


def test_carve_validation_split_errors() -> None:
    data = make_data()
    with pytest.raises(ValueError, match="fewer than 2"):
        carve_validation_split(data, num_validation_classes=6)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        carve_validation_split(data, validation_fraction=1.5)
