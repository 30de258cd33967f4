r"""Rank one image's predicted relations and match them to its ground truth (Scene-Graph-Benchmark rules).

These are the per-image building blocks of :class:`~pyg_scenegraph.SceneGraphEvaluator`, as tensor
operations on the inputs' device (no host synchronisation):

1. :func:`object_matches` — which predicted object may stand for which ground-truth object: same label and
   box IoU :math:`\ge` the threshold with the +1-pixel convention (Scene-Graph-Benchmark, every mode), or the
   same index (``matching="index"``).
2. :func:`rank_graph_constrained` / :func:`rank_unconstrained` — the ranked list of predicted triplets with
   and without the graph constraint.
3. :func:`first_hit_rank` — for each ground-truth triplet, the rank of the first prediction that hits it.
   Recall@K is then ``(first_hit_rank < K).sum() / R``, which is Scene-Graph-Benchmark's
   :math:`|\bigcup_{i<K} \text{pred\_to\_gt}_i| / R`: one prediction may hit several ground-truth triplets
   (repeated annotations, same-label twins at IoU :math:`\ge 0.5`), and each triplet counts once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .boxes import box_iou

__all__ = ["first_hit_rank", "object_matches", "rank_graph_constrained", "rank_unconstrained"]


def object_matches(
    pred_labels: Tensor,
    gt_labels: Tensor,
    pred_boxes: Tensor | None = None,
    gt_boxes: Tensor | None = None,
    *,
    matching: str = "iou",
    iou_threshold: float = 0.5,
) -> Tensor:
    r"""``[M, N]`` boolean matrix: predicted object :math:`m` may stand for ground-truth object :math:`n`.

    ``matching="iou"``: :math:`c_m = c_n` and :math:`\text{IoU}_{+1}(b_m, b_n) \ge \tau` (the boxes are pixel
    corners, both inclusive, as in Scene-Graph-Benchmark). ``matching="index"``: :math:`c_m = c_n` and
    :math:`m = n`.

    Args:
        pred_labels: ``[M]`` predicted object labels.
        gt_labels: ``[N]`` ground-truth object labels.
        pred_boxes: ``[M, 4]`` predicted boxes (``"iou"`` only).
        gt_boxes: ``[N, 4]`` ground-truth boxes (``"iou"`` only).
        matching: ``"iou"`` or ``"index"``.
        iou_threshold: :math:`\tau`. (default: ``0.5``)

    Returns:
        ``[M, N]`` boolean tensor.

    Raises:
        ValueError: for an unknown ``matching`` or missing boxes with ``"iou"``.
    """
    same_label = pred_labels.view(-1, 1) == gt_labels.view(1, -1)
    if matching == "index":
        return same_label & torch.eye(
            pred_labels.numel(), gt_labels.numel(), dtype=torch.bool, device=same_label.device
        )
    if matching != "iou":
        raise ValueError(f"'matching' must be 'iou' or 'index' (got {matching!r})")
    if pred_boxes is None or gt_boxes is None:
        raise ValueError("matching='iou' needs 'pred_boxes' and 'gt_boxes'")
    return same_label & (box_iou(pred_boxes, gt_boxes, inclusive=True) >= iou_threshold)


def rank_graph_constrained(
    pair_index: Tensor, rel_scores: Tensor, object_scores: Tensor
) -> tuple[Tensor, Tensor]:
    r"""Predicted triplets under the graph constraint, best first.

    Each pair :math:`q = (s, o)` predicts one predicate, :math:`\hat p_q = \arg\max_{p \ge 1} r_{qp}` (the
    first maximum), with score :math:`r_{q\hat p_q} \cdot s_s \cdot s_o`; pairs are sorted by it, descending,
    ties kept in input order (Scene-Graph-Benchmark's post-processor sorts the same product).

    Args:
        pair_index: ``[2, Q]`` (subject, object) indices into the predicted objects.
        rel_scores: ``[Q, P]`` relation scores, column 0 = background.
        object_scores: ``[M]`` predicted object scores.

    Returns:
        ``([2, Q] ranked pairs, [Q] ranked predicates)``.
    """
    best_score, best = rel_scores[:, 1:].max(dim=-1)
    score = best_score * object_scores[pair_index[0]] * object_scores[pair_index[1]]
    order = torch.argsort(score, descending=True, stable=True)
    return pair_index[:, order], best[order] + 1


def rank_unconstrained(
    pair_index: Tensor, rel_scores: Tensor, object_scores: Tensor, top: int
) -> tuple[Tensor, Tensor]:
    r"""The ``top`` best (pair, predicate) combinations without the graph constraint.

    Every foreground predicate of every pair is a candidate with score :math:`r_{qp} \cdot s_s \cdot s_o`;
    ties are kept in pair-major input order.

    Args:
        pair_index: ``[2, Q]`` pairs.
        rel_scores: ``[Q, P]`` relation scores, column 0 = background.
        object_scores: ``[M]`` predicted object scores.
        top: How many candidates to keep (Scene-Graph-Benchmark keeps 100, the largest K).

    Returns:
        ``([2, T] pairs, [T] predicates)`` with :math:`T = \min(\text{top}, Q (P - 1))`.
    """
    num_fg = rel_scores.size(-1) - 1
    pair_score = object_scores[pair_index[0]] * object_scores[pair_index[1]]
    flat = (pair_score.view(-1, 1) * rel_scores[:, 1:]).reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)[:top]
    return pair_index[:, order // num_fg], order % num_fg + 1


def first_hit_rank(gt_triplets: Tensor, pairs: Tensor, predicates: Tensor, same_object: Tensor) -> Tensor:
    r"""Rank of the first prediction that hits each ground-truth triplet.

    Prediction :math:`t = (s_t, o_t, p_t)` hits ground truth :math:`r = (s_r, o_r, p_r)` when
    ``same_object[s_t, s_r] & same_object[o_t, o_r] & (p_t == p_r)``.

    Args:
        gt_triplets: ``[R, 3]`` ``(subject, object, predicate)`` rows, ground-truth object indices.
        pairs: ``[2, T]`` ranked predicted pairs (predicted object indices).
        predicates: ``[T]`` their predicates.
        same_object: ``[M, N]`` from :func:`object_matches`.

    Returns:
        ``[R]`` int64 ranks; ``torch.iinfo(torch.int64).max`` where no prediction hits.
    """
    never = torch.iinfo(torch.int64).max
    if pairs.size(1) == 0:
        return torch.full((gt_triplets.size(0),), never, dtype=torch.long, device=gt_triplets.device)
    hit = (
        same_object[pairs[0]][:, gt_triplets[:, 0]]
        & same_object[pairs[1]][:, gt_triplets[:, 1]]
        & (predicates.view(-1, 1) == gt_triplets[:, 2].view(1, -1))
    )  # [T, R]
    rank = torch.arange(pairs.size(1), device=hit.device).view(-1, 1)
    return torch.where(hit, rank, torch.full_like(rank, never)).amin(dim=0)
