"""Drop-in for real (issue #15): PML's exact constructor calls, attribute writes and conventions on ours.

Each test builds PML's ``SoftTripleLoss`` and ours with the same call, gives them the same centres and
compares values, both gradients, ``fc``'s dtype and the recorded statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from pml_softtriple import (
    RecallAtKAccuracyCalculator,
    SoftTripleLoss,
    SparseCentersRegularizer,
    effective_center_counts,
)
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.regularizers import SparseCentersRegularizer as PMLSparseCentersRegularizer

C, D = 6, 8
REGULARIZERS = {"pml_regularizer": PMLSparseCentersRegularizer, "our_regularizer": SparseCentersRegularizer}

# PML's own ways of building the loss (keyword arguments after num_classes, embedding_size), given the
# regulariser class to use: PML's in PML's loss, PML's or ours in ours.
PML_CALLS: dict[str, Callable[[type], dict[str, Any]]] = {
    "regularizer_and_weight": lambda reg: {
        "centers_per_class": 3,
        "weight_regularizer": reg(C, 3),
        "weight_reg_weight": 0.2,
    },
    "regularizer_default_weight_1": lambda reg: {"centers_per_class": 3, "weight_regularizer": reg(C, 3)},
    "numpy_scalars": lambda reg: {
        "centers_per_class": np.int64(2),
        "la": np.float32(15.0),
        "gamma": np.float64(0.05),
        "margin": np.float64(0.02),  # PML cannot assign a numpy float32 into a float64 tensor
        "weight_regularizer": reg(np.int64(C), np.int64(2)),
        "weight_reg_weight": np.float32(0.5),
    },
    "regularizer_none": lambda reg: {"centers_per_class": 4, "weight_regularizer": None},
    "regularizer_weight_0": lambda reg: {
        "centers_per_class": 2,
        "weight_regularizer": reg(C, 2),
        "weight_reg_weight": 0,
    },
    "one_center_per_class": lambda reg: {"centers_per_class": 1, "la": 10},
}


def _pair(call: Callable[[type], dict[str, Any]], ours_reg: type) -> tuple[SoftTripleLoss, torch.nn.Module]:
    pml = pml_losses.SoftTripleLoss(np.int64(C), D, **call(PMLSparseCentersRegularizer)).double()
    ours = SoftTripleLoss(np.int64(C), D, **call(ours_reg)).double()
    ours.fc.data.copy_(pml.fc.data)
    return ours, pml


def _value_and_grads(loss: torch.nn.Module, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(12, D, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (12,), generator=gen)
    value = loss(x, y)
    return (value.detach(), *torch.autograd.grad(value, (x, loss.fc)))


@pytest.mark.parametrize("ours_reg", REGULARIZERS.values(), ids=REGULARIZERS.keys())
@pytest.mark.parametrize("call", PML_CALLS.values(), ids=PML_CALLS.keys())
def test_pml_constructor_calls_give_pmls_loss(call, ours_reg, implementation):
    ours, pml = _pair(call, ours_reg)
    assert ours.weight_reg_weight == pytest.approx(
        float(pml.weight_reg_weight) if pml.weight_regularizer else 0
    )
    for got, want in zip(_value_and_grads(ours), _value_and_grads(pml), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_setting_tau_later_does_what_it_says(implementation):
    plain = SoftTripleLoss(C, D, centers_per_class=3, tau=0).double()
    pml = pml_losses.SoftTripleLoss(
        C, D, centers_per_class=3, weight_regularizer=PMLSparseCentersRegularizer(C, 3), weight_reg_weight=0.3
    ).double()
    plain.fc.data.copy_(pml.fc.data)
    without = _value_and_grads(plain)
    assert plain.weight_regularizer is None and plain.sub_loss_names() == ["loss"]

    plain.tau = 0.3  # adds the paper's regulariser, weighted 0.3
    assert isinstance(plain.weight_regularizer, SparseCentersRegularizer)
    assert plain.sub_loss_names() == ["loss", "weight_reg_loss"]
    for got, want in zip(_value_and_grads(plain), _value_and_grads(pml), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)

    plain.weight_reg_weight = 0  # PML's name, the same number
    assert plain.tau == 0
    for got, want in zip(_value_and_grads(plain), without, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_one_center_per_class_has_no_regulariser_to_weight():
    loss = SoftTripleLoss(C, D, centers_per_class=1)
    assert loss.tau == 0 and loss.weight_regularizer is None
    loss.tau = 0.0  # still fine
    with pytest.raises(ValueError, match=r"needs centers_per_class >= 2 \(R divides by K - 1\)"):
        loss.tau = 0.2
    assert loss.tau == 0 and loss.weight_regularizer is None


def test_fc_follows_the_embeddings_dtype_like_pmls_cast_types():
    ours = SoftTripleLoss(C, D, centers_per_class=2, weight_regularizer=PMLSparseCentersRegularizer(C, 2))
    pml = pml_losses.SoftTripleLoss(
        C, D, centers_per_class=2, weight_regularizer=PMLSparseCentersRegularizer(C, 2)
    )
    ours.fc.data.copy_(pml.fc.data)
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.1)  # holds fc before its dtype changes
    y = torch.randint(0, C, (5,))
    for dtype in (torch.float64, torch.float16, torch.float32):
        x = torch.randn(5, D, dtype=dtype)
        ours(x, y).backward()
        pml(x, y)
        assert ours.fc.dtype == pml.fc.dtype == dtype
        assert ours.fc.grad.dtype == dtype
        optimizer.step()  # the optimizer keeps working on the cast parameter
        optimizer.zero_grad(set_to_none=True)
        assert torch.isfinite(ours.fc).all()


def test_fc_keeps_its_dtype_under_autocast():
    loss = SoftTripleLoss(C, D, centers_per_class=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(torch.nn.Linear(D, D)(torch.randn(5, D)), torch.randint(0, C, (5,)))
    assert loss.fc.dtype == torch.float32 and value.dtype == torch.float32


@pytest.mark.parametrize("k", [2, 3])
def test_collect_stats_records_pmls_regulariser_statistics(k):
    pml = pml_losses.SoftTripleLoss(
        C, D, centers_per_class=k, weight_regularizer=PMLSparseCentersRegularizer(C, k, collect_stats=True)
    )
    built_in = SoftTripleLoss(
        C, D, centers_per_class=k, collect_stats=True
    )  # default regulariser inherits it
    ours_pml_reg = SoftTripleLoss(
        C, D, centers_per_class=k, weight_regularizer=PMLSparseCentersRegularizer(C, k, collect_stats=True)
    )
    not_collecting = SoftTripleLoss(C, D, centers_per_class=k)
    x, y = torch.randn(8, D), torch.randint(0, C, (8,))
    for loss in (built_in, ours_pml_reg, not_collecting):
        loss.fc.data.copy_(pml.fc.data)
        loss(x, y)
    pml(x, y)
    names = ["same_class_center_sim", "diff_class_center_sim"]
    assert pml.weight_regularizer._record_these_stats == names
    for loss in (built_in, ours_pml_reg):
        assert loss.weight_regularizer._record_these_stats == names
        for name in names:
            got, want = getattr(loss.weight_regularizer, name), getattr(pml.weight_regularizer, name)
            assert isinstance(got, float) and got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert not getattr(not_collecting.weight_regularizer, "_record_these_stats", [])
    assert not hasattr(not_collecting.weight_regularizer, "same_class_center_sim")


def test_numpy_scalars_elsewhere_in_the_plugin():
    calc = RecallAtKAccuracyCalculator(recall_ks=(np.int64(2), 1))
    assert calc.recall_ks == (1, 2) and all(type(k) is int for k in calc.recall_ks)
    centers = torch.randn(3, 4, 5)
    assert torch.equal(
        effective_center_counts(centers, np.float32(0.5)), effective_center_counts(centers, 0.5)
    )
    with pytest.raises(ValueError, match="threshold must be a cosine similarity"):
        effective_center_counts(centers, True)
