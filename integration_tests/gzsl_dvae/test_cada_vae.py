from __future__ import annotations

import io

import pytest
import torch
from gzsl_dvae import CADAVAE, GaussianKLLoss, GaussianWassersteinLoss, LinearWarmup, ReconstructionLoss

SMALL = {"visual_hidden": (24, 20), "attribute_hidden": (16, 12), "latent_dim": 4}


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(6, 10, generator=g), torch.rand(6, 5, generator=g)


def test_published_architecture_defaults() -> None:
    model = CADAVAE(2048, 312)
    assert model.visual_encoder.hidden[0].out_features == 1560
    assert model.visual_encoder.mu.out_features == 64
    assert model.visual_decoder[0].out_features == 1660
    assert model.semantic_encoder.hidden[0].out_features == 1450
    assert model.semantic_decoder[0].out_features == 665
    assert model.kl_warmup == LinearWarmup(0.25, 0, 93)
    assert model.cross_reconstruction_warmup == LinearWarmup(2.37, 21, 75)
    assert model.distance_warmup == LinearWarmup(8.13, 6, 22)
    assert "visual_hidden=(1560, 1660), attribute_hidden=(1450, 665)" in str(model)


@pytest.mark.parametrize("epoch", [0, 10, 40, 99])
def test_total_is_the_warmed_up_sum_of_independently_computed_terms(epoch: int) -> None:
    model = CADAVAE(10, 5, **SMALL)  # type: ignore[arg-type]
    x, c = _batch()
    torch.manual_seed(7)
    terms = model(x, c, epoch=epoch)
    # recompute with the same noise from the building blocks
    torch.manual_seed(7)
    mu_v, lv_v = model.visual_encoder(x)
    mu_s, lv_s = model.semantic_encoder(c)
    z_v = mu_v + torch.exp(0.5 * lv_v) * torch.randn_like(mu_v)
    z_s = mu_s + torch.exp(0.5 * lv_s) * torch.randn_like(mu_s)
    l1 = ReconstructionLoss()
    rec = l1(model.visual_decoder(z_v), x) + l1(model.semantic_decoder(z_s), c)
    cross = l1(model.visual_decoder(z_s), x) + l1(model.semantic_decoder(z_v), c)
    kl = GaussianKLLoss()(mu_v, lv_v) + GaussianKLLoss()(mu_s, lv_s)
    dist = GaussianWassersteinLoss()(mu_v, lv_v, mu_s, lv_s)
    total = rec + LinearWarmup(0.25, 0, 93)(epoch) * kl + LinearWarmup(2.37, 21, 75)(epoch) * cross
    total = total + LinearWarmup(8.13, 6, 22)(epoch) * dist
    torch.testing.assert_close(terms["loss"], total)
    torch.testing.assert_close(terms["cross_reconstruction"], cross.detach())
    torch.testing.assert_close(terms["distance"], dist.detach())


def test_training_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    model = CADAVAE(10, 5, **SMALL)  # type: ignore[arg-type]
    x, c = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = model(x, c, epoch=30)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_state_dict_round_trip() -> None:
    model = CADAVAE(10, 5, **SMALL)  # type: ignore[arg-type]
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    clone = CADAVAE(10, 5, **SMALL)  # type: ignore[arg-type]
    clone.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    x, c = _batch()
    for a, b in zip(model.encode_visual(x), clone.encode_visual(x), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(model.generate_visual(c), clone.generate_visual(c))


def test_bf16_autocast_keeps_parameter_dtype() -> None:
    model = CADAVAE(10, 5, **SMALL)  # type: ignore[arg-type]
    x, c = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, c, epoch=50)["loss"]
    loss.float().backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_input_errors() -> None:
    model = CADAVAE(10, 5, **SMALL)  # type: ignore[arg-type]
    x, c = _batch()
    with pytest.raises(ValueError, match="visual_dim=10"):
        model(x[:, :9], c)
    with pytest.raises(ValueError, match="attribute_dim=5"):
        model(x, c[:, :4])
    with pytest.raises(ValueError, match="same number of rows"):
        model(x, c[:5])
