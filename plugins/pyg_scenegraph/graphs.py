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

__all__ = [
    "EBM_PAIRS_PER_IMAGE",
    "all_pairs",
    "negative_scene_graph",
    "positive_scene_graph",
    "sample_relation_pairs",
]

_TASKS = ("predcls", "sgcls", "sgdet")


def _one_hot(labels: Tensor, num_classes: int, name: str) -> Tensor:
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"'{name}' must hold integer class ids (got {labels.dtype})")
    if labels.dim() != 1:
        raise ValueError(f"'{name}' must be 1-D [num_items] (got {list(labels.shape)})")
    if labels.numel() > 0 and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"'{name}' ids must lie in [0, {num_classes}) (got [{int(labels.min())}, {int(labels.max())}])"
        )
    return F.one_hot(labels.long(), num_classes).float()


def positive_scene_graph(
    y: Tensor,
    edge_index: Tensor,
    edge_predicate: Tensor,
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
        edge_predicate: ``[R]`` predicates (1-based).
        num_object_classes: object classes incl. background (node-state size).
        num_predicate_classes: predicate classes incl. background (edge-state size).
        noise_std: standard deviation of the added Gaussian noise. (default: ``1e-4``)

    Returns:
        ``(node_states [N, C], edge_index [2, R'], edge_states [R', P])`` with ``R' <= R`` unique pairs.

    Raises:
        ValueError: for labels outside the vocabulary or mismatched sizes.
    """
    if edge_index.size(1) != edge_predicate.numel():
        raise ValueError(
            f"'edge_index' has {edge_index.size(1)} pairs but 'edge_predicate' has "
            f"{edge_predicate.numel()} labels"
        )
    nodes = _one_hot(y, num_object_classes, "y")
    edges = _one_hot(edge_predicate, num_predicate_classes, "edge_predicate")
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


def all_pairs(
    batch: Tensor | None, num_nodes: int | None = None, device: torch.device | str | None = None
) -> Tensor:
    """All ordered pairs ``(i, j), i != j`` inside each graph of a batch, ``[2, sum_g n_g (n_g - 1)]``.

    Args:
        batch: ``[N]`` sorted batch vector (PyG's ``data.batch``), or ``None`` for one graph.
        num_nodes: number of nodes when ``batch`` is ``None``.
        device: device of the result when ``batch`` is ``None`` (else ``batch``'s). (default: CPU)

    Raises:
        ValueError: if neither ``batch`` nor ``num_nodes`` is given.
    """
    if batch is None:
        if num_nodes is None:
            raise ValueError("all_pairs needs 'batch' or 'num_nodes'")
        batch = torch.zeros(num_nodes, dtype=torch.long, device=device)
    same = batch.view(-1, 1) == batch.view(1, -1)
    same.fill_diagonal_(False)
    return same.nonzero().t().contiguous()


def _rank_within(group: Tensor, noise: Tensor) -> Tensor:
    """Rank of each element among those of its group, in increasing ``noise`` (0 = smallest)."""
    order = torch.argsort(noise)
    order = order[torch.argsort(group[order], stable=True)]
    sorted_group = group[order]
    position = torch.arange(group.numel(), device=group.device)
    start = torch.zeros_like(position)
    if group.numel() > 0:
        first = torch.ones_like(sorted_group, dtype=torch.bool)
        first[1:] = sorted_group[1:] != sorted_group[:-1]
        start = torch.cummax(torch.where(first, position, torch.zeros_like(position)), dim=0).values
    rank = torch.empty_like(position)
    rank[order] = position - start
    return rank


#: Pairs per image of the official EBM configuration: every ordered pair of an image, up to 1024.
EBM_PAIRS_PER_IMAGE = 1024


def sample_relation_pairs(
    edge_index: Tensor,
    edge_predicate: Tensor,
    batch: Tensor,
    pairs_per_image: int = EBM_PAIRS_PER_IMAGE,
    positive_fraction: float = 0.25,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Scene-Graph-Benchmark's training pair sampler for PredCls/SGCls (``gtbox_relsample``).

    Per image: up to ``pairs_per_image * positive_fraction`` ground-truth pairs (a pair with several
    predicates keeps one at random), filled up to ``pairs_per_image`` with random background pairs
    (label 0). The default budget is the official energy-based configuration's, 1024 pairs per image,
    which keeps **every** ordered pair of an image with up to 32 objects (SGB's CE baseline samples 256).

    Args:
        edge_index: ``[2, R]`` ground-truth pairs of the batch.
        edge_predicate: ``[R]`` predicates (1-based).
        batch: ``[N]`` batch vector.
        pairs_per_image: pairs per image. (default: ``1024``)
        positive_fraction: cap on the foreground share. (default: ``0.25``)
        generator: optional random generator (on the inputs' device, or a CPU generator).

    Returns:
        ``(pair_index [2, Q], pair_label [Q])`` on the inputs' device.

    Raises:
        ValueError: for a non-positive budget, a fraction outside ``(0, 1]``, mismatched lengths, or a
            ground-truth relation that is no candidate pair: a self-relation (subject = object; the
            dataset readers drop them) or a relation across two graphs of the batch.
    """
    if pairs_per_image <= 0 or not 0 < positive_fraction <= 1:
        raise ValueError(
            "sample_relation_pairs needs 'pairs_per_image' > 0 and 'positive_fraction' in (0, 1]"
        )
    if edge_index.dim() != 2 or edge_index.size(0) != 2 or edge_index.size(1) != edge_predicate.numel():
        raise ValueError(
            f"sample_relation_pairs: 'edge_index' must be [2, {edge_predicate.numel()}] to match "
            f"'edge_predicate' (got {list(edge_index.shape)})"
        )
    device = edge_index.device
    num_nodes = batch.numel()
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValueError(f"sample_relation_pairs: 'edge_index' must point into [0, {num_nodes})")
    candidates = all_pairs(batch.to(device))
    key = candidates[0] * num_nodes + candidates[1]  # sorted: all_pairs enumerates row-major
    gen_device = generator.device if generator is not None else device
    perm = torch.randperm(edge_predicate.numel(), generator=generator, device=gen_device).to(device)
    gt_key = (edge_index[0] * num_nodes + edge_index[1])[perm]
    pos = torch.searchsorted(key, gt_key).clamp(max=max(key.numel() - 1, 0))
    found = key[pos] == gt_key if key.numel() else torch.zeros_like(gt_key, dtype=torch.bool)
    if not bool(found.all()):
        s, o = (int(v) for v in edge_index[:, perm[~found][0]])
        kind = "a self-relation" if s == o else "a relation between two graphs of the batch"
        raise ValueError(
            f"sample_relation_pairs: ground-truth relation ({s} -> {o}) is {kind}, which is no candidate "
            "pair; drop self-relations before training (the dataset readers of pyg_scenegraph do)"
        )
    label = torch.zeros(key.numel(), dtype=torch.long, device=device)
    label[pos] = edge_predicate[perm].long()  # a duplicate pair keeps one of its predicates at random
    graph = batch.to(device)[candidates[0]]
    noise = torch.rand(key.numel(), generator=generator, device=gen_device).to(device)
    num_fg = int(pairs_per_image * positive_fraction)
    is_fg = label > 0
    rank = _rank_within(graph * 2 + (~is_fg).long(), noise)  # among this graph's foreground / background
    fg_keep = is_fg & (rank < num_fg)
    num_graphs = int(graph.max()) + 1 if graph.numel() else 0
    kept_fg = torch.zeros(num_graphs, dtype=torch.long, device=device).index_add_(0, graph, fg_keep.long())
    bg_keep = ~is_fg & (rank < pairs_per_image - kept_fg[graph])
    keep = fg_keep | bg_keep
    return candidates[:, keep], label[keep]
