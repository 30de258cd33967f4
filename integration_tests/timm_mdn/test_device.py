"""Everything follows the input's device (docs/gpu.md): layers, lazily sized state, the kernel, dcor².

The ``device`` cases run on every available device; the ``cuda``-marked ones compare CUDA with the CPU in
float32 (values and gradients) and check that ``validate_args=False`` keeps a training step free of
host-device synchronisations.
"""

import copy

import pytest
import timm
import timm_mdn
import torch
from timm.utils import ModelEmaV3
from timm_mdn import (
    MetadataNorm,
    MetadataNorm1d,
    MetadataNorm2d,
    MetadataNormAct2d,
    distance_correlation_sqr,
    metadata_norm_layers,
)
from timm_mdn.functional import channel_affine
from torch import nn

from integration_tests.timm_mdn.toy import toy_kernel as _kernel

LAYERS = [
    (MetadataNorm2d, (6, 4, 3, 5), {}),
    (MetadataNormAct2d, (6, 4, 3, 5), {"act_layer": nn.SiLU}),
    (MetadataNorm, (6, 7, 4), {"affine": True}),
    (MetadataNorm1d, (6, 4), {}),
]


@pytest.mark.parametrize(("cls", "shape", "kwargs"), LAYERS)
def test_layer_state_lives_on_the_device_of_the_module(
    device: torch.device, cls: type, shape: tuple[int, ...], kwargs: dict
) -> None:
    kernel, design = _kernel()
    layer = cls(4, **kwargs).to(device)  # the kernel set after the move lands on the module's device
    layer.set_kernel(kernel)
    layer.metadata = design[:6].to(device)
    x = torch.randn(*shape, device=device, requires_grad=True)
    out = layer(x)
    out.square().mean().backward()
    assert out.device == x.device and x.grad is not None and x.grad.device == x.device
    for name, buffer in layer.named_buffers():
        assert buffer.device == x.device, name
    layer.eval()
    assert layer(x).device == x.device


def test_metadata_on_the_host_follow_the_input(device: torch.device) -> None:
    kernel, design = _kernel()
    layer = MetadataNorm2d(4, kernel=kernel, device=device)
    layer.metadata = design[:6]  # on the CPU
    out = layer(torch.randn(6, 4, 2, 2, device=device))
    assert out.device.type == device.type and layer.running_beta.device.type == device.type


def test_ema_copy_on_its_own_device_is_sized_there(device: torch.device) -> None:
    kernel, design = _kernel()
    model = timm.create_model("mdn_resnet18", num_classes=3, layers=(1, 1, 1, 1), mdn_kernel=kernel).to(
        device
    )
    ema = ModelEmaV3(model, decay=0.5, device=torch.device("cpu"))
    model(torch.randn(2, 3, 32, 32, device=device), metadata=design[:2].to(device))
    ema.update(model)
    for layer in metadata_norm_layers(ema.module):
        assert layer.running_beta.device.type == "cpu" and not layer.has_uninitialized_params()


def test_deepcopy_and_to_keep_unsized_buffers_unsized(device: torch.device) -> None:
    layer = MetadataNorm2d(4).to(device)
    twin = copy.deepcopy(layer).to(torch.float64)
    assert twin.has_uninitialized_params() and twin.running_beta.dtype == torch.float64
    assert twin.running_beta.device.type == device.type


def test_dcor_on_the_device(device: torch.device) -> None:
    x = torch.randn(50, 3, device=device)
    y = x[:, :1].square() + 0.1 * torch.randn(50, 1, device=device)
    value = distance_correlation_sqr(x, y)
    assert value.device.type == device.type and float(value) > 0.1


@pytest.mark.cuda
@pytest.mark.parametrize(("cls", "shape", "kwargs"), LAYERS)
def test_cuda_matches_cpu_in_float32(
    cuda_device: torch.device, cls: type, shape: tuple[int, ...], kwargs: dict
) -> None:
    kernel, design = _kernel()
    cpu_layer = cls(4, kernel=kernel, **kwargs)
    if cpu_layer.weight is not None:
        with torch.no_grad():
            cpu_layer.weight.uniform_(0.5, 1.5)
            cpu_layer.bias.uniform_(-0.5, 0.5)
    gpu_layer = copy.deepcopy(cpu_layer).to(cuda_device)
    cpu_layer.metadata, gpu_layer.metadata = design[:6], design[:6].to(cuda_device)
    x = torch.randn(*shape)
    weights = torch.randn(*shape)
    outs, grads = [], []
    for layer, dev in ((cpu_layer, torch.device("cpu")), (gpu_layer, cuda_device)):
        xi = x.to(dev).requires_grad_(True)
        out = layer(xi)
        (out * weights.to(dev)).sum().backward()
        outs.append(out.detach().cpu())
        grads.append(xi.grad.cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu_layer.running_beta.cpu(), cpu_layer.running_beta, rtol=1e-4, atol=1e-5)
    if cpu_layer.weight is not None:
        torch.testing.assert_close(gpu_layer.weight.grad.cpu(), cpu_layer.weight.grad, rtol=1e-4, atol=1e-4)
    cpu_layer.eval()
    gpu_layer.eval()
    torch.testing.assert_close(gpu_layer(x.to(cuda_device)).cpu(), cpu_layer(x), rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_cuda_channel_affine_and_dcor_match_cpu(cuda_device: torch.device) -> None:
    x = torch.randn(5, 4, 3, 3, requires_grad=True)
    w, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    xg, wg, bg = (t.detach().to(cuda_device).requires_grad_(True) for t in (x, w, b))
    channel_affine(x, w, b).square().sum().backward()
    channel_affine(xg, wg, bg).square().sum().backward()
    for cpu_t, gpu_t in ((x, xg), (w, wg), (b, bg)):
        torch.testing.assert_close(gpu_t.grad.cpu(), cpu_t.grad, rtol=1e-4, atol=1e-4)
    f, c = torch.randn(200, 8), torch.randn(200, 1)
    torch.testing.assert_close(
        distance_correlation_sqr(f.to(cuda_device), c.to(cuda_device)).cpu(), distance_correlation_sqr(f, c)
    )


@pytest.mark.cuda
def test_cuda_model_matches_cpu_in_float32(cuda_device: torch.device) -> None:
    kernel, design = _kernel()
    torch.manual_seed(0)
    cpu_model = timm.create_model(
        "mdn_resnet18", num_classes=3, layers=(1, 1, 1, 1), mdn_kernel=kernel, mdn_sites="all"
    )
    gpu_model = copy.deepcopy(cpu_model).to(cuda_device)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.randn(4, 3, 32, 32)
    cpu_out = cpu_model(x, metadata=design[:4])
    gpu_out = gpu_model(x.to(cuda_device), metadata=design[:4].to(cuda_device))
    torch.testing.assert_close(gpu_out.cpu(), cpu_out, rtol=1e-3, atol=1e-3)
    cpu_out.sum().backward()
    gpu_out.sum().backward()
    torch.testing.assert_close(
        gpu_model.conv1.weight.grad.cpu(), cpu_model.conv1.weight.grad, rtol=1e-3, atol=1e-3
    )


@pytest.mark.cuda
def test_cuda_training_step_without_validation_never_synchronises(cuda_device: torch.device) -> None:
    kernel, design = _kernel()
    layer = nn.Sequential(
        nn.Conv2d(3, 4, 3), MetadataNorm2d(4, kernel=kernel, affine=True, validate_args=False)
    )
    layer = layer.to(cuda_device)
    metadata = design[:6].to(cuda_device)
    x = torch.randn(6, 3, 8, 8, device=cuda_device)
    layer[1].metadata = metadata
    layer(x).sum().backward()  # sizes the running beta (allocation only)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).square().mean().backward()
        nan_x = x.clone()
        nan_x[0, 0, 0, 0] = float("nan")
        layer(nan_x)  # masked update, still no synchronisation
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(torch.isfinite(layer[1].running_beta).all())
    assert timm_mdn.metadata_norm_layers(layer)[0].validate_args is False
