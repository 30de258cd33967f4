from __future__ import annotations

import numpy as np
import pytest
import torch
from gzsl_dvae import ShufflingClassificationLoss


def _ce(logits: np.ndarray, label: int) -> float:
    shifted = logits - logits.max()
    return float(np.log(np.exp(shifted).sum()) - shifted[label])


def _reference(z_t, z_p, labels, perm, weight, bias) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Per sample: CE(F(z^t_i + z^p_i), y_i) + CE(F(z^t_i + z^p_{perm(i)}), y_i), F(h) = W h + b, float64."""
    out = np.zeros(len(labels))
    for i, y in enumerate(labels):
        out[i] = _ce(weight @ (z_t[i] + z_p[i]) + bias, y) + _ce(weight @ (z_t[i] + z_p[perm[i]]) + bias, y)
    return out


def _setup(n: int = 6, d: int = 4, k: int = 3, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    z_t = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    z_p = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, k, (n,), generator=g)
    perm = torch.randperm(n, generator=g)
    loss = ShufflingClassificationLoss(k, d).double()
    return loss, z_t, z_p, labels, perm


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_values_match_float64_reference(reduction: str) -> None:
    loss, z_t, z_p, labels, perm = _setup()
    loss.reduction = reduction  # type: ignore[assignment]
    w = loss.classifier.weight.detach().numpy()
    b = loss.classifier.bias.detach().numpy()
    ref = _reference(z_t.detach().numpy(), z_p.detach().numpy(), labels.numpy(), perm.numpy(), w, b)
    expected = {"sum": ref.sum(), "mean": ref.mean(), "none": ref}[reduction]
    out = loss(z_t, z_p, labels, permutation=perm)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-12)


def test_gradients_match_reference_autograd() -> None:
    loss, z_t, z_p, labels, perm = _setup(seed=1)
    loss(z_t, z_p, labels, permutation=perm).backward()
    # independent float64 reference: explicit log-sum-exp per row, autograd only differentiates it
    zt2, zp2 = z_t.detach().clone().requires_grad_(), z_p.detach().clone().requires_grad_()
    w = loss.classifier.weight.detach().clone().requires_grad_()
    b = loss.classifier.bias.detach().clone().requires_grad_()
    total = zt2.new_zeros(())
    for i, y in enumerate(labels.tolist()):
        for h in (zt2[i] + zp2[i], zt2[i] + zp2[perm[i]]):
            logits = w @ h + b
            total = total + torch.logsumexp(logits, 0) - logits[y]
    total.backward()
    torch.testing.assert_close(z_t.grad, zt2.grad)
    torch.testing.assert_close(z_p.grad, zp2.grad)
    torch.testing.assert_close(loss.classifier.weight.grad, w.grad)
    torch.testing.assert_close(loss.classifier.bias.grad, b.grad)


def test_identity_permutation_is_twice_cross_entropy() -> None:
    loss, z_t, z_p, labels, _ = _setup(seed=2)
    logits = loss.classifier(z_t + z_p)
    expected = 2 * torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    torch.testing.assert_close(loss(z_t, z_p, labels, permutation=torch.arange(6)), expected)


def test_shuffling_penalises_class_information_in_z_p() -> None:
    # z^p = class code, z^t = 0: the un-shuffled term is easy, the re-combined one cannot be; moving the code
    # to z^t makes both terms easy. The loss must prefer the second arrangement.
    k, d = 4, 4
    labels = torch.arange(k).repeat(3)
    code = 8.0 * torch.eye(d)[labels]
    loss = ShufflingClassificationLoss(k, d, classifier=torch.nn.Identity())
    perm = torch.roll(torch.arange(len(labels)), 1)
    in_p = loss(torch.zeros_like(code), code, labels, permutation=perm)
    in_t = loss(code, torch.zeros_like(code), labels, permutation=perm)
    assert in_t < 0.01 * in_p


def test_random_permutation_uses_generator() -> None:
    loss, z_t, z_p, labels, _ = _setup(n=16, seed=3)
    a = loss(z_t, z_p, labels, generator=torch.Generator().manual_seed(5))
    b = loss(z_t, z_p, labels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_errors_and_repr() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        ShufflingClassificationLoss(1, 4)
    loss, z_t, z_p, labels, _ = _setup()
    with pytest.raises(ValueError, match="permutation"):
        loss(z_t, z_p, labels, permutation=torch.tensor([0, 0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\)"):
        loss(z_t, z_p, torch.full((6,), 3))
    with pytest.raises(TypeError, match="integer"):
        loss(z_t, z_p, labels.double())
    with pytest.raises(ValueError, match="latent_dim=4"):
        loss(z_t[:, :3], z_p[:, :3], labels)
    assert "num_classes=3, latent_dim=4, reduction='sum'" in str(loss)
