"""Devices (docs/gpu.md): every loss, layer, model, training helper and the estimator follow the inputs.

``device``-parametrized tests run on the CPU here and on CUDA where available; the tests marked ``cuda``
compare CUDA with the CPU in float32 (values and gradients of every loss and layer), run a float16 autocast
step with ``GradScaler`` and a bfloat16 autocast step, and check that the unvalidated losses never
synchronise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
from gzsl_dvae import (
    CADAVAE,
    ClassifierProtocol,
    DisentangledVAE,
    GaussianKLLoss,
    GaussianMLPEncoder,
    GaussianWassersteinLoss,
    GZSLClassifier,
    MLPDecoder,
    ReconstructionLoss,
    ShufflingClassificationLoss,
    build_classifier_training_set,
    train_softmax_classifier,
    train_vae,
)
from torch import Tensor, nn

SMALL = {"latent_dim": 4, "visual_hidden": (16, 16), "attribute_hidden": (8, 8)}
N, D1, D2, C, LATENT = 12, 10, 6, 3, 4


def _latents(device: torch.device, n: int = N, d: int = LATENT) -> list[Tensor]:
    """Four (n, d) float32 tensors drawn on the CPU (the same values on every device), moved, with grads."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, d, generator=g).to(device).requires_grad_() for _ in range(4)]


PERMUTATION = torch.tensor([3, 0, 1, 2, 5, 4, 7, 6, 9, 8, 11, 10])
LABELS = torch.arange(N) % C


Call = Callable[[nn.Module, list[Tensor], Tensor, Tensor], Tensor]


def _loss_cases() -> dict[str, tuple[Callable[[], nn.Module], Call]]:
    """name -> (make the loss, call it on four latents, labels and a permutation already on the device)."""
    return {
        "kl": (GaussianKLLoss, lambda loss, t, y, perm: loss(t[0], t[1])),
        "reconstruction_l1": (ReconstructionLoss, lambda loss, t, y, perm: loss(t[0], t[1])),
        "reconstruction_l2": (lambda: ReconstructionLoss("l2"), lambda loss, t, y, perm: loss(t[0], t[1])),
        "wasserstein": (GaussianWassersteinLoss, lambda loss, t, y, perm: loss(*t)),
        "shuffling_classification": (
            lambda: ShufflingClassificationLoss(C, LATENT),
            lambda loss, t, y, perm: loss(t[0], t[1], y, perm),  # a fixed permutation: devices agree
        ),
    }


def _call(call: Call, loss: nn.Module, inputs: list[Tensor]) -> Tensor:
    device = inputs[0].device
    return call(loss, inputs, LABELS.to(device), PERMUTATION.to(device))


LOSSES = list(_loss_cases())


@pytest.mark.parametrize("name", LOSSES)
def test_losses_follow_the_inputs_device(name: str, device: torch.device) -> None:
    make, call = _loss_cases()[name]
    torch.manual_seed(0)
    loss = make().to(device)
    inputs = _latents(device)
    value = _call(call, loss, inputs)
    assert value.device.type == device.type and value.dtype == torch.float32
    value.backward()
    used = inputs[:2] if name != "wasserstein" else inputs
    assert all(t.grad is not None and t.grad.device.type == device.type for t in used)
    assert all(bool(torch.isfinite(t.grad).all()) for t in used if t.grad is not None)


def _batch(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x, c = torch.rand(N, D1, generator=g), torch.rand(N, D2, generator=g)
    return x.to(device), c.to(device), LABELS.to(device)


def _models() -> dict[str, Callable[[], nn.Module]]:
    return {
        "dvae": lambda: DisentangledVAE(D1, D2, C, **SMALL),  # type: ignore[arg-type]
        "cada": lambda: CADAVAE(D1, D2, **SMALL),  # type: ignore[arg-type]
    }


@pytest.mark.parametrize("name", ["dvae", "cada"])
def test_models_follow_the_inputs_device(name: str, device: torch.device) -> None:
    torch.manual_seed(0)
    model = _models()[name]().to(device)
    terms = model(*_batch(device), epoch=30.0)
    assert all(v.device.type == device.type for v in terms.values())
    terms["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.device.type == device.type and bool(torch.isfinite(g).all()) for g in grads)
    mu, _ = model.encode_visual(_batch(device)[0])
    assert mu.device.type == device.type and mu.shape == (N, LATENT)


def test_training_helpers_stay_on_the_device(device: torch.device) -> None:
    """train_vae, the latent sampling and the softmax classifier take and return tensors on the device."""
    torch.manual_seed(0)
    model = DisentangledVAE(D1, D2, C, **SMALL)  # type: ignore[arg-type]
    x, _, y = _batch(device)
    attrs = torch.rand(C + 1, D2).to(device)  # class 3 is unseen
    history = train_vae(model, x, y, attrs[:C], epochs=2, batch_size=6, lr=1e-3, device=device)
    assert len(history) == 2 and all(p.device.type == device.type for p in model.parameters())
    protocol = ClassifierProtocol(
        seen_visual_samples=5, seen_semantic_samples=2, unseen_semantic_samples=5, epochs=2
    )
    z, z_y = build_classifier_training_set(
        model.encode_visual, model.encode_semantic, x, y, attrs, torch.arange(C), torch.tensor([C]), protocol
    )
    assert z.device.type == device.type and z_y.device.type == device.type
    assert torch.equal(torch.bincount(z_y.cpu()), torch.tensor([7, 7, 7, 5]))
    classifier = train_softmax_classifier(z, z_y, C + 1, protocol)
    assert classifier.weight.device.type == device.type


def test_estimator_device_parameter(device: torch.device) -> None:
    rng = np.random.default_rng(0)
    attrs = rng.random((4, D2))
    y = np.repeat(np.arange(3), 10)
    X = attrs[y] @ rng.random((D2, D1)) + 0.05 * rng.standard_normal((30, D1))
    est = GZSLClassifier(
        class_attributes=attrs,
        device=device.type,
        epochs=2,
        batch_size=10,
        classifier_epochs=2,
        seen_visual_samples=8,
        unseen_semantic_samples=8,
        random_state=0,
        **SMALL,  # type: ignore[arg-type]
    ).fit(X, y)
    assert all(p.device.type == device.type for p in est.model_.parameters())
    assert est.classifier_.weight.device.type == device.type
    pred = est.predict(X)
    assert isinstance(pred, np.ndarray) and set(pred) <= {0, 1, 2, 3}


# ----------------------------------------------------------------------------------------- CUDA only
def _cpu_and_cuda_grads(
    make: Callable[[], nn.Module], call: Call, cuda: torch.device
) -> tuple[tuple[Tensor, list[Tensor]], tuple[Tensor, list[Tensor]]]:
    results = []
    for device in (torch.device("cpu"), cuda):
        torch.manual_seed(0)
        loss = make().to(device)
        inputs = _latents(device)
        value = _call(call, loss, inputs)
        params = list(loss.parameters())
        grads = torch.autograd.grad(value, [*inputs, *params], allow_unused=True, materialize_grads=True)
        results.append((value.detach().cpu(), [g.cpu() for g in grads]))
    return results[0], results[1]


@pytest.mark.cuda
@pytest.mark.parametrize("name", LOSSES)
def test_loss_cuda_matches_cpu_float32(name: str, cuda_device: torch.device) -> None:
    make, call = _loss_cases()[name]
    (cpu_value, cpu_grads), (gpu_value, gpu_grads) = _cpu_and_cuda_grads(make, call, cuda_device)
    torch.testing.assert_close(gpu_value, cpu_value, rtol=1e-5, atol=1e-5)
    for gpu, cpu in zip(gpu_grads, cpu_grads, strict=True):
        torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-5)


@contextmanager
def _fixed_noise(device: torch.device) -> Iterator[None]:
    """The models' reparameterisation noise and batch shuffles, fixed and identical on every device."""
    g = torch.Generator().manual_seed(5)
    eps = torch.randn(N, 2 * LATENT, generator=g)

    def reparameterize(mu: Tensor, logvar: Tensor, generator: object = None) -> Tensor:
        return mu + torch.exp(0.5 * logvar) * eps[:, : mu.shape[1]].to(mu.device)

    with (
        mock.patch("gzsl_dvae.disentangled_vae.reparameterize", reparameterize),
        mock.patch("gzsl_dvae.cada_vae.reparameterize", reparameterize),
        mock.patch.object(torch, "randperm", lambda n, **kw: PERMUTATION[:n].to(kw.get("device") or "cpu")),
    ):
        yield


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["dvae", "cada", "encoder", "decoder"])
def test_layer_and_model_cuda_matches_cpu_float32(name: str, cuda_device: torch.device) -> None:
    results = []
    for device in (torch.device("cpu"), cuda_device):
        torch.manual_seed(0)
        x, c, y = _batch(device)
        if name in ("dvae", "cada"):
            model = _models()[name]().to(device)
            with _fixed_noise(device):
                terms = model(x, c, y, epoch=30.0)
            value = terms["loss"]
            outputs = torch.stack([v.detach() for v in terms.values()])
        else:
            model = (
                GaussianMLPEncoder(D1, 16, LATENT, 2) if name == "encoder" else MLPDecoder(D1, 16, D2)
            ).to(device)
            out = model(x)
            outputs = torch.cat(out, dim=1) if isinstance(out, tuple) else out
            value = outputs.square().sum()
        grads = torch.autograd.grad(
            value, list(model.parameters()), allow_unused=True, materialize_grads=True
        )
        results.append((outputs.detach().cpu(), [g.cpu() for g in grads]))
    (cpu_out, cpu_grads), (gpu_out, gpu_grads) = results
    torch.testing.assert_close(gpu_out, cpu_out, rtol=1e-4, atol=1e-4)
    for gpu, cpu in zip(gpu_grads, cpu_grads, strict=True):
        torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["dvae", "cada"])
def test_float16_autocast_step_with_grad_scaler(name: str, cuda_device: torch.device) -> None:
    torch.manual_seed(0)
    model = _models()[name]().to(cuda_device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)  # the losses are sums over the batch: O(100)
    before = [p.detach().clone() for p in model.parameters()]
    x, c, y = _batch(cuda_device)
    for _ in range(3):  # a step the scaler skips on overflow lowers the scale; the next one is taken
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x, c, y, epoch=30.0)["loss"]
        assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))  # sums run in float32
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["dvae", "cada"])
def test_bfloat16_autocast_close_to_float32(name: str, cuda_device: torch.device) -> None:
    torch.manual_seed(0)
    model = _models()[name]().to(cuda_device)
    x, c, y = _batch(cuda_device)
    with _fixed_noise(cuda_device):
        reference = model(x, c, y, epoch=30.0)["loss"]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, c, y, epoch=30.0)["loss"]
    loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(loss.float(), reference, rtol=5e-2, atol=1e-1)


@pytest.mark.cuda
@pytest.mark.parametrize("name", LOSSES)
def test_unvalidated_losses_do_not_synchronise(name: str, cuda_device: torch.device) -> None:
    """With ``validate_args=False`` a loss's forward and backward queue kernels only (docs/gpu.md)."""
    make, call = _loss_cases()[name]
    loss = make().to(cuda_device)
    loss.validate_args = False
    inputs = _latents(cuda_device)
    labels, permutation = LABELS.to(cuda_device), PERMUTATION.to(cuda_device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call(loss, inputs, labels, permutation).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
