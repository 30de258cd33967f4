import pytest
import torch
from pml_softtriple import SoftTripleLoss, param_groups


def test_groups_default_to_the_papers_100x_centre_rate():
    model = torch.nn.Linear(8, 4)
    loss_func = SoftTripleLoss(3, 4)
    groups = param_groups(model, loss_func, lr=1e-4, weight_decay=1e-4)
    assert [g["lr"] for g in groups] == [1e-4, pytest.approx(1e-2)]
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    assert groups[1]["params"] == [loss_func.fc]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters()}


def test_each_group_steps_at_its_own_rate():
    model = torch.nn.Linear(8, 4)
    loss_func = SoftTripleLoss(3, 4, centers_per_class=2)
    optimizer = torch.optim.SGD(param_groups(model, loss_func, lr=0.01, centers_lr=0.5))
    before_w, before_fc = model.weight.detach().clone(), loss_func.fc.detach().clone()
    loss_func(model(torch.randn(6, 8)), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    grad_w, grad_fc = model.weight.grad.clone(), loss_func.fc.grad.clone()
    optimizer.step()
    torch.testing.assert_close(model.weight.detach(), before_w - 0.01 * grad_w)
    torch.testing.assert_close(loss_func.fc.detach(), before_fc - 0.5 * grad_fc)


def test_shared_parameters_go_only_to_the_centre_group():
    loss_func = SoftTripleLoss(3, 4)
    both = torch.nn.ModuleDict({"embedder": torch.nn.Linear(8, 4), "loss": loss_func})
    groups = param_groups(both, loss_func)
    assert all(p is not loss_func.fc for p in groups[0]["params"])
    assert len(groups[0]["params"]) == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="centers_lr must be > 0"):
        param_groups(torch.nn.Linear(2, 2), SoftTripleLoss(2, 2), centers_lr=0.0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        param_groups(torch.nn.Linear(2, 2), SoftTripleLoss(2, 2), lr=-1.0)
    with pytest.raises(ValueError, match="has no trainable parameters"):
        param_groups(torch.nn.Linear(2, 2), torch.nn.Identity())
