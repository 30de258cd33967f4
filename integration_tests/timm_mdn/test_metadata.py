"""Getting each batch's metadata into the MDN layers of unmodified timm models."""

import copy
import io
from functools import partial

import pytest
import timm
import torch
from timm_mdn import (
    MetadataKernel,
    MetadataKwargHook,
    MetadataNorm2d,
    enable_metadata_kwarg,
    metadata_context,
    metadata_norm_layers,
    set_metadata,
    set_metadata_kernel,
)
from torch import nn

from integration_tests.timm_mdn.toy import toy_kernel


def _kernel(n: int = 32) -> tuple[MetadataKernel, torch.Tensor]:
    return toy_kernel(n)


def _resnet(kernel: MetadataKernel, layers: tuple[int, ...] = (2, 2, 2, 2)) -> nn.Module:
    norm_layer = partial(MetadataNorm2d, kernel=kernel)
    return timm.create_model("resnet18", num_classes=3, norm_layer=norm_layer, layers=layers)


def test_kwarg_and_context_route_the_same_metadata() -> None:
    kernel, design = _kernel()
    model = _resnet(kernel)
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    with metadata_context(twin, design[:4]):
        expected = twin(x)
    enable_metadata_kwarg(model)
    torch.testing.assert_close(model(x, metadata=design[:4]), expected)
    assert all(layer.metadata is None for layer in metadata_norm_layers(twin))  # restored on exit


def test_a_call_without_metadata_never_reuses_the_previous_batch() -> None:
    kernel, design = _kernel()
    model = _resnet(kernel)
    enable_metadata_kwarg(model)
    model(torch.randn(4, 3, 32, 32), metadata=design[:4])
    with pytest.raises(ValueError, match="needs the batch's metadata"):
        model(torch.randn(4, 3, 32, 32))
    with metadata_context(model, design[4:8]):  # a context's metadata are kept by the hook
        model(torch.randn(4, 3, 32, 32))


def test_context_nests_and_restores() -> None:
    kernel, design = _kernel()
    model = _resnet(kernel)
    layers = metadata_norm_layers(model)
    assert len(layers) == 20
    with metadata_context(model, design[:2]):
        with metadata_context(model, design[2:4]):
            assert all(
                layer.metadata is not None and layer.metadata.data_ptr() == design[2:4].data_ptr()
                for layer in layers
            )
        assert all(
            layer.metadata is not None and layer.metadata.data_ptr() == design[:2].data_ptr()
            for layer in layers
        )
    assert all(layer.metadata is None for layer in layers)
    set_metadata(model, design[:2])
    assert all(layer.metadata is not None for layer in layers)
    set_metadata(model, None)
    assert all(layer.metadata is None for layer in layers)


def test_hook_is_idempotent_removable_and_survives_copies() -> None:
    kernel, design = _kernel()
    model = _resnet(kernel)
    handle = enable_metadata_kwarg(model)
    enable_metadata_kwarg(model)
    assert sum(isinstance(h, MetadataKwargHook) for h in model._forward_pre_hooks.values()) == 1
    x = torch.randn(2, 3, 32, 32)
    for clone in (copy.deepcopy(model), _reload(model)):
        assert clone(x, metadata=design[:2]).shape == (2, 3)
    handle.remove()
    with pytest.raises(TypeError, match="metadata"):
        model(x, metadata=design[:2])


def _reload(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_gradient_checkpointing_recomputes_with_the_same_metadata() -> None:
    kernel, design = _kernel()
    plain = _resnet(kernel)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    for model in (plain, checkpointed):
        enable_metadata_kwarg(model)
    x = torch.randn(4, 3, 32, 32)
    plain(x, metadata=design[:4]).square().mean().backward()
    checkpointed(x, metadata=design[:4]).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_timm_model_takes_new_metadata_every_step_without_recompiling() -> None:
    kernel, design = _kernel()
    model = _resnet(kernel, layers=(1, 1, 1, 1))
    enable_metadata_kwarg(model)
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    model(x, metadata=design[:4])  # size the running betas (as for torch's Lazy modules)
    eager(x, metadata=design[:4])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    counters = torch._dynamo.utils.counters
    counters.clear()
    for step in range(1, 4):
        rows = design[4 * step : 4 * step + 4]
        torch.testing.assert_close(compiled(x, metadata=rows), eager(x, metadata=rows), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1


def test_errors_name_the_problem() -> None:
    kernel, design = _kernel()
    with pytest.raises(ValueError, match="no MetadataNorm layer"):
        enable_metadata_kwarg(timm.create_model("resnet18", num_classes=3))
    with pytest.raises(ValueError, match="no MetadataNorm layer"):
        set_metadata_kernel(nn.Linear(2, 2), kernel)
    model = _resnet(kernel)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        with metadata_context(model, design.numpy()):  # type: ignore[arg-type]
            pass
    with pytest.raises(TypeError, match=r"nn\.Module"):
        set_metadata(object(), design)  # type: ignore[arg-type]
    enable_metadata_kwarg(model)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        model(torch.randn(2, 3, 32, 32), metadata=[[0.0, 1.0, 1.0]] * 2)
    with pytest.raises(ValueError, match="inf or NaN"):
        model(torch.randn(2, 3, 32, 32), metadata=torch.full((2, 3), float("inf")))


def test_set_metadata_kernel_reaches_every_layer() -> None:
    kernel, _ = _kernel()
    model = timm.create_model("resnet18", num_classes=3, norm_layer=MetadataNorm2d)
    assert not any(layer.has_kernel for layer in metadata_norm_layers(model))
    set_metadata_kernel(model, kernel)
    assert all(layer.has_kernel and layer.num_columns == 3 for layer in metadata_norm_layers(model))
