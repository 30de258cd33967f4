"""Dense reference of the official energy model (mods333/energy-based-scene-graph), written from its formulas.

The official EGNN keeps an ``N x N`` adjacency over the *whole batch* and an ``N x N x F_e`` edge-state
tensor, runs the node→edge kernel as 1x1 convolutions over all ``N^2`` pairs (masked by the adjacency),
and reads the edge states back at the relation pairs. These functions do exactly that with the parameters
of our modules, so that tests can compare values and gradients, and ``examples/bench_egnn.py`` can time it.
No code is copied from the official repository.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pyg_scenegraph import EGNNConv, GraphEnergyModel, ImageGraphConv
from torch import Tensor


def gru_formula(inp: Tensor, h: Tensor, cell: torch.nn.GRUCell) -> Tensor:
    """GRU cell written from its equations (Cho et al., 2014), with the cell's parameters."""
    gi = inp @ cell.weight_ih.t()
    gh = h @ cell.weight_hh.t()
    if cell.bias:
        gi, gh = gi + cell.bias_ih, gh + cell.bias_hh
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def _mlp(x: Tensor, seq: torch.nn.Sequential) -> Tensor:
    lin1, lin2 = seq[0], seq[2]
    return F.relu(F.linear(F.relu(F.linear(x, lin1.weight, lin1.bias)), lin2.weight, lin2.bias))


def _conv_mlp(pairs: Tensor, seq: torch.nn.Sequential) -> Tensor:
    """The official node→edge kernel: two 1x1 Conv2d + ReLU over a [1, 2F, N, N] pair image."""
    lin1, lin2 = seq[0], seq[2]
    h = F.relu(F.conv2d(pairs, lin1.weight[:, :, None, None], lin1.bias))
    return F.relu(F.conv2d(h, lin2.weight[:, :, None, None], lin2.bias))


def dense_adjacency(edge_index: Tensor, num_nodes: int, dtype: torch.dtype) -> Tensor:
    adj = torch.zeros(num_nodes, num_nodes, dtype=dtype, device=edge_index.device)
    adj[edge_index[0], edge_index[1]] = 1
    return adj


def dense_egnn(
    conv: EGNNConv, x: Tensor, edge_index: Tensor, edge_attr: Tensor, use_formula_gru: bool = True
):
    """The official dense EGNN iteration; returns node states and the edge states at ``edge_index``."""
    n = x.size(0)
    adj = dense_adjacency(edge_index, n, x.dtype)
    edges = torch.zeros(n, n, edge_attr.size(-1), dtype=x.dtype, device=x.device)
    edges = edges.index_put(
        (edge_index[0], edge_index[1]), edge_attr, accumulate=True
    )  # sparse.to_dense sums
    node_gru = (lambda a, b: gru_formula(a, b, conv.node_gru)) if use_formula_gru else conv.node_gru
    edge_gru = (lambda a, b: gru_formula(a, b, conv.edge_gru)) if use_formula_gru else conv.edge_gru
    for _ in range(conv.num_iterations):
        m_nn = adj @ x / (adj.sum(dim=1, keepdim=True) + conv.eps)
        m_en = (adj[:, :, None] * edges).sum(dim=0)
        pair = (
            torch.cat([x.repeat(1, n).view(n * n, -1), x.repeat(n, 1)], dim=1).view(n, n, -1)
            * adj[:, :, None]
        )
        m_ne = _conv_mlp(pair.transpose(0, 2).unsqueeze(0), conv.node2edge).squeeze(0).transpose(0, 2)
        node_in = conv.alpha * _mlp(m_nn, conv.node2node) + (1 - conv.alpha) * _mlp(m_en, conv.edge2node)
        x_new = node_gru(node_in, x)
        edges = edge_gru(m_ne.reshape(n * n, -1), edges.reshape(n * n, -1)).view(n, n, -1)
        x = x_new
    return x, edges[edge_index[0], edge_index[1]]


def dense_image_graph(conv: ImageGraphConv, x: Tensor, edge_index: Tensor) -> Tensor:
    adj = dense_adjacency(edge_index, x.size(0), x.dtype)
    for _ in range(conv.num_iterations):
        m = adj @ x / (adj.sum(dim=1, keepdim=True) + conv.eps)
        x = gru_formula(_mlp(m, conv.kernel), x, conv.gru)
    return x


def dense_energy(
    model: GraphEnergyModel,
    x: Tensor,
    node_states: Tensor,
    edge_index: Tensor,
    edge_states: Tensor,
    box_code: Tensor,
    batch: Tensor,
    num_graphs: int,
) -> Tensor:
    """The official ``GraphEnergyModel.forward`` over a dense batch adjacency (BatchNorm as set)."""
    image = dense_image_graph(
        model.image_conv, F.linear(x, model.image_embedding.weight, model.image_embedding.bias), edge_index
    )
    box = model.box_embedding(box_code)
    nodes = F.linear(
        torch.cat([node_states, box], -1), model.node_embedding.weight, model.node_embedding.bias
    )
    edges = F.linear(edge_states, model.edge_embedding.weight, model.edge_embedding.bias)
    nodes, edges = dense_egnn(model.scene_conv, nodes, edge_index, edges)
    member = F.one_hot(batch, num_graphs).to(x.dtype).t()  # [B, N]
    edge_member = F.one_hot(batch[edge_index[0]], num_graphs).to(x.dtype).t()
    ip, sp = model.image_pool, model.scene_pool
    image_pooled = F.linear(
        member @ (F.linear(image, ip.gate.weight, ip.gate.bias) * image), ip.lin.weight, ip.lin.bias
    )
    node_pool = member @ (F.linear(nodes, sp.node_gate.weight, sp.node_gate.bias) * nodes)
    edge_pool = edge_member @ (F.linear(edges, sp.edge_gate.weight, sp.edge_gate.bias) * edges)
    scene_pooled = F.linear(torch.cat([node_pool, edge_pool], -1), sp.lin.weight, sp.lin.bias)
    h = F.relu(
        F.linear(torch.cat([image_pooled, scene_pooled], -1), model.energy[0].weight, model.energy[0].bias)
    )
    return F.linear(h, model.energy[2].weight, model.energy[2].bias).squeeze(-1)
