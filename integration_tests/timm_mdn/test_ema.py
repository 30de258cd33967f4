"""EMA-, deepcopy- and load_state_dict-safe lazy state, tested with timm's own ``ModelEmaV2``/``ModelEmaV3``.

The running beta is sized by the first training batch (as torch's ``Lazy*`` modules); an EMA created right
after the model, before that batch, must still pair with the model entry by entry and follow it.
"""

import copy
import io

import pytest
import timm
import timm_mdn
import torch
from timm.utils import ModelEmaV2, ModelEmaV3
from timm_mdn import MetadataKernel, MetadataNorm2d, metadata_norm_layers
from torch import nn

from integration_tests.timm_mdn.toy import toy_kernel as _kernel

DECAY = 0.5


def _model(kernel: MetadataKernel | None) -> nn.Module:
    return timm.create_model(
        "mdn_resnet18", num_classes=3, layers=(1, 1, 1, 1), mdn_kernel=kernel, mdn_sites="all"
    )


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, design: torch.Tensor, step: int) -> None:
    rows = slice(4 * step, 4 * step + 4)
    optimizer.zero_grad(set_to_none=True)
    logits = model(torch.randn(4, 3, 32, 32), metadata=design[rows])
    nn.functional.cross_entropy(logits, torch.arange(4) % 3).backward()
    optimizer.step()


@pytest.mark.parametrize("ema_cls", [ModelEmaV3, ModelEmaV2])
@pytest.mark.parametrize("kernel_later", [False, True], ids=["kernel_at_creation", "kernel_after_ema"])
def test_ema_created_before_the_first_step_follows_weights_and_running_beta(
    ema_cls: type, kernel_later: bool
) -> None:
    kernel, design = _kernel()
    model = _model(None if kernel_later else kernel)
    ema = ema_cls(model, decay=DECAY)  # right after the model: every running beta still unsized
    assert all(layer.has_uninitialized_params() for layer in metadata_norm_layers(ema.module))
    if kernel_later:
        timm_mdn.set_metadata_kernel(model, kernel)  # the EMA's copies receive it too
        assert all(layer.has_kernel for layer in metadata_norm_layers(ema.module))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = {k: v.clone() for k, v in ema.module.state_dict().items() if v.is_floating_point()}
    for step in range(3):
        _train_step(model, optimizer, design, step)
        ema.update(model)
        for key, value in model.state_dict().items():
            if not value.is_floating_point():
                continue
            # A state sized by this step was zeros in the EMA, the value an eager buffer would have held.
            previous = expected.get(key, torch.zeros_like(value))
            expected[key] = DECAY * previous + (1 - DECAY) * value
    ema_state = ema.module.state_dict()
    assert ema_state.keys() == model.state_dict().keys()
    for key, value in expected.items():
        torch.testing.assert_close(ema_state[key], value, rtol=1e-5, atol=1e-6)
    betas = [key for key in ema_state if key.endswith("running_beta")]
    assert len(betas) == len(metadata_norm_layers(model)) == 13  # 12 BatchNorms and the head
    assert any(not torch.equal(ema_state[k], model.state_dict()[k]) for k in betas)
    with torch.no_grad():  # the EMA evaluates with its own running betas
        out = ema(torch.randn(2, 3, 32, 32), metadata=design[:2])
    assert out.shape == (2, 3) and bool(torch.isfinite(out).all())


def test_deepcopy_of_an_unsized_layer_is_sized_with_its_original_and_then_independent() -> None:
    kernel, design = _kernel()
    layer = MetadataNorm2d(4, kernel=kernel)
    twin = copy.deepcopy(layer)
    assert twin.has_uninitialized_params()
    layer.metadata = design[:6]
    layer(torch.randn(6, 4, 3, 5))
    assert twin.running_beta.shape == layer.running_beta.shape == (3, 4, 3, 5)
    assert not bool(twin.running_beta.any())  # zeros, like a freshly sized buffer
    twin.metadata = design[6:12]
    twin(torch.randn(6, 4, 3, 5))
    assert not torch.equal(twin.running_beta, layer.running_beta)
    independent = copy.deepcopy(layer)  # copies of sized layers are plain copies
    independent.metadata = design[:6]
    independent(torch.randn(6, 4, 3, 5))
    assert not torch.equal(independent.running_beta, layer.running_beta)


def test_copy_trained_at_another_size_resizes_a_beta_it_never_estimated() -> None:
    kernel, design = _kernel()
    layer = MetadataNorm2d(4, kernel=kernel)
    other = copy.deepcopy(layer)
    layer.metadata = other.metadata = design[:6]
    layer(torch.randn(6, 4, 3, 3))
    other(torch.randn(6, 4, 5, 5))  # its zeros came from the copy: re-sized, not an error
    assert other.running_beta.shape == (3, 4, 5, 5)
    with pytest.raises(ValueError, match="estimated for features of shape"):
        other(torch.randn(6, 4, 3, 3))


def test_state_dict_round_trips_through_torch_save_weights_only_into_a_fresh_model() -> None:
    kernel, design = _kernel()
    model = _model(kernel)
    unsized = model.state_dict()
    assert not any(k.endswith("running_beta") for k in unsized)  # unsized buffers are left out
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _train_step(model, optimizer, design, 0)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _model(None)  # no kernel, nothing sized
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    model.eval()
    fresh.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x, metadata=design[:2]), model(x, metadata=design[:2]), rtol=0, atol=0)
    # An MDN checkpoint saved before the first step loads strictly too: the betas stay unsized.
    again = _model(None)
    again.load_state_dict(unsized, strict=True)
    assert all(layer.has_kernel for layer in metadata_norm_layers(again))
    assert all(layer.has_uninitialized_params() for layer in metadata_norm_layers(again))


def test_reset_running_stats_zeroes_in_place_and_keeps_the_ema_pairing() -> None:
    kernel, design = _kernel()
    layer = MetadataNorm2d(4, kernel=kernel)
    layer.metadata = design[:6]
    layer(torch.randn(6, 4, 2, 2))
    beta = layer.running_beta
    layer.reset_running_stats()
    assert layer.running_beta is beta and not bool(beta.any())
    layer(torch.randn(6, 4, 3, 3))  # a reset beta may take a new feature shape
    assert layer.running_beta.shape == (3, 4, 3, 3)
