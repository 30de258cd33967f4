r"""The image-graph branch of the scene-graph energy model (a GGNN with mean aggregation)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import GRUCell, Linear, ReLU, Sequential
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.utils import scatter

__all__ = ["ImageGraphConv"]


class ImageGraphConv(MessagePassing):
    r"""The image-graph layer of the energy model: a GGNN over region features with mean aggregation.

    From `"Energy-Based Learning for Scene Graph Generation"
    <https://arxiv.org/abs/2103.02221>`_ (Suhail et al., CVPR 2021): a gated graph network (`Li et al., ICLR
    2016 <https://arxiv.org/abs/1511.05493>`_) over object-region features, with mean aggregation over the
    out-neighbours of each region and weights shared across :math:`T` iterations. It has no edge states.

    .. math::
        \mathbf{m}_i = \frac{1}{|\mathcal{N}^{out}(i)| + \epsilon} \sum_{j \in \mathcal{N}^{out}(i)}
            \mathbf{x}_j, \qquad
        \mathbf{x}_i \leftarrow \mathrm{GRU}\big(K(\mathbf{m}_i),\ \mathbf{x}_i\big)

    with :math:`K` = ``Linear-ReLU-Linear-ReLU``. The edges are the pairs of the scene graph it is paired
    with.

    Args:
        channels (int): Size of each node state.
        num_iterations (int, optional): Number of refinement steps :math:`T`. (default: :obj:`3`)
        eps (float, optional): Added to the out-degree in the mean, as in the official code.
            (default: :obj:`1e-6`)
        **kwargs (optional): Additional arguments of :class:`torch_geometric.nn.conv.MessagePassing`.

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F)`, edge indices :math:`(2, |\mathcal{E}|)`
        - **output:** node features :math:`(|\mathcal{V}|, F)`

    Raises:
        ValueError: for non-positive sizes or, in :meth:`forward`, features of the wrong size, an empty graph
            or edge indices out of range.
    """

    def __init__(self, channels: int, num_iterations: int = 3, eps: float = 1e-6, **kwargs) -> None:
        kwargs.setdefault("aggr", "add")
        kwargs.setdefault("flow", "target_to_source")
        super().__init__(**kwargs)
        if channels <= 0:
            raise ValueError(f"ImageGraphConv needs positive 'channels' (got {channels})")
        if num_iterations < 1:
            raise ValueError(f"ImageGraphConv needs 'num_iterations' >= 1 (got {num_iterations})")
        self.channels = channels
        self.num_iterations = num_iterations
        self.eps = eps
        self.kernel = Sequential(Linear(channels, channels), ReLU(), Linear(channels, channels), ReLU())
        self.gru = GRUCell(channels, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Re-initialise all learnable parameters."""
        super().reset_parameters()
        for module in self.kernel:
            if isinstance(module, Linear):
                module.reset_parameters()
        self.gru.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """Refine the region features over ``num_iterations`` steps."""
        if not torch.compiler.is_compiling():
            if x.dim() != 2 or x.size(-1) != self.channels or x.size(0) == 0:
                raise ValueError(
                    f"ImageGraphConv: 'x' must be a non-empty [num_nodes, {self.channels}] "
                    f"(got {list(x.shape)})"
                )
            if edge_index.numel() > 0 and (int(edge_index.min()) < 0 or int(edge_index.max()) >= x.size(0)):
                raise ValueError(f"ImageGraphConv: 'edge_index' must point into [0, {x.size(0)})")
        num_nodes = x.size(0)
        # 1 / (0 + 1e-6) overflows float16: the degree term is kept in at least float32 (autocast safe).
        degree_dtype = torch.promote_types(x.dtype, torch.float32)
        ones = torch.ones(edge_index.size(1), dtype=degree_dtype, device=x.device)
        degree = scatter(ones, edge_index[0], dim=0, dim_size=num_nodes, reduce="sum")
        inv_degree = (degree + self.eps).reciprocal().unsqueeze(-1)
        for _ in range(self.num_iterations):
            m = (self.propagate(edge_index, x=x, size=(num_nodes, num_nodes)) * inv_degree).to(x.dtype)
            x = self.gru(self.kernel(m), x)
        return x

    def message(self, x_j: Tensor) -> Tensor:
        r"""Node-to-node message: the object state :math:`x_j`."""
        return x_j

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.channels}, num_iterations={self.num_iterations})"
