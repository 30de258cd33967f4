"""SoftTriple on a CUDA GPU: float32 parity with the CPU, the PML device convention, AMP, no hidden syncs.

Every test here is marked ``cuda``: collected everywhere, skipped without a GPU (``pytest -m cuda`` runs
them). The CPU side of each parity test runs through whichever CPU implementation is active (the fused
kernels when built), so this also holds the GPU's PyTorch path to the kernels.
"""

from __future__ import annotations

import pytest
import torch
from pml_softtriple import SoftTripleLoss, SparseCentersRegularizer
from pytorch_metric_learning import losses as pml_losses

pytestmark = pytest.mark.cuda

C, D, B = 20, 32, 64


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=gen), torch.randint(0, C, (B,), generator=gen)


def _value_and_grads(loss: SoftTripleLoss, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_(True)
    value = loss(x, y)
    return (value, *torch.autograd.grad(value, (x, loss.fc)))


@pytest.mark.parametrize(
    ("k", "la", "gamma"), [(1, 20.0, 0.1), (2, 20.0, 0.1), (4, 20.0, 0.1), (3, 60.0, 0.01)]
)
def test_cuda_matches_cpu_in_float32_values_and_both_gradients(k, la, gamma, cuda_device, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # compare float32 with float32
    torch.manual_seed(k)
    cpu_loss = SoftTripleLoss(C, D, centers_per_class=k, la=la, gamma=gamma)
    cuda_loss = SoftTripleLoss(C, D, centers_per_class=k, la=la, gamma=gamma).to(cuda_device)
    cuda_loss.load_state_dict(cpu_loss.state_dict())
    x, y = _batch(k)
    on_cpu = _value_and_grads(cpu_loss, x, y)
    on_cuda = _value_and_grads(cuda_loss, x.to(cuda_device), y.to(cuda_device))
    for got, want in zip(on_cuda, on_cpu, strict=True):
        assert got.device.type == cuda_device.type and got.dtype == torch.float32
        assert _rel_err(got, want) < 2e-5


@pytest.mark.parametrize("k", [2, 5])  # K = 5 takes the regulariser's batched-matmul backward
def test_regulariser_cuda_matches_cpu_values_gradients_and_stats(k, cuda_device):
    weights = torch.randn(C * k, D)
    reg_cpu = SparseCentersRegularizer(C, k, collect_stats=True)
    reg_cuda = SparseCentersRegularizer(C, k, collect_stats=True)  # built on the CPU: its buffers follow
    w_cpu, w_cuda = weights.clone().requires_grad_(True), weights.to(cuda_device).requires_grad_(True)
    value_cpu, value_cuda = reg_cpu(w_cpu), reg_cuda(w_cuda)
    (g_cpu,), (g_cuda,) = torch.autograd.grad(value_cpu, w_cpu), torch.autograd.grad(value_cuda, w_cuda)
    assert _rel_err(value_cuda, value_cpu) < 1e-5 and _rel_err(g_cuda, g_cpu) < 1e-5
    for name in ("same_class_center_sim", "diff_class_center_sim"):
        assert getattr(reg_cuda, name) == pytest.approx(getattr(reg_cpu, name), rel=1e-5, abs=1e-6)


def test_a_loss_built_on_the_cpu_follows_cuda_embeddings_like_pmls(cuda_device):
    # What PML's trainers do: build the loss and its optimizer, never move the loss, feed GPU embeddings.
    ours = SoftTripleLoss(C, D, centers_per_class=2, tau=0.0)
    pml = pml_losses.SoftTripleLoss(C, D, centers_per_class=2)
    ours.fc.data.copy_(pml.fc.data)
    optimizers = [torch.optim.Adam(loss.parameters(), lr=0.01) for loss in (ours, pml)]
    x, y = _batch()
    x, y = x.to(cuda_device), y.to(cuda_device)
    for loss, optimizer in zip((ours, pml), optimizers, strict=True):
        loss(x, y).backward()
        optimizer.step()
        assert loss.fc.device == loss.fc.grad.device == x.device
    assert _rel_err(ours.fc, pml.fc) < 1e-5  # one identical Adam step on the GPU
    ours.tau = 0.2  # the regulariser added now lives with the centres
    assert torch.isfinite(ours(x, y))
    assert ours.weight_regularizer is not None and ours.weight_regularizer._pair_rows.device == x.device
    logits = SoftTripleLoss(C, D, centers_per_class=2).get_logits(x)  # a getter: fc is not moved
    assert logits.device == x.device


def test_fp16_autocast_with_grad_scaler_trains(cuda_device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 64), torch.nn.ReLU(), torch.nn.Linear(64, D)).to(
        cuda_device
    )
    loss_func = SoftTripleLoss(C, D, centers_per_class=2).to(cuda_device)
    optimizer = torch.optim.Adam([*model.parameters(), *loss_func.parameters()], lr=1e-2)
    scaler = torch.amp.GradScaler("cuda")
    x, y = _batch()
    x, y = x.to(cuda_device), y.to(cuda_device)
    values = []
    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            embeddings = model(x)
            value = loss_func(embeddings, y)
        assert embeddings.dtype == torch.float16 and value.dtype == torch.float32
        scaler.scale(value).backward()
        scaler.step(optimizer)
        scaler.update()
        values.append(float(value.detach()))
    assert loss_func.fc.dtype == torch.float32 and torch.isfinite(loss_func.fc).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert values[-1] < 0.5 * values[0]  # it trains


def test_bf16_autocast_computes_in_float32(cuda_device):
    loss_func = SoftTripleLoss(C, D, centers_per_class=3).to(cuda_device)
    model = torch.nn.Linear(D, D).to(cuda_device)
    x, y = _batch()
    x, y = x.to(cuda_device), y.to(cuda_device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        embeddings = model(x)
        value = loss_func(embeddings, y)
    assert embeddings.dtype == torch.bfloat16 and value.dtype == loss_func.fc.dtype == torch.float32
    value.backward()
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
    expected = loss_func(embeddings.detach().float(), y)  # the same (rounded) embeddings, outside autocast
    assert _rel_err(value, expected) < 1e-5


@pytest.mark.parametrize("k", [2, 4])
def test_validate_args_false_runs_a_training_step_without_host_synchronisation(k, cuda_device):
    loss_func = SoftTripleLoss(C, D, centers_per_class=k, validate_args=False).to(cuda_device)
    x, y = _batch()
    x = x.to(cuda_device).requires_grad_(True)
    y = y.to(cuda_device)
    loss_func(x, y).backward()  # warm-up: allocations, lazy initialisation
    torch.cuda.synchronize(cuda_device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_func(x, y).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(cuda_device)
    assert torch.isfinite(loss_func.fc.grad).all()


def test_validate_args_true_rejects_nan_on_cuda_and_leaves_the_centres(cuda_device):
    loss_func = SoftTripleLoss(C, D, centers_per_class=2).to(cuda_device)
    before = loss_func.fc.detach().clone()
    x, y = _batch()
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="embeddings contain NaN or Inf"):
        loss_func(x.to(cuda_device), y.to(cuda_device))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=20\)"):
        loss_func(x.nan_to_num().to(cuda_device), (y + C).to(cuda_device))
    assert loss_func.fc.grad is None and torch.equal(loss_func.fc.detach(), before)
