"""Input checks of :class:`~pyg_scenegraph.SceneGraphEvaluator` (docs/reliability.md).

Types and shapes are checked on the host, always. Values (index and label ranges, finiteness) are checked
with ``validate_args``, with one host synchronisation for all of them; the offending value is looked up only
when a check fails.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .evaluator import SceneGraphEvaluator

__all__ = ["check_image", "check_update_batch"]

_ROWS = " (one row per pair of 'pair_index', one column per predicate class incl. background)"


def _tensor(owner: str, name: str, value: Any, kind: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{owner}: '{name}' must be a torch.Tensor (got {type(value).__name__})")
    if kind == "integer" and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{owner}: '{name}' must be an integer tensor (got {value.dtype})")
    if kind == "floating" and not value.is_floating_point():
        raise TypeError(f"{owner}: '{name}' must be a floating-point tensor (got {value.dtype})")
    return value


def _shape(owner: str, name: str, value: Tensor, expected: tuple[int | None, ...], hint: str = "") -> None:
    ok = value.dim() == len(expected) and all(
        e is None or e == s for e, s in zip(expected, value.shape, strict=True)
    )
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{owner}: '{name}' must be {want}{hint} (got {list(value.shape)})")


def _raise_first(owner: str, checks: list[tuple[Tensor, Tensor, str]]) -> None:
    """``checks``: (values, bad mask, message). One synchronisation; the first failing check raises."""
    if not checks:
        return
    flags = torch.stack([bad.any() for _, bad, _ in checks]).tolist()
    for (values, bad, message), failed in zip(checks, flags, strict=True):
        if failed:
            first = values[bad].reshape(-1)[0].item()
            raise ValueError(f"{owner}: {message} (first offending value: {first})")


def _nonfinite(name: str, value: Tensor) -> tuple[Tensor, Tensor, str]:
    return (
        value,
        ~torch.isfinite(value),
        f"'{name}' contains non-finite values (nan or inf); expected finite values",
    )


def check_image(
    metric: SceneGraphEvaluator,
    gt_labels: Any,
    gt_triplets: Any,
    pair_index: Any,
    rel_scores: Any,
    gt_boxes: Any,
    pred_labels: Any,
    pred_scores: Any,
    pred_boxes: Any,
) -> int:
    """Check :meth:`SceneGraphEvaluator.update`'s inputs; return the number of ground-truth objects."""
    owner = f"{type(metric).__name__}.update"
    mode, num_pred = metric.mode, metric.num_predicate_classes
    gt_labels = _tensor(owner, "gt_labels", gt_labels, "integer")
    _shape(owner, "gt_labels", gt_labels, (None,))
    num_gt = gt_labels.numel()
    gt_triplets = _tensor(owner, "gt_triplets", gt_triplets, "integer")
    _shape(owner, "gt_triplets", gt_triplets, (None, 3), " (subject, object, predicate) rows")
    pair_index = _tensor(owner, "pair_index", pair_index, "integer")
    _shape(owner, "pair_index", pair_index, (2, None))
    num_pairs = pair_index.size(1)
    rel_scores = _tensor(owner, "rel_scores", rel_scores, "floating")
    _shape(owner, "rel_scores", rel_scores, (num_pairs, num_pred), _ROWS)
    if mode == "predcls":
        for name, value in (
            ("pred_labels", pred_labels),
            ("pred_scores", pred_scores),
            ("pred_boxes", pred_boxes),
        ):
            if value is not None:
                raise ValueError(
                    f"{owner}: PredCls takes the ground-truth objects with score 1 (Scene-Graph-Benchmark); "
                    f"'{name}' is for SGCls/SGDet"
                )
        num_objects = num_gt
    else:
        if pred_labels is None:
            raise ValueError(f"{owner}: {mode!r} needs 'pred_labels'")
        pred_labels = _tensor(owner, "pred_labels", pred_labels, "integer")
        _shape(owner, "pred_labels", pred_labels, (None,))
        num_objects = pred_labels.numel()
        if mode == "sgcls" and num_objects != num_gt:
            raise ValueError(
                f"{owner}: in SGCls the predicted objects are the {num_gt} ground-truth objects "
                f"('pred_labels' has {num_objects})"
            )
        if pred_scores is not None:
            pred_scores = _tensor(owner, "pred_scores", pred_scores, "floating")
            _shape(owner, "pred_scores", pred_scores, (num_objects,), " (one score per predicted object)")
        if mode == "sgcls" and pred_boxes is not None:
            raise ValueError(f"{owner}: SGCls uses the ground-truth boxes; 'pred_boxes' is for SGDet")
        if mode == "sgdet":
            if pred_boxes is None:
                raise ValueError(f"{owner}: 'sgdet' needs 'pred_boxes'")
            pred_boxes = _tensor(owner, "pred_boxes", pred_boxes, "floating")
            _shape(
                owner, "pred_boxes", pred_boxes, (num_objects, 4), " (x1, y1, x2, y2 per predicted object)"
            )
    if gt_boxes is None and (metric.matching == "iou"):
        raise ValueError(
            f"{owner}: matching='iou' (Scene-Graph-Benchmark) needs 'gt_boxes'; pass them, or build the "
            "evaluator with matching='index' to match PredCls/SGCls objects by index"
        )
    if gt_boxes is not None:
        gt_boxes = _tensor(owner, "gt_boxes", gt_boxes, "floating")
        _shape(owner, "gt_boxes", gt_boxes, (num_gt, 4), " (x1, y1, x2, y2 per ground-truth object)")
    if not metric.validate_args:
        return num_gt

    checks: list[tuple[Tensor, Tensor, str]] = []
    if gt_triplets.size(0):
        objects, predicates = gt_triplets[:, :2], gt_triplets[:, 2]
        checks.append(
            (
                objects,
                (objects < 0) | (objects >= num_gt),
                f"'gt_triplets' object indices must lie in [0, {num_gt})",
            )
        )
        checks.append(
            (
                predicates,
                (predicates < 1) | (predicates >= num_pred),
                f"'gt_triplets' predicates must lie in [1, {num_pred - 1}] (0 is background)",
            )
        )
    if num_pairs:
        checks.append(
            (
                pair_index,
                (pair_index < 0) | (pair_index >= num_objects),
                f"'pair_index' must point into the predicted objects, [0, {num_objects})",
            )
        )
    checks.append((gt_labels, gt_labels < 0, "'gt_labels' must be non-negative class ids"))
    if pred_labels is not None:
        checks.append((pred_labels, pred_labels < 0, "'pred_labels' must be non-negative class ids"))
    checks.append(_nonfinite("rel_scores", rel_scores))
    for name, value in (("pred_scores", pred_scores), ("gt_boxes", gt_boxes), ("pred_boxes", pred_boxes)):
        if value is not None:
            checks.append(_nonfinite(name, value))
    _raise_first(owner, checks)
    return num_gt


def check_update_batch(
    metric: SceneGraphEvaluator, batch: Any, pair_index: Any, rel_scores: Any, object_scores: Any
) -> Tensor:
    """Check :meth:`SceneGraphEvaluator.update_batch`'s inputs; return the batch's ``[R, 3]`` triplets."""
    owner = f"{type(metric).__name__}.update_batch"
    if metric.mode == "sgdet":
        raise ValueError(f"{owner}: SGDet predicts its own objects; call update() once per image")
    if not callable(getattr(batch, "triplets", None)):
        raise TypeError(
            f"{owner}: 'batch' must be a torch_geometric Batch of SceneGraphData (got {type(batch).__name__})"
        )
    for key in ("y", "batch", "ptr"):
        if batch.get(key) is None:
            raise ValueError(f"{owner}: 'batch' has no '{key}' (a Batch of SceneGraphData has it)")
    if metric.matching == "iou" and batch.get("box") is None:
        raise ValueError(
            f"{owner}: matching='iou' needs 'batch.box'; or build the evaluator with matching='index'"
        )
    triplets = batch.triplets()
    num_nodes = batch.y.numel()
    pair_index = _tensor(owner, "pair_index", pair_index, "integer")
    _shape(owner, "pair_index", pair_index, (2, None))
    rel_scores = _tensor(owner, "rel_scores", rel_scores, "floating")
    _shape(owner, "rel_scores", rel_scores, (pair_index.size(1), metric.num_predicate_classes), _ROWS)
    if metric.mode == "predcls" and object_scores is not None:
        raise ValueError(
            f"{owner}: PredCls takes the ground-truth objects with score 1 (Scene-Graph-Benchmark); "
            "'object_scores' is for SGCls"
        )
    if metric.mode == "sgcls":
        if object_scores is None:
            raise ValueError(f"{owner}: SGCls needs 'object_scores' [N, C]")
        object_scores = _tensor(owner, "object_scores", object_scores, "floating")
        _shape(owner, "object_scores", object_scores, (num_nodes, None), " (one row per object of the batch)")
        if object_scores.size(1) < 2:
            raise ValueError(f"{owner}: 'object_scores' needs a background and >= 1 object class column")
    if metric.validate_args and pair_index.size(1):
        in_range = (pair_index >= 0) & (pair_index < num_nodes)
        ends = batch.batch[pair_index.clamp(0, max(num_nodes - 1, 0))]
        _raise_first(
            owner,
            [
                (
                    pair_index,
                    ~in_range,
                    f"'pair_index' must point into the batch's objects, [0, {num_nodes})",
                ),
                (
                    pair_index,
                    (ends[0] != ends[1]).expand_as(pair_index) & in_range.all(0),
                    "'pair_index' has a pair across two graphs of the batch",
                ),
            ],
        )
    return triplets
