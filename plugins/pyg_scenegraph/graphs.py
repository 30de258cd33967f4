r"""Build the positive (ground-truth) and negative (predicted) scene graphs that the energy model compares.

Following `Suhail et al., CVPR 2021 <https://arxiv.org/abs/2103.02221>`_ and its official code:

* positive graph :math:`G^+`: ground-truth one-hot object labels and predicates over the ground-truth pairs
  only, plus :math:`\mathcal{N}(0, \sigma^2)` noise (official ``DATA_NOISE_VAR = 1e-4``, used as a standard
  deviation);
* negative graph :math:`G^-`: the base model's relation scores over its proposed pairs, min-max normalised
  per row to :math:`[0, 1]` (and, in SGCls/SGDet, its object scores likewise). In PredCls the object states
  are the given labels (one-hot plus the same noise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .sgld import minmax_normalize

__all__ = ["all_pairs", "negative_scene_graph", "positive_scene_graph", "sample_relation_pairs"]

_TASKS = ("predcls", "sgcls", "sgdet")


def _one_hot(labels: Tensor, num_classes: int, name: str) -> Tensor:
    if labels.numel() > 0 and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"'{name}' ids must lie in [0, {num_classes}) (got [{int(labels.min())}, {int(labels.max())}])"
        )
    return F.one_hot(labels.long(), num_classes).float()


def positive_scene_graph(
    y: Tensor,
    edge_index: Tensor,
    edge_label: Tensor,
    num_object_classes: int,
    num_predicate_classes: int,
    noise_std: float = 1e-4,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The ground-truth scene graph as energy-model states.

    Duplicate pairs (one pair with several predicates, as in Visual Genome) are merged into one edge whose
    state is the sum of its one-hot predicates — what the official dense model does when it scatters the
    edge list into an :math:`N \times N` matrix.

    Args:
        y: ``[N]`` object labels (1-based, 0 = background).
        edge_index: ``[2, R]`` ground-truth pairs.
        edge_label: ``[R]`` predicates (1-based).
        num_object_classes: object classes incl. background (node-state size).
        num_predicate_classes: predicate classes incl. background (edge-state size).
        noise_std: standard deviation of the added Gaussian noise. (default: ``1e-4``)

    Returns:
        ``(node_states [N, C], edge_index [2, R'], edge_states [R', P])`` with ``R' <= R`` unique pairs.

    Raises:
        ValueError: for labels outside the vocabulary or mismatched sizes.
    """
    if edge_index.size(1) != edge_label.numel():
        raise ValueError(
            f"'edge_index' has {edge_index.size(1)} pairs but 'edge_label' {edge_label.numel()} labels"
        )
    nodes = _one_hot(y, num_object_classes, "y")
    edges = _one_hot(edge_label, num_predicate_classes, "edge_label")
    num_nodes = y.numel()
    key = edge_index[0] * num_nodes + edge_index[1]
    unique, inverse = torch.unique(key, return_inverse=True)
    merged = edges.new_zeros(unique.numel(), num_predicate_classes).index_add_(0, inverse, edges)
    pairs = torch.stack([unique // num_nodes, unique % num_nodes]).to(edge_index.dtype)
    if noise_std > 0:
        nodes = nodes + noise_std * torch.randn_like(nodes)
        merged = merged + noise_std * torch.randn_like(merged)
    return nodes, pairs, merged


def negative_scene_graph(
    relation_logits: Tensor,
    object_logits: Tensor | None = None,
    y: Tensor | None = None,
    num_object_classes: int | None = None,
    task: str = "predcls",
    noise_std: float = 1e-4,
) -> tuple[Tensor, Tensor]:
    r"""The base model's prediction as energy-model states (differentiable w.r.t. the logits).

    Args:
        relation_logits: ``[Q, P]`` relation scores over the proposed pairs (incl. the background column).
        object_logits: ``[N, C]`` object scores; required for ``"sgcls"``/``"sgdet"``.
        y: ``[N]`` given object labels; required for ``"predcls"``.
        num_object_classes: object classes incl. background; required for ``"predcls"``.
        task: ``"predcls"``, ``"sgcls"`` or ``"sgdet"``.
        noise_std: noise added to the one-hot PredCls node states. (default: ``1e-4``)

    Returns:
        ``(node_states [N, C], edge_states [Q, P])``.

    Raises:
        ValueError: for an unknown task or a missing argument of that task.
    """
    if task not in _TASKS:
        raise ValueError(f"negative_scene_graph: 'task' must be one of {_TASKS} (got {task!r})")
    edge_states = minmax_normalize(relation_logits)
    if task == "predcls":
        if y is None or num_object_classes is None:
            raise ValueError(
                "negative_scene_graph: 'predcls' needs the given labels 'y' and 'num_object_classes'"
            )
        nodes = _one_hot(y, num_object_classes, "y")
        return nodes + noise_std * torch.randn_like(nodes), edge_states
    if object_logits is None:
        raise ValueError(f"negative_scene_graph: {task!r} needs 'object_logits'")
    return minmax_normalize(object_logits), edge_states


def all_pairs(batch: Tensor | None, num_nodes: int | None = None) -> Tensor:
    """All ordered pairs ``(i, j), i != j`` inside each graph of a batch, ``[2, sum_g n_g (n_g - 1)]``.

    Args:
        batch: ``[N]`` sorted batch vector (PyG's ``data.batch``), or ``None`` for one graph.
        num_nodes: number of nodes when ``batch`` is ``None``.

    Raises:
        ValueError: if neither ``batch`` nor ``num_nodes`` is given.
    """
    if batch is None:
        if num_nodes is None:
            raise ValueError("all_pairs needs 'batch' or 'num_nodes'")
        batch = torch.zeros(num_nodes, dtype=torch.long)
    same = batch.view(-1, 1) == batch.view(1, -1)
    same.fill_diagonal_(False)
    return same.nonzero().t().contiguous()


def sample_relation_pairs(
    edge_index: Tensor,
    edge_label: Tensor,
    batch: Tensor,
    pairs_per_image: int = 64,
    positive_fraction: float = 0.25,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Scene-Graph-Benchmark's training pair sampler for PredCls/SGCls (``gtbox_relsample``).

    Per image: up to ``pairs_per_image * positive_fraction`` ground-truth pairs (a pair with several
    predicates keeps one at random), filled up to ``pairs_per_image`` with random background pairs
    (label 0).

    Args:
        edge_index: ``[2, R]`` ground-truth pairs of the batch.
        edge_label: ``[R]`` predicates (1-based).
        batch: ``[N]`` batch vector.
        pairs_per_image: pairs per image. (default: ``64``)
        positive_fraction: cap on the foreground share. (default: ``0.25``)
        generator: optional random generator.

    Returns:
        ``(pair_index [2, Q], pair_label [Q])``.

    Raises:
        ValueError: for a non-positive budget or a fraction outside ``(0, 1]``.
    """
    if pairs_per_image <= 0 or not 0 < positive_fraction <= 1:
        raise ValueError(
            "sample_relation_pairs needs 'pairs_per_image' > 0 and 'positive_fraction' in (0, 1]"
        )
    num_nodes = batch.numel()
    candidates = all_pairs(batch)
    key = candidates[0] * num_nodes + candidates[1]
    perm = torch.randperm(edge_label.numel(), generator=generator)
    gt_key = (edge_index[0] * num_nodes + edge_index[1])[perm]
    label = torch.zeros(key.numel(), dtype=torch.long)
    order = torch.argsort(key)
    pos = torch.searchsorted(key[order], gt_key)
    label[order[pos]] = edge_label[perm].long()  # a duplicate pair keeps one of its predicates at random
    graph = batch[candidates[0]]
    noise = torch.rand(key.numel(), generator=generator)
    num_fg = int(pairs_per_image * positive_fraction)
    keep = torch.zeros(key.numel(), dtype=torch.bool)
    for g in torch.unique(graph).tolist():
        in_graph = graph == g
        fg = (in_graph & (label > 0)).nonzero().view(-1)
        bg = (in_graph & (label == 0)).nonzero().view(-1)
        fg = fg[torch.argsort(noise[fg])[:num_fg]]
        bg = bg[torch.argsort(noise[bg])[: pairs_per_image - fg.numel()]]
        keep[fg] = True
        keep[bg] = True
    return candidates[:, keep], label[keep]
