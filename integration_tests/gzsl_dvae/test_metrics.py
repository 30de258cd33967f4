from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gzsl_dvae import GZSLScores, evaluate_gzsl, harmonic_mean
from sklearn.metrics import recall_score


def test_hand_computed_case() -> None:
    # seen {0, 1}, unseen {2}. class 0: 1 of 2 right; class 1: 1 of 1; class 2: 1 of 2
    # S = (1/2 + 1) / 2 = 0.75, U = 0.5, H = 2 * 0.75 * 0.5 / 1.25 = 0.6
    scores = evaluate_gzsl([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], seen_classes=[0, 1], unseen_classes=[2])
    assert scores.seen == pytest.approx(0.75)
    assert scores.unseen == pytest.approx(0.5)
    assert scores.harmonic == pytest.approx(0.6)
    assert scores.per_class == {0: 0.5, 1: 1.0, 2: 0.5}
    assert scores.as_percent() == pytest.approx((50.0, 75.0, 60.0))


def test_per_class_not_per_sample() -> None:
    # 9 samples of seen class 0 all right, 1 sample of seen class 1 wrong: per-sample 90 %, per-class 50 %
    y_true = [0] * 9 + [1] + [2, 3]
    y_pred = [0] * 9 + [0] + [2, 3]
    scores = evaluate_gzsl(y_true, y_pred, [0, 1], [2, 3])
    assert scores.seen == pytest.approx(0.5)
    assert scores.unseen == pytest.approx(1.0)
    assert scores.harmonic == pytest.approx(2 * 0.5 / 1.5)


def test_predicting_a_wrong_group_counts_as_error() -> None:
    # an unseen sample predicted as a seen class is wrong even though the classes "exist"
    scores = evaluate_gzsl([0, 2], [0, 0], [0, 1], [2])
    assert scores.seen == 1.0 and scores.unseen == 0.0 and scores.harmonic == 0.0


def test_seen_only_predictions_give_zero_harmonic_mean() -> None:
    y_true = np.array([0, 1, 2, 3])
    scores = evaluate_gzsl(y_true, [0, 1, 0, 1], [0, 1], [2, 3])
    assert scores.seen == 1.0 and scores.unseen == 0.0 and scores.harmonic == 0.0


def test_matches_sklearn_recall_per_class() -> None:
    rng = np.random.default_rng(0)
    seen, unseen = np.arange(6), np.arange(6, 10)
    y_true = rng.integers(0, 10, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 10, 200))
    scores = evaluate_gzsl(torch.as_tensor(y_true), torch.as_tensor(y_pred), seen, unseen)
    all_labels = np.arange(10)
    recall = recall_score(y_true, y_pred, labels=all_labels, average=None, zero_division=0)
    assert scores.seen == pytest.approx(recall[seen].mean())
    assert scores.unseen == pytest.approx(recall[unseen].mean())


def test_classes_without_test_samples_are_skipped_and_empty_group_is_nan() -> None:
    scores = evaluate_gzsl([0, 0], [0, 0], [0, 1], [2])
    assert scores.seen == 1.0  # class 1 has no test sample
    assert math.isnan(scores.unseen) and math.isnan(scores.harmonic)


def test_harmonic_mean() -> None:
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(0.5, 0.5) == 0.5
    assert harmonic_mean(1.0, 0.25) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="`unseen` must be an accuracy"):
        harmonic_mean(float("nan"), 1.0)
    with pytest.raises(ValueError, match="`seen` must be an accuracy"):
        harmonic_mean(0.5, 1.5)


def test_errors() -> None:
    with pytest.raises(ValueError, match="disjoint"):
        evaluate_gzsl([0, 1], [0, 1], [0, 1], [1, 2])
    with pytest.raises(ValueError, match="neither"):
        evaluate_gzsl([0, 5], [0, 1], [0, 1], [2])
    with pytest.raises(ValueError, match="`y_pred` must have 2 entries"):
        evaluate_gzsl([0, 1], [0, 1, 1], [0, 1], [2])
    with pytest.raises(ValueError, match="`y_true` must be 1-D"):
        evaluate_gzsl([[0, 1]], [0, 1], [0, 1], [2])
    with pytest.raises(TypeError, match="integer"):
        evaluate_gzsl([0.5, 1.0], [0, 1], [0, 1], [2])


def test_scores_dataclass_is_frozen() -> None:
    scores = GZSLScores(0.1, 0.2, 0.3)
    with pytest.raises(AttributeError):
        scores.seen = 0.5  # type: ignore[misc]
