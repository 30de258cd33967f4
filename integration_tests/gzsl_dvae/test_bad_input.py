"""Bad and edge-case input to every public entry of gzsl_dvae: one table, docs/reliability.md's policy.

Each case is ``id -> (callable, expected)``: ``expected`` is an exception type and a message fragment (a clear
error), or ``HANDLED`` with a predicate on the returned value (a handled result, e.g. the parameters unchanged
and finite after a skipped step).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from gzsl_dvae import (
    DisentangledVAE,
    GaussianKLLoss,
    GaussianWassersteinLoss,
    GZSLClassifier,
    ReconstructionLoss,
    ShufflingClassificationLoss,
    evaluate_gzsl,
    harmonic_mean,
    train_vae,
)
from sklearn.exceptions import NotFittedError

HANDLED = "handled"
SMALL = {"latent_dim": 4, "visual_hidden": (16, 16), "attribute_hidden": (8, 8)}
FAST = {**SMALL, "epochs": 2, "batch_size": 16, "lr": 3e-3, "classifier_epochs": 1}
FAST |= {"seen_visual_samples": 8, "unseen_semantic_samples": 8, "random_state": 0}


def _model(**kwargs: Any) -> DisentangledVAE:
    torch.manual_seed(0)
    return DisentangledVAE(8, 5, 3, **SMALL, **kwargs)  # type: ignore[arg-type]


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 8, generator=g), torch.rand(n, 5, generator=g), torch.arange(n) % 3


def _with(index: int, value: Any, n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The standard batch with entry ``index`` (0: x, 1: c, 2: labels) replaced."""
    parts = list(_batch(n))
    parts[index] = value
    return parts[0], parts[1], parts[2]


def _poison(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[1] = value
    return t


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _step_rejected_then_params_unchanged() -> bool:
    """A training step on a NaN batch: the forward raises, Adam never steps, parameters stay as they were."""
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(*_batch())["loss"].backward()  # a finite step first, so Adam has state
    optimizer.step()
    before = _params(model)
    x, c, y = _batch()
    try:
        optimizer.zero_grad()
        model(_poison(x, float("nan")), c, y)["loss"].backward()
        optimizer.step()
    except ValueError:
        pass
    after = _params(model)
    state_finite = all(torch.isfinite(v).all() for s in optimizer.state.values() for v in s.values())
    return state_finite and all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def _grad_scaler_skips_nan_step() -> bool:
    """validate_args=False hands a NaN loss to the caller; GradScaler skips that optimizer step."""
    model = _model(validate_args=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    before = _params(model)
    x, c, y = _batch()
    loss = model(_poison(x, float("nan")), c, y)["loss"]
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return not bool(torch.isfinite(loss)) and all(
        torch.equal(a, b) for a, b in zip(_params(model), before, strict=True)
    )


def _train_features(n: int = 32, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 3
    attrs = rng.random((3, 5))
    return (scale * rng.random((n, 8))).astype(np.float32), labels, attrs


def _train_vae_deferred_check() -> bool:
    """validate_args=False: no per-step sync; the epoch ends with FloatingPointError, parameters finite."""
    model = _model()
    feats, labels, attrs = _train_features(scale=1e20)
    try:
        train_vae(model, feats, labels, attrs, epochs=1, batch_size=16, validate_args=False)
    except FloatingPointError as err:
        named = "epoch 0, step 0" in str(err)
        return named and all(torch.isfinite(p).all() for p in model.parameters())
    return False


def _gzsl_data(n_per_class: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    attrs = rng.random((4, 5))
    y = np.repeat(np.arange(3), n_per_class)  # class 3 is unseen
    return attrs[y] @ rng.random((5, 8)) + 0.05 * rng.standard_normal((y.size, 8)), y, attrs


@functools.cache
def _fitted() -> GZSLClassifier:
    X, y, attrs = _gzsl_data()
    return GZSLClassifier(class_attributes=attrs, **FAST).fit(X, y)  # type: ignore[arg-type]


def _fit(X: Any = None, y: Any = None, **params: Any) -> GZSLClassifier:
    X0, y0, attrs = _gzsl_data()
    params = {"class_attributes": attrs, **FAST, **params}
    return GZSLClassifier(**params).fit(X0 if X is None else X, y0 if y is None else y)


def _nan_x() -> np.ndarray:
    X, _, _ = _gzsl_data()
    X[3, 2] = np.nan
    return X


def _fitted_state_unchanged_after_rejected_predict() -> bool:
    est = _fitted()
    before = _params(est.model_) + _params(est.classifier_)
    try:
        est.predict(_nan_x())
    except ValueError:
        pass
    after = _params(est.model_) + _params(est.classifier_)
    return all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def _failed_refit_keeps_the_fitted_model() -> bool:
    """A refit stopped by a non-finite loss leaves the earlier fit in place (classes, model, predictions)."""
    X, y, attrs = _gzsl_data()
    est = GZSLClassifier(class_attributes=attrs, **FAST).fit(X, y)  # type: ignore[arg-type]
    before, model = est.decision_function(X), est.model_
    try:
        est.fit(X, np.where(y == 2, 3, y), class_attributes=attrs * 1e20)  # overflows: inf loss at step 0
    except FloatingPointError:
        pass
    unchanged = est.model_ is model and np.array_equal(est.unseen_classes_, [3])
    return unchanged and np.array_equal(est.decision_function(X), before)


nan, inf = float("nan"), float("inf")
x0, c0, y0 = _batch()
mu = torch.zeros(4, 3)
CASES: dict[str, tuple[Callable[[], Any], Any]] = {
    # --- DisentangledVAE: non-finite, empty, batch of 1, rank, width, dtype, labels, lengths
    "dvae_nan_x": (lambda: _model()(*_with(0, _poison(x0, nan))), (ValueError, "`x` contains non-finite")),
    "dvae_inf_c": (lambda: _model()(*_with(1, _poison(c0, -inf))), (ValueError, "`c` contains non-finite")),
    "dvae_empty_batch": (lambda: _model()(*_batch(0)), (ValueError, "empty batch")),
    "dvae_batch_of_1": (
        lambda: _model()(*_batch(1))["loss"],
        (HANDLED, lambda loss: loss.shape == () and bool(torch.isfinite(loss))),
    ),
    "dvae_wrong_rank": (lambda: _model()(*_with(0, x0[0])), (ValueError, "must have 2 dimensions")),
    "dvae_wrong_width": (lambda: _model()(*_with(0, x0[:, :7])), (ValueError, "visual_dim=8 columns, got 7")),
    "dvae_float64_x": (lambda: _model()(*_with(0, x0.double())), (TypeError, "module.to(torch.float64)")),
    "dvae_int64_x": (lambda: _model()(*_with(0, x0.long())), (TypeError, "floating-point tensor")),
    "dvae_label_out_of_range": (lambda: _model()(*_with(2, y0 + 1)), (ValueError, "[0, 3); got 3")),
    "dvae_label_negative": (lambda: _model()(*_with(2, y0 - 1)), (ValueError, "got -1")),
    "dvae_label_float": (lambda: _model()(*_with(2, y0.float())), (TypeError, "integer tensor")),
    "dvae_rows_mismatch": (lambda: _model()(*_with(1, c0[:5])), (ValueError, "same number of rows")),
    "dvae_labels_short": (
        lambda: _model()(*_with(2, y0[:5])),
        (ValueError, "`labels` must be a tensor"),
    ),
    "dvae_nan_step_never_reaches_params": (_step_rejected_then_params_unchanged, (HANDLED, bool)),
    "dvae_unchecked_nan_step_skipped_by_grad_scaler": (_grad_scaler_skips_nan_step, (HANDLED, bool)),
    # --- the losses
    "kl_nan_mu": (lambda: GaussianKLLoss()(_poison(mu, nan), mu), (ValueError, "`mu` contains non-finite")),
    "kl_shape_mismatch": (lambda: GaussianKLLoss()(mu, mu[:, :2]), (ValueError, "equal shapes")),
    "kl_integer_input": (lambda: GaussianKLLoss()(mu.long(), mu), (TypeError, "floating-point")),
    "kl_unchecked_nan_returned_to_caller": (
        lambda: GaussianKLLoss(validate_args=False)(_poison(mu, nan), mu),
        (HANDLED, lambda v: bool(torch.isnan(v))),
    ),
    "wasserstein_inf_logvar": (
        lambda: GaussianWassersteinLoss()(mu, mu, mu, _poison(mu, inf)),
        (ValueError, "`logvar2` contains non-finite"),
    ),
    "wasserstein_wrong_rank": (
        lambda: GaussianWassersteinLoss()(mu[0], mu, mu, mu),
        (ValueError, "2 dimensions"),
    ),
    "reconstruction_nan_target": (
        lambda: ReconstructionLoss()(mu, _poison(mu, nan)),
        (ValueError, "`target` contains non-finite"),
    ),
    "reconstruction_huge_finite_accepted": (  # their sum overflows float32: the exact check still passes them
        lambda: ReconstructionLoss(reduction="none")(torch.full((2, 2), 3e38), torch.full((2, 2), 3e38)),
        (HANDLED, lambda v: torch.equal(v, torch.zeros(2))),
    ),
    "shuffling_nan_z_p": (
        lambda: ShufflingClassificationLoss(3, 3)(mu, _poison(mu, nan), torch.arange(4) % 3),
        (ValueError, "`z_p` contains non-finite"),
    ),
    "shuffling_label_out_of_range": (
        lambda: ShufflingClassificationLoss(3, 3)(mu, mu, torch.tensor([0, 1, 2, 7])),
        (ValueError, "got 7"),
    ),
    "shuffling_permutation_out_of_range": (
        lambda: ShufflingClassificationLoss(3, 3)(mu, mu, torch.arange(4) % 3, torch.tensor([0, 1, 2, 9])),
        (ValueError, "permutation of range(4)"),
    ),
    "shuffling_empty_batch": (
        lambda: ShufflingClassificationLoss(3, 3)(mu[:0], mu[:0], torch.arange(0)),
        (HANDLED, lambda v: v.item() == 0.0),  # a sum over no samples, as torch's reduction="sum"
    ),
    # --- metrics raise rather than lie
    "evaluate_gzsl_empty": (lambda: evaluate_gzsl([], [], [0, 1], [2]), (ValueError, "`y_true` is empty")),
    "harmonic_mean_nan": (lambda: harmonic_mean(nan, 0.5), (ValueError, "`unseen` must be an accuracy")),
    "harmonic_mean_inf": (lambda: harmonic_mean(0.5, inf), (ValueError, "`seen` must be an accuracy")),
    "evaluate_gzsl_float_labels": (
        lambda: evaluate_gzsl([0.5, 1], [0, 1], [0, 1], [2]),
        (TypeError, "integer"),
    ),
    "evaluate_gzsl_lengths": (lambda: evaluate_gzsl([0, 1], [0], [0, 1], [2]), (ValueError, "2 entries")),
    "evaluate_gzsl_stray_label": (
        lambda: evaluate_gzsl([0, 9], [0, 1], [0, 1], [2]),
        (ValueError, "neither"),
    ),
    # --- training helpers stop at the first non-finite loss (rule 5)
    "train_vae_nan_features": (
        lambda: train_vae(_model(), _poison(torch.rand(32, 8), nan), np.arange(32) % 3, np.ones((3, 5))),
        (ValueError, "`features` contains NaN"),
    ),
    "train_vae_non_finite_loss": (
        lambda: train_vae(_model(), *_train_features(scale=1e20), epochs=1, batch_size=16),
        (FloatingPointError, "at epoch 0, step 0; the parameters are those of the last finite step"),
    ),
    "train_vae_unchecked_non_finite_loss": (_train_vae_deferred_check, (HANDLED, bool)),
    # --- the estimator
    "fit_nan_X": (lambda: _fit(X=_nan_x()), (ValueError, "Input X contains NaN")),
    "fit_non_finite_loss": (
        lambda: _fit(X=_gzsl_data()[0] * 1e20, feature_scaling=None),
        (FloatingPointError, "at epoch 0, step 0"),
    ),
    "fit_nan_attributes": (
        lambda: _fit(class_attributes=_poison(torch.ones(4, 5), nan).numpy()),
        (ValueError, "Input class_attributes contains NaN"),
    ),
    "fit_without_attributes": (lambda: _fit(class_attributes=None), (ValueError, "needs `class_attributes`")),
    "fit_one_class": (
        lambda: _fit(y=np.zeros(24, dtype=int)),
        (ValueError, "at least 2 classes"),
    ),
    "fit_lengths": (lambda: _fit(y=np.zeros(23, dtype=int)), (ValueError, "inconsistent numbers of samples")),
    "fit_continuous_y": (lambda: _fit(y=np.linspace(0, 1, 24)), (ValueError, "Unknown label type")),
    "fit_empty": (lambda: _fit(X=np.zeros((0, 8)), y=np.zeros(0, dtype=int)), (ValueError, "0 sample")),
    "fit_label_without_row": (lambda: _fit(y=np.repeat([0, 1, 7], 8)), (ValueError, "missing class(es) [7]")),
    "fit_classes_length": (lambda: _fit(classes=[0, 1, 2]), (ValueError, "one label per row")),
    "predict_before_fit": (lambda: GZSLClassifier().predict(np.ones((2, 8))), (NotFittedError, "not fitted")),
    "predict_wrong_width": (lambda: _fitted().predict(np.ones((2, 7))), (ValueError, "expecting 8 features")),
    "predict_nan_state_unchanged": (_fitted_state_unchanged_after_rejected_predict, (HANDLED, bool)),
    "refit_non_finite_loss_keeps_fit": (_failed_refit_keeps_the_fitted_model, (HANDLED, bool)),
    "score_unknown_label": (
        lambda: _fitted().score(np.ones((2, 8)), [0, 9]),
        (ValueError, "labels unknown to the fitted classifier: [9]"),
    ),
    "predict_batch_of_1": (lambda: _fitted().predict(np.ones((1, 8))), (HANDLED, lambda p: p.shape == (1,))),
}


def test_case_count() -> None:
    outcomes = [expected[0] == HANDLED for _, expected in CASES.values()]
    assert len(CASES) >= 25
    assert sum(outcomes) >= 5 and len(outcomes) - sum(outcomes) >= 20


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input(case: str) -> None:
    call, (expected, check) = CASES[case]
    if expected == HANDLED:
        assert check(call()), f"{case}: unexpected handled result"
    else:
        with pytest.raises(expected, match=re.escape(check)):
            call()
