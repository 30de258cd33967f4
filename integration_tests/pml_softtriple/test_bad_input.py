"""Bad and edge-case input to ``SoftTripleLoss`` (docs/reliability.md): one table, both implementations.

Each case is a call and what must come of it: a clear error (exception type and a fragment of the message
naming the argument) or a handled result (a check on what the call returned). Every case runs through the
fused CPU kernels and through the PyTorch path (the ``implementation`` fixture); where the two differ by
design, the case says so with one expectation per implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pml_softtriple import SoftTripleLoss
from pytorch_metric_learning.distances import LpDistance

from integration_tests.helpers.bad_input import Handled, Raises, check_outcome

C, D, K, B = 4, 5, 3, 4
NAN, INF = float("nan"), float("inf")


Expected = Raises | Handled | dict[str, Raises | Handled]  # a dict: one expectation per implementation


def _loss(**kwargs: Any) -> SoftTripleLoss:
    torch.manual_seed(0)
    return SoftTripleLoss(C, D, centers_per_class=K, **kwargs)


def _x(batch: int = B, **kwargs: Any) -> torch.Tensor:
    return torch.randn(batch, D, generator=torch.Generator().manual_seed(1), **kwargs)


def _y(batch: int = B) -> torch.Tensor:
    return torch.arange(batch) % C


def _with(value: float, row: int = 2, col: int | None = None) -> torch.Tensor:
    x = _x()
    if col is None:
        x[row] = value
    else:
        x[row, col] = value
    return x


def _formula(loss: SoftTripleLoss, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss from get_logits and PML's margin cross-entropy (no regulariser: tau=0 where used)."""
    logits = loss.la * (loss.get_logits(x) - loss.margin * F.one_hot(y, C))
    return F.cross_entropy(logits, y)


def _batch_of_one() -> bool:
    loss = _loss(tau=0.0)
    x, y = _x(1), torch.tensor([2])
    return bool(torch.allclose(loss(x, y), _formula(loss, x, y), rtol=1e-5, atol=1e-6))


def _numpy_hyperparameters() -> bool:
    ours = SoftTripleLoss(
        np.int64(C), np.int64(D), np.int64(K), la=np.float32(10), gamma=np.float64(0.2), margin=np.float32(0)
    )
    plain = SoftTripleLoss(C, D, K, la=10.0, gamma=0.2, margin=0.0)
    plain.load_state_dict(ours.state_dict())
    return type(ours.num_classes) is int and bool(torch.equal(ours(_x(), _y()), plain(_x(), _y())))


def _validate_args_false_matches() -> bool:
    checked, unchecked = _loss(), _loss(validate_args=False)
    return bool(torch.equal(checked(_x(), _y()), unchecked(_x(), _y())))


def _set_tau(loss: SoftTripleLoss, value: Any) -> None:
    loss.tau = value


def _state_after_rejected_batch() -> bool:
    """A NaN batch is refused before any gradient exists; the optimizer step that follows changes nothing."""
    model, loss = torch.nn.Linear(D, D), _loss()
    optimizer = torch.optim.SGD([*model.parameters(), *loss.parameters()], lr=0.1)
    before = [p.detach().clone() for p in (*model.parameters(), *loss.parameters())]
    x = _x()
    x[1, 3] = NAN
    try:
        loss(model(x), _y()).backward()
    except ValueError:
        pass
    else:
        return False
    optimizer.step()
    after = [p.detach() for p in (*model.parameters(), *loss.parameters())]
    unchanged = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    return (
        unchanged
        and all(p.grad is None for p in loss.parameters())
        and all(torch.isfinite(p).all() for p in after)
    )


def _grad_scaler_skips_unchecked_nan() -> bool:
    """validate_args=False: the NaN reaches the gradients, GradScaler skips the step, parameters stay."""
    model, loss = torch.nn.Linear(D, D), _loss(validate_args=False)
    params = [*model.parameters(), *loss.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().clone() for p in params]
    value = loss(model(_with(NAN)), _y())
    scaler.scale(value).backward()
    scaler.step(optimizer)
    scaler.update()
    unchanged = all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))
    return bool(not torch.isfinite(value)) and unchanged


EMB_SHAPE = r"embeddings must have shape \(batch_size, embedding_size=5\), got "
LABEL_RANGE = r"labels must lie in \[0, num_classes=4\), got values in "
NONFINITE = Raises(ValueError, r"^SoftTripleLoss: embeddings contain NaN or Inf")
CASES: list[tuple[str, Callable[[], Any], Expected]] = [
    # ---- non-finite and extreme values
    ("nan_row", lambda: _loss()(_with(NAN), _y()), NONFINITE),
    ("posinf_row", lambda: _loss()(_with(INF), _y()), NONFINITE),
    ("one_neginf_element", lambda: _loss()(_with(-INF, row=0, col=4), _y()), NONFINITE),
    (
        "huge_but_finite",  # the quick finiteness tests overflow here; the exact check must clear them
        lambda: _loss()(torch.full((B, D), 1e38), _y()),
        Handled(lambda v: bool(torch.isfinite(v)), "a finite loss"),
    ),
    (
        "zero_embedding_row",
        lambda: _loss()(_with(0.0), _y()),
        Handled(lambda v: bool(torch.isfinite(v)), "a finite loss (normalise clamps the norm)"),
    ),
    # ---- batch size
    ("empty_batch", lambda: _loss()(_x(0), _y(0)), Raises(ValueError, r"empty batch \(batch_size = 0\)")),
    ("batch_of_one", _batch_of_one, Handled(bool, "the one-sample formula")),
    # ---- rank, feature size, dtype of the embeddings
    ("embeddings_rank_1", lambda: _loss()(torch.randn(D), _y()), Raises(ValueError, EMB_SHAPE + r"\(5,\)")),
    ("embeddings_rank_3", lambda: _loss()(torch.randn(B, 1, D), _y()), Raises(ValueError, EMB_SHAPE)),
    (
        "wrong_feature_size",
        lambda: _loss()(torch.randn(B, 6), _y()),
        Raises(ValueError, EMB_SHAPE + r"\(4, 6\)"),
    ),
    (
        "integer_embeddings",
        lambda: _loss()(torch.ones(B, D, dtype=torch.long), _y()),
        Raises(TypeError, "embeddings must be a floating tensor, got dtype torch.int64"),
    ),
    (
        "bool_embeddings",
        lambda: _loss()(torch.ones(B, D, dtype=torch.bool), _y()),
        Raises(TypeError, "embeddings must be a floating tensor"),
    ),
    (
        "embeddings_list",
        lambda: _loss()(_x().tolist(), _y()),
        Raises(TypeError, "embeddings must be a torch.Tensor"),
    ),
    (
        "float64_embeddings_cast_the_centres",  # PML's cast_types: fc follows the embeddings' dtype
        lambda: (lambda loss: (loss(_x(dtype=torch.float64), _y()), loss.fc))(_loss()),
        Handled(lambda out: out[0].dtype == out[1].dtype == torch.float64, "float64 loss and fc"),
    ),
    (
        "float16_embeddings_compute_in_float32",
        lambda: _loss()(_x().half(), _y()),
        Handled(lambda v: v.dtype == torch.float32 and bool(torch.isfinite(v)), "a finite float32 loss"),
    ),
    # ---- labels
    (
        "labels_float",
        lambda: _loss()(_x(), _y().float()),
        Raises(TypeError, "labels must be an integer tensor"),
    ),
    ("labels_bool", lambda: _loss()(_x(), _y() > 1), Raises(TypeError, "labels must be an integer tensor")),
    ("labels_list", lambda: _loss()(_x(), [0, 1, 2, 3]), Raises(TypeError, "labels must be a torch.Tensor")),
    (
        "labels_too_large",
        lambda: _loss()(_x(), torch.tensor([0, 1, 4, 2])),
        Raises(ValueError, LABEL_RANGE + r"\[0, 4\]"),
    ),
    (
        "labels_negative",
        lambda: _loss()(_x(), torch.tensor([0, -1, 3, 2])),
        Raises(ValueError, LABEL_RANGE + r"\[-1, 3\]"),
    ),
    (
        "labels_int32_in_range",
        lambda: (_loss()(_x(), _y().int()), _loss()(_x(), _y())),
        Handled(lambda out: bool(torch.equal(*out)), "the int64 result"),
    ),
    (
        "labels_one_short",
        lambda: _loss()(_x(), _y(3)),
        Raises(ValueError, r"labels must have shape \(batch_size=4,\) like the embeddings, got \(3,\)"),
    ),
    ("labels_rank_2", lambda: _loss()(_x(), _y()[:, None]), Raises(ValueError, r"got \(4, 1\)")),
    ("labels_scalar", lambda: _loss()(_x(), torch.tensor(1)), Raises(ValueError, r"got \(\)")),
    ("labels_missing", lambda: _loss()(_x()), Raises(ValueError, "labels are required")),
    (
        "ref_emb",
        lambda: _loss()(_x(), _y(), ref_emb=_x(), ref_labels=_y()),
        Raises(ValueError, "ref_emb is not supported"),
    ),
    # ---- miner indices
    (
        "indices_out_of_range",
        lambda: _loss()(_x(), _y(), (torch.tensor([0, 1]), torch.tensor([2, 4]), torch.tensor([3, 3]))),
        Raises(
            ValueError,
            r"indices_tuple must index the batch, values in \[0, batch_size=4\), got values in \[0, 4\]",
        ),
    ),
    (
        "indices_negative",  # PML would silently wrap -1 around to the last sample
        lambda: _loss()(_x(), _y(), (torch.tensor([-1]), torch.tensor([1]), torch.tensor([2]))),
        Raises(ValueError, r"got values in \[-1, 2\]"),
    ),
    (
        "indices_float",
        lambda: _loss()(_x(), _y(), (torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([2.0]))),
        Raises(TypeError, "indices_tuple must hold integer tensors"),
    ),
    (
        "indices_not_tensors",
        lambda: _loss()(_x(), _y(), ([0], [1], [2])),
        Raises(TypeError, "tuple of index tensors"),
    ),
    (
        "get_logits_wrong_shape",
        lambda: _loss().get_logits(torch.randn(3, 4)),
        Raises(ValueError, r"get_logits: embeddings"),
    ),
    # ---- hyperparameters
    (
        "num_classes_zero",
        lambda: SoftTripleLoss(0, D),
        Raises(ValueError, "num_classes must be an int >= 1, got 0"),
    ),
    (
        "num_classes_bool",
        lambda: SoftTripleLoss(True, D),
        Raises(TypeError, "num_classes must be an int >= 1, got bool"),
    ),
    (
        "embedding_size_float",
        lambda: SoftTripleLoss(C, 2.5),
        Raises(TypeError, "embedding_size must be an int"),
    ),
    (
        "centers_per_class_numpy_zero",
        lambda: SoftTripleLoss(C, D, centers_per_class=np.int64(0)),
        Raises(ValueError, "centers_per_class must be an int >= 1"),
    ),
    ("la_zero", lambda: SoftTripleLoss(C, D, la=0.0), Raises(ValueError, "la must be > 0")),
    (
        "la_string",
        lambda: SoftTripleLoss(C, D, la="20"),
        Raises(TypeError, "la must be a real number, got str"),
    ),
    (
        "gamma_nan",
        lambda: SoftTripleLoss(C, D, gamma=NAN),
        Raises(ValueError, "gamma must be a finite number"),
    ),
    (
        "gamma_numpy_inf",
        lambda: SoftTripleLoss(C, D, gamma=np.float32(INF)),
        Raises(ValueError, "gamma must be a finite"),
    ),
    (
        "margin_negative",
        lambda: SoftTripleLoss(C, D, margin=-0.01),
        Raises(ValueError, "margin must be >= 0"),
    ),
    ("tau_negative", lambda: SoftTripleLoss(C, D, tau=-1.0), Raises(ValueError, "tau must be >= 0")),
    (
        "weight_reg_weight_nan",
        lambda: SoftTripleLoss(C, D, weight_reg_weight=NAN),
        Raises(ValueError, "weight_reg_weight must be a finite number"),
    ),
    (
        "tau_and_weight_reg_weight",
        lambda: SoftTripleLoss(C, D, tau=0.2, weight_reg_weight=0.2),
        Raises(TypeError, "tau and weight_reg_weight are two names"),
    ),
    (
        "tau_with_one_center",
        lambda: SoftTripleLoss(C, D, centers_per_class=1, tau=0.2),
        Raises(ValueError, r"needs centers_per_class >= 2"),
    ),
    (
        "tau_set_later_with_one_center",
        lambda: _set_tau(SoftTripleLoss(C, D, centers_per_class=1), 0.2),
        Raises(ValueError, r"must be 0 for centers_per_class=1"),
    ),
    ("tau_set_to_nan", lambda: _set_tau(_loss(), NAN), Raises(ValueError, "tau must be a finite number")),
    (
        "distance_not_cosine",
        lambda: SoftTripleLoss(C, D, distance=LpDistance()),
        Raises(ValueError, "only CosineSimilarity"),
    ),
    (
        "weight_regularizer_not_a_regularizer",
        lambda: SoftTripleLoss(C, D, weight_regularizer="sparse"),
        Raises(TypeError, "weight_regularizer must be a pytorch_metric_learning regularizer"),
    ),
    (
        "validate_args_not_bool",
        lambda: _loss(validate_args=1),
        Raises(TypeError, "validate_args must be a bool"),
    ),
    ("numpy_hyperparameters", _numpy_hyperparameters, Handled(bool, "the same loss as Python scalars")),
    # ---- state and the validate_args switch
    (
        "state_after_rejected_nan_batch_and_step",
        _state_after_rejected_batch,
        Handled(bool, "parameters unchanged"),
    ),
    ("validate_args_false_same_value", _validate_args_false_matches, Handled(bool, "the checked value")),
    (
        "validate_args_false_nan_then_grad_scaler",
        _grad_scaler_skips_unchecked_nan,
        {
            "cpu_kernels": NONFINITE,  # the kernels check in their own pass, always (no synchronisation)
            "pytorch": Handled(bool, "a NaN loss, the step skipped, parameters unchanged"),
        },
    ),
]


@pytest.mark.parametrize(("call", "expected"), [pytest.param(c, e, id=i) for i, c, e in CASES])
def test_bad_input(call: Callable[[], Any], expected: Expected, implementation: str) -> None:
    if isinstance(expected, dict):
        expected = expected[implementation]
    check_outcome(call, expected)


def test_the_table_covers_the_policy() -> None:
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids)) >= 25
    raises = sum(isinstance(e, Raises) for _, _, e in CASES)
    assert raises >= 20 and len(CASES) - raises >= 5
