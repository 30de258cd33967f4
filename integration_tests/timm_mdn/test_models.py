"""timm's own model-test conventions (tests/test_models.py) on the registered ``mdn_*`` models."""

from functools import partial

import pytest
import timm
import timm_mdn
import torch
from timm_mdn import (
    MetadataNorm,
    MetadataNorm2d,
    enable_metadata_kwarg,
    is_norm_layer,
    metadata_norm_layers,
)
from torch import nn

from integration_tests.timm_mdn.toy import toy_kernel as _kernel

MODELS = timm.list_models("mdn_*")
FAMILIES = ["mdn_resnet18", "mdn_convnext_atto", "mdn_vit_tiny_patch16_224"]  # the smallest of each family
SMALL = {"vit_": {"img_size": 32}}  # ViTs take the input size at construction


def _create(name: str, **kwargs: object) -> nn.Module:
    extra = next((v for k, v in SMALL.items() if k in name), {})
    return timm.create_model(name, **{**extra, **kwargs})


def test_registered_names_are_prefixed_and_cover_three_families() -> None:
    assert {"mdn_resnet18", "mdn_convnext_atto", "mdn_vit_tiny_patch16_224"} <= set(MODELS)
    assert all(name.startswith("mdn_") for name in MODELS)
    assert timm.is_model("resnet18") and type(timm.create_model("resnet18")).__name__ == "ResNet"
    assert timm_mdn.models.resnet.mdn_resnet18.__module__ == "timm_mdn.models.resnet"


@pytest.mark.parametrize("name", MODELS)
def test_model_backward_every_parameter_gets_a_gradient(name: str) -> None:
    kernel, design = _kernel()
    model = _create(name, num_classes=42, mdn_kernel=kernel)
    num_params = sum(p.numel() for p in model.parameters())
    model.train()
    outputs = model(torch.randn(2, 3, 32, 32), metadata=design[:2])
    outputs.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"No gradient for {n}"
    assert num_params == sum(p.grad.numel() for p in model.parameters() if p.grad is not None)
    assert outputs.shape == (2, 42) and not torch.isnan(outputs).any()
    model.eval()  # timm's forward test: batch 1 in eval (after one step gave the running beta)
    out = model(torch.randn(1, 3, 32, 32), metadata=design[:1])
    assert out.shape == (1, 42) and not torch.isnan(out).any()


@pytest.mark.parametrize("name", MODELS)
def test_model_default_cfgs_and_classifier_reset(name: str) -> None:
    kernel, design = _kernel()
    model = _create(name, mdn_kernel=kernel)
    cfg = model.pretrained_cfg
    state_dict = model.state_dict()
    assert cfg["classifier"] + ".weight" in state_dict and cfg["first_conv"] + ".weight" in state_dict
    assert cfg["url"] == "" and "hf_hub_id" not in cfg
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(0)
    assert model(x, metadata=design[:2]).shape == (2, model.num_features)
    if "vit" not in name:  # no pooling: the head MDN becomes a 2-D one and keeps the kernel
        model.reset_classifier(0, "")
        assert isinstance(model.metadata_norm, MetadataNorm2d) and model.metadata_norm.has_kernel
        assert model(x, metadata=design[:2]).dim() == 4


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_round_trip_and_plain_checkpoints(name: str) -> None:
    kernel, design = _kernel()
    model = _create(name, num_classes=5, mdn_kernel=kernel)
    for step in range(2):
        model(torch.randn(2, 3, 32, 32), metadata=design[2 * step : 2 * step + 2]).mean().backward()
    fresh = _create(name, num_classes=5)  # no kernel: everything comes from the checkpoint
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    fresh.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x, metadata=design[:2]), model(x, metadata=design[:2]))
    plain = _create(name.removeprefix("mdn_"), num_classes=5)
    model.load_state_dict(plain.state_dict(), strict=True)  # MDN adds no parameter


def test_pretrained_weights_are_refused_with_a_way_out() -> None:
    with pytest.raises(ValueError, match="load a plain timm checkpoint"):
        timm.create_model("mdn_resnet18", pretrained=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_mdn_sites_all_adds_mdn_after_every_trunk_norm(name: str) -> None:
    kernel, design = _kernel()
    model = _create(name, num_classes=3, mdn_kernel=kernel, mdn_sites="all")
    trunk_norms = [
        n for n, m in model.named_modules() if is_norm_layer(m) and not n.startswith(("head", "fc_norm"))
    ]
    assert len(metadata_norm_layers(model)) == len(trunk_norms) + 1
    assert all(layer.has_kernel for layer in metadata_norm_layers(model))
    model(torch.randn(2, 3, 32, 32), metadata=design[:2]).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="mdn_sites"):
        _create(name, mdn_sites="everywhere")


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("mdn_resnet18", {"layers": (1, 1, 1, 1)}),
        ("mdn_convnext_atto", {"depths": (1, 1, 1, 1)}),
        ("mdn_vit_tiny_patch16_224", {"depth": 2}),
    ],
)
def test_torch_compile_fullgraph_forward_backward(name: str, kwargs: dict[str, object]) -> None:
    kernel, design = _kernel()
    model = _create(name, num_classes=3, mdn_kernel=kernel, mdn_sites="all", **kwargs)
    x = torch.randn(2, 3, 32, 32)
    model(x, metadata=design[:2])  # sizes the running betas eagerly, like torch's Lazy modules
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    out = compiled(x, metadata=design[2:4])
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    torch.testing.assert_close(compiled(x, metadata=design[2:4]), model(x, metadata=design[2:4]))


@pytest.mark.parametrize(
    ("name", "kwargs", "layer", "count"),
    [
        ("resnet18", {}, MetadataNorm2d, 20),
        ("convnext_atto", {"conv_mlp": True}, MetadataNorm2d, 17),
        ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, MetadataNorm, 5),
    ],
)
def test_norm_layer_injection_into_plain_timm_models(
    name: str, kwargs: dict[str, object], layer: type, count: int
) -> None:
    kernel, design = _kernel()
    model = timm.create_model(name, num_classes=3, norm_layer=partial(layer, kernel=kernel), **kwargs)
    assert len(metadata_norm_layers(model)) == count
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) for m in model.modules())
    enable_metadata_kwarg(model)
    model(torch.randn(2, 3, 32, 32), metadata=design[:2]).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
