"""Bad and edge-case input to timm_mdn's public entries, as one table (docs/reliability.md).

Each case is a callable and either the exception it must raise (type and message fragment) or a check of the
result it must handle. Cases that reject a batch also check the state afterwards: the running beta, the kernel
buffers and the parameters are finite and unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import timm_mdn
import torch
from timm_mdn import (
    MetadataKernel,
    MetadataNorm,
    MetadataNorm1d,
    MetadataNorm2d,
    MetadataNormAct2d,
    convert_metadata_norm,
    distance_correlation_sqr,
    load_weights,
)
from torch import nn

from integration_tests.timm_mdn.toy import toy_kernel as _kernel

NAN, INF = float("nan"), float("inf")


KERNEL, DESIGN = _kernel()


def _trained(cls: type = MetadataNorm2d, **kwargs: object) -> nn.Module:
    """A layer that has seen one finite training batch of (6, 4, 3, 3) features (or (6, 4))."""
    layer = cls(4, kernel=KERNEL, **kwargs)
    layer.metadata = DESIGN[:6]
    layer(torch.randn(6, 4, 3, 3) if cls is MetadataNorm2d else torch.randn(6, 4))
    return layer


def _with_nan(shape: tuple[int, ...], value: float = NAN) -> torch.Tensor:
    x = torch.randn(*shape)
    x.view(-1)[5] = value
    return x


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _unchanged_and_finite(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = module.state_dict()
    return after.keys() == before.keys() and all(
        torch.equal(after[k], before[k]) and (not v.is_floating_point() or bool(torch.isfinite(v).all()))
        for k, v in before.items()
    )


@dataclass
class Case:
    """``run()`` raises ``raises`` matching ``match`` (then ``after()`` holds), or ``check(run())`` holds."""

    run: Callable[[], object]
    raises: type[Exception] | None = None
    match: str = ""
    check: Callable[[object], bool] | None = None
    after: Callable[[], bool] | None = None


def _rejected_batch(x: torch.Tensor, metadata: torch.Tensor = DESIGN[:6]) -> Case:
    """Training forward of a non-finite batch: a clear error, and the layer's state untouched."""
    layer = _trained()
    before = _state(layer)

    def run() -> object:
        layer.metadata = metadata
        return layer(x)

    return Case(run, ValueError, "non-finite|inf or NaN", after=lambda: _unchanged_and_finite(layer, before))


def _skipped_batch() -> Case:
    """validate_args=False: no check, no sync; the running beta is not updated from the NaN batch."""
    layer = _trained(validate_args=False)
    before = _state(layer)

    def run() -> object:
        layer.metadata = DESIGN[:6]
        return layer(_with_nan((6, 4, 3, 3)))

    return Case(run, check=lambda out: bool(torch.isnan(out).any()) and _unchanged_and_finite(layer, before))


def _optimizer_step_on_nan(validate_args: bool) -> Case:
    """One training step on a NaN image never writes NaN into the parameters or the running betas."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        MetadataNorm2d(4, kernel=KERNEL, affine=True, validate_args=validate_args),
    )
    model[1].metadata = DESIGN[:6]
    model(torch.randn(6, 3, 3, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    before = _state(model)

    def run() -> object:
        optimizer.zero_grad()
        loss = model(_with_nan((6, 3, 3, 3))).square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # skipped: the gradient is not finite
        scaler.update()
        return loss

    if validate_args:
        return Case(run, ValueError, "non-finite", after=lambda: _unchanged_and_finite(model, before))
    return Case(run, check=lambda loss: bool(torch.isnan(loss)) and _unchanged_and_finite(model, before))


def _layer_call(
    x: torch.Tensor,
    metadata: object = DESIGN[:6],
    cls: type = MetadataNorm2d,
    train: bool = True,
    **kwargs: object,
) -> Callable[[], object]:
    def run() -> object:
        layer = cls(4, kernel=KERNEL, **kwargs)
        layer.train(train)
        layer.metadata = metadata
        return layer(x)

    return run


def _eval_nan_passes_through() -> object:
    layer = _trained()
    layer.eval()
    layer.metadata = DESIGN[:6]
    return layer(_with_nan((6, 4, 3, 3)))


def _eval_batch_of_one() -> object:
    layer = _trained()
    layer.eval()
    layer.metadata = DESIGN[:1]
    return layer(torch.randn(1, 4, 3, 3))


def _shape_changed() -> object:
    layer = _trained()
    return layer(torch.randn(6, 4, 5, 5))


def _eval_before_training() -> object:
    layer = MetadataNorm2d(4, kernel=KERNEL).eval()
    layer.metadata = DESIGN[:6]
    return layer(torch.randn(6, 4, 3, 3))


def _model_nan_metadata_kwarg() -> object:
    model = timm.create_model("mdn_resnet18", num_classes=3, layers=(1, 1, 1, 1), mdn_kernel=KERNEL)
    return model(torch.randn(2, 3, 32, 32), metadata=_with_nan((2, 3), INF))


def _model_nan_batch(validate_args: bool) -> bool:
    model = timm.create_model(
        "mdn_resnet18",
        num_classes=3,
        layers=(1, 1, 1, 1),
        mdn_kernel=KERNEL,
        mdn_sites="all",
        mdn_validate_args=validate_args,
    )
    model(torch.randn(2, 3, 32, 32), metadata=DESIGN[:2])
    betas = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("running_beta")}
    image = torch.randn(2, 3, 32, 32)
    image[1, 0, 3, 3] = NAN
    model(image, metadata=DESIGN[2:4])
    # Every running beta kept its value (BatchNorm's own running statistics are torch's, and take the NaN).
    after = model.state_dict()
    return len(betas) == 13 and all(
        torch.equal(after[k], v) and bool(v.isfinite().all()) for k, v in betas.items()
    )


X = torch.randn(6, 4, 3, 3)
ONES = torch.ones(12, 3)
CASES: dict[str, Case] = {
    # non-finite values and the state they must never reach
    "nan_features_in_training": _rejected_batch(_with_nan((6, 4, 3, 3))),
    "inf_features_in_training": _rejected_batch(_with_nan((6, 4, 3, 3), INF)),
    "minus_inf_features_in_training": _rejected_batch(_with_nan((6, 4, 3, 3), -INF)),
    "nan_metadata_row": _rejected_batch(X, _with_nan((6, 3))),
    "inf_metadata_through_the_model_kwarg": Case(_model_nan_metadata_kwarg, ValueError, "inf or NaN"),
    "nan_batch_with_validate_args_false_is_skipped": _skipped_batch(),
    "nan_in_evaluation_passes_through_a_pure_layer": Case(
        _eval_nan_passes_through, check=lambda out: int(torch.isnan(out).sum()) >= 1
    ),
    "optimizer_step_on_nan_rejected": _optimizer_step_on_nan(validate_args=True),
    "optimizer_step_on_nan_skipped_by_grad_scaler": _optimizer_step_on_nan(validate_args=False),
    # empty batch, batch of 1
    "empty_batch": Case(_layer_call(torch.randn(0, 4, 3, 3), DESIGN[:0]), ValueError, "empty batch"),
    "batch_of_one_in_training": Case(
        _layer_call(torch.randn(1, 4, 3, 3), DESIGN[:1]), check=lambda out: bool(torch.isfinite(out).all())
    ),
    "batch_of_one_in_evaluation": Case(_eval_batch_of_one, check=lambda out: out.shape == (1, 4, 3, 3)),
    # rank, feature size, layout
    "wrong_rank_into_2d": Case(_layer_call(torch.randn(6, 4, 3)), ValueError, "4-D input"),
    "wrong_rank_into_1d": Case(_layer_call(X, cls=MetadataNorm1d), ValueError, "2-D or 3-D"),
    "wrong_channel_count": Case(_layer_call(torch.randn(6, 5, 3, 3)), ValueError, "C=4"),
    "channels_last_vs_first_in_token_layer": Case(
        _layer_call(torch.randn(6, 4, 7), cls=MetadataNorm), ValueError, r"\(B, N, C\) with C=4"
    ),
    "feature_shape_changed_since_the_running_beta": Case(
        _shape_changed, ValueError, "estimated for features"
    ),
    # dtypes
    "float64_into_float32_layer": Case(_layer_call(X.double()), TypeError, r"layer.to\(torch.float64\)"),
    "integer_features": Case(_layer_call(X.long()), TypeError, "floating point"),
    "bfloat16_into_float32_layer_is_computed_in_float32": Case(
        _layer_call(X.bfloat16()), check=lambda out: out.dtype == torch.bfloat16
    ),
    "boolean_metadata": Case(_layer_call(X, torch.ones(6, 3, dtype=torch.bool)), TypeError, "real tensor"),
    # metadata: missing, mismatched lengths, wrong width
    "metadata_missing": Case(_layer_call(X, None), ValueError, "needs the batch's metadata"),
    "metadata_not_a_tensor": Case(_layer_call(X, [[1.0, 0.0, 1.0]] * 6), TypeError, "torch.Tensor"),
    "metadata_rows_mismatched": Case(_layer_call(X, DESIGN[:5]), ValueError, "5 rows but the batch has 6"),
    "metadata_columns_wrong": Case(_layer_call(X, DESIGN[:6, :2]), ValueError, r"shape \(B, 3\)"),
    # layer state and configuration
    "no_kernel": Case(lambda: MetadataNorm2d(4)(X), ValueError, "no metadata kernel"),
    "evaluation_before_any_training": Case(_eval_before_training, ValueError, "no running beta yet"),
    "input_on_another_device": Case(
        _layer_call(torch.empty(6, 4, 3, 3, device="meta")), ValueError, "move the model"
    ),
    "momentum_out_of_range": Case(lambda: MetadataNorm(4, momentum=1.5), ValueError, "momentum"),
    "num_features_zero": Case(lambda: MetadataNorm(0), ValueError, "num_features"),
    "set_kernel_with_a_tensor": Case(
        lambda: MetadataNorm(4).set_kernel(torch.eye(3)), TypeError, "MetadataKernel"
    ),
    "norm_act_without_running_stats": Case(
        lambda: MetadataNormAct2d(4, track_running_stats=False), ValueError, "track_running_stats"
    ),
    # the kernel: wrong shapes, singular, non-finite, indices out of range, labels
    "kernel_singular_design": Case(
        lambda: MetadataKernel.from_design(torch.ones(10, 2), remove=[1]), ValueError, "singular"
    ),
    "kernel_nan_design": Case(
        lambda: MetadataKernel.from_design(_with_nan((10, 2)), remove=[1]), ValueError, "inf or NaN"
    ),
    "kernel_fewer_rows_than_columns": Case(
        lambda: MetadataKernel.from_design(torch.randn(2, 3), remove=[1]), ValueError, "at least as many rows"
    ),
    "kernel_wrong_rank": Case(
        lambda: MetadataKernel.from_design(torch.randn(4, 3, 2), remove=[1]),
        ValueError,
        r"\(N,\) or \(N, q\)",
    ),
    "kernel_remove_out_of_range": Case(
        lambda: MetadataKernel.from_design(torch.randn(10, 3), remove=[3]), ValueError, r"in \[0, 3\)"
    ),
    "kernel_remove_negative": Case(
        lambda: MetadataKernel.from_design(torch.randn(10, 3), remove=[-1]), ValueError, r"in \[0, 3\)"
    ),
    "kernel_labels_length_mismatched": Case(
        lambda: MetadataKernel.from_columns(torch.rand(10), labels=torch.arange(9) % 2),
        ValueError,
        "labels must have 10 rows",
    ),
    "kernel_negative_categorical_level": Case(
        lambda: MetadataKernel.from_columns(torch.tensor([0, 1, -1, 1])), ValueError, "negatives"
    ),
    "design_level_out_of_range": Case(
        lambda: MetadataKernel.from_columns(torch.arange(12) % 3).design(torch.tensor([0, 3])),
        ValueError,
        r"levels must lie in \[0, 3\)",
    ),
    "design_float_labels_for_categorical": Case(
        lambda: MetadataKernel.from_columns(torch.rand(12), labels=torch.arange(12) % 2).design(
            torch.rand(2), torch.tensor([0.0, 1.0])
        ),
        ValueError,
        r"categorical \(integer\), got a float column",
    ),
    # dcor²: a metric raises rather than returning NaN
    "dcor_mismatched_n": Case(
        lambda: distance_correlation_sqr(torch.randn(10, 3), torch.randn(9)), ValueError, "10 and 9"
    ),
    "dcor_fewer_than_4_samples": Case(
        lambda: distance_correlation_sqr(torch.randn(3, 2), torch.randn(3)), ValueError, "at least 4"
    ),
    "dcor_nan_features": Case(
        lambda: distance_correlation_sqr(_with_nan((10, 3)), torch.randn(10)),
        ValueError,
        "x contains non-finite",
    ),
    "dcor_wrong_rank": Case(
        lambda: distance_correlation_sqr(torch.randn(10, 3, 2), torch.randn(10)), ValueError, r"shape \(n,\)"
    ),
    "dcor_constant_confounder_is_zero": Case(
        lambda: distance_correlation_sqr(torch.randn(10, 3), torch.ones(10)), check=lambda r: float(r) == 0.0
    ),
    # model-level entries
    "features_only_with_no_mdn_left": Case(
        lambda: timm.create_model("mdn_resnet18", layers=(1, 1, 1, 1), mdn_kernel=KERNEL, features_only=True),
        ValueError,
        "mdn_sites='all'",
    ),
    "convert_unknown_mode": Case(
        lambda: convert_metadata_norm(nn.BatchNorm2d(4), KERNEL, mode="before"), ValueError, "mode"
    ),
    "model_with_validate_args_false_skips_a_nan_batch": Case(
        lambda: _model_nan_batch(validate_args=False), check=lambda finite_and_unchanged: finite_and_unchanged
    ),
    "model_with_validate_args_rejects_a_nan_batch": Case(
        lambda: _model_nan_batch(validate_args=True), ValueError, "non-finite"
    ),
    "load_weights_into_a_non_module": Case(
        lambda: load_weights({}, nn.Linear(2, 2)),
        TypeError,
        "target must be an nn.Module",  # type: ignore[arg-type]
    ),
    "metadata_context_with_a_list": Case(
        lambda: timm_mdn.metadata_context(MetadataNorm(4), [1.0]).__enter__(), TypeError, "torch.Tensor"
    ),
}


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input(case_id: str) -> None:
    case = CASES[case_id]
    if case.raises is not None:
        with pytest.raises(case.raises, match=case.match):
            case.run()
        assert case.after is None or case.after()
    else:
        assert case.check is not None
        assert case.check(case.run())


def test_the_table_covers_both_outcomes() -> None:
    raised = sum(case.raises is not None for case in CASES.values())
    handled = len(CASES) - raised
    assert len(CASES) >= 25 and raised >= 20 and handled >= 5
