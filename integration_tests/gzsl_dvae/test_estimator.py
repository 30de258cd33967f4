from __future__ import annotations

import pickle

import numpy as np
import pytest
import sklearn
import torch
from gzsl_dvae import CADAVAE, DisentangledVAE, GZSLClassifier
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import balanced_accuracy_score, recall_score
from sklearn.model_selection import GridSearchCV, GroupKFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

FAST = {
    "visual_hidden": (32, 32),
    "attribute_hidden": (16, 16),
    "latent_dim": 4,
    "epochs": 4,
    "batch_size": 20,
    "lr": 3e-3,
    "classifier_epochs": 2,
    "seen_visual_samples": 10,
    "unseen_semantic_samples": 20,
}


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    attrs = rng.random((6, 5))
    project = rng.random((5, 12))
    y = np.repeat(np.arange(4), 15)  # classes 4 and 5 are unseen
    X = attrs[y] @ project + 0.05 * rng.standard_normal((y.size, 12))
    y_test = np.repeat(np.arange(6), 3)
    X_test = attrs[y_test] @ project + 0.05 * rng.standard_normal((y_test.size, 12))
    return X, y, attrs, X_test, y_test


@pytest.mark.parametrize(("method", "model_cls"), [("dvae", DisentangledVAE), ("cada", CADAVAE)])
def test_fit_predict_score(method: str, model_cls: type) -> None:
    X, y, attrs, X_test, y_test = _data()
    est = GZSLClassifier(method=method, random_state=0, **FAST).fit(X, y, attrs)  # type: ignore[arg-type]
    assert isinstance(est.model_, model_cls)
    np.testing.assert_array_equal(est.seen_classes_, [0, 1, 2, 3])
    np.testing.assert_array_equal(est.unseen_classes_, [4, 5])
    pred = est.predict(X_test)
    assert pred.shape == (18,) and set(pred) <= set(range(6))
    proba = est.predict_proba(X_test)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    assert est.transform(X_test).shape == (18, 4)
    scores = est.evaluate(X_test, y_test)
    assert est.score(X_test, y_test) == pytest.approx(scores.harmonic, nan_ok=True)
    assert len(est.history_) == 4


def test_custom_class_labels() -> None:
    X, y, attrs, X_test, _ = _data()
    names = np.array([10, 20, 30, 40, 50, 60])
    est = GZSLClassifier(random_state=0, **FAST).fit(X, names[y], attrs, classes=names)  # type: ignore[arg-type]
    np.testing.assert_array_equal(est.unseen_classes_, [50, 60])
    assert set(est.predict(X_test)) <= set(names)


def test_reproducible_and_leaves_global_rng_alone() -> None:
    X, y, attrs, X_test, _ = _data()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = GZSLClassifier(random_state=7, **FAST).fit(X, y, attrs)  # type: ignore[arg-type]
    assert torch.equal(torch.rand(1), before)  # the fit did not consume the caller's RNG stream
    b = GZSLClassifier(random_state=7, **FAST).fit(X, y, attrs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(a.decision_function(X_test), b.decision_function(X_test))


def test_pickle_and_state_dict_round_trip() -> None:
    X, y, attrs, X_test, _ = _data()
    est = GZSLClassifier(random_state=0, **FAST).fit(X, y, attrs)  # type: ignore[arg-type]
    restored = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(restored.decision_function(X_test), est.decision_function(X_test))
    fresh = DisentangledVAE(12, 5, 4, latent_dim=4, visual_hidden=(32, 32), attribute_hidden=(16, 16))
    fresh.load_state_dict(est.model_.state_dict())
    torch.testing.assert_close(
        fresh.encode_visual(torch.ones(2, 12))[0], est.model_.encode_visual(torch.ones(2, 12))[0]
    )


def test_sklearn_clone_and_pipeline() -> None:
    X, y, attrs, X_test, _y_test = _data()
    est = GZSLClassifier(random_state=0, **FAST)  # type: ignore[arg-type]
    assert clone(est).get_params() == est.get_params()
    pipe = make_pipeline(FunctionTransformer(np.sqrt), est)
    pipe.fit(np.abs(X), y, gzslclassifier__class_attributes=attrs)
    assert pipe.predict(np.abs(X_test)).shape == (18,)


def test_errors() -> None:
    X, y, attrs, X_test, y_test = _data()
    est = GZSLClassifier(**FAST)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing class"):
        est.fit(X, y, attrs[:3])
    bad = X.copy()
    bad[2, 3] = np.inf
    with pytest.raises(ValueError, match="Input X contains infinity"):
        est.fit(bad, y, attrs)
    with pytest.raises(ValueError, match="at least 2 classes"):
        est.fit(X[:15], y[:15], attrs)
    with pytest.raises(ValueError, match="`method`"):
        GZSLClassifier(method="gan", **FAST).fit(X, y, attrs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one distinct label per row"):
        est.fit(X, y, attrs, classes=[0, 0, 1, 2, 3, 4])
    est.fit(X, y, attrs)
    with pytest.raises(ValueError, match="expecting 12 features"):
        est.predict(X_test[:, :5])
    with pytest.raises(ValueError, match="sample_weight"):
        est.score(X_test, y_test, sample_weight=np.ones(18))


@pytest.mark.parametrize("method", ["dvae", "cada"])
def test_warmups_follow_the_number_of_epochs(method: str) -> None:
    """CADA-VAE's schedules are published for 100 epochs; a 4-epoch fit compresses them to 4 % of that."""
    X, y, attrs, _, _ = _data()
    model = GZSLClassifier(method=method, random_state=0, **FAST).fit(X, y, attrs).model_  # type: ignore[arg-type]
    assert (model.kl_warmup.start_epoch, model.kl_warmup.end_epoch) == pytest.approx((0, 93 * 0.04))
    assert model.cross_reconstruction_warmup.end_epoch == pytest.approx(75 * 0.04)
    assert model.distance_warmup.start_epoch == pytest.approx(6 * 0.04)
    assert model.kl_warmup(3) == pytest.approx(0.25 * 3 / 3.72)  # not 0.25 * 3 / 93 as unscaled
    assert model.cross_reconstruction_warmup.factor == 2.37


def test_constructor_attributes_match_the_fit_argument() -> None:
    """The sklearn idiom (side information in the constructor) and the older fit argument train alike."""
    X, y, attrs, X_test, _ = _data()
    old = GZSLClassifier(random_state=0, **FAST).fit(X, y, attrs)  # type: ignore[arg-type]
    new = GZSLClassifier(class_attributes=attrs, random_state=0, **FAST).fit(X, y)  # type: ignore[arg-type]
    np.testing.assert_array_equal(new.decision_function(X_test), old.decision_function(X_test))
    assert clone(new).get_params()["class_attributes"] is not attrs  # cloned, not shared
    with pytest.raises(ValueError, match="needs `class_attributes`"):
        GZSLClassifier(**FAST).fit(X, y)  # type: ignore[arg-type]


def test_string_labels_keyed_by_classes() -> None:
    X, y, attrs, X_test, y_test = _data()
    names = np.array(["ant", "bee", "cat", "dog", "eel", "fox"])  # label of integer class k: names[k]
    order = [3, 0, 5, 1, 4, 2]  # attribute rows in any order, each keyed by its label in `classes`
    est = GZSLClassifier(class_attributes=attrs[order], classes=names[order], random_state=0, **FAST)  # type: ignore[arg-type]
    est.fit(X, names[y])
    np.testing.assert_array_equal(est.classes_, names)  # sorted, the columns of predict_proba
    np.testing.assert_array_equal(est.unseen_classes_, ["eel", "fox"])
    # the same model as with integer labels: rows were re-ordered with the labels, not mixed up
    ints = GZSLClassifier(class_attributes=attrs, random_state=0, **FAST).fit(X, y)  # type: ignore[arg-type]
    np.testing.assert_array_equal(est.predict(X_test), names[ints.predict(X_test)])
    assert est.score(X_test, names[y_test]) == pytest.approx(ints.score(X_test, y_test))
    assert set(est.evaluate(X_test, names[y_test]).per_class) == set(names)
    with pytest.raises(ValueError, match="unless `classes` is given"):
        GZSLClassifier(class_attributes=attrs, **FAST).fit(X, names[y])  # type: ignore[arg-type]


def test_not_fitted_error() -> None:
    est = GZSLClassifier(class_attributes=np.eye(3))
    for method in ("predict", "predict_proba", "decision_function", "transform"):
        with pytest.raises(NotFittedError):
            getattr(est, method)(np.ones((2, 3)))
    with pytest.raises(NotFittedError):
        est.score(np.ones((2, 3)), [0, 1])


def test_score_is_h_with_both_groups_and_balanced_accuracy_with_one() -> None:
    X, y, attrs, X_test, y_test = _data()
    est = GZSLClassifier(class_attributes=attrs, random_state=0, **FAST).fit(X, y)  # type: ignore[arg-type]
    scores = est.evaluate(X_test, y_test)
    assert est.score(X_test, y_test) == pytest.approx(scores.harmonic)
    seen = y_test < 4
    pred = est.predict(X_test)
    assert est.score(X_test[seen], y_test[seen]) == pytest.approx(
        balanced_accuracy_score(y_test[seen], pred[seen])
    )
    recall = recall_score(y_test, pred, labels=[4, 5], average="macro")
    assert est.score(X_test[~seen], y_test[~seen]) == pytest.approx(recall)


def test_grid_search_over_seen_classes_scores_every_fold() -> None:
    """Stratified folds of seen-class data: each fold is scored (per-class accuracy), none is NaN."""
    X, y, attrs, _, _ = _data()
    est = GZSLClassifier(class_attributes=attrs, random_state=0, **FAST)  # type: ignore[arg-type]
    search = GridSearchCV(
        est, {"alpha": [0.5, 2.0]}, cv=StratifiedKFold(2, shuffle=True, random_state=0), error_score="raise"
    )
    search.fit(X, y)
    means = search.cv_results_["mean_test_score"]
    assert np.isfinite(means).all() and ((0 <= means) & (means <= 1)).all()
    assert search.best_params_["alpha"] in (0.5, 2.0)


def test_cross_validation_over_held_out_classes_scores_them_as_unseen() -> None:
    """GroupKFold by class: each fold's test classes have no training sample, so they are unseen classes."""
    X, y, attrs, _, _ = _data()
    est = GZSLClassifier(class_attributes=attrs, random_state=0, **FAST)  # type: ignore[arg-type]
    scores = cross_val_score(est, X, y, groups=y, cv=GroupKFold(2), error_score="raise")
    assert scores.shape == (2,) and np.isfinite(scores).all()
    train, test = next(GroupKFold(2).split(X, y, groups=y))
    fitted = clone(est).fit(X[train], y[train])
    assert set(np.unique(y[test])) <= set(fitted.unseen_classes_)
    recall = recall_score(y[test], fitted.predict(X[test]), labels=np.unique(y[test]), average="macro")
    assert scores[0] == pytest.approx(recall)  # U: mean per-class accuracy of the held-out classes


def test_binary_decision_function_follows_sklearn() -> None:
    X, y, _, X_test, _ = _data()
    keep = y < 2
    est = GZSLClassifier(class_attributes="onehot", random_state=0, **FAST)  # type: ignore[arg-type]
    est.fit(X[keep], y[keep])
    decision = est.decision_function(X_test)
    assert decision.shape == (18,)
    np.testing.assert_array_equal(est.classes_[(decision > 0).astype(int)], est.predict(X_test))


def test_transform_output_and_feature_names() -> None:
    X, y, attrs, X_test, _ = _data()
    est = GZSLClassifier(class_attributes=attrs, random_state=0, **FAST).fit(X, y)  # type: ignore[arg-type]
    assert est.transform(X_test).dtype == np.float64
    assert est.transform(X_test.astype(np.float32)).dtype == np.float32
    np.testing.assert_array_equal(est.get_feature_names_out(), [f"gzslclassifier{i}" for i in range(4)])


def test_fit_argument_through_metadata_routing() -> None:
    """The older fit argument also travels through scikit-learn's metadata routing when requested."""
    X, y, attrs, _, _ = _data()
    with sklearn.config_context(enable_metadata_routing=True):
        est = GZSLClassifier(random_state=0, **FAST).set_fit_request(class_attributes=True)  # type: ignore[arg-type]
        cv = StratifiedKFold(2, shuffle=True, random_state=0)
        routed = cross_val_score(est, X, y, cv=cv, params={"class_attributes": attrs}, error_score="raise")
    plain = GZSLClassifier(class_attributes=attrs, random_state=0, **FAST)  # type: ignore[arg-type]
    np.testing.assert_allclose(routed, cross_val_score(plain, X, y, cv=cv, error_score="raise"))
