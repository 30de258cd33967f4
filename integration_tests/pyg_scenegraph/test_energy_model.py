from __future__ import annotations

import pytest
import torch
from pyg_scenegraph import EdgeGatedPooling, GatedPooling, GraphEnergyModel, ImageGraphConv, box_code
from torch_geometric.nn import global_add_pool

from integration_tests.pyg_scenegraph.dense_reference import dense_energy, dense_image_graph


def _inputs(batch, dtype=torch.float):
    torch.manual_seed(3)
    n, e = batch.num_nodes, batch.num_edges
    node_states = torch.rand(n, 7, dtype=dtype)
    edge_states = torch.rand(e, 5, dtype=dtype)
    code = box_code(batch.box, batch.image_size[batch.batch]).to(dtype)
    return batch.x.to(dtype), node_states, batch.edge_index, edge_states, code, batch.batch, batch.num_graphs


def test_energy_model_repr_and_shape(scene_batch):
    model = GraphEnergyModel(7, 5, 6, hidden_channels=16, pooling_channels=8)
    assert str(model) == (
        "GraphEnergyModel(num_object_classes=7, num_predicate_classes=5, in_channels=6, "
        "hidden_channels=16, pooling_channels=8, box_norm=True)"
    )
    assert model(*_inputs(scene_batch)).shape == (3,)


@pytest.mark.parametrize("train", [False, True])
def test_energy_model_matches_dense_official_float64(scene_batch, train):
    model = GraphEnergyModel(7, 5, 6, hidden_channels=16, pooling_channels=8).double().train(train)
    x, nodes, edge_index, edges, code, batch, b = _inputs(scene_batch, torch.double)
    nodes.requires_grad_(True)
    edges.requires_grad_(True)
    energy = model(x, nodes, edge_index, edges, code, batch, b)
    ref = dense_energy(model, x, nodes, edge_index, edges, code, batch, b)
    torch.testing.assert_close(energy, ref, rtol=0, atol=1e-10)
    params = [nodes, edges, *model.parameters()]
    w = torch.randn(3, dtype=torch.double)
    for g, r in zip(
        torch.autograd.grad((energy * w).sum(), params),
        torch.autograd.grad((ref * w).sum(), params),
        strict=True,
    ):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


def test_energy_model_float32_within_1e5_of_dense(scene_batch):
    model = GraphEnergyModel(7, 5, 6, hidden_channels=32, pooling_channels=16).eval()
    inputs = _inputs(scene_batch)
    torch.testing.assert_close(model(*inputs), dense_energy(model, *inputs), rtol=0, atol=1e-5)


def test_energy_of_a_graph_does_not_depend_on_the_rest_of_the_batch(scene_batch):
    model = GraphEnergyModel(7, 5, 6, hidden_channels=16, pooling_channels=8).eval()
    x, nodes, edge_index, edges, code, batch, b = _inputs(scene_batch)
    full = model(x, nodes, edge_index, edges, code, batch, b)
    k = scene_batch.ptr[1]
    mask = batch[edge_index[0]] == 0
    alone = model(x[:k], nodes[:k], edge_index[:, mask], edges[mask], code[:k])
    torch.testing.assert_close(full[:1], alone)


def test_energy_model_sees_the_predicates(scene_batch):
    model = GraphEnergyModel(7, 5, 6, hidden_channels=16, pooling_channels=8).eval()
    x, nodes, edge_index, edges, code, batch, b = _inputs(scene_batch)
    e1 = model(x, nodes, edge_index, edges, code, batch, b)
    e2 = model(x, nodes, edge_index, edges.roll(1, dims=-1), code, batch, b)
    assert not torch.allclose(e1, e2)


def test_pooling_modules_against_pyg_global_add_pool(scene_batch):
    torch.manual_seed(0)
    pool = GatedPooling(6, 4)
    x, batch = scene_batch.x, scene_batch.batch
    expected = pool.lin(global_add_pool(pool.gate(x) * x, batch))
    torch.testing.assert_close(pool(x, batch, 3), expected)
    edge_pool = EdgeGatedPooling(6, 5, 4)
    e = torch.randn(scene_batch.num_edges, 5)
    eb = batch[scene_batch.edge_index[0]]
    expected = edge_pool.lin(
        torch.cat(
            [
                global_add_pool(edge_pool.node_gate(x) * x, batch),
                global_add_pool(edge_pool.edge_gate(e) * e, eb, 3),
            ],
            -1,
        )
    )
    torch.testing.assert_close(edge_pool(x, e, batch, eb, 3), expected)
    assert str(pool) == "GatedPooling(6, 4)" and str(edge_pool) == "EdgeGatedPooling(6, 5, 4)"


def test_image_graph_conv_matches_dense(scene_batch):
    conv = ImageGraphConv(6).double()
    x = scene_batch.x.double()
    torch.testing.assert_close(
        conv(x, scene_batch.edge_index), dense_image_graph(conv, x, scene_batch.edge_index)
    )
    assert str(conv) == "ImageGraphConv(6, num_iterations=3)"


def test_image_graph_conv_compiles_without_graph_breaks(scene_batch):
    conv = ImageGraphConv(6)
    explanation = torch._dynamo.explain(conv)(scene_batch.x, scene_batch.edge_index)
    assert explanation.graph_break_count == 0


def test_energy_model_bad_inputs(scene_batch):
    model = GraphEnergyModel(7, 5, 6, hidden_channels=16, pooling_channels=8)
    x, nodes, edge_index, edges, code, batch, b = _inputs(scene_batch)
    with pytest.raises(ValueError, match=r"'node_states' must be \[12, 7\]"):
        model(x, nodes[:, :6], edge_index, edges, code, batch, b)
    with pytest.raises(ValueError, match=r"'edge_states' must be"):
        model(x, nodes, edge_index, edges[:, :4], code, batch, b)
    with pytest.raises(ValueError, match=r"'x' must be \[12, 6\]"):
        model(x[:, :3], nodes, edge_index, edges, code, batch, b)
    with pytest.raises(ValueError, match="out-of-range"):
        model(x, nodes, edge_index + 12, edges, code, batch, b)
    with pytest.raises(ValueError, match="duplicate relation pairs"):
        model(
            x,
            nodes,
            torch.cat([edge_index, edge_index[:, :1]], 1),
            torch.cat([edges, edges[:1]]),
            code,
            batch,
            b,
        )
    with pytest.raises(ValueError, match="empty graph"):
        model(x[:0], nodes[:0], edge_index[:, :0], edges[:0], code[:0], batch[:0], 1)
    with pytest.raises(ValueError, match="positive 'in_channels'"):
        GraphEnergyModel(7, 5, 0)


def test_energy_model_graph_without_relations_pools_a_zero_edge_vector(scene_batch):
    model = GraphEnergyModel(7, 5, 6, hidden_channels=16, pooling_channels=8).double().eval()
    x, nodes, edge_index, edges, code, batch, b = _inputs(scene_batch, torch.double)
    mask = batch[edge_index[0]] != 2  # graph 2 loses its relations
    energy = model(x, nodes, edge_index[:, mask], edges[mask], code, batch, b)
    ref = dense_energy(model, x, nodes, edge_index[:, mask], edges[mask], code, batch, b)
    torch.testing.assert_close(energy, ref, rtol=0, atol=1e-10)
    # Graph 2's scene branch pools zeros for its edges: its energy equals the one computed alone.
    keep = batch == 2
    alone = model(x[keep], nodes[keep], edge_index[:, :0], edges[:0], code[keep], None, 1)
    torch.testing.assert_close(energy[2:], alone, rtol=0, atol=1e-10)
