r"""Gated readouts of the scene-graph energy model (node-only and node+edge)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import Linear
from torch_geometric.utils import scatter

__all__ = ["EdgeGatedPooling", "GatedPooling"]


def _graph_sum(src: Tensor, index: Tensor | None, size: int | None) -> Tensor:
    if index is None:
        return src.sum(dim=0, keepdim=True)
    return scatter(src, index, dim=0, dim_size=size, reduce="sum")


class GatedPooling(torch.nn.Module):
    r"""Gated sum readout of the image graph.

    From (`Suhail et al., CVPR 2021 <https://arxiv.org/abs/2103.02221>`_,
    after the GGNN readout of `Li et al., ICLR 2016 <https://arxiv.org/abs/1511.05493>`_):

    .. math::
        \mathbf{h}_G = \mathbf{W} \sum_{i \in G} g(\mathbf{x}_i)\, \mathbf{x}_i + \mathbf{b},
        \qquad g(\mathbf{x}) = \mathbf{w}_g^\top \mathbf{x} + b_g

    The gate :math:`g` is linear (no softmax or sigmoid), as in the official code.

    Args:
        in_channels (int): Size of each node state.
        out_channels (int): Size of the pooled vector.

    Shapes:
        - **input:** node states :math:`(|\mathcal{V}|, F)`, batch vector :math:`(|\mathcal{V}|)` (optional)
        - **output:** :math:`(B, F_{out})`
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.gate = Linear(in_channels, 1)
        self.lin = Linear(in_channels, out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Re-initialise all learnable parameters."""
        self.gate.reset_parameters()
        self.lin.reset_parameters()

    def forward(self, x: Tensor, batch: Tensor | None = None, num_graphs: int | None = None) -> Tensor:
        """Pool node states per graph."""
        return self.lin(_graph_sum(self.gate(x) * x, batch, num_graphs))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels})"


class EdgeGatedPooling(torch.nn.Module):
    r"""Gated readout of a scene graph over its nodes **and** edges.

    From (`Suhail et al., CVPR 2021 <https://arxiv.org/abs/2103.02221>`_):

    .. math::
        \mathbf{h}_G = \mathbf{W} \Big[\sum_{i \in G} g_n(\mathbf{x}_i)\, \mathbf{x}_i \ \Big\Vert\
            \sum_{(i, j) \in G} g_e(\mathbf{e}_{ij})\, \mathbf{e}_{ij}\Big] + \mathbf{b}

    with linear gates :math:`g_n, g_e`. A graph without edges pools a zero edge vector.

    Args:
        node_channels (int): Size of each node state.
        edge_channels (int): Size of each edge state.
        out_channels (int): Size of the pooled vector.

    Shapes:
        - **input:** node states :math:`(|\mathcal{V}|, F)`, edge states :math:`(|\mathcal{E}|, F_e)`,
          node batch vector :math:`(|\mathcal{V}|)`, edge batch vector :math:`(|\mathcal{E}|)`
        - **output:** :math:`(B, F_{out})`
    """

    def __init__(self, node_channels: int, edge_channels: int, out_channels: int) -> None:
        super().__init__()
        self.node_channels = node_channels
        self.edge_channels = edge_channels
        self.out_channels = out_channels
        self.node_gate = Linear(node_channels, 1)
        self.edge_gate = Linear(edge_channels, 1)
        self.lin = Linear(node_channels + edge_channels, out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Re-initialise all learnable parameters."""
        self.node_gate.reset_parameters()
        self.edge_gate.reset_parameters()
        self.lin.reset_parameters()

    def forward(
        self,
        x: Tensor,
        edge_attr: Tensor,
        batch: Tensor | None = None,
        edge_batch: Tensor | None = None,
        num_graphs: int | None = None,
    ) -> Tensor:
        """Pool node and edge states per graph."""
        if (batch is None) != (edge_batch is None):
            raise ValueError("EdgeGatedPooling: pass both 'batch' and 'edge_batch', or neither")
        if batch is not None and num_graphs is None:
            num_graphs = int(batch.max()) + 1 if batch.numel() > 0 else 0
        node_pool = _graph_sum(self.node_gate(x) * x, batch, num_graphs)
        edge_pool = _graph_sum(self.edge_gate(edge_attr) * edge_attr, edge_batch, num_graphs)
        return self.lin(torch.cat([node_pool, edge_pool], dim=-1))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.node_channels}, {self.edge_channels}, {self.out_channels})"
