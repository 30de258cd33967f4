"""An independent NumPy port of Scene-Graph-Benchmark's relation evaluation, used only by the tests.

Written from the logic of KaihuaTang/Scene-Graph-Benchmark.pytorch, not from our evaluator:

* ``modeling/roi_heads/relation_head/inference.py`` (``PostProcessor``): each pair's label is its best
  foreground predicate; pairs are sorted by ``max_fg(rel) * obj_score[sub] * obj_score[obj]``;
* ``data/datasets/evaluation/vg/vg_eval.py`` (``evaluate_relation_of_one_image``): images without
  ground-truth relations, or without predicted pairs, are skipped; PredCls takes the ground-truth boxes
  and labels with object scores 1, SGCls the ground-truth boxes;
* ``data/datasets/evaluation/vg/sgg_eval.py``: triplets ``(sub class, predicate, obj class)`` and their 8-d
  boxes; ``pred_to_gt`` lists, for every prediction, the ground-truth triplets with equal labels and both
  boxes at IoU >= 0.5; recall@K = |union of pred_to_gt[:K]| / #gt per image, mean over images; no graph
  constraint: the top 100 of ``obj_score[sub] * obj_score[obj] * rel[:, 1:]``; mean recall: per image and
  predicate ``hits / count``, per predicate the mean over images, mR the mean over all foreground predicates
  (0 if never seen); zero-shot recall over the ground-truth triplets ``(sub class, obj class, predicate)`` of
  the list, per image with any;
* ``structures/boxlist_ops.py`` (``boxlist_iou``): float32, +1 on widths, heights and the intersection.

It loops as the official code does (lists per image, Python loops over matches). One deliberate choice: the
official sorts are unstable (``torch.sort``, ``np.argsort``); here ties keep the input order (stable sorts),
which is what our evaluator documents.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SGBReference", "iou_plus_one"]


def iou_plus_one(a: np.ndarray, b: np.ndarray) -> np.float32:
    """IoU of two ``(x1, y1, x2, y2)`` boxes in float32 with the +1-pixel convention."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    one = np.float32(1)
    area_a = (a[2] - a[0] + one) * (a[3] - a[1] + one)
    area_b = (b[2] - b[0] + one) * (b[3] - b[1] + one)
    w = max(min(a[2], b[2]) - max(a[0], b[0]) + one, np.float32(0))
    h = max(min(a[3], b[3]) - max(a[1], b[1]) + one, np.float32(0))
    inter = np.float32(w * h)
    return np.float32(inter / (area_a + area_b - inter))


def _triplets(relations, classes, boxes) -> tuple[np.ndarray, np.ndarray]:
    """``(sub class, predicate, obj class)`` and ``[sub box, obj box]`` rows of ``(s, o, p)`` relations."""
    labels = np.stack([classes[relations[:, 0]], relations[:, 2], classes[relations[:, 1]]], axis=1)
    return labels, np.concatenate([boxes[relations[:, 0]], boxes[relations[:, 1]]], axis=1)


def _pred_to_gt(gt_labels, gt_boxes, pred_labels, pred_boxes, iou_thres: float) -> list[list[int]]:
    """For every prediction, the ground-truth triplets it hits (labels as ``intersect_2d``, then IoU)."""
    same_labels = (gt_labels[:, None, :] == pred_labels[None, :, :]).all(-1)  # [#gt, #pred]
    pred_to_gt: list[list[int]] = [[] for _ in range(len(pred_labels))]
    for g in np.where(same_labels.any(1))[0]:
        for i in np.where(same_labels[g])[0]:
            sub_iou = iou_plus_one(gt_boxes[g, :4], pred_boxes[i, :4])
            obj_iou = iou_plus_one(gt_boxes[g, 4:], pred_boxes[i, 4:])
            if sub_iou >= iou_thres and obj_iou >= iou_thres:
                pred_to_gt[i].append(int(g))
    return pred_to_gt


def _matched(pred_to_gt: list[list[int]], k: int) -> list[int]:
    """``reduce(np.union1d, pred_to_gt[:k])``: the sorted ground-truth triplets hit by the top ``k``."""
    return sorted(set().union(*pred_to_gt[:k]))


class SGBReference:
    """Per-image result lists as in ``sgg_eval.py``; :meth:`results` gives R, ngR, mR and zR."""

    def __init__(self, num_predicates: int, mode: str, ks, zero_shot=None, iou_thres: float = 0.5) -> None:
        self.num_predicates, self.mode, self.ks, self.iou_thres = num_predicates, mode, tuple(ks), iou_thres
        self.zero_shot = None if zero_shot is None else np.asarray(zero_shot, dtype=np.int64)
        self.recall: dict[int, list[float]] = {k: [] for k in self.ks}
        self.recall_nogc: dict[int, list[float]] = {k: [] for k in self.ks}
        self.zeroshot_recall: dict[int, list[float]] = {k: [] for k in self.ks}
        self.mean_recall_collect = {k: [[] for _ in range(num_predicates)] for k in self.ks}

    def add_image(self, gt_rels, gt_classes, gt_boxes, pair_index, rel_logits_or_scores,
                  pred_classes=None, obj_scores=None, pred_boxes=None) -> None:  # fmt: skip
        """One image: ``gt_rels`` [R, 3] (s, o, p), ``pair_index`` [Q, 2], ``rel_*`` [Q, P]; NumPy arrays."""
        gt_rels = np.asarray(gt_rels, dtype=np.int64)
        if len(gt_rels) == 0:
            return
        gt_classes, gt_boxes = np.asarray(gt_classes, np.int64), np.asarray(gt_boxes, np.float32)
        zeroshot_idx: list[int] = []
        if self.zero_shot is not None:
            for g, (s, o, p) in enumerate(gt_rels):
                if ((self.zero_shot == [gt_classes[s], gt_classes[o], p]).all(1)).any():
                    zeroshot_idx.append(g)
        if self.mode == "predcls":
            pred_boxes, pred_classes = gt_boxes, gt_classes
            obj_scores = np.ones(len(gt_classes), np.float32)
        elif self.mode == "sgcls":
            pred_boxes = gt_boxes
        pred_classes = np.asarray(pred_classes, np.int64)
        pred_boxes = np.asarray(pred_boxes, np.float32)
        obj_scores = np.asarray(obj_scores, np.float32)
        pairs = np.asarray(pair_index, np.int64).reshape(-1, 2)
        if len(pairs) == 0:
            return
        rel_scores = np.asarray(rel_logits_or_scores, np.float32)

        # PostProcessor: graph-constrained labels and the ranking of the pairs
        rel_label = 1 + rel_scores[:, 1:].argmax(1)
        triple = rel_scores[:, 1:].max(1) * obj_scores[pairs[:, 0]] * obj_scores[pairs[:, 1]]
        order = np.argsort(-triple, kind="stable")
        pairs, rel_scores, rel_label = pairs[order], rel_scores[order], rel_label[order]

        gt_trip, gt_trip_boxes = _triplets(gt_rels, gt_classes, gt_boxes)
        pred_rels = np.column_stack([pairs, rel_label])
        pred_trip, pred_trip_boxes = _triplets(pred_rels, pred_classes, pred_boxes)
        pred_to_gt = _pred_to_gt(gt_trip, gt_trip_boxes, pred_trip, pred_trip_boxes, self.iou_thres)

        nogc = (obj_scores[pairs].prod(1)[:, None] * rel_scores[:, 1:]).ravel()
        top = np.argsort(-nogc, kind="stable")[:100]
        rows, cols = np.unravel_index(top, rel_scores[:, 1:].shape)
        nogc_rels = np.column_stack([pairs[rows], cols + 1])
        nogc_trip, nogc_trip_boxes = _triplets(nogc_rels, pred_classes, pred_boxes)
        nogc_pred_to_gt = _pred_to_gt(gt_trip, gt_trip_boxes, nogc_trip, nogc_trip_boxes, self.iou_thres)

        for k in self.ks:
            match = _matched(pred_to_gt, k)
            self.recall[k].append(len(match) / len(gt_rels))
            self.recall_nogc[k].append(len(_matched(nogc_pred_to_gt, k)) / len(gt_rels))
            hit, count = [0] * self.num_predicates, [0] * self.num_predicates
            for g in range(len(gt_rels)):
                count[gt_rels[g, 2]] += 1
                count[0] += 1
            for g in match:
                hit[gt_rels[g, 2]] += 1
                hit[0] += 1
            for p in range(self.num_predicates):
                if count[p] > 0:
                    self.mean_recall_collect[k][p].append(hit[p] / count[p])
            if zeroshot_idx:
                both = len(zeroshot_idx) + len(match) - len(set(zeroshot_idx + match))
                self.zeroshot_recall[k].append(both / len(zeroshot_idx))

    def results(self) -> dict[str, float]:
        """``{"R@K", "ngR@K", "mR@K"[, "zR@K"]}`` as ``generate_print_string`` / ``calculate_mean_recall``."""
        out: dict[str, float] = {}
        for k in self.ks:
            out[f"R@{k}"] = float(np.mean(self.recall[k]))
            out[f"ngR@{k}"] = float(np.mean(self.recall_nogc[k]))
            per_predicate = [float(np.mean(v)) if v else 0.0 for v in self.mean_recall_collect[k][1:]]
            out[f"mR@{k}"] = sum(per_predicate) / (self.num_predicates - 1)
            if self.zero_shot is not None:
                out[f"zR@{k}"] = (
                    float(np.mean(self.zeroshot_recall[k])) if self.zeroshot_recall[k] else float("nan")
                )
        return out

    def per_predicate(self, k: int) -> list[float]:
        """Recall@K of predicates ``1..P-1``, NaN where never seen."""
        return [float(np.mean(v)) if v else float("nan") for v in self.mean_recall_collect[k][1:]]
