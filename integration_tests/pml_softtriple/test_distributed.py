"""Two gloo processes on CPU against one process on the concatenated batch.

What a user writes: ``DDP(model)`` and ``DDP(SoftTripleLoss(...))``, each rank feeding an equal-size shard.
SoftTriple has no cross-sample term, so no all-gather is needed: the per-rank mean losses average, through
DDP's gradient averaging, to the gradient of the global mean. PML's ``DistributedLossWrapper(loss)`` gives the
same gradients with ours (measured: PML's own loss gets twice the centre gradient on 2 ranks); its
``efficient=True`` mode is refused with a clear error.
"""

import pytest
import torch
from pml_softtriple import SoftTripleLoss, param_groups
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.regularizers import SparseCentersRegularizer as PMLSparseCentersRegularizer
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper
from torch.nn.parallel import DistributedDataParallel as DDP

from integration_tests.helpers.distributed import run_distributed

NUM_CLASSES, DIM_IN, DIM, K = 5, 6, 4, 3


def _build(state, device="cpu"):
    model = torch.nn.Linear(DIM_IN, DIM).double()
    loss_func = SoftTripleLoss(NUM_CLASSES, DIM, centers_per_class=K).double()
    model.load_state_dict(state["model"])
    loss_func.load_state_dict(state["loss"])
    return model.to(device), loss_func.to(device)


def _rank_step(rank, world_size, x, y, state, backend="gloo"):
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    x, y = x.to(device), y.to(device)
    shard = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
    model, loss_func = _build(state, device)
    ddp_model, ddp_loss = DDP(model), DDP(loss_func)
    optimizer = torch.optim.SGD(param_groups(ddp_model, ddp_loss, lr=0.1, centers_lr=1.0))
    embeddings = ddp_model(x[shard])
    embeddings.retain_grad()
    value = ddp_loss(embeddings, y[shard])
    value.backward()
    out = {
        "model_grad": [p.grad.clone() for p in model.parameters()],
        "fc_grad": loss_func.fc.grad.clone(),
        "embedding_grad": embeddings.grad.clone(),
    }
    optimizer.step()
    out["fc_after"] = loss_func.fc.detach().clone()

    # PML's all-gather wrapper: the loss of the gathered batch times the world size on every rank. Ours
    # scales its centres' gradient back; PML's own loss keeps world-size times the gradient.
    model, loss_func = _build(state, device)
    wrapped, ddp_model = DistributedLossWrapper(loss_func), DDP(model)  # DDP kept alive through backward
    wrapped(ddp_model(x[shard]), y[shard]).backward()
    out["wrapper_fc_grad"] = loss_func.fc.grad.clone()
    out["wrapper_model_grad"] = [p.grad.clone() for p in model.parameters()]
    if device.type != "cpu":  # PML's regulariser keeps its masks on the CPU: the contrast runs on gloo only
        return _efficient_refused(loss_func, model, x[shard], y[shard], out)
    model, _ = _build(state)
    pml = pml_losses.SoftTripleLoss(
        NUM_CLASSES,
        DIM,
        centers_per_class=K,
        weight_regularizer=PMLSparseCentersRegularizer(NUM_CLASSES, K),
        weight_reg_weight=0.2,
    ).double()
    pml.fc.data.copy_(state["loss"]["fc"])
    ddp_model = DDP(model)
    DistributedLossWrapper(pml)(ddp_model(x[shard]), y[shard]).backward()
    out["pml_wrapper_fc_grad"] = pml.fc.grad.clone()
    return _efficient_refused(loss_func, model, x[shard], y[shard], out)


def _efficient_refused(loss_func, model, x, y, out):
    try:
        DistributedLossWrapper(loss_func, efficient=True)(model(x).detach(), y)
    except ValueError as error:
        out["efficient_error"] = str(error)
    return {key: _to_cpu(value) for key, value in out.items()}


def _to_cpu(value):
    if isinstance(value, list):
        return [t.cpu() for t in value]
    return value.cpu() if isinstance(value, torch.Tensor) else value


@pytest.mark.distributed
@pytest.mark.parametrize(
    "backend", ["gloo", pytest.param("nccl", marks=[pytest.mark.nccl, pytest.mark.cuda])]
)
def test_ddp_gradients_equal_single_process_on_the_concatenated_batch(backend):
    torch.manual_seed(0)
    x = torch.randn(16, DIM_IN, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (16,))
    model, loss_func = _build(
        {
            "model": torch.nn.Linear(DIM_IN, DIM).double().state_dict(),
            "loss": SoftTripleLoss(NUM_CLASSES, DIM, centers_per_class=K).double().state_dict(),
        }
    )
    state = {  # cloned: state_dict() shares storage with the parameters the optimizer steps below
        name: {key: value.clone() for key, value in module.state_dict().items()}
        for name, module in (("model", model), ("loss", loss_func))
    }
    assert loss_func.weight_regularizer is not None  # tau * R is part of what is compared

    optimizer = torch.optim.SGD(param_groups(model, loss_func, lr=0.1, centers_lr=1.0))
    embeddings = model(x)
    embeddings.retain_grad()
    loss_func(embeddings, y).backward()
    single_model_grad = [p.grad.clone() for p in model.parameters()]
    single_fc_grad = loss_func.fc.grad.clone()
    single_embedding_grad = embeddings.grad.clone()
    optimizer.step()

    results = run_distributed(_rank_step, x, y, state, backend, world_size=2, backend=backend)
    for rank, out in enumerate(results):
        for got, want in zip(out["model_grad"], single_model_grad, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(out["fc_grad"], single_fc_grad, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(out["fc_after"], loss_func.fc.detach(), rtol=1e-10, atol=1e-13)
        # Each rank's embeddings get d(local mean)/de = world_size * d(global mean)/de; DDP's 1/world_size
        # average of the parameter gradients (checked above) turns that into the single-process gradient.
        shard = slice(rank * 8, (rank + 1) * 8)
        torch.testing.assert_close(
            out["embedding_grad"], 2 * single_embedding_grad[shard], rtol=1e-10, atol=1e-13
        )
        torch.testing.assert_close(out["wrapper_fc_grad"], single_fc_grad, rtol=1e-10, atol=1e-13)
        for got, want in zip(out["wrapper_model_grad"], single_model_grad, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
        if backend == "gloo":
            torch.testing.assert_close(out["pml_wrapper_fc_grad"], 2 * single_fc_grad, rtol=1e-10, atol=1e-13)
        assert "DistributedLossWrapper(efficient=True) passes the gathered batch as ref_emb" in out.get(
            "efficient_error", ""
        )
