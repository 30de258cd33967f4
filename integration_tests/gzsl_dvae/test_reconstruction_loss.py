from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gzsl_dvae import ReconstructionLoss


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(5, 7, generator=g, dtype=torch.float64).requires_grad_(),
        torch.randn(5, 7, generator=g, dtype=torch.float64),
    )


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_values_match_float64_reference(norm: str, reduction: str) -> None:
    rec, target = _inputs()
    diff = rec.detach().numpy() - target.numpy()
    per_sample = np.abs(diff).sum(1) if norm == "l1" else (diff**2).sum(1)
    expected = {"sum": per_sample.sum(), "mean": per_sample.mean(), "none": per_sample}[reduction]
    out = ReconstructionLoss(norm, reduction)(rec, target)  # type: ignore[arg-type]
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize(("norm", "anchor"), [("l1", F.l1_loss), ("l2", F.mse_loss)])
def test_matches_torch_sum_losses_values_and_gradients(norm: str, anchor) -> None:  # type: ignore[no-untyped-def]
    # CADA-VAE uses nn.L1Loss(size_average=False), i.e. reduction="sum"
    rec, target = _inputs(seed=1)
    ours = ReconstructionLoss(norm)(rec, target)  # type: ignore[arg-type]
    ref = anchor(rec, target, reduction="sum")
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, rec)[0], torch.autograd.grad(ref, rec)[0])


def test_l1_gradient_is_sign() -> None:
    rec, target = _inputs(seed=2)
    ReconstructionLoss("l1")(rec, target).backward()
    torch.testing.assert_close(rec.grad, torch.sign(rec.detach() - target))


def test_errors_and_repr() -> None:
    with pytest.raises(ValueError, match="`norm`"):
        ReconstructionLoss("l3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="equal shapes"):
        ReconstructionLoss()(torch.zeros(2, 3), torch.zeros(2, 4))
    assert str(ReconstructionLoss()) == "ReconstructionLoss(norm='l1', reduction='sum')"
