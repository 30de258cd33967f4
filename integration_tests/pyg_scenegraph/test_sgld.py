from __future__ import annotations

import pytest
import torch
from pyg_scenegraph import SGLDSampler, minmax_normalize


def _toy_energy(w_edge: torch.Tensor, w_node: torch.Tensor):
    params = torch.nn.Parameter(torch.ones(()))

    def energy(nodes, edges):
        return params * (torch.tanh(edges @ w_edge).sum() + torch.tanh(nodes @ w_node).sum()).view(1)

    return energy, params


def _reference(energy, nodes, edges, lr, steps, sigma, clip, seed, sample_nodes):
    """SGLD from the formula: s~ = s + eps; s = minmax(s~ - lr clip(dE/ds~)); steps are autograd constants."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        eps_e = torch.randn(edges.shape, generator=g, dtype=edges.dtype) * sigma
        eps_n = torch.randn(nodes.shape, generator=g, dtype=nodes.dtype) * sigma if sample_nodes else None
        e_t = (edges.detach() + eps_e).requires_grad_(True)
        n_t = (nodes.detach() + eps_n).requires_grad_(True) if sample_nodes else nodes.detach()
        grads = torch.autograd.grad(energy(n_t, e_t).sum(), [e_t, n_t] if sample_nodes else [e_t])
        step_e = eps_e - lr * grads[0].clamp(-clip, clip)
        shifted = edges + step_e.detach()
        shifted = shifted - shifted.min(-1, keepdim=True).values
        edges = shifted / shifted.max(-1, keepdim=True).values
        if sample_nodes:
            step_n = eps_n - lr * grads[1].clamp(-clip, clip)
            shifted = nodes + step_n.detach()
            shifted = shifted - shifted.min(-1, keepdim=True).values
            nodes = shifted / shifted.max(-1, keepdim=True).values
    return nodes, edges


@pytest.mark.parametrize("task", ["predcls", "sgcls"])
def test_sgld_matches_formula_values_and_gradient_path_float64(task):
    torch.manual_seed(0)
    w_edge, w_node = torch.randn(5, 3, dtype=torch.double), torch.randn(4, 3, dtype=torch.double)
    energy, params = _toy_energy(w_edge, w_node)
    params.data = params.data.double()
    logits = torch.randn(6, 5, dtype=torch.double, requires_grad=True)
    obj_logits = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    kwargs = dict(step_size=0.5, num_steps=4, noise_std=0.05, grad_clip=0.3)
    sampler = SGLDSampler(**kwargs, generator=torch.Generator().manual_seed(7))
    nodes, edges = sampler.sample(energy, minmax_normalize(obj_logits), minmax_normalize(logits), task=task)
    ref_nodes, ref_edges = _reference(
        energy,
        minmax_normalize(obj_logits),
        minmax_normalize(logits),
        0.5,
        4,
        0.05,
        0.3,
        7,
        task != "predcls",
    )
    torch.testing.assert_close(edges, ref_edges)
    torch.testing.assert_close(nodes, ref_nodes)
    assert params.grad is None  # sampling never touches the energy model's gradients
    w = torch.randn_like(edges)
    grad = torch.autograd.grad((edges * w).sum(), logits)[0]
    ref_grad = torch.autograd.grad((ref_edges * w).sum(), logits)[0]
    torch.testing.assert_close(grad, ref_grad)
    assert grad.abs().sum() > 0  # the base model receives gradient through the re-normalisation


def test_sgld_predcls_keeps_node_states_and_lowers_energy():
    torch.manual_seed(0)
    w_edge = torch.randn(5, 1)
    energy, _ = _toy_energy(w_edge, torch.zeros(4, 1))
    nodes, edges = torch.rand(3, 4), minmax_normalize(torch.randn(8, 5))
    out_nodes, out_edges = SGLDSampler(step_size=1.0, num_steps=20, noise_std=0.0, grad_clip=10.0).sample(
        energy, nodes, edges
    )
    assert out_nodes is nodes
    assert energy(nodes, out_edges) < energy(nodes, edges)
    assert out_edges.min() >= 0 and out_edges.max() <= 1


def test_sgld_gradient_clip_bounds_each_step():
    energy, _ = _toy_energy(torch.full((5, 1), 100.0), torch.zeros(4, 1))
    edges = torch.tensor([[0.0, 0.2, 0.4, 0.6, 1.0]])
    sampler = SGLDSampler(step_size=1.0, num_steps=1, noise_std=0.0, grad_clip=0.01)
    _, out = sampler.sample(
        lambda n, e: (e @ torch.full((5, 1), 100.0)).sum().view(1), torch.zeros(1, 4), edges
    )
    # constant gradient 100 clipped to 0.01 shifts every entry equally: min-max leaves the row unchanged
    torch.testing.assert_close(out, edges)
    del energy


def test_sgld_is_reproducible_with_a_generator():
    energy, _ = _toy_energy(torch.randn(5, 3), torch.randn(4, 3))
    edges = minmax_normalize(torch.randn(6, 5))
    runs = [
        SGLDSampler(num_steps=3, noise_std=0.1, generator=torch.Generator().manual_seed(1)).sample(
            energy, torch.rand(2, 4), edges
        )[1]
        for _ in range(2)
    ]
    torch.testing.assert_close(runs[0], runs[1])


def test_minmax_normalize_rows_and_constant_rows_stay_finite():
    x = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
    out = minmax_normalize(x)
    torch.testing.assert_close(out[0], torch.tensor([0.0, 1.0, 0.5]))
    assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_sgld_validation_and_repr():
    assert str(SGLDSampler()) == (
        "SGLDSampler(step_size=1.0, num_steps=20, noise_std=0.001, grad_clip=0.01, validate_args=True)"
    )
    with pytest.raises(ValueError, match="'step_size' >= 0"):
        SGLDSampler(step_size=-1)
    with pytest.raises(ValueError, match="'grad_clip' > 0"):
        SGLDSampler(grad_clip=0)
    with pytest.raises(ValueError, match="'task' must be one of"):
        SGLDSampler().sample(lambda n, e: e.sum().view(1), torch.rand(2, 3), torch.rand(2, 3), task="det")
