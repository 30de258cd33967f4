from __future__ import annotations

import pytest
import torch
from pyg_scenegraph import EBMLoss

from integration_tests.helpers.distributed import run_distributed


def _formula(pos, neg, t, lam):
    return t * pos.mean() - t * neg.mean() + lam * (pos.pow(2).sum() + neg.pow(2).sum())


@pytest.mark.parametrize(("t", "lam"), [(1.0, 1.0), (0.5, 0.1), (2.0, 0.0)])
def test_ebm_loss_matches_formula_values_and_gradients_float64(t, lam):
    torch.manual_seed(0)
    pos = torch.randn(5, dtype=torch.double, requires_grad=True)
    neg = torch.randn(7, dtype=torch.double, requires_grad=True)
    loss = EBMLoss(temperature=t, regularization=lam)(pos, neg)
    ref = _formula(pos, neg, t, lam)
    torch.testing.assert_close(loss, ref)
    g = torch.autograd.grad(loss, [pos, neg])
    torch.testing.assert_close(g[0], t / 5 + 2 * lam * pos.detach())
    torch.testing.assert_close(g[1], -t / 7 + 2 * lam * neg.detach())


def test_ebm_loss_pushes_positive_energy_down_and_negative_up():
    pos = torch.zeros(4, requires_grad=True)
    neg = torch.zeros(4, requires_grad=True)
    EBMLoss()(pos, neg).backward()
    assert (pos.grad > 0).all() and (neg.grad < 0).all()  # gradient descent lowers E+ and raises E-


def test_ebm_loss_validation_and_repr():
    assert str(EBMLoss()) == (
        "EBMLoss(temperature=1.0, regularization=1.0, gather_distributed=False, validate_args=True)"
    )
    with pytest.raises(ValueError, match="'temperature' > 0"):
        EBMLoss(temperature=0)
    with pytest.raises(ValueError, match="'regularization' >= 0"):
        EBMLoss(regularization=-1)
    with pytest.raises(ValueError, match="'positive_energy' must be a non-empty 1-D"):
        EBMLoss()(torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(ValueError, match=r"initialised torch\.distributed"):
        EBMLoss(gather_distributed=True)(torch.zeros(2), torch.zeros(2))


def _ddp_grads(rank, world_size, pos_feat, neg_feat):
    grads = []
    for gather in (True, False):
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
        pos, neg = pos_feat.chunk(world_size)[rank], neg_feat.chunk(world_size)[rank]
        EBMLoss(gather_distributed=gather)(model(pos).squeeze(-1), model(neg).squeeze(-1)).backward()
        grads.append(torch.cat([model.module.weight.grad.view(-1), model.module.bias.grad]))
    return grads


@pytest.mark.distributed
def test_ebm_loss_ddp_gradient_equals_one_process_with_gather_distributed():
    g = torch.Generator().manual_seed(1)
    pos_feat, neg_feat = torch.randn(4, 3, generator=g), torch.randn(6, 3, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    EBMLoss()(model(pos_feat).squeeze(-1), model(neg_feat).squeeze(-1)).backward()
    expected = torch.cat([model.weight.grad.view(-1), model.bias.grad])
    for gathered, local in run_distributed(_ddp_grads, pos_feat, neg_feat, world_size=2):
        torch.testing.assert_close(gathered, expected)
        assert not torch.allclose(
            local, expected
        )  # per-rank sums halve the regulariser, as in the official runs
