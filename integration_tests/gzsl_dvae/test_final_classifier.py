from __future__ import annotations

import functools

import pytest
import torch
from gzsl_dvae import (
    ClassifierProtocol,
    DisentangledVAE,
    build_classifier_training_set,
    encode_mean,
    train_softmax_classifier,
)


def _identity_encoder(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # deterministic "posterior": mean = input, variance ~ 0
    return inputs, torch.full_like(inputs, -30.0)


def test_protocol_defaults_are_cada_vae() -> None:
    p = ClassifierProtocol()
    assert (p.seen_visual_samples, p.seen_semantic_samples, p.unseen_semantic_samples) == (200, 0, 400)
    assert (p.batch_size, p.lr, p.beta1) == (32, 1e-3, 0.5)


def test_training_set_counts_and_labels() -> None:
    features = torch.randn(30, 3)
    labels = torch.tensor([0] * 5 + [2] * 25)  # class 0 has fewer rows than requested: tiled
    attributes = torch.randn(4, 3)
    protocol = ClassifierProtocol(seen_visual_samples=10, seen_semantic_samples=3, unseen_semantic_samples=7)
    z, y = build_classifier_training_set(
        _identity_encoder,
        _identity_encoder,
        features,
        labels,
        attributes,
        torch.tensor([0, 2]),
        torch.tensor([1, 3]),
        protocol,
        generator=torch.Generator().manual_seed(0),
    )
    assert z.shape == (2 * 10 + 2 * 3 + 2 * 7, 3)
    counts = torch.bincount(y, minlength=4)
    assert counts.tolist() == [13, 7, 13, 7]
    # unseen samples come from their own attribute row (deterministic encoder)
    torch.testing.assert_close(z[y == 3], attributes[3].expand(7, 3), atol=1e-6, rtol=0)
    # visual samples of class 0 are its own (tiled) rows
    visual_0 = z[:10]
    assert all(any(torch.allclose(v, f, atol=1e-6) for f in features[:5]) for v in visual_0)


def test_training_set_errors() -> None:
    args = (
        _identity_encoder,
        _identity_encoder,
        torch.randn(4, 2),
        torch.tensor([0, 0, 1, 1]),
        torch.randn(3, 2),
    )
    with pytest.raises(ValueError, match="disjoint"):
        build_classifier_training_set(*args, torch.tensor([0, 1]), torch.tensor([1, 2]), ClassifierProtocol())
    with pytest.raises(ValueError, match="index rows"):
        build_classifier_training_set(*args, torch.tensor([0, 1]), torch.tensor([5]), ClassifierProtocol())
    with pytest.raises(ValueError, match="no input rows"):
        build_classifier_training_set(*args, torch.tensor([0, 2]), torch.tensor([1]), ClassifierProtocol())
    with pytest.raises(ValueError, match="epochs"):
        ClassifierProtocol(epochs=0)
    with pytest.raises(ValueError, match="unseen_semantic_samples"):
        ClassifierProtocol(unseen_semantic_samples=-1)


def test_softmax_classifier_learns_separable_latents() -> None:
    g = torch.Generator().manual_seed(0)
    centres = 4.0 * torch.eye(5)
    y = torch.arange(5).repeat(40)
    z = centres[y] + 0.3 * torch.randn(200, 5, generator=g)
    epochs_seen = []
    clf = train_softmax_classifier(
        z,
        y,
        5,
        ClassifierProtocol(epochs=20, lr=2e-2),
        generator=g,
        callback=lambda e, _: epochs_seen.append(e),
    )
    assert epochs_seen == list(range(20))
    assert isinstance(clf, torch.nn.Linear) and clf.out_features == 5
    assert (clf(z).argmax(1) == y).float().mean() > 0.95
    with pytest.raises(ValueError, match=r"`y` must lie in \[0, 3\)"):
        train_softmax_classifier(z, y, 3, ClassifierProtocol(epochs=1))


def test_encode_mean_is_posterior_mean_in_batches() -> None:
    model = DisentangledVAE(6, 4, 3, latent_dim=2, visual_hidden=(8, 8), attribute_hidden=(8, 8))
    x = torch.randn(10, 6)
    ours = encode_mean(functools.partial(model.encode_visual, factor="p"), x, batch_size=3)
    torch.testing.assert_close(ours, model.visual_encoder(x)[0][:, 2:])


def test_closed_form_gradient_matches_autograd_cross_entropy_with_adam() -> None:
    # reference: the textbook loop (autograd CE + torch.optim.Adam), same batch order and initial weights
    g = torch.Generator().manual_seed(0)
    z = torch.randn(100, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (100,), generator=g)
    protocol = ClassifierProtocol(epochs=3, batch_size=32)
    torch.manual_seed(5)
    ours = train_softmax_classifier(z, y, 4, protocol, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(5)
    ref = torch.nn.Linear(6, 4).double()
    torch.nn.init.xavier_uniform_(ref.weight, gain=0.5)
    torch.nn.init.zeros_(ref.bias)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3, betas=(0.5, 0.999), foreach=False)
    order_g = torch.Generator().manual_seed(9)
    for _ in range(3):
        order = torch.randperm(100, generator=order_g)
        for b in range(100 // 32):
            index = order[b * 32 : (b + 1) * 32]
            loss = torch.nn.functional.cross_entropy(ref(z[index]), y[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(ours.bias, ref.bias, rtol=1e-7, atol=1e-9)
