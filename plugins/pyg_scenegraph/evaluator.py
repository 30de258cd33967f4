r"""Scene-graph recall metrics as a :class:`torchmetrics.Metric`: R@K, ngR@K, mR@K and zR@K.

The definitions are Scene-Graph-Benchmark's (Tang et al., CVPR 2020; ``sgg_eval.py``), which the
energy-based paper (`Suhail et al., CVPR 2021 <https://arxiv.org/abs/2103.02221>`_) and the literature report:

* **Matching** (every mode): a predicted triplet :math:`(s, p, o)` hits a ground-truth triplet
  :math:`(s', p', o')` when :math:`p = p'`, and subject and object have the ground truth's labels and boxes
  with :math:`\text{IoU} \ge 0.5`, boxes as pixel corners with the +1 convention. In PredCls and SGCls the
  predicted boxes *are* the ground-truth boxes, so a same-label twin at IoU :math:`\ge 0.5` also counts, and
  one prediction can hit several ground-truth triplets. ``matching="index"`` matches PredCls/SGCls objects by
  index instead (our earlier definition; not comparable with published tables).
* **R@K** (graph constraint): each pair predicts its best foreground predicate; pairs are ranked by
  :math:`s_{rel} \cdot s_{sub} \cdot s_{obj}`; per image, recall = ground-truth triplets hit by the top
  :math:`K` / ground-truth triplets (repeated annotations counted individually); averaged over images.
* **ngR@K** (no graph constraint): the top :math:`K` of all (pair, predicate) combinations.
* **mR@K**: per image, for each predicate :math:`p` in its ground truth, :math:`\text{hits}_p /
  \text{count}_p`; per predicate, the mean over the images that contain it; mR = mean over **all**
  foreground predicates, one never seen counting 0.
* **zR@K**: recall over the ground-truth triplets :math:`(c_s, c_o, p)` of a zero-shot list, per image
  with any, averaged over those images.

An image without ground-truth relations, or without predicted pairs, is skipped, as in
Scene-Graph-Benchmark. Two choices where the official code is silent: ranking ties keep the input order
(stable sorts; the official sorts are unstable), and ngR@K ranks the top ``max(ks)`` combinations (the
official code keeps 100, its largest K).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch_geometric.data import Batch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat, rank_zero_warn

from .evaluator_checks import check_image, check_update_batch
from .sgg_matching import first_hit_rank, object_matches, rank_graph_constrained, rank_unconstrained

__all__ = ["SceneGraphEvaluator"]

_MODES = ("predcls", "sgcls", "sgdet")


class SceneGraphEvaluator(Metric):
    r"""Scene-Graph-Benchmark's R@K, ngR@K, mR@K and zR@K for PredCls, SGCls and SGDet.

    Feed images with :meth:`update` (one image) or :meth:`update_batch` (a PyG batch, PredCls/SGCls); read
    the result with :meth:`compute`. States are per-image lists (``"cat"``), so :meth:`compute` is correct
    across DDP processes, and they live on the inputs' device.

    Args:
        num_predicate_classes: Predicate classes **including** background (51 for VG150); column 0 of the
            relation scores is background and never predicted.
        mode: ``"predcls"`` (ground-truth boxes and labels, object scores 1), ``"sgcls"`` (ground-truth
            boxes, predicted labels and scores) or ``"sgdet"`` (predicted boxes, labels and scores).
        ks: The :math:`K` values. (default: ``(20, 50, 100)``)
        zero_shot_triplets: Optional ``[Z, 3]`` integer rows ``(subject class, object class, predicate)``,
            e.g. VG150's ``zeroshot_triplet.pytorch``; enables zR@K.
        matching: ``"iou"`` (Scene-Graph-Benchmark, every mode; default) or ``"index"`` (PredCls/SGCls:
            predicted object :math:`i` is ground-truth object :math:`i`).
        iou_threshold: Box-match threshold :math:`\tau` of ``"iou"``. (default: ``0.5``)
        validate_args: Check index ranges, labels and finiteness of every input, one host synchronisation
            per image (docs/reliability.md). With ``False`` an image with non-finite scores or boxes is
            not counted (masked on the device) and out-of-range indices are the caller's to avoid.
        **kwargs: :class:`~torchmetrics.Metric` options (``dist_sync_on_step``, ``process_group``, ...).

    In Lightning, update in ``validation_step`` and log at the epoch's end (a dict of 0-d tensors, float64,
    float32 on MPS)::

        self.sgg.update_batch(batch, pairs, rel_probs)  # validation_step
        self.log_dict(self.sgg.compute()); self.sgg.reset()  # on_validation_epoch_end

    Example:
        >>> ev = SceneGraphEvaluator(num_predicate_classes=3, ks=(1,))
        >>> ev.update(gt_labels=torch.tensor([1, 2]), gt_triplets=torch.tensor([[0, 1, 2]]),
        ...           gt_boxes=torch.tensor([[0.0, 0, 9, 9], [5, 5, 20, 20]]),
        ...           pair_index=torch.tensor([[0], [1]]), rel_scores=torch.tensor([[0.1, 0.2, 0.7]]))
        >>> float(ev.compute()["R@1"])
        1.0

    Raises:
        ValueError: for an unknown mode or matching, ``matching="index"`` in SGDet, fewer than 2 predicate
            classes, non-positive K, a threshold outside ``(0, 1]``, or a zero-shot list not ``[Z, 3]``.
        TypeError: for a floating zero-shot list.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    _ks: Tensor
    zero_shot_triplets: Tensor | None
    # "cat" states: lists of per-image tensors (one tensor once synchronised across processes)
    num_gt: list[Tensor]
    hits: list[Tensor]
    ng_hits: list[Tensor]
    predicate_count: list[Tensor]
    predicate_hits: list[Tensor]
    zs_num_gt: list[Tensor]
    zs_hits: list[Tensor]

    def __init__(
        self,
        num_predicate_classes: int,
        mode: str = "predcls",
        ks: Sequence[int] = (20, 50, 100),
        zero_shot_triplets: Tensor | None = None,
        matching: str = "iou",
        iou_threshold: float = 0.5,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        if mode not in _MODES:
            raise ValueError(f"{name}: 'mode' must be one of {_MODES} (got {mode!r})")
        if matching not in ("iou", "index"):
            raise ValueError(f"{name}: 'matching' must be 'iou' or 'index' (got {matching!r})")
        if matching == "index" and mode == "sgdet":
            raise ValueError(f"{name}: matching='index' needs the ground-truth objects (PredCls/SGCls)")
        if num_predicate_classes < 2:
            raise ValueError(
                f"{name}: 'num_predicate_classes' must be >= 2 incl. background (got {num_predicate_classes})"
            )
        if not ks or min(ks) <= 0:
            raise ValueError(f"{name}: 'ks' must be positive integers (got {ks})")
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"{name}: 'iou_threshold' must lie in (0, 1] (got {iou_threshold})")
        self.num_predicate_classes = int(num_predicate_classes)
        self.mode = mode
        self.ks = tuple(int(k) for k in ks)
        self.matching = matching
        self.iou_threshold = float(iou_threshold)
        self.validate_args = validate_args
        self.register_buffer("_ks", torch.tensor(self.ks), persistent=False)
        if zero_shot_triplets is not None:
            if not isinstance(zero_shot_triplets, Tensor) or zero_shot_triplets.is_floating_point():
                raise TypeError(f"{name}: 'zero_shot_triplets' must be an integer tensor")
            if zero_shot_triplets.dim() != 2 or zero_shot_triplets.size(-1) != 3:
                raise ValueError(
                    f"{name}: 'zero_shot_triplets' must be [Z, 3] (got {list(zero_shot_triplets.shape)})"
                )
            zero_shot_triplets = zero_shot_triplets.long().clone()
        self.register_buffer("zero_shot_triplets", zero_shot_triplets, persistent=False)
        # One entry per counted image (SGB's per-image lists); [K] or [P] blocks are flattened so that every
        # state is 1-d and a DDP rank without images (an empty placeholder) still concatenates.
        for state in ("num_gt", "hits", "ng_hits", "predicate_count", "predicate_hits"):
            self.add_state(state, default=[], dist_reduce_fx="cat")
        if self.zero_shot_triplets is not None:
            self.add_state("zs_num_gt", default=[], dist_reduce_fx="cat")
            self.add_state("zs_hits", default=[], dist_reduce_fx="cat")

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
            gt_labels: ``[N]`` ground-truth object labels (integers, 1-based).
            gt_triplets: ``[R, 3]`` ground-truth ``(subject, object, predicate)`` rows (object indices,
                predicates in ``[1, P - 1]``).
            pair_index: ``[2, Q]`` proposed pairs, indices into the predicted objects.
            rel_scores: ``[Q, P]`` relation scores, column 0 = background (probabilities or any monotone
                score).
            gt_boxes: ``[N, 4]`` ground-truth boxes :math:`(x_1, y_1, x_2, y_2)`; needed unless
                ``matching="index"``.
            pred_labels: ``[M]`` predicted object labels (SGCls, SGDet).
            pred_scores: ``[M]`` predicted object scores (SGCls, SGDet; default: ones).
            pred_boxes: ``[M, 4]`` predicted boxes (SGDet).

        Raises:
            TypeError: for non-tensor inputs, floating labels/indices or integer scores/boxes.
            ValueError: on shape mismatches, inputs the mode does not take or lacks, and (with
                ``validate_args``) indices or labels out of range or non-finite scores or boxes.
        """
        num_gt_objects = check_image(
            self,
            gt_labels,
            gt_triplets,
            pair_index,
            rel_scores,
            gt_boxes,
            pred_labels,
            pred_scores,
            pred_boxes,
        )
        if gt_triplets.size(0) == 0 or pair_index.size(1) == 0:
            return  # Scene-Graph-Benchmark skips images without ground-truth relations or predicted pairs
        device, dtype = rel_scores.device, self.dtype
        gt = gt_triplets.long()
        if self.mode == "predcls":
            pred_labels = gt_labels
            pred_scores = torch.ones(num_gt_objects, dtype=rel_scores.dtype, device=device)
        elif pred_scores is None:
            pred_scores = torch.ones(pred_labels.numel(), dtype=rel_scores.dtype, device=device)  # type: ignore[union-attr]
        if self.mode != "sgdet":
            pred_boxes = gt_boxes
        same = object_matches(pred_labels, gt_labels, pred_boxes, gt_boxes,  # type: ignore[arg-type]
                              matching=self.matching, iou_threshold=self.iou_threshold)  # fmt: skip
        pairs = pair_index.long()
        rank = first_hit_rank(gt, *rank_graph_constrained(pairs, rel_scores, pred_scores), same)
        ng_rank = first_hit_rank(gt, *rank_unconstrained(pairs, rel_scores, pred_scores, max(self.ks)), same)
        ks = self._ks.to(device).view(-1, 1)
        hit = rank.view(1, -1) < ks  # [K, R]
        ng_hit = ng_rank.view(1, -1) < ks
        counted = torch.ones((), dtype=dtype, device=device)
        if not self.validate_args:  # mask a non-finite image on the device, without synchronising
            finite = [rel_scores, pred_scores] + [b for b in (gt_boxes, pred_boxes) if b is not None]
            counted = torch.stack([torch.isfinite(t).all() for t in finite]).all().to(dtype)

        num_pred = self.num_predicate_classes
        predicate_count = torch.zeros(num_pred, dtype=dtype, device=device).index_add_(
            0, gt[:, 2], torch.ones(gt.size(0), dtype=dtype, device=device)
        )
        predicate_hits = torch.zeros(len(self.ks), num_pred, dtype=dtype, device=device).index_add_(
            1, gt[:, 2], hit.to(dtype)
        )
        self.num_gt.append(counted.new_full((1,), gt.size(0)) * counted)
        self.hits.append(hit.sum(-1).to(dtype) * counted)
        self.ng_hits.append(ng_hit.sum(-1).to(dtype) * counted)
        self.predicate_count.append(predicate_count * counted)
        self.predicate_hits.append(predicate_hits.view(-1) * counted)
        if self.zero_shot_triplets is not None:
            classes = torch.stack([gt_labels[gt[:, 0]].long(), gt_labels[gt[:, 1]].long(), gt[:, 2]], dim=-1)
            zero_shot = self.zero_shot_triplets.to(device)
            in_list = (classes.view(-1, 1, 3) == zero_shot.view(1, -1, 3)).all(-1).any(-1)  # [R]
            self.zs_num_gt.append(in_list.sum().to(dtype).view(1) * counted)
            self.zs_hits.append((hit & in_list).sum(-1).to(dtype) * counted)

    def update_batch(
        self,
        batch: Batch,
        pair_index: Tensor,
        rel_scores: Tensor,
        object_scores: Tensor | None = None,
    ) -> None:
        """Add every graph of a PyG batch of :class:`~pyg_scenegraph.SceneGraphData` (PredCls/SGCls).

        The ground truth is ``batch.triplets()``, ``batch.y`` and ``batch.box`` (needed unless
        ``matching="index"``). Pairs are split by graph with one host synchronisation per batch; their
        order within a graph is kept (it breaks score ties).

        Args:
            batch: A :class:`~torch_geometric.data.Batch` of :class:`~pyg_scenegraph.SceneGraphData`.
            pair_index: ``[2, Q]`` proposed pairs with batch-global indices, both ends in the same graph.
            rel_scores: ``[Q, P]`` relation scores, one row per pair.
            object_scores: ``[N, C]`` object probabilities (SGCls only): labels are the argmax over
                non-background classes, scores its probability.

        Raises:
            TypeError: if ``batch`` has no ``triplets()`` (not a batch of ``SceneGraphData``).
            ValueError: in SGDet, for ``object_scores`` in PredCls or its absence in SGCls, on shape
                mismatches, and (with ``validate_args``) for pairs across graphs or out of range, and every
                per-image error of :meth:`update`.
        """
        triplets = check_update_batch(self, batch, pair_index, rel_scores, object_scores)
        pred_labels = pred_scores = None
        if object_scores is not None:
            pred_scores, pred_labels = object_scores[:, 1:].max(dim=-1)
            pred_labels = pred_labels + 1
        node_graph = batch.batch
        pair_graph = node_graph[pair_index[0]]
        gt_graph = node_graph[triplets[:, 0]]
        pair_order = torch.argsort(pair_graph, stable=True)
        gt_order = torch.argsort(gt_graph, stable=True)
        num_graphs = int(batch.num_graphs)
        per_graph = pair_graph.new_zeros(2, num_graphs)  # pairs and ground-truth relations per graph
        per_graph[0].index_add_(0, pair_graph, torch.ones_like(pair_graph))
        per_graph[1].index_add_(0, gt_graph, torch.ones_like(gt_graph))
        sizes = torch.cat([batch.ptr.diff().to(per_graph), per_graph.view(-1)]).tolist()  # the one sync
        graph_sizes = sizes[:num_graphs]
        pairs_by_graph = torch.split(pair_index[:, pair_order], sizes[num_graphs : 2 * num_graphs], dim=1)
        scores_by_graph = torch.split(rel_scores[pair_order], sizes[num_graphs : 2 * num_graphs])
        gt_by_graph = torch.split(triplets[gt_order], sizes[2 * num_graphs :])
        box = batch.get("box") if self.matching == "iou" else None
        start = 0
        for g, size in enumerate(graph_sizes):
            nodes = slice(start, start + size)
            gt = gt_by_graph[g]
            self.update(
                gt_labels=batch.y[nodes],
                gt_triplets=torch.cat([gt[:, :2] - start, gt[:, 2:]], dim=1),
                pair_index=pairs_by_graph[g] - start,
                rel_scores=scores_by_graph[g],
                gt_boxes=None if box is None else box[nodes],
                pred_labels=None if pred_labels is None else pred_labels[nodes],
                pred_scores=None if pred_scores is None else pred_scores[nodes],
            )
            start += size

    # ----------------------------------------------------------------------------------------------- compute
    def _counted(self) -> tuple[Tensor, Tensor]:
        """Per-image GT counts (float64, or float32 on MPS) and the mask of counted images; raises if none."""
        if _is_empty(self.num_gt):
            raise ValueError(
                f"{type(self).__name__}: no image with ground-truth relations and predicted pairs was added; "
                "a recall over no images is undefined"
            )
        num_gt = dim_zero_cat(self.num_gt)
        dtype = torch.float32 if num_gt.device.type == "mps" else torch.float64
        num_gt = num_gt.to(dtype)
        counted = num_gt > 0
        if not bool(counted.any()):
            raise ValueError(
                f"{type(self).__name__}: every image added had non-finite scores or boxes (masked with "
                "validate_args=False); a recall over no images is undefined"
            )
        return num_gt, counted

    def _per_predicate(self) -> Tensor:
        """``[K, P]`` per-predicate recall, NaN for background and predicates never seen (no sync)."""
        num_gt, _ = self._counted()
        num_k, num_pred = len(self.ks), self.num_predicate_classes
        count = dim_zero_cat(self.predicate_count).to(num_gt.dtype).view(-1, 1, num_pred)
        hits = dim_zero_cat(self.predicate_hits).to(num_gt.dtype).view(-1, num_k, num_pred)
        present = count > 0
        ratio = torch.where(present, hits / count.clamp(min=1), torch.zeros_like(hits))
        per_predicate = ratio.sum(0) / present.sum(0)  # 0 / 0 = NaN where never seen
        per_predicate[:, 0] = float("nan")
        return per_predicate

    def per_predicate_recall(self, k: int) -> Tensor:
        """``[P]`` recall@K of each predicate, synchronised across processes like :meth:`compute`.

        Index 0 (background) and predicates never seen in the ground truth are NaN (mR@K counts them 0).

        Raises:
            ValueError: if ``k`` is not one of ``ks`` or no image was counted.
        """
        if k not in self.ks:
            raise ValueError(f"{type(self).__name__}: 'k' must be one of {self.ks} (got {k})")
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync and not self._is_synced,
            should_unsync=self._should_unsync,
        ):
            return self._per_predicate()[self.ks.index(k)].clone()

    def compute(self) -> dict[str, Tensor]:
        """``{"R@K", "ngR@K", "mR@K"[, "zR@K"]}`` for every K, 0-d tensors in ``[0, 1]``.

        zR@K is NaN, with a warning, when no counted image has a zero-shot triplet.

        Raises:
            ValueError: if no image with ground-truth relations and predicted pairs was counted.
        """
        num_gt, counted = self._counted()
        num_k = len(self.ks)
        recall = dim_zero_cat(self.hits).to(num_gt.dtype).view(-1, num_k) / num_gt.view(-1, 1).clamp(min=1)
        ng_recall = dim_zero_cat(self.ng_hits).to(num_gt.dtype).view(-1, num_k) / num_gt.view(-1, 1).clamp(
            min=1
        )
        recall, ng_recall = recall[counted].mean(0), ng_recall[counted].mean(0)
        mean_recall = self._per_predicate()[:, 1:].nan_to_num(0.0).mean(-1)
        zs_recall = None
        if self.zero_shot_triplets is not None:
            zs_num = dim_zero_cat(self.zs_num_gt).to(num_gt.dtype)
            zs_hits = dim_zero_cat(self.zs_hits).to(num_gt.dtype).view(-1, num_k)
            with_zs = zs_num > 0
            if not bool(with_zs.any()):
                rank_zero_warn(
                    f"{type(self).__name__}: no counted image has a zero-shot triplet; zR@K is NaN"
                )
            zs_recall = (zs_hits[with_zs] / zs_num[with_zs].view(-1, 1)).mean(0)
        out: dict[str, Tensor] = {}
        for i, k in enumerate(self.ks):
            out[f"R@{k}"] = recall[i]
            out[f"ngR@{k}"] = ng_recall[i]
            out[f"mR@{k}"] = mean_recall[i]
            if zs_recall is not None:
                out[f"zR@{k}"] = zs_recall[i]
        return out

    @property
    def num_images(self) -> int:
        """Images counted so far by this process (host synchronisation)."""
        if _is_empty(self.num_gt):
            return 0
        return int((dim_zero_cat(self.num_gt) > 0).sum())

    def extra_repr(self) -> str:
        """The constructor settings, for ``repr``."""
        return (
            f"num_predicate_classes={self.num_predicate_classes}, mode={self.mode!r}, ks={self.ks}, "
            f"matching={self.matching!r}, iou_threshold={self.iou_threshold}, "
            f"zero_shot={self.zero_shot_triplets is not None}"
        )


def _is_empty(state: list[Tensor] | Tensor) -> bool:
    """A ``"cat"`` state is a list before a DDP sync and one tensor after it."""
    return len(state) == 0 if isinstance(state, list) else state.numel() == 0
