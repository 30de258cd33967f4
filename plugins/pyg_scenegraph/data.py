r"""A :class:`torch_geometric.data.Data` type for scene graphs whose relation fields batch correctly.

A scene graph (`Johnson et al., CVPR 2015 <https://openaccess.thecvf.com/content_cvpr_2015/html/Johnson_Image_Retrieval_Using_2015_CVPR_paper.html>`_)
is a set of objects (nodes: a class label and a box) and relations ``(subject, predicate, object)``
(directed edges). :class:`SceneGraphData` stores them in PyG's layout so that
:class:`~torch_geometric.loader.DataLoader` and :class:`~torch_geometric.data.Batch` work unchanged.

Predicates live in ``edge_predicate``, not ``edge_label``: ``edge_label`` / ``edge_label_index`` are PyG's
names for link-level supervision, written by :class:`~torch_geometric.transforms.RandomLinkSplit` and
:class:`~torch_geometric.loader.LinkNeighborLoader`. ``edge_predicate`` is an edge attribute, so every
transform that permutes, filters or splits edges carries it; transforms that invent, reverse or merge
relations are caught by :class:`~pyg_scenegraph.transforms.SceneGraphTransform` (see docs/pyg_scenegraph.md).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import Tensor
from torch_geometric.data import Data

__all__ = ["SceneGraphData", "first_predicate_per_pair"]

_RENAMED = (
    "SceneGraphData: predicates are stored in 'edge_predicate' since PyG's link-level tools "
    "(RandomLinkSplit, LinkNeighborLoader) write their own 'edge_label'; the 'edge_label' alias will be "
    "removed"
)


def first_predicate_per_pair(edge_index: Tensor) -> Tensor:
    r"""Positions of the relations to keep so that each ``(subject, object)`` pair has one predicate.

    The first occurrence in the current order is kept (what :class:`~pyg_scenegraph.VG150` does for its
    training split; Scene-Graph-Benchmark draws one of a pair's predicates at random on every access).

    Args:
        edge_index: ``[2, R]`` relation pairs.

    Returns:
        ``[R']`` sorted positions into the relations, ``R' <=  R``.
    """
    if edge_index.size(1) == 0:
        return torch.zeros(0, dtype=torch.long, device=edge_index.device)
    num_nodes = int(edge_index.max()) + 1
    key = edge_index[0] * num_nodes + edge_index[1]
    unique, inverse = torch.unique(key, return_inverse=True)
    position = torch.arange(key.numel(), device=key.device)
    first = torch.full_like(unique, key.numel()).scatter_reduce(0, inverse, position, reduce="amin")
    return first.sort().values


class SceneGraphData(Data):
    r"""One image's scene graph.

    Fields (all optional except ``y``, ``box`` and ``image_size`` for the datasets of this package):

    * ``x`` ``[N, F]`` — per-object visual features (ROI features; for synthetic scenes a noisy rendering).
    * ``y`` ``[N]`` — object class ids, **1-based**; ``0`` is reserved for background (VG150 convention).
    * ``box`` ``[N, 4]`` — object boxes :math:`(x_1, y_1, x_2, y_2)` in pixels.
    * ``image_size`` ``[1, 2]`` — image :math:`(W, H)`; one row per graph, so a batch holds ``[B, 2]``.
    * ``edge_index`` ``[2, R]`` — ground-truth relation pairs, row 0 = subject, row 1 = object. The same pair
      may occur more than once with different predicates (Visual Genome does this).
    * ``edge_predicate`` ``[R]`` — predicate ids (``torch.long``), **1-based**; ``0`` = no relation.
      ``SceneGraphData(edge_label=...)`` and reading ``data.edge_label`` (when no link-level ``edge_label``
      exists) still work as a deprecated alias of ``edge_predicate``.
    * ``pair_index`` ``[2, Q]`` — optional candidate pairs (e.g. all ordered pairs for PredCls).
    * any ``*triplet`` field ``[T, 3]`` of ``(subject, object, predicate)`` rows, e.g. predicted triplets.

    Fields whose name contains ``"index"`` are shifted by the node count when batched (PyG's default). A
    ``[T, 3]`` triplet field must shift only its first two columns, which PyG cannot know: :meth:`__inc__`
    returns ``[[N, N, 0]]`` for it, and :meth:`~torch_geometric.data.Batch.get_example` undoes the shift.

    Example:
        >>> data = SceneGraphData(y=torch.tensor([1, 2]), box=torch.tensor([[0., 0, 4, 4], [2, 2, 8, 8]]),
        ...                       image_size=torch.tensor([[10, 10]]), edge_index=torch.tensor([[0], [1]]),
        ...                       edge_predicate=torch.tensor([3]))
        >>> data.triplets()
        tensor([[0, 1, 3]])
    """

    def __inc__(self, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if key.endswith("triplet") and isinstance(value, Tensor) and value.dim() == 2 and value.size(-1) == 3:
            return torch.tensor([[self.num_nodes, self.num_nodes, 0]], device=value.device)
        return super().__inc__(key, value, *args, **kwargs)

    def __cat_dim__(self, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if key.endswith("triplet"):
            return 0
        return super().__cat_dim__(key, value, *args, **kwargs)

    def __init__(self, **kwargs: Any) -> None:
        if "edge_label" in kwargs and "edge_predicate" not in kwargs:
            warnings.warn(_RENAMED, DeprecationWarning, stacklevel=2)
            kwargs["edge_predicate"] = kwargs.pop("edge_label")
        # Objects are defined by labels or boxes even without visual features: record the node count so that
        # collation never has to guess it (PyG warns and may guess wrong otherwise).
        if "num_nodes" not in kwargs:
            for key in ("y", "box", "x"):
                value = kwargs.get(key)
                if isinstance(value, Tensor):
                    kwargs["num_nodes"] = int(value.size(0))
                    break
        super().__init__(**kwargs)

    def __getattr__(self, key: str) -> Any:
        if key == "edge_label":  # deprecated alias, unless a link-level 'edge_label' exists
            store = self.__dict__.get("_store")
            if store is not None and "edge_label" not in store and "edge_predicate" in store:
                warnings.warn(_RENAMED, DeprecationWarning, stacklevel=2)
                return store["edge_predicate"]
        return super().__getattr__(key)

    def coalesce(self) -> SceneGraphData:
        r"""Sort the relations by ``(subject, object)`` and drop exact duplicate **triplets**.

        PyG's :meth:`~torch_geometric.data.Data.coalesce` merges duplicate pairs by summing their edge
        attributes, which would add predicate ids. Here a relation is the triplet ``(s, o, p)``: a pair
        annotated with two different predicates keeps both (use :func:`first_predicate_per_pair` for one
        predicate per pair), and every other edge attribute follows the kept relations.
        """
        out = copy.copy(self)
        store = out._store
        edge_index = store.get("edge_index")
        predicate = store.get("edge_predicate")
        if edge_index is None or predicate is None:
            return super().coalesce()  # type: ignore[return-value]
        num_nodes = max(int(out.num_nodes or 0), int(edge_index.max()) + 1 if edge_index.numel() else 0)
        num_predicates = int(predicate.max()) + 1 if predicate.numel() else 1
        key = (edge_index[0] * num_nodes + edge_index[1]) * num_predicates + predicate.long()
        unique, inverse = torch.unique(key, return_inverse=True)
        position = torch.arange(key.numel(), device=key.device)
        keep = torch.full_like(unique, key.numel()).scatter_reduce(0, inverse, position, reduce="amin")
        for name in [k for k in store.keys() if k != "edge_index" and store.is_edge_attr(k)]:
            store[name] = store[name][keep]
        store.edge_index = edge_index[:, keep]
        return out

    def triplets(self) -> Tensor:
        """Ground-truth relations as ``[R, 3]`` rows ``(subject, object, predicate)`` (``relation_tuple``).

        Raises:
            ValueError: if ``edge_index`` or ``edge_predicate`` is missing or their sizes disagree (e.g.
                after a PyG transform that edits the edges without carrying ``edge_predicate``).
            TypeError: if ``edge_predicate`` is not an integer tensor.
        """
        edge_index, predicate = self._store.get("edge_index"), self._store.get("edge_predicate")
        if edge_index is None or predicate is None:
            raise ValueError("SceneGraphData.triplets() needs both 'edge_index' and 'edge_predicate'")
        if predicate.is_floating_point() or predicate.dtype == torch.bool:
            raise TypeError(
                f"SceneGraphData: 'edge_predicate' must hold integer predicate ids (got {predicate.dtype})"
            )
        if edge_index.size(1) != predicate.numel():
            raise ValueError(
                f"SceneGraphData: 'edge_index' has {edge_index.size(1)} pairs but 'edge_predicate' has "
                f"{predicate.numel()} predicates; a transform changed the edges without the predicates "
                "(wrap PyG transforms in pyg_scenegraph.SceneGraphTransform to name it)"
            )
        return torch.cat([edge_index.t(), predicate.view(-1, 1).to(edge_index.dtype)], dim=-1)

    def validate_scene_graph(
        self, num_object_classes: int | None = None, num_predicate_classes: int | None = None
    ) -> SceneGraphData:
        """Check shapes, index ranges and label ranges; return ``self`` so it can be chained.

        Args:
            num_object_classes: number of object classes **including** background (e.g. 151 for VG150).
            num_predicate_classes: number of predicate classes **including** background (e.g. 51 for VG150).

        Raises:
            ValueError: for an empty graph, a graph without relations, relation indices out of range,
                mismatched sizes, or class ids outside ``[1, num_classes - 1]``.
        """
        name = type(self).__name__
        y, box = self._store.get("y"), self._store.get("box")
        if y is None or y.numel() == 0:
            raise ValueError(
                f"{name}: empty graph (no objects in 'y'); drop it before training or evaluation"
            )
        num_nodes = y.numel()
        if box is not None and box.shape != (num_nodes, 4):
            raise ValueError(f"{name}: 'box' must be [{num_nodes}, 4] to match 'y' (got {list(box.shape)})")
        x = self._store.get("x")
        if x is not None and x.size(0) != num_nodes:
            raise ValueError(f"{name}: 'x' has {x.size(0)} rows but 'y' has {num_nodes} objects")
        if num_object_classes is not None and (int(y.min()) < 1 or int(y.max()) >= num_object_classes):
            raise ValueError(
                f"{name}: object labels must lie in [1, {num_object_classes - 1}] "
                f"(got [{int(y.min())}, {int(y.max())}]); 0 is background"
            )
        triplets = self.triplets()
        if triplets.size(0) == 0:
            raise ValueError(f"{name}: graph without relations; filter such images (SGB's filter_empty_rels)")
        if int(triplets[:, :2].min()) < 0 or int(triplets[:, :2].max()) >= num_nodes:
            raise ValueError(
                f"{name}: 'edge_index' must point into [0, {num_nodes}) (got out-of-range indices)"
            )
        if bool((triplets[:, 0] == triplets[:, 1]).any()):
            raise ValueError(f"{name}: a relation has the same subject and object (a self-relation)")
        if num_predicate_classes is not None and (
            int(triplets[:, 2].min()) < 1 or int(triplets[:, 2].max()) >= num_predicate_classes
        ):
            raise ValueError(
                f"{name}: predicate labels must lie in [1, {num_predicate_classes - 1}]; 0 means no relation"
            )
        return self


# Processed datasets are saved with torch.save; let torch.load(weights_only=True) rebuild this class.
torch.serialization.add_safe_globals([SceneGraphData])
