"""Adding MDN to, or swapping it into, existing timm models."""

import copy

import pytest
import timm
import torch
from timm_mdn import (
    MetadataNorm,
    MetadataNorm1d,
    MetadataNorm2d,
    convert_metadata_norm,
    enable_metadata_kwarg,
    metadata_context,
    metadata_norm_for,
    metadata_norm_layers,
)
from torch import nn

from integration_tests.timm_mdn.toy import toy_kernel as _kernel


def test_after_mode_applies_mdn_to_the_layer_output() -> None:
    kernel, design = _kernel()
    bn = nn.BatchNorm2d(4)
    reference_bn, reference_mdn = copy.deepcopy(bn), MetadataNorm2d(4, kernel=kernel)
    converted = convert_metadata_norm(nn.Sequential(bn), kernel, mode="after")
    assert isinstance(converted[0], nn.BatchNorm2d) and isinstance(converted[0].metadata_norm, MetadataNorm2d)
    x = torch.randn(6, 4, 3, 3)
    with metadata_context(converted, design[:6]):
        out = converted(x)
    reference_mdn.metadata = design[:6]
    torch.testing.assert_close(out, reference_mdn(reference_bn(x)))


def test_plain_checkpoint_loads_strictly_into_the_converted_model() -> None:
    kernel, design = _kernel()
    plain = timm.create_model("resnet18", num_classes=3)
    converted = convert_metadata_norm(copy.deepcopy(plain), kernel, mode="after")
    assert len(metadata_norm_layers(converted)) == 20
    assert set(plain.state_dict()) <= set(converted.state_dict())
    converted.load_state_dict(plain.state_dict(), strict=True)
    # and the converted model's own checkpoint, running betas included, round-trips strictly
    enable_metadata_kwarg(converted)
    converted(torch.randn(4, 3, 32, 32), metadata=design[:4])
    restored = convert_metadata_norm(timm.create_model("resnet18", num_classes=3), mode="after")
    restored.load_state_dict(converted.state_dict(), strict=True)
    converted.eval()
    restored.eval()
    x = torch.randn(2, 3, 32, 32)
    with metadata_context(converted, design[:2]), metadata_context(restored, design[:2]):
        torch.testing.assert_close(restored(x), converted(x))


def test_replace_mode_swaps_norms_and_copies_affine() -> None:
    kernel, _ = _kernel()
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 6), nn.LayerNorm(6)
    )
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-1.0, 1.0)
    gamma = model[1].weight.detach().clone()
    converted = convert_metadata_norm(model, kernel, mode="replace")
    assert isinstance(converted[1], MetadataNorm2d) and isinstance(converted[4], MetadataNorm)
    torch.testing.assert_close(converted[1].weight.detach(), gamma)
    assert converted[1].affine and converted[1].has_kernel
    assert "1.running_mean" not in converted.state_dict()
    whole = convert_metadata_norm(nn.BatchNorm1d(5), kernel, mode="replace")
    assert isinstance(whole, MetadataNorm1d)


def test_resnet_with_every_batchnorm_replaced_trains() -> None:
    kernel, design = _kernel()
    model = convert_metadata_norm(timm.create_model("resnet18", num_classes=3), kernel, mode="replace")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    enable_metadata_kwarg(model)
    model(torch.randn(4, 3, 32, 32), metadata=design[:4]).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_selection_by_name_and_predicate() -> None:
    kernel, design = _kernel()
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, depth=2)
    convert_metadata_norm(vit, kernel, layers=["blocks.1.mlp.fc2", "norm"], mode="after")
    assert isinstance(vit.blocks[1].mlp.fc2.metadata_norm, MetadataNorm)
    assert len(metadata_norm_layers(vit)) == 2
    enable_metadata_kwarg(vit)
    assert vit(torch.randn(2, 3, 32, 32), metadata=design[:2]).shape == (2, 3)  # on (B, N, C) tokens
    cnn = timm.create_model("resnet18", num_classes=3)
    convert_metadata_norm(
        cnn, kernel, layers=lambda name, m: name.startswith("layer4") and isinstance(m, nn.Conv2d)
    )
    assert len(metadata_norm_layers(cnn)) == 5  # 4 convs in the blocks + the downsample conv


@pytest.mark.parametrize(
    ("module", "cls", "width"),
    [
        (nn.Conv2d(3, 7, 3), MetadataNorm2d, 7),
        (nn.Linear(3, 7), MetadataNorm, 7),
        (nn.BatchNorm1d(7), MetadataNorm1d, 7),
        (nn.GroupNorm(1, 7), MetadataNorm2d, 7),
        (nn.LayerNorm(7), MetadataNorm, 7),
        (timm.layers.LayerNorm2d(7), MetadataNorm2d, 7),
        (timm.layers.RmsNorm(7), MetadataNorm, 7),
    ],
)
def test_layer_layout_follows_the_module(module: nn.Module, cls: type, width: int) -> None:
    mdn = metadata_norm_for(module.to(torch.float64))
    assert type(mdn) is cls and mdn.num_features == width and mdn.running_beta.dtype == torch.float64


def test_errors() -> None:
    kernel, _ = _kernel()
    model = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(ValueError, match="mode must be"):
        convert_metadata_norm(model, kernel, mode="before")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\['nope'\] are not modules"):
        convert_metadata_norm(model, kernel, layers=["nope"])
    with pytest.raises(ValueError, match="no layer selected"):
        convert_metadata_norm(model, kernel, layers=[])
    with pytest.raises(ValueError, match="swaps norm layers only"):
        convert_metadata_norm(model, kernel, layers=["conv1"], mode="replace")
    with pytest.raises(TypeError, match="cannot add MetadataNorm after ReLU"):
        convert_metadata_norm(model, kernel, layers=["act1"])
    with pytest.raises(TypeError, match="single str"):
        convert_metadata_norm(model, kernel, layers="conv1")
    convert_metadata_norm(model, kernel, layers=["bn1"])
    with pytest.raises(ValueError, match="already has a metadata_norm"):
        convert_metadata_norm(model, kernel, layers=["bn1"])
