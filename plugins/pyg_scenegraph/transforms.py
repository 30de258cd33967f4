r"""PyG transforms on scene graphs: a guard that keeps predicates meaningful, and default node features.

Scene-graph predicates are **categorical labels of directed relations**. PyG's edge transforms treat every
edge attribute as a number attached to an undirected-or-not edge: :class:`~torch_geometric.transforms.\
ToUndirected` adds the reversed relation with the same predicate and sums predicate ids where both
directions exist, :class:`~torch_geometric.transforms.AddSelfLoops` and
:class:`~torch_geometric.transforms.RemoveDuplicatedEdges` rewrite ``edge_index`` but only the attributes
they are told about. :class:`SceneGraphTransform` runs any transform and then checks that every relation
of the result is a relation of the input, ``(subject, object, predicate)`` as a multiset, with nodes
followed through relabelling (:meth:`~torch_geometric.data.Data.subgraph`,
:class:`~torch_geometric.transforms.LargestConnectedComponents`, ...). Transforms that permute, filter or
split relations pass; transforms that invent, reverse or merge them raise a :class:`ValueError` naming the
transform. The datasets of this package wrap their ``transform`` and ``pre_transform`` in it.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.transforms import BaseTransform, Compose

from .boxes import box_code

__all__ = ["ObjectFeatures", "SceneGraphTransform", "check_relations", "dataset_transform"]

_NODE_ID = "scene_graph_node_id"  # temporary node attribute that follows nodes through relabelling


def _relations(data: Data, node_id: Tensor | None) -> Counter:
    edge_index, predicate = data.edge_index, data.edge_predicate
    if node_id is not None:
        edge_index = node_id[edge_index]
    rows = torch.cat([edge_index.t(), predicate.view(-1, 1).long()], dim=-1)
    return Counter(map(tuple, rows.tolist()))


def check_relations(before: Data, after: Data, name: str, node_id: Tensor | None = None) -> None:
    r"""Check that ``after`` holds a sub-multiset of the relations of ``before``.

    Args:
        before: The scene graph given to a transform.
        after: Its result.
        name: The transform, for the message.
        node_id: ``[N_after]`` node of ``before`` that each node of ``after`` is (``None``: the same nodes).

    Raises:
        ValueError: if ``after`` lost ``edge_index``/``edge_predicate``, if their lengths disagree, if the
            predicates are no longer integers, or if a relation of ``after`` is not one of ``before``.
    """
    if "edge_predicate" not in before or "edge_index" not in before:
        return
    where = f"{name} changed the relations of a scene graph"
    for key in ("edge_index", "edge_predicate"):
        if key not in after:
            raise ValueError(f"{where}: it removed '{key}', which scene-graph relations need")
    edge_index, predicate = after.edge_index, after.edge_predicate
    if not isinstance(edge_index, Tensor) or not isinstance(predicate, Tensor):
        raise ValueError(f"{where}: 'edge_index' and 'edge_predicate' must stay tensors")
    if predicate.is_floating_point() or predicate.dtype == torch.bool:
        raise ValueError(f"{where}: 'edge_predicate' became {predicate.dtype}; predicates are integer ids")
    if edge_index.dim() != 2 or edge_index.size(1) != predicate.numel():
        raise ValueError(
            f"{where}: 'edge_index' has shape {list(edge_index.shape)} but 'edge_predicate' has "
            f"{predicate.numel()} entries; the transform edited the edges without 'edge_predicate' (where it "
            "takes an attribute name, e.g. attr= or key=, pass 'edge_predicate')"
        )
    num_nodes = after.num_nodes if node_id is None else node_id.numel()
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= (num_nodes or 0)):
        raise ValueError(
            f"{where}: 'edge_index' points outside the graph's {num_nodes} nodes (the transform changed the "
            "nodes without re-indexing the relations)"
        )
    extra = _relations(after, node_id) - _relations(before, None)
    if extra:
        (s, o, p), _ = next(iter(extra.items()))
        raise ValueError(
            f"{where}: the relation ({s} -> {o}, predicate {p}) is not one of its input relations "
            f"({sum(extra.values())} such); predicates are categorical labels of directed relations, so "
            "reversing, merging (summing ids) or inventing relations changes their meaning"
        )


class SceneGraphTransform(BaseTransform):
    r"""Apply a PyG transform to scene graphs and refuse results whose relations changed meaning.

    A result passes when each of its relations ``(subject, object, predicate)`` is a relation of the input
    (as a multiset, nodes followed through relabelling): permuting, filtering, splitting (e.g.
    :class:`~torch_geometric.transforms.RandomLinkSplit`, which writes its own link-level ``edge_label``)
    and subgraphs pass. Otherwise a :class:`ValueError` names the transform. A
    :class:`~torch_geometric.transforms.Compose` is checked step by step, so the error names the step.
    Transforms returning several graphs (``RandomLinkSplit``) are checked on each. The check reads the
    relations on the host (``.tolist()``); it runs where dataset transforms run, in data loading.

    Args:
        transform: Any callable on :class:`~torch_geometric.data.Data` (usually a PyG transform).

    Raises:
        TypeError: if ``transform`` is not callable.
    """

    def __init__(self, transform: Callable[..., Any]) -> None:
        if not callable(transform):
            raise TypeError(
                f"SceneGraphTransform: 'transform' must be callable (got {type(transform).__name__})"
            )
        self.transform = transform

    @classmethod
    def wrap(cls, transform: Callable[..., Any] | None) -> Callable[..., Any] | None:
        """``transform`` guarded (``None`` stays ``None``; a guard is not wrapped twice)."""
        if transform is None or isinstance(transform, SceneGraphTransform):
            return transform
        if isinstance(transform, Compose):
            return Compose([cls.wrap(t) for t in transform.transforms])  # type: ignore[misc]
        return cls(transform)

    def forward(self, data: Any) -> Any:  # noqa: D102
        if not isinstance(data, Data) or "edge_predicate" not in data or "edge_index" not in data:
            return self.transform(data)
        tracked = copy.copy(data)
        num_nodes = data.num_nodes
        tracked[_NODE_ID] = torch.arange(num_nodes, device=data.edge_index.device)
        out = self.transform(tracked)
        for result in out if isinstance(out, (tuple, list)) else (out,):
            node_id = result[_NODE_ID] if isinstance(result, Data) and _NODE_ID in result else None
            if isinstance(result, Data):
                if node_id is not None:
                    del result[_NODE_ID]
                if node_id is None and result.num_nodes != num_nodes:
                    raise ValueError(
                        f"{self.transform!r} changed the nodes of a scene graph in a way that cannot be "
                        "followed (node attributes were not carried)"
                    )
                check_relations(data, result, repr(self.transform), node_id)
        return out

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.transform!r})"


class ObjectFeatures(BaseTransform):
    r"""The default node feature of a scene graph without visual features: class one-hot and box code.

    .. math::
        \mathbf{x}_i = \big[\,\mathrm{onehot}(y_i) \,\Vert\, \mathrm{code}(\mathbf{b}_i, W, H)\,\big]
            \in \mathbb{R}^{C + 9}

    with the 9-d box code of :func:`~pyg_scenegraph.box_code` (Scene-Graph-Benchmark's ``encode_box_info``).
    The class one-hot makes the feature a PredCls input (the labels are given); use ``with_class=False``
    (box code only) where the model must predict classes (SGCls). The datasets of this package add it when a
    graph has no ``x``, so that ``dataset.num_node_features`` is ``C + 9``.

    Args:
        num_object_classes: :math:`C`, object classes including background.
        with_class: Include the class one-hot. (default: ``True``)
        overwrite: Replace an existing ``x``. (default: ``False``)

    Raises:
        ValueError: for a non-positive ``num_object_classes``, or (when called) labels outside
            ``[0, C)`` or a graph without ``box``/``image_size``.
    """

    def __init__(self, num_object_classes: int, with_class: bool = True, overwrite: bool = False) -> None:
        if num_object_classes <= 0:
            raise ValueError(f"ObjectFeatures needs 'num_object_classes' > 0 (got {num_object_classes})")
        self.num_object_classes = num_object_classes
        self.with_class = with_class
        self.overwrite = overwrite

    @property
    def num_features(self) -> int:
        """Size of the feature: ``C + 9`` (or 9 without the class)."""
        return self.num_object_classes * int(self.with_class) + 9

    def forward(self, data: Any) -> Any:  # noqa: D102
        if "x" in data and data.x is not None and not self.overwrite:
            return data
        if "box" not in data or "image_size" not in data:
            raise ValueError("ObjectFeatures: the graph needs 'box' and 'image_size' to encode the boxes")
        size = data.image_size.view(-1, 2)
        batch = data.batch if "batch" in data and data.batch is not None else None
        size = size[batch] if batch is not None else size.expand(data.box.size(0), 2)
        parts = [box_code(data.box.float(), size.float())]
        if self.with_class:
            y = data.y
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_object_classes):
                raise ValueError(
                    f"ObjectFeatures: 'y' must lie in [0, {self.num_object_classes}) "
                    f"(got [{int(y.min())}, {int(y.max())}])"
                )
            parts.insert(0, F.one_hot(y.long(), self.num_object_classes).to(parts[0].dtype))
        data.x = torch.cat(parts, dim=-1)
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.num_object_classes}, with_class={self.with_class})"


def dataset_transform(
    transform: Callable[..., Any] | None, num_object_classes: int, default_features: bool
) -> Callable[..., Any] | None:
    """The ``transform`` of this package's datasets: default features first, then the guarded user transform.

    Args:
        transform: The user's transform, or ``None``.
        num_object_classes: :math:`C` of :class:`ObjectFeatures`.
        default_features: Prepend :class:`ObjectFeatures` (which leaves an existing ``x`` alone).
    """
    guarded = SceneGraphTransform.wrap(transform)
    if not default_features:
        return guarded
    features = ObjectFeatures(num_object_classes)
    return features if guarded is None else Compose([features, guarded])
