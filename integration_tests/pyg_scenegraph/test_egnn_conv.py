from __future__ import annotations

import pytest
import torch
from pyg_scenegraph import EGNNConv

from integration_tests.pyg_scenegraph.dense_reference import dense_egnn


def _graph(dtype=torch.float):
    torch.manual_seed(1)
    x = torch.randn(4, 8, dtype=dtype)
    # A fixed directed 4-node graph: node 3 has no out-neighbours, node 0 has no in-edges.
    edge_index = torch.tensor([[0, 0, 1, 2, 1], [1, 2, 2, 3, 3]])
    edge_attr = torch.randn(5, 6, dtype=dtype)
    return x, edge_index, edge_attr


def test_egnn_conv_repr_and_shapes():
    conv = EGNNConv(8, 6)
    assert str(conv) == "EGNNConv(8, edge_channels=6, num_iterations=3, alpha=0.5)"
    x, edge_index, edge_attr = _graph()
    out, edge_out = conv(x, edge_index, edge_attr)
    assert out.shape == (4, 8) and edge_out.shape == (5, 6)


@pytest.mark.parametrize("alpha", [0.5, 0.0, 1.0])
@pytest.mark.parametrize("iterations", [1, 3])
def test_egnn_conv_matches_dense_official_formulation_float64(alpha, iterations):
    conv = EGNNConv(8, 6, num_iterations=iterations, alpha=alpha).double()
    x, edge_index, edge_attr = _graph(torch.double)
    x.requires_grad_(True)
    edge_attr.requires_grad_(True)
    out, edge_out = conv(x, edge_index, edge_attr)
    ref, ref_edge = dense_egnn(conv, x, edge_index, edge_attr)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(edge_out, ref_edge, rtol=0, atol=1e-10)
    weights = torch.randn_like(out), torch.randn_like(edge_out)
    loss = (out * weights[0]).sum() + (edge_out * weights[1]).sum()
    ref_loss = (ref * weights[0]).sum() + (ref_edge * weights[1]).sum()
    params = [x, edge_attr, *conv.parameters()]
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, params)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


def test_egnn_conv_matches_dense_float32_at_1e5_on_a_batch(scene_batch):
    conv = EGNNConv(6, 5)
    edge_attr = torch.randn(scene_batch.num_edges, 5)
    out, edge_out = conv(scene_batch.x, scene_batch.edge_index, edge_attr)
    ref, ref_edge = dense_egnn(conv, scene_batch.x, scene_batch.edge_index, edge_attr, use_formula_gru=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(edge_out, ref_edge, rtol=0, atol=1e-5)


def test_egnn_conv_direction_matters():
    # The subject aggregates its objects; reversing every edge must change the result.
    conv = EGNNConv(8, 6)
    x, edge_index, edge_attr = _graph()
    out, _ = conv(x, edge_index, edge_attr)
    flipped, _ = conv(x, edge_index.flip(0), edge_attr)
    assert not torch.allclose(out, flipped)


def test_egnn_conv_graphs_do_not_mix(scene_batch):
    conv = EGNNConv(6, 5)
    edge_attr = torch.randn(scene_batch.num_edges, 5)
    out, edge_out = conv(scene_batch.x, scene_batch.edge_index, edge_attr)
    first = scene_batch.get_example(0)
    mask = scene_batch.batch[scene_batch.edge_index[0]] == 0
    alone, alone_edge = conv(first.x, first.edge_index, edge_attr[mask])
    torch.testing.assert_close(out[: first.num_nodes], alone)
    torch.testing.assert_close(edge_out[mask], alone_edge)


def test_egnn_conv_node_states_depend_on_edge_states_only_through_alpha():
    x, edge_index, edge_attr = _graph()
    conv = EGNNConv(8, 6, alpha=1.0)
    a, _ = conv(x, edge_index, edge_attr)
    b, _ = conv(x, edge_index, edge_attr + 1.0)
    torch.testing.assert_close(a, b)  # alpha = 1: edge→node message ignored
    conv.alpha = 0.5
    c, _ = conv(x, edge_index, edge_attr)
    d, _ = conv(x, edge_index, edge_attr + 1.0)
    assert not torch.allclose(c, d)


def test_egnn_conv_compiles_without_graph_breaks():
    conv = EGNNConv(8, 6)
    x, edge_index, edge_attr = _graph()
    explanation = torch._dynamo.explain(conv)(x, edge_index, edge_attr)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(conv, fullgraph=True, backend="eager")
    out, edge_out = compiled(x, edge_index, edge_attr)
    ref, ref_edge = conv(x, edge_index, edge_attr)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(edge_out, ref_edge)


def test_egnn_conv_keeps_parameter_dtype_under_autocast():
    conv = EGNNConv(8, 6)
    x, edge_index, edge_attr = _graph()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, edge_out = conv(x, edge_index, edge_attr)
    assert torch.isfinite(out.float()).all() and torch.isfinite(edge_out.float()).all()
    assert all(p.dtype == torch.float32 for p in conv.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"channels": 0}, "positive 'channels'"), ({"channels": 4, "alpha": 1.5}, "'alpha' in"),
     ({"channels": 4, "num_iterations": 0}, "num_iterations")],
)  # fmt: skip
def test_egnn_conv_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EGNNConv(**kwargs)


def test_egnn_conv_bad_inputs():
    conv = EGNNConv(8, 6)
    x, edge_index, edge_attr = _graph()
    with pytest.raises(ValueError, match=r"'x' must be \[num_nodes, 8\]"):
        conv(x[:, :5], edge_index, edge_attr)
    with pytest.raises(ValueError, match=r"'edge_attr' must be \[5, 6\]"):
        conv(x, edge_index, edge_attr[:, :4])
    with pytest.raises(ValueError, match="out-of-range"):
        conv(x, torch.tensor([[0, 4], [1, 2]]), edge_attr[:2])
    with pytest.raises(ValueError, match="empty graph"):
        conv(x[:0], edge_index[:, :0], edge_attr[:0])


def test_egnn_conv_graph_without_edges_matches_dense_form():
    # As PyG convolutions: no edges is a valid graph. Both messages are zero, the GRU still updates x,
    # which is what the official dense form computes with an all-zero adjacency.
    conv = EGNNConv(8, 6).double()
    x, edge_index, edge_attr = _graph(torch.double)
    out, edge_out = conv(x, edge_index[:, :0], edge_attr[:0])
    ref, _ = dense_egnn(conv, x, edge_index[:, :0], edge_attr[:0])
    assert edge_out.shape == (0, 6)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert not torch.allclose(out, x)  # transformed, not returned as is
