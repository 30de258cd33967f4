from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from gzsl_dvae import (
    DisentangledVAE,
    GaussianKLLoss,
    GaussianWassersteinLoss,
    LinearWarmup,
    ReconstructionLoss,
    train_vae,
)

from integration_tests.helpers.distributed import run_distributed

SMALL = {"visual_hidden": (24, 20), "attribute_hidden": (16, 12), "latent_dim": 4}


def _model(**kwargs: object) -> DisentangledVAE:
    return DisentangledVAE(10, 5, 3, **{**SMALL, **kwargs})  # type: ignore[arg-type]


def _batch(seed: int = 0, n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(n, 10, generator=g),
        torch.rand(n, 5, generator=g),
        torch.randint(0, 3, (n,), generator=g),
    )


def test_factors_and_repr() -> None:
    model = _model(alpha=2.0, gamma=0.5)
    x, c, _ = _batch()
    mu_t, lv_t = model.encode_visual(x)
    mu_p, lv_p = model.encode_visual(x, factor="p")
    mu, lv = model.visual_encoder(x)
    torch.testing.assert_close(torch.cat([mu_t, mu_p], 1), mu)
    torch.testing.assert_close(torch.cat([lv_t, lv_p], 1), lv)
    assert model.encode_semantic(c)[0].shape == (6, 4)
    assert "num_classes=3, latent_dim=4" in str(model) and "alpha=2.0, gamma=0.5" in str(model)
    with pytest.raises(ValueError, match="`factor`"):
        model.encode_visual(x, factor="q")  # type: ignore[arg-type]


@pytest.mark.parametrize("epoch", [0, 15, 60, 99])
@pytest.mark.parametrize(("alpha", "gamma"), [(1.0, 1.0), (3.0, 0.2)])
def test_total_matches_paper_formula_from_building_blocks(epoch: int, alpha: float, gamma: float) -> None:
    model = _model(alpha=alpha, gamma=gamma)
    x, c, y = _batch()
    torch.manual_seed(11)
    terms = model(x, c, y, epoch=epoch)

    torch.manual_seed(11)
    mu_v, lv_v = model.visual_encoder(x)
    mu_s, lv_s = model.semantic_encoder(c)
    z_v = mu_v + torch.exp(0.5 * lv_v) * torch.randn_like(mu_v)
    z_s = mu_s + torch.exp(0.5 * lv_s) * torch.randn_like(mu_s)
    perm_v = torch.randperm(6)
    perm_s = torch.randperm(6)
    d = 4
    zt_v, zp_v, zt_s, zp_s = z_v[:, :d], z_v[:, d:], z_s[:, :d], z_s[:, d:]
    l1, kl, w2 = ReconstructionLoss(), GaussianKLLoss(), GaussianWassersteinLoss()
    # L_VAE: decoders on z^t + z^p, KL on z^t plus alpha * KL on z^p (warmed up like CADA-VAE)
    rec = l1(model.visual_decoder(zt_v + zp_v), x) + l1(model.semantic_decoder(zt_s + zp_s), c)
    kl_t = kl(mu_v[:, :d], lv_v[:, :d]) + kl(mu_s[:, :d], lv_s[:, :d])
    kl_p = kl(mu_v[:, d:], lv_v[:, d:]) + kl(mu_s[:, d:], lv_s[:, d:])
    # L_SC: F_m on z^t + z^p and on z^t + shuffled z^p, summed over samples and modalities
    f_v = model.visual_classification_loss.classifier
    f_s = model.semantic_classification_loss.classifier
    sc = (
        F.cross_entropy(f_v(zt_v + zp_v), y, reduction="sum")
        + F.cross_entropy(f_v(zt_v + zp_v[perm_v]), y, reduction="sum")
        + F.cross_entropy(f_s(zt_s + zp_s), y, reduction="sum")
        + F.cross_entropy(f_s(zt_s + zp_s[perm_s]), y, reduction="sum")
    )
    # L_MA: cross reconstruction and W2 on both factors
    cr = l1(model.visual_decoder(zt_s + zp_s), x) + l1(model.semantic_decoder(zt_v + zp_v), c)
    dd = w2(mu_v[:, :d], lv_v[:, :d], mu_s[:, :d], lv_s[:, :d]) + w2(
        mu_v[:, d:], lv_v[:, d:], mu_s[:, d:], lv_s[:, d:]
    )
    expected = (
        rec
        + LinearWarmup(0.25, 0, 93)(epoch) * (kl_t + alpha * kl_p)
        + gamma * sc
        + LinearWarmup(2.37, 21, 75)(epoch) * cr
        + LinearWarmup(8.13, 6, 22)(epoch) * dd
    )
    torch.testing.assert_close(terms["loss"], expected)
    torch.testing.assert_close(terms["classification"], sc.detach())
    torch.testing.assert_close(terms["kl_p"], kl_p.detach())


def test_alpha_scales_only_the_dispersing_kl_gradient() -> None:
    # with every other weight 0, d loss / d logvar_p is alpha * (exp(logvar_p) - 1) / 2 times the KL warm-up
    zero = LinearWarmup.constant(0.0)
    model = _model(
        alpha=3.0,
        gamma=0.0,
        kl_warmup=LinearWarmup.constant(1.0),
        cross_reconstruction_warmup=zero,
        distance_warmup=zero,
    )
    x, _c, _y = _batch()
    mu, lv = model.visual_encoder(x)
    mu.retain_grad()
    lv.retain_grad()
    total = GaussianKLLoss()(mu[:, :4], lv[:, :4]) + 3.0 * GaussianKLLoss()(mu[:, 4:], lv[:, 4:])
    total.backward()
    torch.testing.assert_close(lv.grad[:, 4:], 3.0 * 0.5 * (lv[:, 4:].exp() - 1).detach())
    torch.testing.assert_close(lv.grad[:, :4], 0.5 * (lv[:, :4].exp() - 1).detach())


def test_classification_gradient_reaches_both_encoders_and_classifiers() -> None:
    zero = LinearWarmup.constant(0.0)
    model = _model(gamma=1.0, kl_warmup=zero, cross_reconstruction_warmup=zero, distance_warmup=zero)
    x, c, y = _batch()
    model(x, c, y, epoch=0)["loss"].backward()
    for module in (
        model.visual_encoder.mu,
        model.semantic_encoder.mu,
        model.visual_classification_loss.classifier,
        model.semantic_classification_loss.classifier,
    ):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def test_seeded_training_is_reproducible_and_state_dict_round_trips() -> None:
    x, _c, y = _batch(n=40)
    attrs = torch.rand(3, 5, generator=torch.Generator().manual_seed(1))

    def fit() -> DisentangledVAE:
        torch.manual_seed(3)
        model = _model()
        train_vae(model, x, y, attrs, epochs=3, batch_size=10)
        return model

    a, b = fit(), fit()
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    clone = _model()
    clone.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    torch.testing.assert_close(clone.encode_visual(x)[0], a.encode_visual(x)[0])
    torch.testing.assert_close(clone.generate_visual(attrs), a.generate_visual(attrs))


def test_bf16_autocast_keeps_parameter_dtype() -> None:
    model = _model()
    x, c, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, c, y, epoch=50)["loss"]
    loss.float().backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="alpha"):
        _model(alpha=-1.0)
    with pytest.raises(ValueError, match="num_classes"):
        DisentangledVAE(10, 5, 1)
    model = _model()
    x, c, y = _batch()
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\)"):
        model(x, c, y + 3)
    with pytest.raises(ValueError, match="visual_dim=10"):
        model(x[:, :3], c, y)


def _ddp_step(
    rank: int,
    world_size: int,
    x: torch.Tensor,
    c: torch.Tensor,
    y: torch.Tensor,
    state: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    model = _model()
    model.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    half = x.shape[0] // world_size
    part = slice(rank * half, (rank + 1) * half)
    torch.manual_seed(100 + rank)
    ddp(x[part], c[part], y[part], 50)["loss"].backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.distributed
def test_ddp_gradients_match_single_process() -> None:
    # every term is a sum over samples and the shuffle stays within each rank's batch, so DDP's averaged
    # gradient is the mean of the per-rank sums computed with the same noise in one process
    x, c, y = _batch(n=8)
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = run_distributed(_ddp_step, x, c, y, state, world_size=2)
    reference = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for rank in range(2):
        model.zero_grad()
        torch.manual_seed(100 + rank)
        model(x[rank * 4 : (rank + 1) * 4], c[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4], 50)[
            "loss"
        ].backward()
        for name, p in model.named_parameters():
            reference[name] += p.grad / 2
    for grads in results:
        for name, g in grads.items():
            torch.testing.assert_close(g, reference[name], rtol=1e-4, atol=1e-5)
