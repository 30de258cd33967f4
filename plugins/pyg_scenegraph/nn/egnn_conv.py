r"""The edge graph neural network (EGNN) layer of the scene-graph energy model."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import GRUCell, Linear, ReLU, Sequential
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.utils import scatter

from ._checks import check_float_input, check_index

__all__ = ["EGNNConv"]


def _kernel(in_channels: int, out_channels: int) -> Sequential:
    return Sequential(Linear(in_channels, out_channels), ReLU(), Linear(out_channels, out_channels), ReLU())


def _reset(module: torch.nn.Module) -> None:
    for child in module.modules():
        if isinstance(child, (Linear, GRUCell)):
            child.reset_parameters()


class EGNNConv(MessagePassing):
    r"""The edge graph neural network (EGNN) layer that refines node and edge states of a scene graph.

    From the `"Energy-Based Learning for Scene Graph Generation"
    <https://arxiv.org/abs/2103.02221>`_ paper (Suhail et al., CVPR 2021), which refines node **and** edge
    states of a scene graph for :math:`T` iterations with weights shared across iterations.

    For directed pairs :math:`(i \rightarrow j)` (subject :math:`i`, object :math:`j`) with node states
    :math:`\mathbf{x}` and edge states :math:`\mathbf{e}`, each iteration computes, from the previous states,

    .. math::
        \mathbf{m}^{nn}_i &= \frac{1}{|\mathcal{N}^{out}(i)| + \epsilon}
            \sum_{j \in \mathcal{N}^{out}(i)} \mathbf{x}_j

        \mathbf{m}^{en}_j &= \sum_{i \in \mathcal{N}^{in}(j)} \mathbf{e}_{i \rightarrow j}

        \mathbf{x}_i &\leftarrow \mathrm{GRU}\big(\alpha\, K_{nn}(\mathbf{m}^{nn}_i)
            + (1 - \alpha)\, K_{en}(\mathbf{m}^{en}_i),\ \mathbf{x}_i\big)

        \mathbf{e}_{i \rightarrow j} &\leftarrow \mathrm{GRU}_{\text{no bias}}\big(
            K_{ne}([\mathbf{x}_i \,\Vert\, \mathbf{x}_j]),\ \mathbf{e}_{i \rightarrow j}\big)

    where every kernel :math:`K` is ``Linear-ReLU-Linear-ReLU``. The official code computes this densely over
    all :math:`N^2` node pairs of the batch; states of non-edges never reach a node (both node messages are
    masked by the adjacency), so this :math:`\mathcal{O}(|\mathcal{E}|)` message-passing form is exact. The
    :math:`\epsilon` in the mean is the official code's ``1e-6``; a node without out-neighbours gets
    :math:`\mathbf{m}^{nn} = \mathbf{0}`. A graph without edges is valid, as for PyG's convolutions: both
    messages are zero and each node state is still updated by the GRU (what the dense form computes with
    an all-zero adjacency).

    Symbols → arguments: :math:`T` = ``num_iterations``, :math:`\alpha` = ``alpha``,
    :math:`\epsilon` = ``eps``.

    Args:
        channels (int): Size of each node state.
        edge_channels (int, optional): Size of each edge state (default: :obj:`channels`).
        num_iterations (int, optional): Number of shared-weight refinement steps :math:`T`.
            (default: :obj:`3`)
        alpha (float, optional): Weight :math:`\alpha` of the node→node message against the edge→node message.
            (default: :obj:`0.5`)
        eps (float, optional): Added to the out-degree in the mean. (default: :obj:`1e-6`)
        **kwargs (optional): Additional arguments of :class:`torch_geometric.nn.conv.MessagePassing`.

    Shapes:
        - **input:**
          node states :math:`(|\mathcal{V}|, F)`,
          edge indices :math:`(2, |\mathcal{E}|)` (row 0 = subject, row 1 = object),
          edge states :math:`(|\mathcal{E}|, F_e)`
        - **output:** node states :math:`(|\mathcal{V}|, F)`, edge states :math:`(|\mathcal{E}|, F_e)`

    Raises:
        ValueError: for non-positive sizes, ``alpha`` outside :math:`[0, 1]`, or (in :meth:`forward`) states
            whose sizes do not match, an empty graph, or edge indices out of range.
        TypeError: (in :meth:`forward`) for integer states, states of another floating precision than the
            parameters outside autocast (``module.to(dtype)`` converts the layer), or floating indices.

    Like PyTorch's layers, the layer keeps no state and passes NaN or infinite inputs through unchecked (a
    NaN in gives a NaN out); the losses and samplers downstream check.
    """

    def __init__(
        self,
        channels: int,
        edge_channels: int | None = None,
        num_iterations: int = 3,
        alpha: float = 0.5,
        eps: float = 1e-6,
        **kwargs,
    ) -> None:
        kwargs.setdefault("aggr", "add")
        kwargs.setdefault("flow", "target_to_source")  # aggregate x_j of the objects j at the subject i
        super().__init__(**kwargs)
        edge_channels = channels if edge_channels is None else edge_channels
        if channels <= 0 or edge_channels <= 0:
            raise ValueError(
                f"EGNNConv needs positive 'channels' and 'edge_channels' (got {channels}, {edge_channels}); "
                "project the inputs with torch.nn.Linear first"
            )
        if num_iterations < 1:
            raise ValueError(f"EGNNConv needs 'num_iterations' >= 1 (got {num_iterations})")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"EGNNConv needs 'alpha' in [0, 1] (got {alpha})")
        self.channels = channels
        self.edge_channels = edge_channels
        self.num_iterations = num_iterations
        self.alpha = alpha
        self.eps = eps

        self.node2node = _kernel(channels, channels)
        self.edge2node = _kernel(edge_channels, channels)
        self.node2edge = _kernel(2 * channels, edge_channels)
        self.node_gru = GRUCell(channels, channels)
        self.edge_gru = GRUCell(edge_channels, edge_channels, bias=False)

        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Re-initialise all learnable parameters."""
        super().reset_parameters()
        for module in (self.node2node, self.edge2node, self.node2edge, self.node_gru, self.edge_gru):
            _reset(module)

    def _validate(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> None:
        name = type(self).__name__
        if x.dim() != 2 or x.size(-1) != self.channels:
            raise ValueError(f"{name}: 'x' must be [num_nodes, {self.channels}] (got {list(x.shape)})")
        if x.size(0) == 0:
            raise ValueError(f"{name}: empty graph (no nodes)")
        if edge_index.dim() != 2 or edge_index.size(0) != 2:
            raise ValueError(f"{name}: 'edge_index' must be [2, num_edges] (got {list(edge_index.shape)})")
        check_index(name, "edge_index", edge_index)
        weight = self.node_gru.weight_hh
        check_float_input(name, "x", x, weight)
        check_float_input(name, "edge_attr", edge_attr, weight)
        if edge_attr.dim() != 2 or edge_attr.shape != (edge_index.size(1), self.edge_channels):
            raise ValueError(
                f"{name}: 'edge_attr' must be [{edge_index.size(1)}, {self.edge_channels}] "
                f"(got {list(edge_attr.shape)})"
            )
        if edge_index.numel() > 0 and (int(edge_index.min()) < 0 or int(edge_index.max()) >= x.size(0)):
            raise ValueError(
                f"{name}: 'edge_index' must point into [0, {x.size(0)}) (got out-of-range indices)"
            )

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> tuple[Tensor, Tensor]:
        """Refine node and edge states; returns ``(x, edge_attr)`` after ``num_iterations`` steps."""
        if not torch.compiler.is_compiling():
            self._validate(x, edge_index, edge_attr)
        num_nodes = x.size(0)
        subject, obj = edge_index[0], edge_index[1]
        # 1 / (0 + 1e-6) overflows float16: the degree term is kept in at least float32 (autocast safe).
        ones = torch.ones(subject.numel(), dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        out_degree = scatter(ones, subject, dim=0, dim_size=num_nodes, reduce="sum")
        inv_degree = (out_degree + self.eps).reciprocal().unsqueeze(-1)
        for _ in range(self.num_iterations):
            m_nn = (self.propagate(edge_index, x=x, size=(num_nodes, num_nodes)) * inv_degree).to(x.dtype)
            m_en = scatter(edge_attr, obj, dim=0, dim_size=num_nodes, reduce="sum")
            m_ne = self.edge_updater(edge_index, x=x, size=(num_nodes, num_nodes))
            node_in = self.alpha * self.node2node(m_nn) + (1.0 - self.alpha) * self.edge2node(m_en)
            x, edge_attr = self.node_gru(node_in, x), self.edge_gru(m_ne, edge_attr)
        return x, edge_attr

    def message(self, x_j: Tensor) -> Tensor:
        r"""Node-to-node message: the object state :math:`x_j`."""
        return x_j

    def edge_update(self, x_i: Tensor, x_j: Tensor) -> Tensor:
        r"""Node-to-edge message :math:`K_{ne}([x_i \Vert x_j])`."""
        # flow="target_to_source": x_i is the subject (edge_index[0]), x_j the object (edge_index[1]).
        return self.node2edge(torch.cat([x_i, x_j], dim=-1))

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.channels}, edge_channels={self.edge_channels}, "
            f"num_iterations={self.num_iterations}, alpha={self.alpha})"
        )
