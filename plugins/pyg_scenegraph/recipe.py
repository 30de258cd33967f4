r"""One training step of the energy-based recipe: cross-entropy plus :math:`\mathcal{L}_e` with SGLD."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .boxes import box_code
from .graphs import negative_scene_graph, positive_scene_graph
from .loss import EBMLoss
from .sgld import SGLDSampler

__all__ = ["scene_graph_losses"]


def scene_graph_losses(
    base_model: torch.nn.Module,
    data: Any,
    pair_index: Tensor,
    pair_label: Tensor,
    energy_model: torch.nn.Module | None = None,
    sampler: SGLDSampler | None = None,
    ebm_loss: EBMLoss | None = None,
    task: str = "predcls",
    ce_normalizer: float | None = None,
) -> dict[str, Any]:
    r"""Losses of one batch for CE training (``energy_model=None``) or CE + EBM training.

    From (`Suhail et al., CVPR 2021 <https://arxiv.org/abs/2103.02221>`_):

    .. math::
        \mathcal{L} = \mathcal{L}_{CE}(\text{relations}) \;[+\ \mathcal{L}_{CE}(\text{objects})]
            + \mathcal{L}_e\big(E_\theta(G_I, G^+),\ E_\theta(G_I, \mathrm{SGLD}(G^-))\big)

    ``G+`` holds the ground-truth labels over the ground-truth pairs, ``G-`` the base model's min-max
    normalised scores over the sampled pairs (:func:`~pyg_scenegraph.positive_scene_graph`,
    :func:`~pyg_scenegraph.negative_scene_graph`); both share the image graph of region features ``data.x``.
    Backpropagating ``out["loss"]`` trains both models, as the official joint training does.

    Args:
        base_model: A relation predictor with :class:`~pyg_scenegraph.RelationPredictor`'s forward
            ``(x, box_code, pair_index, y, batch) -> (relation_logits, object_logits)``.
        data: A batch of :class:`~pyg_scenegraph.SceneGraphData` with ``x``, ``y``, ``box``, ``image_size``,
            ``edge_index``, ``edge_predicate``. The datasets of this package give graphs without visual
            features the default ``x`` of :class:`~pyg_scenegraph.ObjectFeatures`.
        pair_index: ``[2, Q]`` pairs to classify (e.g. from :func:`~pyg_scenegraph.sample_relation_pairs`).
        pair_label: ``[Q]`` their predicates (0 = background).
        energy_model: A :class:`~pyg_scenegraph.GraphEnergyModel`, or ``None`` for plain CE.
        sampler: The SGLD sampler. (default: ``SGLDSampler()``)
        ebm_loss: The energy loss. (default: ``EBMLoss()``)
        task: ``"predcls"`` or ``"sgcls"`` (adds the object cross-entropy and samples node states).
        ce_normalizer: Divide the summed cross-entropies by this instead of averaging (use the global number
            of pairs times the world size under DDP so that gradients equal one process).

    Under DDP, wrap the energy model and the base model separately; in PredCls the base model's object head
    receives no gradient, so wrap it with ``find_unused_parameters=True``.

    Returns:
        ``{"loss", "ce", "ebm", "positive_energy", "negative_energy", "sgld_seconds", "relation_logits"}``
        (``ebm`` and energies are ``None`` without an energy model). ``sgld_seconds`` is host wall time
        without a synchronisation: on a GPU it is the time to queue the sampling, not to run it.

    Raises:
        ValueError: if ``data`` has no node features ``x``.
    """
    if getattr(data, "x", None) is None:
        raise ValueError(
            "scene_graph_losses: 'data' has no node features 'x'; give it region features, or the default "
            "pyg_scenegraph.ObjectFeatures (class one-hot + box code), e.g. as the dataset's transform"
        )
    code = box_code(data.box, data.image_size[data.batch])
    rel_logits, obj_logits = base_model(data.x, code, pair_index, data.y, data.batch)
    reduction = "mean" if ce_normalizer is None else "sum"
    ce = F.cross_entropy(rel_logits, pair_label, reduction=reduction)
    if task == "sgcls":
        ce = ce + F.cross_entropy(obj_logits, data.y, reduction=reduction)
    if ce_normalizer is not None:
        ce = ce / ce_normalizer
    out: dict[str, Any] = {"ce": ce, "ebm": None, "positive_energy": None, "negative_energy": None}
    out["sgld_seconds"] = 0.0
    out["relation_logits"] = rel_logits
    if energy_model is None:
        out["loss"] = ce
        return out

    sampler = sampler or SGLDSampler()
    ebm_loss = ebm_loss or EBMLoss()
    num_classes, num_predicates = obj_logits.size(-1), rel_logits.size(-1)
    pos_nodes, pos_index, pos_edges = positive_scene_graph(
        data.y, data.edge_index, data.edge_predicate, num_classes, num_predicates
    )
    neg_nodes, neg_edges = negative_scene_graph(
        rel_logits, object_logits=obj_logits, y=data.y, num_object_classes=num_classes, task=task
    )
    module = getattr(energy_model, "module", energy_model)  # sample through the bare module under DDP

    def energy(nodes: Tensor, edges: Tensor) -> Tensor:
        return module(data.x, nodes, pair_index, edges, code, data.batch, data.num_graphs)

    start = time.perf_counter()
    neg_nodes, neg_edges = sampler.sample(energy, neg_nodes, neg_edges, task=task)
    out["sgld_seconds"] = time.perf_counter() - start
    e_pos = energy_model(data.x, pos_nodes, pos_index, pos_edges, code, data.batch, data.num_graphs)
    e_neg = energy_model(data.x, neg_nodes, pair_index, neg_edges, code, data.batch, data.num_graphs)
    out["ebm"] = ebm_loss(e_pos, e_neg)
    out["positive_energy"], out["negative_energy"] = e_pos, e_neg
    out["loss"] = ce + out["ebm"]
    return out
