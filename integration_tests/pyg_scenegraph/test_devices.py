"""Devices (docs/gpu.md, issue #17): every layer, sampler and loss follows its inputs' device; on a GPU the
float32 results equal the CPU's (values and gradients), and fp16 (autocast + GradScaler) and bf16 train."""

from __future__ import annotations

import copy

import pytest
import torch
from pyg_scenegraph import (
    EBMLoss,
    EdgeGatedPooling,
    EGNNConv,
    GatedPooling,
    GraphEnergyModel,
    ImageGraphConv,
    RelationPredictor,
    SGLDSampler,
    SyntheticSceneGraphs,
    box_code,
    minmax_normalize,
    negative_scene_graph,
    positive_scene_graph,
    sample_relation_pairs,
    scene_graph_losses,
)
from torch_geometric.data import Batch


def _batch(device) -> Batch:
    return Batch.from_data_list(list(SyntheticSceneGraphs(3, seed=4, feature_dim=8))).to(device)


def _models(device, box_norm: bool = True):
    torch.manual_seed(0)
    base = RelationPredictor(8, 13, 11, hidden_channels=16, num_layers=1, heads=2).to(device)
    energy = GraphEnergyModel(13, 11, 8, hidden_channels=16, pooling_channels=8, box_norm=box_norm).to(device)
    return base, energy


# ------------------------------------------------------------------------------ follow the inputs' device


def test_egnn_conv_follows_the_device(device):
    torch.manual_seed(0)
    conv = EGNNConv(8, 6).to(device)
    x = torch.randn(5, 8, device=device, requires_grad=True)
    edge_index = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]], device=device)
    out, edges = conv(x, edge_index, torch.randn(4, 6, device=device))
    (out.sum() + edges.sum()).backward()
    assert out.device == edges.device == x.grad.device == device
    empty, _ = conv(x, edge_index[:, :0], torch.zeros(0, 6, device=device))
    assert empty.device == device


def test_energy_model_and_loss_follow_the_device(device):
    data = _batch(device)
    _, energy = _models(device)
    code = box_code(data.box, data.image_size[data.batch])
    nodes, pairs, edges = positive_scene_graph(data.y, data.edge_index, data.edge_predicate, 13, 11)
    assert nodes.device == pairs.device == edges.device == device
    e = energy(data.x, nodes, pairs, edges, code, data.batch, data.num_graphs)
    loss = EBMLoss()(e, e.flip(0) + 1.0)
    loss.backward()
    assert e.device == loss.device == device
    assert all(p.grad is not None and p.grad.device == device for p in energy.parameters())


@pytest.mark.parametrize("generator_on_device", [False, True])
def test_sgld_follows_the_device_with_either_generator(device, generator_on_device):
    gen = torch.Generator(device=device if generator_on_device else "cpu").manual_seed(3)
    sampler = SGLDSampler(num_steps=3, noise_std=0.01, generator=gen)
    edges = torch.rand(4, 5, device=device)
    nodes = torch.rand(3, 6, device=device)
    out_nodes, out_edges = sampler.sample(lambda n, e: (e**2).sum().view(1) + n.sum(), nodes, edges, "sgcls")
    assert out_nodes.device == out_edges.device == device
    assert out_edges.min() >= 0 and out_edges.max() <= 1


def test_pair_sampler_and_one_training_step_follow_the_device(device):
    data = _batch(device)
    base, energy = _models(device)
    gen = torch.Generator(device=device).manual_seed(0)
    pairs, labels = sample_relation_pairs(data.edge_index, data.edge_predicate, data.batch, generator=gen)
    assert pairs.device == labels.device == device
    out = scene_graph_losses(base, data, pairs, labels, energy, SGLDSampler(num_steps=2), EBMLoss())
    out["loss"].backward()
    assert out["loss"].device == device
    assert all(p.grad.device == device for p in energy.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------- CUDA vs CPU, float32


def _parity(module_cpu, make_inputs, cuda_device, atol=1e-5, rtol=1e-4):
    """Values and gradients (inputs and parameters) of a module on CUDA equal the CPU's in float32."""
    module_gpu = copy.deepcopy(module_cpu).to(cuda_device)
    inputs_cpu = make_inputs("cpu")
    inputs_gpu = [t.to(cuda_device) if isinstance(t, torch.Tensor) else t for t in inputs_cpu]
    for t in (*inputs_cpu, *inputs_gpu):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t.requires_grad_(True)
    outs = []
    for module, inputs in ((module_cpu, inputs_cpu), (module_gpu, inputs_gpu)):
        out = module(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        g = torch.Generator().manual_seed(5)
        weights = [torch.randn(o.shape, generator=g).to(o.device) for o in out]
        (sum((o * w).sum() for o, w in zip(out, weights, strict=True))).backward()
        grads = [t.grad for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        grads += [p.grad for p in module.parameters() if p.grad is not None]
        outs.append(([o.detach() for o in out], grads))
    (cpu_out, cpu_grads), (gpu_out, gpu_grads) = outs
    assert len(cpu_grads) == len(gpu_grads) > 0
    for a, b in zip(cpu_out + cpu_grads, gpu_out + gpu_grads, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=atol, rtol=rtol)


def _graph_inputs(device):
    g = torch.Generator().manual_seed(1)
    edge_index = torch.tensor([[0, 0, 1, 2, 3, 4], [1, 2, 2, 3, 4, 0]])
    x, edge_attr = torch.randn(5, 8, generator=g), torch.randn(6, 6, generator=g)
    return [t.to(device) for t in (x, edge_index, edge_attr)]


@pytest.mark.cuda
def test_cuda_parity_egnn_conv(cuda_device):
    torch.manual_seed(0)
    _parity(EGNNConv(8, 6), _graph_inputs, cuda_device)


@pytest.mark.cuda
def test_cuda_parity_image_graph_conv_and_pooling(cuda_device):
    torch.manual_seed(0)
    _parity(ImageGraphConv(8), lambda d: _graph_inputs(d)[:2], cuda_device)
    batch = torch.tensor([0, 0, 1, 1, 1])
    _parity(GatedPooling(8, 4), lambda d: [torch.randn(5, 8).to(d), batch.to(d), 2], cuda_device)
    edge_batch = torch.tensor([0, 0, 0, 1, 1, 1])
    _parity(
        EdgeGatedPooling(8, 6, 4),
        lambda d: [*(t.to(d) for t in (torch.randn(5, 8), torch.randn(6, 6), batch, edge_batch)), 2],
        cuda_device,
    )


@pytest.mark.cuda
@pytest.mark.parametrize("train", [False, True])
def test_cuda_parity_graph_energy_model(cuda_device, train):
    _, energy = _models("cpu")
    energy.train(train)

    def inputs(device):
        data = _batch("cpu")
        torch.manual_seed(2)
        nodes, pairs, edges = positive_scene_graph(data.y, data.edge_index, data.edge_predicate, 13, 11)
        code = box_code(data.box, data.image_size[data.batch])
        return [t.to(device) for t in (data.x, nodes, pairs, edges, code, data.batch)] + [data.num_graphs]

    _parity(energy, inputs, cuda_device, atol=1e-4)


@pytest.mark.cuda
def test_cuda_parity_relation_predictor_loss_and_normalisation(cuda_device):
    base, _ = _models("cpu")

    def inputs(device):
        data = _batch("cpu")
        pairs, _ = sample_relation_pairs(
            data.edge_index, data.edge_predicate, data.batch, generator=torch.Generator().manual_seed(0)
        )
        code = box_code(data.box, data.image_size[data.batch])
        return [t.to(device) for t in (data.x, code, pairs, data.y, data.batch)]

    _parity(base, inputs, cuda_device, atol=1e-4)
    _parity(EBMLoss(), lambda d: [torch.randn(4).to(d), torch.randn(5).to(d)], cuda_device)
    norm = torch.nn.Module()
    norm.forward = minmax_normalize  # type: ignore[method-assign]
    _parity(norm, lambda d: [torch.randn(6, 5).to(d)], cuda_device)


@pytest.mark.cuda
def test_cuda_parity_sgld_without_noise(cuda_device):
    _, energy = _models("cpu", box_norm=False)
    energy.eval()
    energy_gpu = copy.deepcopy(energy).to(cuda_device)
    results = []
    for model, device in ((energy, "cpu"), (energy_gpu, cuda_device)):
        data = _batch(device)
        code = box_code(data.box, data.image_size[data.batch])
        logits = torch.randn(data.num_edges, 11, generator=torch.Generator().manual_seed(4)).to(device)
        nodes, edges = negative_scene_graph(logits, y=data.y, num_object_classes=13, noise_std=0.0)
        sampler = SGLDSampler(num_steps=4, noise_std=0.0, grad_clip=1.0, step_size=0.5)

        def energy_fn(n, e, model=model, data=data, code=code):
            return model(data.x, n, data.edge_index, e, code, data.batch, data.num_graphs)

        _, sampled = sampler.sample(energy_fn, nodes, edges)
        results.append(sampled.cpu())
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ AMP


def _amp_step(device, dtype, scaler, max_steps: int = 6):
    """Train with autocast until an optimizer step is taken (GradScaler skips steps while it backs off)."""
    data = _batch(device)
    base, energy = _models(device)
    optimizer = torch.optim.SGD([*base.parameters(), *energy.parameters()], lr=0.01)
    before = [p.detach().clone() for p in energy.parameters()]
    pairs, labels = sample_relation_pairs(data.edge_index, data.edge_predicate, data.batch)
    for _ in range(max_steps):
        optimizer.zero_grad()
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
            out = scene_graph_losses(base, data, pairs, labels, energy, SGLDSampler(num_steps=2), EBMLoss())
        assert out["positive_energy"].dtype == dtype  # the energy head ran in reduced precision
        loss = out["loss"].float()
        assert torch.isfinite(loss)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if scaler.get_scale() < scale:  # inf/NaN gradients: step skipped, parameters untouched
                assert all(torch.equal(a, b) for a, b in zip(before, energy.parameters(), strict=True))
                continue
        break
    after = list(energy.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)), "no step was taken"


@pytest.mark.cuda
def test_cuda_fp16_autocast_with_grad_scaler_trains(cuda_device):
    _amp_step(cuda_device, torch.float16, torch.amp.GradScaler("cuda"))


@pytest.mark.cuda
def test_cuda_bf16_autocast_trains(cuda_device):
    _amp_step(cuda_device, torch.bfloat16, None)


def test_cpu_bf16_autocast_trains():
    _amp_step("cpu", torch.bfloat16, None)


def test_cpu_fp16_autocast_with_grad_scaler_trains():
    # 1 / (0 + 1e-6), the mean's weight of a node without neighbours, overflows float16: kept in float32
    _amp_step("cpu", torch.float16, torch.amp.GradScaler("cpu"))
