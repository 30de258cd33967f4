"""Automatic mixed precision: timm's AMP patterns with Metadata Normalization inside.

The standard loop runs the forward under ``torch.autocast`` and the backward outside it (bf16 on a CPU;
fp16 with ``torch.amp.GradScaler`` or bf16 on CUDA). MDN computes its regression in float32 whatever the
autocast region, returns the input's dtype, and its backward must accept that dtype.
"""

import pytest
import timm
import timm_mdn  # noqa: F401  (registers the mdn_* models)
import torch
from timm_mdn import MetadataKernel, MetadataNorm2d
from torch import nn

from integration_tests.timm_mdn.toy import toy_kernel as _kernel


def _conv_mdn(kernel: MetadataKernel, device: torch.device) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), MetadataNorm2d(4, kernel=kernel)).to(device)


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_bf16_autocast_forward_backward_outside_matches_float32(device: str) -> None:
    kernel, design = _kernel()
    model = _conv_mdn(kernel, torch.device(device))
    reference = _conv_mdn(kernel, torch.device(device))
    reference.load_state_dict(model.state_dict())
    x = torch.randn(8, 3, 6, 6, device=device)
    metadata = design[:8].to(device)
    model[1].metadata = reference[1].metadata = metadata

    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()  # outside the autocast region, as timm's train loop does

    ref = reference(x)
    ref.square().mean().backward()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    torch.testing.assert_close(model[0].weight.grad, reference[0].weight.grad, rtol=0.1, atol=0.02)
    # The running beta stays float32 and near the float32 estimate.
    assert model[1].running_beta.dtype == torch.float32
    torch.testing.assert_close(model[1].running_beta, reference[1].running_beta, rtol=0.1, atol=0.02)


def test_bf16_autocast_mdn_convnext_every_parameter_gets_a_finite_gradient() -> None:
    kernel, design = _kernel()
    # A narrow ConvNeXt: bf16 convolution backward is slow on CPUs without bf16 units.
    model = timm.create_model(
        "mdn_convnext_atto",
        num_classes=3,
        mdn_kernel=kernel,
        mdn_sites="all",
        depths=(1, 1, 1, 1),
        dims=(8, 16, 32, 64),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(4, 3, 32, 32), metadata=design[:4])
        loss = nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert all(bool(torch.isfinite(b).all()) for b in model.buffers() if b.is_floating_point())


@pytest.mark.cuda
def test_fp16_autocast_with_grad_scaler_on_cuda(cuda_device: torch.device) -> None:
    kernel, design = _kernel()
    model = timm.create_model("mdn_resnet18", num_classes=3, mdn_kernel=kernel, mdn_sites="all").to(
        cuda_device
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda")
    x, target = torch.randn(4, 3, 32, 32, device=cuda_device), torch.tensor([0, 1, 2, 0], device=cuda_device)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            logits = model(x, metadata=design[:4].to(cuda_device))
            loss = nn.functional.cross_entropy(logits, target)
        assert logits.dtype == torch.float16
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(bool(torch.isfinite(b).all()) for b in model.buffers() if b.is_floating_point())
