"""Bad-input cases of :class:`~pyg_scenegraph.SceneGraphEvaluator` (docs/reliability.md, issue #16).

``test_bad_input.py`` runs :data:`EVALUATOR_CASES` with its own table. Every call builds a fresh evaluator;
the state cases check that a rejected (or, with ``validate_args=False``, masked) image leaves the metric as
it was.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from pyg_scenegraph import SceneGraphData, SceneGraphEvaluator
from torch_geometric.data import Batch

from .bad_input_case import BadInputCase

__all__ = ["EVALUATOR_CASES"]

P = 5  # background + 4 predicates


def _image(**changes: Any) -> dict[str, Any]:
    """One valid PredCls image (3 objects, 3 relations, 3 candidate pairs), with ``changes`` applied."""
    image = dict(
        gt_labels=torch.tensor([1, 2, 3]),
        gt_boxes=torch.tensor([[0.0, 0, 9, 9], [20, 0, 29, 9], [0, 20, 9, 29]]),
        gt_triplets=torch.tensor([[0, 1, 1], [1, 2, 2], [0, 1, 3]]),
        pair_index=torch.tensor([[0, 1, 2], [1, 2, 0]]),
        rel_scores=torch.tensor(
            [[0.1, 0.6, 0.1, 0.2, 0.0], [0.1, 0.1, 0.5, 0.3, 0.0], [0.0, 0.9, 0.05, 0.05, 0.0]]
        ),
    )
    image.update(changes)
    return image


def _with_nan(values: torch.Tensor, value: float = math.nan) -> torch.Tensor:
    values = values.clone()
    values.view(-1)[1] = value
    return values


def _update(mode: str = "predcls", **changes: Any) -> None:
    SceneGraphEvaluator(P, mode=mode, ks=(1, 2)).update(**_image(**changes))


def _batch() -> Batch:
    image = _image()
    graph = SceneGraphData(
        y=image["gt_labels"],
        box=image["gt_boxes"],
        image_size=torch.tensor([[40.0, 40.0]]),
        edge_index=image["gt_triplets"][:, :2].t(),
        edge_predicate=image["gt_triplets"][:, 2],
    )
    return Batch.from_data_list([graph, graph])


def _update_batch(pair_index: torch.Tensor, rel_scores: torch.Tensor, **kwargs: Any) -> None:
    SceneGraphEvaluator(P, ks=(1, 2)).update_batch(_batch(), pair_index, rel_scores, **kwargs)


def _state(ev: SceneGraphEvaluator) -> dict[str, float]:
    return {key: float(value) for key, value in ev.compute().items()}


def _rejected_image_leaves_state() -> tuple[dict, dict, int]:
    ev = SceneGraphEvaluator(P, ks=(1, 2, 3))
    ev.update(**_image())
    before = _state(ev)
    try:
        ev.update(**_image(rel_scores=_with_nan(_image()["rel_scores"])))
    except ValueError:
        pass
    return before, _state(ev), ev.num_images


def _check_rejected(result: tuple[dict, dict, int]) -> None:
    before, after, num_images = result
    assert before == after and num_images == 1 and all(math.isfinite(v) for v in after.values())


def _masked_image_is_not_counted() -> tuple[dict, dict, int]:
    ev = SceneGraphEvaluator(P, ks=(1, 2, 3), validate_args=False)
    ev.update(**_image())
    before = _state(ev)
    ev.update(**_image(rel_scores=_with_nan(_image()["rel_scores"]), gt_triplets=torch.tensor([[1, 0, 4]])))
    return before, _state(ev), ev.num_images


def _batch_of_one() -> dict[str, float]:
    ev = SceneGraphEvaluator(P, ks=(1, 2))
    ev.update(**_image(gt_triplets=torch.tensor([[2, 0, 1]])))
    return _state(ev)


def _check_batch_of_one(out: dict[str, float]) -> None:
    # (2 -> 0) with p1 is the top prediction: R@1 = 1; mR@1 = 1 / 4 (three predicates never seen count 0)
    assert out["R@1"] == 1.0 and out["ngR@1"] == 1.0 and out["mR@1"] == 0.25


def _check_same(pair: tuple[dict, dict]) -> None:
    assert pair[0] == pair[1]


def _check_zr_nan(out: dict[str, float]) -> None:
    assert math.isnan(out["zR@1"]) and math.isfinite(out["R@1"])


def _only_images_without_relations() -> None:
    ev = SceneGraphEvaluator(P, ks=(1,))
    ev.update(**_image(gt_triplets=torch.zeros(0, 3, dtype=torch.long)))
    ev.compute()


def _float64_scores() -> tuple[dict, dict]:
    image = _image()
    results = []
    for dtype in (torch.float32, torch.float64):
        ev = SceneGraphEvaluator(P, ks=(1, 2, 3))
        ev.update(
            **{**image, "rel_scores": image["rel_scores"].to(dtype), "gt_boxes": image["gt_boxes"].to(dtype)}
        )
        results.append(_state(ev))
    return results[0], results[1]


def _no_zero_shot_triplet_in_data() -> dict[str, float]:
    ev = SceneGraphEvaluator(P, ks=(1,), zero_shot_triplets=torch.tensor([[9, 9, 1]]))
    ev.update(**_image())
    with warnings.catch_warnings(record=True):
        return _state(ev)


EVALUATOR_CASES: list[BadInputCase] = [
    # non-finite scores and boxes: a metric raises rather than reporting a number
    BadInputCase(
        "SceneGraphEvaluator-nan-rel_scores",
        lambda: _update(rel_scores=_with_nan(_image()["rel_scores"])),
        ValueError,
        r"'rel_scores' contains non-finite values",
        covers="nan",
    ),
    BadInputCase(
        "SceneGraphEvaluator-inf-rel_scores",
        lambda: _update(rel_scores=_with_nan(_image()["rel_scores"], math.inf)),
        ValueError,
        r"'rel_scores' contains non-finite.*first offending value: inf",
        covers="inf",
    ),
    BadInputCase(
        "SceneGraphEvaluator-nan-gt_boxes",
        lambda: _update(gt_boxes=_with_nan(_image()["gt_boxes"])),
        ValueError,
        r"'gt_boxes' contains non-finite",
        covers="nan",
    ),
    BadInputCase(
        "SceneGraphEvaluator-nan-pred_scores-sgcls",
        lambda: _update(
            "sgcls", pred_labels=torch.tensor([1, 2, 3]), pred_scores=torch.tensor([1.0, math.nan, 1.0])
        ),
        ValueError,
        r"'pred_scores' contains non-finite",
        covers="nan",
    ),
    # shapes and lengths
    BadInputCase(
        "SceneGraphEvaluator-rel_scores-one-row-short",
        lambda: _update(rel_scores=torch.rand(2, P)),
        ValueError,
        r"'rel_scores' must be \[3, 5\] \(one row per pair of 'pair_index'.*got \[2, 5\]",
        covers="mismatched lengths",
    ),
    BadInputCase(
        "SceneGraphEvaluator-rel_scores-no-background-column",
        lambda: _update(rel_scores=torch.rand(3, P - 1)),
        ValueError,
        r"'rel_scores' must be \[3, 5\].*incl\. background",
        covers="wrong feature size",
    ),
    BadInputCase(
        "SceneGraphEvaluator-pair_index-rank-1",
        lambda: _update(pair_index=torch.tensor([0, 1, 2])),
        ValueError,
        r"'pair_index' must be \[2, \*\] \(got \[3\]\)",
        covers="wrong rank",
    ),
    BadInputCase(
        "SceneGraphEvaluator-gt_triplets-two-columns",
        lambda: _update(gt_triplets=torch.tensor([[0, 1]])),
        ValueError,
        r"'gt_triplets' must be \[\*, 3\]",
        covers="wrong feature size",
    ),
    BadInputCase(
        "SceneGraphEvaluator-gt_boxes-one-short",
        lambda: _update(gt_boxes=torch.rand(2, 4)),
        ValueError,
        r"'gt_boxes' must be \[3, 4\]",
        covers="mismatched lengths",
    ),
    BadInputCase(
        "SceneGraphEvaluator-sgdet-pred_boxes-one-short",
        lambda: _update("sgdet", pred_labels=torch.tensor([1, 2, 3]), pred_boxes=torch.rand(2, 4)),
        ValueError,
        r"'pred_boxes' must be \[3, 4\]",
        covers="mismatched lengths",
    ),
    # dtypes
    BadInputCase(
        "SceneGraphEvaluator-integer-rel_scores",
        lambda: _update(rel_scores=torch.ones(3, P, dtype=torch.long)),
        TypeError,
        r"'rel_scores' must be a floating-point tensor \(got torch.int64\)",
        covers="wrong dtype",
    ),
    BadInputCase(
        "SceneGraphEvaluator-float-gt_triplets",
        lambda: _update(gt_triplets=torch.tensor([[0.0, 1.0, 1.0]])),
        TypeError,
        r"'gt_triplets' must be an integer tensor \(got torch.float32\)",
        covers="float labels",
    ),
    BadInputCase(
        "SceneGraphEvaluator-float-zero_shot_triplets",
        lambda: SceneGraphEvaluator(P, zero_shot_triplets=torch.ones(2, 3)),
        TypeError,
        r"'zero_shot_triplets' must be an integer tensor",
        covers="wrong dtype",
    ),
    # ranges
    BadInputCase(
        "SceneGraphEvaluator-background-predicate",
        lambda: _update(gt_triplets=torch.tensor([[0, 1, 0]])),
        ValueError,
        r"'gt_triplets' predicates must lie in \[1, 4\].*first offending value: 0",
        covers="labels out of range",
    ),
    BadInputCase(
        "SceneGraphEvaluator-predicate-too-large",
        lambda: _update(gt_triplets=torch.tensor([[0, 1, 5]])),
        ValueError,
        r"predicates must lie in \[1, 4\].*first offending value: 5",
        covers="labels out of range",
    ),
    BadInputCase(
        "SceneGraphEvaluator-negative-gt_labels",
        lambda: _update(gt_labels=torch.tensor([1, -2, 3])),
        ValueError,
        r"'gt_labels' must be non-negative.*first offending value: -2",
        covers="negative labels",
    ),
    BadInputCase(
        "SceneGraphEvaluator-gt_triplets-object-out-of-range",
        lambda: _update(gt_triplets=torch.tensor([[0, 3, 1]])),
        ValueError,
        r"object indices must lie in \[0, 3\).*first offending value: 3",
        covers="out-of-range indices",
    ),
    BadInputCase(
        "SceneGraphEvaluator-negative-pair_index",
        lambda: _update(pair_index=torch.tensor([[0, -1, 2], [1, 2, 0]])),
        ValueError,
        r"'pair_index' must point into the predicted objects, \[0, 3\).*value: -1",
        covers="out-of-range indices",
    ),
    # what a mode takes
    BadInputCase(
        "SceneGraphEvaluator-iou-matching-without-boxes",
        lambda: _update(gt_boxes=None),
        ValueError,
        r"matching='iou' \(Scene-Graph-Benchmark\) needs 'gt_boxes'.*matching='index'",
        covers="missing input",
    ),
    BadInputCase(
        "SceneGraphEvaluator-predcls-given-pred_scores",
        lambda: _update(pred_scores=torch.ones(3)),
        ValueError,
        r"PredCls takes the ground-truth objects with score 1",
        covers="missing input",
    ),
    # update_batch
    BadInputCase(
        "SceneGraphEvaluator.update_batch-rel_scores-one-row-short",
        lambda: _update_batch(torch.tensor([[0, 3], [1, 4]]), torch.rand(1, P)),
        ValueError,
        r"update_batch: 'rel_scores' must be \[2, 5\]",
        covers="mismatched lengths",
    ),
    BadInputCase(
        "SceneGraphEvaluator.update_batch-pair-across-graphs",
        lambda: _update_batch(torch.tensor([[0, 2], [1, 3]]), torch.rand(2, P)),
        ValueError,
        r"pair across two graphs.*first offending value: 2",
        covers="out-of-range indices",
    ),
    BadInputCase(
        "SceneGraphEvaluator.update_batch-nan-rel_scores",
        lambda: _update_batch(torch.tensor([[0, 3], [1, 4]]), torch.full((2, P), math.nan)),
        ValueError,
        r"'rel_scores' contains non-finite",
        covers="nan",
    ),
    # empty input, batch of 1, handled dtypes
    BadInputCase(
        "SceneGraphEvaluator-compute-without-images",
        lambda: SceneGraphEvaluator(P).compute(),
        ValueError,
        r"no image with ground-truth relations",
        covers="empty batch",
    ),
    BadInputCase(
        "SceneGraphEvaluator-only-images-without-relations",
        _only_images_without_relations,
        ValueError,
        r"no image with ground-truth relations",
        covers="empty batch",
    ),
    BadInputCase(
        "SceneGraphEvaluator-batch-of-one-image-one-relation",
        _batch_of_one,
        check=_check_batch_of_one,
        covers="batch of 1",
    ),
    BadInputCase(
        "SceneGraphEvaluator-float64-scores-and-boxes",
        _float64_scores,
        check=_check_same,
        covers="wrong dtype",
    ),
    BadInputCase(
        "SceneGraphEvaluator-no-zero-shot-triplet-in-data-zR-is-nan",
        _no_zero_shot_triplet_in_data,
        check=_check_zr_nan,
        covers="empty batch",
    ),
    # state: a rejected image leaves the metric unchanged; validate_args=False masks it on the device
    BadInputCase(
        "SceneGraphEvaluator-state-after-rejected-nan-image",
        _rejected_image_leaves_state,
        check=_check_rejected,
        covers="state",
    ),
    BadInputCase(
        "SceneGraphEvaluator-validate_args-False-masks-nan-image",
        _masked_image_is_not_counted,
        check=_check_rejected,
        covers="state",
    ),
]
