r"""Scene-graph recall metrics: R@K, ngR@K, mR@K and zR@K for PredCls, SGCls and SGDet.

Definitions follow Scene-Graph-Benchmark (Tang et al., CVPR 2020), which the energy-based paper
(`Suhail et al., CVPR 2021 <https://arxiv.org/abs/2103.02221>`_) reports with:

* **R@K** (graph constraint): one predicate per pair (the best non-background one); pairs are ranked by
  :math:`s_{rel} \cdot s_{sub} \cdot s_{obj}`; a ground-truth triplet is hit when one of the top :math:`K`
  predictions has its subject, object and predicate (same labels; in SGDet both boxes with IoU
  :math:`\ge 0.5`). Recall = hit ground-truth triplets / ground-truth triplets, per image, averaged over the
  images that have relations. Ground-truth triplets are counted individually, so a pair annotated with two
  predicates can reach at most 1/2 under the graph constraint.
* **ngR@K** (no graph constraint): the top :math:`K` over all (pair, predicate) combinations.
* **mR@K**: per image, for each predicate :math:`p` of its ground truth, :math:`\text{hits}_p /
  \text{count}_p`; averaged over the images containing :math:`p`; then averaged over **all** predicates
  (one never seen in the evaluated images counts 0).
* **zR@K**: recall restricted to ground-truth triplets :math:`(c_s, c_o, p)` listed as zero-shot, per image
  with any, averaged over those images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch_geometric.data import Batch

from .boxes import box_iou

__all__ = ["SceneGraphEvaluator"]

_MODES = ("predcls", "sgcls", "sgdet")


class SceneGraphEvaluator:
    r"""Accumulate scene-graph predictions image by image and report R@K, ngR@K, mR@K and zR@K.

    Args:
        num_predicate_classes: Predicate classes **including** background (51 for VG150); column 0 of the
            relation scores is background and never predicted.
        mode: ``"predcls"``, ``"sgcls"`` or ``"sgdet"``. In PredCls/SGCls the predicted objects are the
            ground-truth objects (same indices); in SGDet they are matched by IoU.
        ks: The :math:`K` values. (default: ``(20, 50, 100)``)
        zero_shot_triplets: Optional ``[Z, 3]`` rows ``(subject class, object class, predicate)`` (1-based),
            e.g. VG150's ``zeroshot_triplet.pytorch``; enables zR@K.
        iou_threshold: SGDet box-match threshold. (default: ``0.5``)

    Example:
        >>> ev = SceneGraphEvaluator(num_predicate_classes=3, ks=(1,))
        >>> ev.update(gt_labels=torch.tensor([1, 2]), gt_triplets=torch.tensor([[0, 1, 2]]),
        ...           pair_index=torch.tensor([[0], [1]]), rel_scores=torch.tensor([[0.1, 0.2, 0.7]]))
        >>> ev.compute()["R@1"]
        1.0

    Raises:
        ValueError: for an unknown mode, fewer than 2 predicate classes, non-positive K, or a zero-shot list
            that is not ``[Z, 3]``.
    """

    def __init__(
        self,
        num_predicate_classes: int,
        mode: str = "predcls",
        ks: Sequence[int] = (20, 50, 100),
        zero_shot_triplets: Tensor | None = None,
        iou_threshold: float = 0.5,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"SceneGraphEvaluator: 'mode' must be one of {_MODES} (got {mode!r})")
        if num_predicate_classes < 2:
            raise ValueError(
                "SceneGraphEvaluator: 'num_predicate_classes' must be >= 2 incl. background "
                f"(got {num_predicate_classes})"
            )
        if not ks or min(ks) <= 0:
            raise ValueError(f"SceneGraphEvaluator: 'ks' must be positive integers (got {ks})")
        if zero_shot_triplets is not None and (
            zero_shot_triplets.dim() != 2 or zero_shot_triplets.size(-1) != 3
        ):
            raise ValueError(
                "SceneGraphEvaluator: 'zero_shot_triplets' must be [Z, 3] "
                f"(got {list(zero_shot_triplets.shape)})"
            )
        self.num_predicate_classes = num_predicate_classes
        self.mode = mode
        self.ks = tuple(int(k) for k in ks)
        self.zero_shot = (
            None if zero_shot_triplets is None else {tuple(t) for t in zero_shot_triplets.long().tolist()}
        )
        self.iou_threshold = iou_threshold
        self.reset()

    def reset(self) -> None:
        """Forget all accumulated images."""
        self.num_images = 0
        self._recall: dict[int, list[float]] = {k: [] for k in self.ks}
        self._ng_recall: dict[int, list[float]] = {k: [] for k in self.ks}
        self._zs_recall: dict[int, list[float]] = {k: [] for k in self.ks}
        self._per_predicate: dict[int, list[list[float]]] = {
            k: [[] for _ in range(self.num_predicate_classes)] for k in self.ks
        }

    # ------------------------------------------------------------------------------------------------ update
    def update(
        self,
        *,
        gt_labels: Tensor,
        gt_triplets: Tensor,
        pair_index: Tensor,
        rel_scores: Tensor,
        gt_boxes: Tensor | None = None,
        pred_labels: Tensor | None = None,
        pred_scores: Tensor | None = None,
        pred_boxes: Tensor | None = None,
    ) -> None:
        r"""Add one image.

        Args:
            gt_labels: ``[N]`` ground-truth object labels (1-based).
            gt_triplets: ``[R, 3]`` ground-truth ``(subject, object, predicate)`` rows (object indices).
            pair_index: ``[2, Q]`` proposed pairs (indices into the predicted objects).
            rel_scores: ``[Q, P]`` relation scores, column 0 = background (probabilities or any monotone
                score).
            gt_boxes: ``[N, 4]`` ground-truth boxes (SGDet only).
            pred_labels: ``[M]`` predicted object labels (SGCls/SGDet; PredCls uses ``gt_labels``).
            pred_scores: ``[M]`` predicted object scores (default: ones, i.e. PredCls).
            pred_boxes: ``[M, 4]`` predicted boxes (SGDet only).

        Raises:
            ValueError: on shape mismatches, indices out of range, or predicates outside the vocabulary.
        """
        num_gt = gt_labels.numel()
        if gt_triplets.dim() != 2 or gt_triplets.size(-1) != 3:
            raise ValueError(f"'gt_triplets' must be [R, 3] (got {list(gt_triplets.shape)})")
        if pair_index.dim() != 2 or pair_index.size(0) != 2:
            raise ValueError(f"'pair_index' must be [2, Q] (got {list(pair_index.shape)})")
        if rel_scores.dim() != 2 or rel_scores.shape != (pair_index.size(1), self.num_predicate_classes):
            raise ValueError(
                f"'rel_scores' must be [{pair_index.size(1)}, {self.num_predicate_classes}] "
                f"(got {list(rel_scores.shape)})"
            )
        if gt_triplets.numel() and (
            int(gt_triplets[:, :2].min()) < 0 or int(gt_triplets[:, :2].max()) >= num_gt
        ):
            raise ValueError(f"'gt_triplets' object indices must lie in [0, {num_gt})")
        if gt_triplets.numel() and (
            int(gt_triplets[:, 2].min()) < 1 or int(gt_triplets[:, 2].max()) >= self.num_predicate_classes
        ):
            raise ValueError(f"ground-truth predicates must lie in [1, {self.num_predicate_classes - 1}]")
        if self.mode == "predcls":
            pred_labels = gt_labels
        if pred_labels is None:
            raise ValueError(f"{self.mode!r} needs 'pred_labels'")
        num_pred = pred_labels.numel()
        if self.mode != "sgdet" and num_pred != num_gt:
            raise ValueError(
                f"in {self.mode!r} the predicted objects are the ground-truth objects ({num_gt}), "
                f"got {num_pred}"
            )
        if pair_index.numel() and (int(pair_index.min()) < 0 or int(pair_index.max()) >= num_pred):
            raise ValueError(f"'pair_index' must point into [0, {num_pred})")
        if pred_scores is None:
            pred_scores = torch.ones(num_pred, dtype=rel_scores.dtype)
        if self.mode == "sgdet" and (gt_boxes is None or pred_boxes is None):
            raise ValueError("'sgdet' needs 'gt_boxes' and 'pred_boxes'")

        if gt_triplets.size(0) == 0:
            return  # images without relations do not count (Scene-Graph-Benchmark)
        self.num_images += 1
        gt_triplets, pair_index = gt_triplets.long().cpu(), pair_index.long().cpu()
        rel_scores, pred_scores = rel_scores.detach().float().cpu(), pred_scores.detach().float().cpu()
        gt_labels, pred_labels = gt_labels.long().cpu(), pred_labels.long().cpu()

        # Which predicted object may stand for which ground-truth object.
        if self.mode == "sgdet":
            iou = box_iou(pred_boxes.detach().float().cpu(), gt_boxes.detach().float().cpu())  # type: ignore[union-attr]
            same_object = (iou >= self.iou_threshold) & (pred_labels.view(-1, 1) == gt_labels.view(1, -1))
        else:
            same_object = torch.eye(num_gt, dtype=torch.bool) & (
                pred_labels.view(-1, 1) == gt_labels.view(1, -1)
            )

        pair_object_score = pred_scores[pair_index[0]] * pred_scores[pair_index[1]]
        # Graph constraint: best non-background predicate per pair.
        best_score, best_pred = rel_scores[:, 1:].max(dim=-1)
        order = torch.argsort(best_score * pair_object_score, descending=True, stable=True)
        constrained = (pair_index[:, order], best_pred[order] + 1)
        # No graph constraint: every (pair, predicate).
        flat = (pair_object_score.view(-1, 1) * rel_scores[:, 1:]).reshape(-1)
        flat_order = torch.argsort(flat, descending=True, stable=True)[: max(self.ks)]
        num_fg = self.num_predicate_classes - 1
        unconstrained = (pair_index[:, flat_order // num_fg], flat_order % num_fg + 1)

        hit_rank = self._first_hit(gt_triplets, *constrained, same_object)
        ng_hit_rank = self._first_hit(gt_triplets, *unconstrained, same_object)
        gt_pred = gt_triplets[:, 2]
        zs_mask = None
        if self.zero_shot is not None:
            classes = torch.stack(
                [gt_labels[gt_triplets[:, 0]], gt_labels[gt_triplets[:, 1]], gt_pred], dim=-1
            )
            zs_mask = torch.tensor([tuple(t) in self.zero_shot for t in classes.tolist()], dtype=torch.bool)
        for k in self.ks:
            hit = hit_rank < k
            self._recall[k].append(float(hit.float().mean()))
            self._ng_recall[k].append(float((ng_hit_rank < k).float().mean()))
            for p in torch.unique(gt_pred).tolist():
                of_p = gt_pred == p
                self._per_predicate[k][p].append(float(hit[of_p].float().mean()))
            if zs_mask is not None and bool(zs_mask.any()):
                self._zs_recall[k].append(float(hit[zs_mask].float().mean()))

    @staticmethod
    def _first_hit(gt: Tensor, pairs: Tensor, predicates: Tensor, same_object: Tensor) -> Tensor:
        """Rank of the first prediction that hits each ground-truth triplet (``inf`` if none)."""
        if pairs.size(1) == 0:
            return torch.full((gt.size(0),), float("inf"))
        match = (
            same_object[pairs[0]][:, gt[:, 0]]
            & same_object[pairs[1]][:, gt[:, 1]]
            & (predicates.view(-1, 1) == gt[:, 2].view(1, -1))
        )  # [num_predictions, R]
        ranks = torch.arange(pairs.size(1), dtype=torch.float).view(-1, 1).expand_as(match)
        return torch.where(match, ranks, torch.full_like(ranks, float("inf"))).min(dim=0).values

    def update_batch(
        self,
        batch: Batch,
        pair_index: Tensor,
        rel_scores: Tensor,
        object_scores: Tensor | None = None,
    ) -> None:
        """Add every graph of a PyG batch of :class:`~pyg_scenegraph.SceneGraphData` (PredCls/SGCls).

        Args:
            batch: a :class:`~torch_geometric.data.Batch` with ``y``, ``edge_index``, ``edge_label``, ``ptr``.
            pair_index: ``[2, Q]`` proposed pairs with batch-global indices.
            rel_scores: ``[Q, P]`` relation scores.
            object_scores: ``[N, C]`` object probabilities (SGCls); labels = argmax over non-background.
        """
        ptr = batch.ptr.tolist()
        pair_graph = batch.batch[pair_index[0]]
        edge_graph = batch.batch[batch.edge_index[0]]
        pred_labels = pred_scores = None
        if object_scores is not None:
            pred_scores, pred_labels = object_scores[:, 1:].max(dim=-1)
            pred_labels = pred_labels + 1
        for g in range(len(ptr) - 1):
            lo, hi = ptr[g], ptr[g + 1]
            in_pairs, in_edges = pair_graph == g, edge_graph == g
            triplets = torch.cat(
                [batch.edge_index[:, in_edges].t() - lo, batch.edge_label[in_edges].view(-1, 1)], -1
            )
            self.update(
                gt_labels=batch.y[lo:hi],
                gt_triplets=triplets,
                pair_index=pair_index[:, in_pairs] - lo,
                rel_scores=rel_scores[in_pairs],
                pred_labels=None if pred_labels is None else pred_labels[lo:hi],
                pred_scores=None if pred_scores is None else pred_scores[lo:hi],
            )

    # ----------------------------------------------------------------------------------------------- compute
    def per_predicate_recall(self, k: int) -> Tensor:
        """``[P]`` recall@K of each predicate (index 0 = background = 0; NaN for predicates never seen)."""
        values = [float("nan")] + [sum(v) / len(v) if v else float("nan") for v in self._per_predicate[k][1:]]
        return torch.tensor(values)

    def compute(self) -> dict[str, float]:
        """``{"R@K", "ngR@K", "mR@K", "zR@K"}`` for every K (zR only with a zero-shot list), in ``[0, 1]``."""
        out: dict[str, float] = {}
        for k in self.ks:
            out[f"R@{k}"] = _mean(self._recall[k])
            out[f"ngR@{k}"] = _mean(self._ng_recall[k])
            per_pred = self.per_predicate_recall(k)[1:]
            out[f"mR@{k}"] = float(torch.nan_to_num(per_pred, nan=0.0).mean())
            if self.zero_shot is not None:
                out[f"zR@{k}"] = _mean(self._zs_recall[k])
        return out

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(num_predicate_classes={self.num_predicate_classes}, "
            f"mode={self.mode!r}, "
            f"ks={self.ks}, zero_shot={self.zero_shot is not None}, images={self.num_images})"
        )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
