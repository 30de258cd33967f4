"""Every timm model-surgery path with Metadata Normalization, through timm's own API.

``features_only``, ``forward_intermediates``, ``num_classes=0, global_pool=""`` at creation,
``reset_classifier``, ``norm_layer=`` injection into six families (norm-act ones included), and moving weights
between an MDN model and the plain timm architecture.
"""

from functools import partial

import pytest
import timm
import timm_mdn
import torch
from timm.models import MobileNetV3
from timm.models._efficientnet_builder import decode_arch_def
from timm_mdn import (
    MetadataNorm,
    MetadataNorm2d,
    MetadataNormAct2d,
    enable_metadata_kwarg,
    is_norm_layer,
    load_weights,
    metadata_norm_layers,
    plain_state_dict,
)
from torch import nn

from integration_tests.timm_mdn.toy import toy_kernel as _kernel

SMALL = {
    "mdn_resnet18": {"layers": (1, 1, 1, 1)},
    "mdn_convnext_atto": {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)},
    "mdn_vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8, "depth": 3},
}


def _create(name: str, **kwargs: object) -> nn.Module:
    return timm.create_model(name, **{**SMALL[name], **kwargs})


def _train_once(model: nn.Module, design: torch.Tensor) -> None:
    """One training forward, so every running beta is sized and estimated."""
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32), metadata=design[:4])


@pytest.mark.parametrize("name", list(SMALL))
def test_features_only_keeps_mdn_at_its_sites_and_takes_metadata(name: str) -> None:
    kernel, design = _kernel()
    torch.manual_seed(1)
    full = _create(name, mdn_kernel=kernel, mdn_sites="all")
    torch.manual_seed(1)  # the same initial weights (timm renames modules in features_only models)
    features = _create(name, mdn_kernel=kernel, mdn_sites="all", features_only=True)
    trunk = [layer for layer in metadata_norm_layers(full) if layer is not full.metadata_norm]
    assert len(metadata_norm_layers(features)) == len(trunk) > 0
    x = torch.randn(4, 3, 32, 32)
    maps = features(x, metadata=design[:4])
    expected = full.forward_intermediates(x, metadata=design[:4], intermediates_only=True)
    assert len(maps) == len(expected) >= 1
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want)
    other = features(x, metadata=design[4:8])  # the metadata reach the layers: other rows, other maps
    assert not torch.allclose(other[-1], maps[-1])
    sum(m.float().mean() for m in maps).backward()


def test_features_only_without_trunk_mdn_raises_instead_of_dropping_it() -> None:
    kernel, _ = _kernel()
    with pytest.raises(ValueError, match="mdn_sites='all'"):
        _create("mdn_resnet18", mdn_kernel=kernel, features_only=True)


@pytest.mark.parametrize("name", list(SMALL))
def test_forward_intermediates_takes_metadata_like_forward(name: str) -> None:
    kernel, design = _kernel()
    model = _create(name, mdn_kernel=kernel, mdn_sites="all")
    x = torch.randn(4, 3, 32, 32)
    final, intermediates = model.forward_intermediates(x, metadata=design[:4])
    with timm_mdn.metadata_context(model, design[:4]):
        torch.testing.assert_close(final, model.forward_features(x))
    final_other, _ = model.forward_intermediates(x, metadata=design[4:8])
    assert not torch.allclose(final, final_other)
    logits = model.forward_head(final)
    logits.sum().backward()
    assert logits.shape[0] == 4 and len(intermediates) >= 1


@pytest.mark.parametrize("name", ["mdn_resnet18", "mdn_convnext_atto"])
def test_num_classes_0_and_no_pooling_at_creation(name: str) -> None:
    kernel, design = _kernel()
    model = _create(name, mdn_kernel=kernel, num_classes=0, global_pool="")
    assert isinstance(model.metadata_norm, MetadataNorm2d)
    out = model(torch.randn(4, 3, 32, 32), metadata=design[:4])
    assert out.dim() == 4 and out.shape[:2] == (4, model.num_features)
    out.mean().backward()
    model.reset_classifier(7, "avg")  # and back to a classifier: a pooled head MDN, the kernel kept
    assert isinstance(model.metadata_norm, MetadataNorm) and model.metadata_norm.has_kernel
    assert model(torch.randn(4, 3, 32, 32), metadata=design[:4]).shape == (4, 7)


def test_vit_without_pooling_normalises_the_tokens() -> None:
    kernel, design = _kernel()
    model = _create("mdn_vit_tiny_patch16_224", mdn_kernel=kernel, num_classes=0, global_pool="")
    out = model(torch.randn(4, 3, 32, 32), metadata=design[:4])
    assert out.shape == (4, 17, 192)  # 16 patches and the class token


def _mobilenetv3(**kwargs: object) -> nn.Module:
    # timm's mobilenetv3_* generators fix norm_layer themselves (create_model(..., norm_layer=) is a
    # TypeError there), so the class is built directly from a small arch definition.
    arch = [["ds_r1_k3_s2_e1_c16_se0.25_nre"], ["ir_r1_k3_s2_e4_c24_nre"], ["ir_r1_k5_s2_e4_c40_se0.25"]]
    return MobileNetV3(decode_arch_def(arch), num_classes=3, act_layer=nn.Hardswish, **kwargs)


FAMILIES = {
    "resnet": lambda norm: timm.create_model("resnet18", num_classes=3, norm_layer=norm),
    "convnext": lambda norm: timm.create_model(
        "convnext_atto", num_classes=3, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), norm_layer=norm
    ),
    "efficientnet": lambda norm: timm.create_model("efficientnet_b0", num_classes=3, norm_layer=norm),
    "mobilenetv3": lambda norm: _mobilenetv3(norm_layer=norm),
    "regnet": lambda norm: timm.create_model("regnetx_002", num_classes=3, norm_layer=norm),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_norm_layer_injection_replaces_every_norm_forward_and_backward(family: str) -> None:
    kernel, design = _kernel()
    model = FAMILIES[family](partial(MetadataNorm2d, kernel=kernel))
    enable_metadata_kwarg(model)
    layers = metadata_norm_layers(model)
    assert layers and not any(is_norm_layer(m) for m in model.modules())  # no BatchNorm/LayerNorm left
    if family in ("efficientnet", "mobilenetv3", "regnet"):  # timm's norm-act factory resolved MDN
        assert all(isinstance(layer, MetadataNormAct2d) for layer in layers)
        assert any(not isinstance(layer.act, nn.Identity) for layer in layers)
    logits = model(torch.randn(4, 3, 32, 32), metadata=design[:4])
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert all(not layer.has_uninitialized_params() for layer in layers)


def test_norm_layer_injection_into_vit_normalises_tokens() -> None:
    kernel, design = _kernel()
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        depth=2,
        num_classes=3,
        norm_layer=partial(MetadataNorm, kernel=kernel),
    )
    enable_metadata_kwarg(model)
    assert not any(is_norm_layer(m) for m in model.modules())
    model(torch.randn(4, 3, 32, 32), metadata=design[:4]).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.blocks[0].norm1.running_beta.shape == (3, 17, 192)  # one regression per token element


@pytest.mark.parametrize("norm_layer", ["metadatanorm2d", MetadataNorm2d, MetadataNormAct2d])
def test_norm_act_factory_resolves_names_and_classes(norm_layer: object) -> None:
    kernel, design = _kernel()
    model = timm.create_model("efficientnet_b0", num_classes=3, norm_layer=norm_layer)
    timm_mdn.set_metadata_kernel(model, kernel)
    enable_metadata_kwarg(model)
    assert len(metadata_norm_layers(model)) == 49
    assert model(torch.randn(2, 3, 32, 32), metadata=design[:2]).shape == (2, 3)


def test_convert_replace_keeps_the_activation_of_norm_act_layers() -> None:
    kernel, design = _kernel()
    plain = timm.create_model("mobilenetv3_small_100", num_classes=3)
    acts = [type(m.act) for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
    model = timm_mdn.convert_metadata_norm(plain, kernel, mode="replace")
    enable_metadata_kwarg(model)
    assert [type(layer.act) for layer in metadata_norm_layers(model)] == acts
    model(torch.randn(2, 3, 32, 32), metadata=design[:2]).sum().backward()


def test_weights_move_between_the_mdn_and_the_plain_architecture() -> None:
    kernel, design = _kernel()
    mdn = timm.create_model("mdn_resnet18", num_classes=3, mdn_kernel=kernel, mdn_sites="all")
    _train_once(mdn, design)
    plain = timm.create_model("resnet18", num_classes=3)
    load_weights(plain, mdn)  # strict: only MDN's state is left out
    assert plain_state_dict(mdn).keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, mdn.state_dict()[key])
    fresh = timm.create_model("mdn_resnet18", num_classes=3, mdn_kernel=kernel, mdn_sites="all")
    load_weights(fresh, plain)  # and back
    torch.testing.assert_close(fresh.fc.weight, mdn.fc.weight)


def test_weights_move_where_mdn_replaced_the_norms() -> None:
    kernel, design = _kernel()
    mdn = timm.create_model("resnet18", num_classes=3, norm_layer=partial(MetadataNorm2d, kernel=kernel))
    enable_metadata_kwarg(mdn)
    _train_once(mdn, design)
    plain = timm.create_model("resnet18", num_classes=3)
    result = load_weights(plain, mdn)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(plain.conv1.weight, mdn.conv1.weight)
    assert bool((plain.bn1.weight == 1).all())  # MDN without affine is the identity scale
    affine = partial(MetadataNorm2d, kernel=kernel, affine=True)
    back = timm.create_model("resnet18", num_classes=3, norm_layer=affine)
    load_weights(back, plain)  # BatchNorm's running statistics have no place in the MDN model
    torch.testing.assert_close(back.layer4[1].conv2.weight, plain.layer4[1].conv2.weight)
    torch.testing.assert_close(back.bn1.weight, plain.bn1.weight)
    with pytest.raises(RuntimeError, match=r"unexpected keys \['bn1.weight'"):  # gamma would be lost
        load_weights(mdn, plain)
    with pytest.raises(RuntimeError, match="unexpected keys"):
        load_weights(plain, {**plain.state_dict(), "extra.weight": torch.zeros(1)})
