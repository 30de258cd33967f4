r"""The graph energy model :math:`E_\theta(G_I, G_{SG})` of energy-based scene-graph learning."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import BatchNorm1d, Linear, ReLU, Sequential

from ._checks import check_float_input, check_index
from .egnn_conv import EGNNConv
from .image_graph_conv import ImageGraphConv
from .pooling import EdgeGatedPooling, GatedPooling

__all__ = ["GraphEnergyModel"]


class GraphEnergyModel(torch.nn.Module):
    r"""The graph energy model: one scalar per image, low when a scene graph fits the image.

    From `"Energy-Based Learning for Scene Graph Generation"
    <https://arxiv.org/abs/2103.02221>`_ (Suhail et al., CVPR 2021): one scalar per image that is low when a
    scene graph fits the image.

    .. math::
        E_\theta(G_I, G_{SG}) = \mathrm{MLP}\big(\big[\,\mathrm{GatedPool}(\mathrm{GGNN}(W_I\,\mathbf{x}))
            \ \Vert\ \mathrm{EdgeGatedPool}(\mathrm{EGNN}(W_n[\mathbf{s}_n \Vert B(\mathbf{b})],\
            W_e\,\mathbf{s}_e))\,\big]\big)

    * image graph :math:`G_I`: nodes are region features :math:`\mathbf{x}` embedded by :math:`W_I`, refined
      by :class:`ImageGraphConv`, pooled by :class:`GatedPooling`;
    * scene graph :math:`G_{SG}`: node states :math:`\mathbf{s}_n` (object-label distributions) concatenated
      with the box embedding :math:`B`
      (``Linear(9, 32)-BatchNorm(momentum=0.001)-Linear(32, box_channels)-ReLU`` of
      :func:`~pyg_scenegraph.boxes.box_code`), edge states :math:`\mathbf{s}_e` (predicate distributions),
      refined by :class:`EGNNConv` and pooled by :class:`EdgeGatedPooling`;
    * both graphs share the relation pairs ``edge_index``; the energy head is
      ``Linear(2P, P)-ReLU-Linear(P, 1)``.

    Symbols → arguments: :math:`|\mathbf{s}_n|` = ``num_object_classes`` (incl. background),
    :math:`|\mathbf{s}_e|` = ``num_predicate_classes`` (incl. background), :math:`|\mathbf{x}|` =
    ``in_channels``, :math:`P` = ``pooling_channels``.

    Args:
        num_object_classes (int): Size of a node state, e.g. 151 for VG150.
        num_predicate_classes (int): Size of an edge state, e.g. 51 for VG150.
        in_channels (int): Size of a region feature.
        hidden_channels (int, optional): Size of node and edge states inside both graph branches.
            (default: :obj:`512`)
        pooling_channels (int, optional): Size of each pooled graph vector :math:`P`. (default: :obj:`512`)
        box_channels (int, optional): Size of the box embedding. (default: :obj:`128`)
        num_iterations (int, optional): Iterations of both graph branches. (default: :obj:`3`)
        alpha (float, optional): Node→node message weight of :class:`EGNNConv`. (default: :obj:`0.5`)
        box_norm (bool, optional): Keep the official BatchNorm in the box embedding. Its batch statistics
            depend on the per-process batch, so set :obj:`False` where a distributed run must equal a
            single process exactly. (default: :obj:`True`)

    Shapes:
        - **input:** region features :math:`(|\mathcal{V}|, F_{in})`, node states :math:`(|\mathcal{V}|, C)`,
          relation pairs :math:`(2, |\mathcal{E}|)` (no duplicate pairs),
          edge states :math:`(|\mathcal{E}|, P_e)`,
          box codes :math:`(|\mathcal{V}|, 9)`, batch vector :math:`(|\mathcal{V}|)` (optional)
        - **output:** energies :math:`(B)`

    A graph of the batch without relations is valid: its scene-graph branch pools a zero edge vector, as
    the official dense model does with an empty adjacency.

    Raises:
        ValueError: on mismatched feature sizes, a ``batch`` vector of the wrong length or out of
            ``[0, num_graphs)``, edge indices out of range, duplicate pairs, or relations across graphs.
        TypeError: for integer states or features, inputs of another floating precision than the
            parameters outside autocast (``model.to(dtype)``), or floating indices.

    The model keeps no state across calls (the box BatchNorm's running statistics only update in
    training mode, as in PyTorch) and passes NaN inputs through; :class:`~pyg_scenegraph.EBMLoss` refuses
    non-finite energies.
    """

    def __init__(
        self,
        num_object_classes: int,
        num_predicate_classes: int,
        in_channels: int,
        hidden_channels: int = 512,
        pooling_channels: int = 512,
        box_channels: int = 128,
        num_iterations: int = 3,
        alpha: float = 0.5,
        box_norm: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_object_classes", num_object_classes),
            ("num_predicate_classes", num_predicate_classes),
            ("in_channels", in_channels),
            ("hidden_channels", hidden_channels),
            ("pooling_channels", pooling_channels),
            ("box_channels", box_channels),
        ):
            if value <= 0:
                raise ValueError(f"GraphEnergyModel needs a positive '{name}' (got {value})")
        self.num_object_classes = num_object_classes
        self.num_predicate_classes = num_predicate_classes
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.pooling_channels = pooling_channels
        self.box_channels = box_channels
        self.box_norm = box_norm

        self.image_embedding = Linear(in_channels, hidden_channels)
        box_layers: list[torch.nn.Module] = [Linear(9, 32)]
        if box_norm:
            box_layers.append(BatchNorm1d(32, momentum=0.001))
        box_layers += [Linear(32, box_channels), ReLU()]
        self.box_embedding = Sequential(*box_layers)
        self.node_embedding = Linear(num_object_classes + box_channels, hidden_channels)
        self.edge_embedding = Linear(num_predicate_classes, hidden_channels)

        self.image_conv = ImageGraphConv(hidden_channels, num_iterations=num_iterations)
        self.scene_conv = EGNNConv(
            hidden_channels, hidden_channels, num_iterations=num_iterations, alpha=alpha
        )
        self.image_pool = GatedPooling(hidden_channels, pooling_channels)
        self.scene_pool = EdgeGatedPooling(hidden_channels, hidden_channels, pooling_channels)
        self.energy = Sequential(
            Linear(2 * pooling_channels, pooling_channels), ReLU(), Linear(pooling_channels, 1)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Re-initialise all learnable parameters."""
        for child in self.modules():
            if child is not self and hasattr(child, "reset_parameters"):
                child.reset_parameters()  # type: ignore[operator]

    def _validate(
        self,
        x: Tensor,
        node_states: Tensor,
        edge_index: Tensor,
        edge_states: Tensor,
        box_code: Tensor,
        batch: Tensor | None,
        num_graphs: int,
    ) -> None:
        name = type(self).__name__
        num_nodes = node_states.size(0)
        if num_nodes == 0:
            raise ValueError(f"{name}: empty graph (no nodes)")
        expected = (
            ("x", x, self.in_channels),
            ("node_states", node_states, self.num_object_classes),
            ("box_code", box_code, 9),
        )
        weight = self.image_embedding.weight
        for arg, value, size in expected:
            if value.dim() != 2 or value.shape != (num_nodes, size):
                raise ValueError(f"{name}: '{arg}' must be [{num_nodes}, {size}] (got {list(value.shape)})")
            check_float_input(name, arg, value, weight)
        check_float_input(name, "edge_states", edge_states, weight)
        if edge_index.dim() != 2 or edge_index.size(0) != 2:
            raise ValueError(f"{name}: 'edge_index' must be [2, num_edges] (got {list(edge_index.shape)})")
        check_index(name, "edge_index", edge_index)
        if num_graphs < 1:
            raise ValueError(f"{name}: 'num_graphs' must be >= 1 (got {num_graphs})")
        if batch is not None:
            check_index(name, "batch", batch)
            if batch.dim() != 1 or batch.numel() != num_nodes:
                raise ValueError(
                    f"{name}: 'batch' must be [{num_nodes}] (one graph id per node) (got {list(batch.shape)})"
                )
            if int(batch.min()) < 0 or int(batch.max()) >= num_graphs:
                raise ValueError(
                    f"{name}: 'batch' must lie in [0, {num_graphs}) "
                    f"(got [{int(batch.min())}, {int(batch.max())}])"
                )
        if edge_states.dim() != 2 or edge_states.shape != (edge_index.size(1), self.num_predicate_classes):
            raise ValueError(
                f"{name}: 'edge_states' must be [{edge_index.size(1)}, {self.num_predicate_classes}] "
                f"(got {list(edge_states.shape)})"
            )
        if edge_index.numel() > 0 and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
            raise ValueError(
                f"{name}: 'edge_index' must point into [0, {num_nodes}) (got out-of-range indices)"
            )
        key = edge_index[0] * num_nodes + edge_index[1]
        if key.unique().numel() != key.numel():
            raise ValueError(
                f"{name}: duplicate relation pairs; the dense official model merges them, so coalesce first "
                "(see pyg_scenegraph.positive_scene_graph)"
            )
        if batch is not None and bool((batch[edge_index[0]] != batch[edge_index[1]]).any()):
            raise ValueError(f"{name}: a relation connects nodes of two different graphs")
        if self.training and self.box_norm and not bool(torch.isfinite(box_code).all()):
            raise ValueError(
                f"{name}: 'box_code' contains non-finite values (nan or inf); they would enter the box "
                "BatchNorm's running statistics"
            )

    def forward(
        self,
        x: Tensor,
        node_states: Tensor,
        edge_index: Tensor,
        edge_states: Tensor,
        box_code: Tensor,
        batch: Tensor | None = None,
        num_graphs: int | None = None,
    ) -> Tensor:
        """Energy of each (image graph, scene graph) pair of the batch, shape ``[num_graphs]``."""
        if num_graphs is None:
            num_graphs = 1 if batch is None or batch.numel() == 0 else int(batch.max()) + 1
        if not torch.compiler.is_compiling():
            self._validate(x, node_states, edge_index, edge_states, box_code, batch, num_graphs)
        edge_batch = None if batch is None else batch[edge_index[0]]

        image = self.image_conv(self.image_embedding(x), edge_index)
        nodes = self.node_embedding(torch.cat([node_states, self.box_embedding(box_code)], dim=-1))
        nodes, edges = self.scene_conv(nodes, edge_index, self.edge_embedding(edge_states))

        image_pooled = self.image_pool(image, batch, num_graphs)
        scene_pooled = self.scene_pool(nodes, edges, batch, edge_batch, num_graphs)
        return self.energy(torch.cat([image_pooled, scene_pooled], dim=-1)).squeeze(-1)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(num_object_classes={self.num_object_classes}, "
            f"num_predicate_classes={self.num_predicate_classes}, in_channels={self.in_channels}, "
            f"hidden_channels={self.hidden_channels}, pooling_channels={self.pooling_channels}, "
            f"box_norm={self.box_norm})"
        )
