from __future__ import annotations

import os
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightly_pcl import IndexedDataset, ProtoNCELoss, PrototypeClustering
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from integration_tests.helpers.distributed import run_distributed
from integration_tests.lightly_pcl.toy import TwoViewToy, tiny_module, tiny_pcl

GLOBAL_BATCH, STEPS = 8, 3


def _train(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """E-step then STEPS M-steps on a global batch of 8, split evenly over the ranks."""
    model = tiny_pcl(0, batch_norm=False)
    criterion = ProtoNCELoss(memory_bank_size=(16, 8), num_negative_prototypes=4, gather_distributed=True)
    clustering = PrototypeClustering(
        num_clusters=(4, 8), num_redo=2, min_points_per_centroid=1, backend="torch", progress=False
    )
    cluster_set = IndexedDataset(TwoViewToy(32, eval_view=True))
    sampler = DistributedSampler(cluster_set, shuffle=False) if world_size > 1 else None
    clustering.update(model.forward_momentum, DataLoader(cluster_set, batch_size=5, sampler=sampler), epoch=0)

    net = DistributedDataParallel(model) if world_size > 1 else model
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    data = TwoViewToy(32)
    losses = []
    for step in range(STEPS):
        local = torch.arange(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH).chunk(world_size)[rank]
        views = [data[int(i)][0] for i in local]
        x_query, x_key = torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])
        model.update_momentum(0.9)
        loss = criterion(net(x_query), model.forward_momentum(x_key), clustering(local))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return {
        "labels": clustering.labels.clone(),
        "centroids": torch.cat(clustering.centroids),
        "phi": torch.cat(clustering.concentrations),
        "losses": torch.stack(losses),
        "weights": torch.cat([p.detach().flatten() for p in model.parameters()]),
        "bank": criterion.memory_bank.bank.clone(),
    }


@pytest.mark.distributed
def test_two_gloo_ranks_match_one_process():
    single = _train(0, 1)
    ranks = run_distributed(_train, world_size=2)
    for result in ranks:  # clustering done once, identical on every rank and equal to one process
        assert torch.equal(result["labels"], ranks[0]["labels"])
        assert torch.equal(result["centroids"], ranks[0]["centroids"])
        assert torch.equal(result["phi"], ranks[0]["phi"])
        assert torch.equal(result["labels"], single["labels"])
        torch.testing.assert_close(result["centroids"], single["centroids"], rtol=0, atol=1e-6)
        torch.testing.assert_close(result["phi"], single["phi"], rtol=0, atol=1e-6)
        # DDP-averaged gradients of the per-rank losses = gradient of the single-process loss
        torch.testing.assert_close(result["weights"], single["weights"], rtol=0, atol=1e-6)
        torch.testing.assert_close(result["bank"], single["bank"], rtol=0, atol=1e-6)
    mean_loss = (ranks[0]["losses"] + ranks[1]["losses"]) / 2
    torch.testing.assert_close(mean_loss, single["losses"], rtol=0, atol=1e-6)
    assert not torch.allclose(ranks[0]["losses"], ranks[1]["losses"])  # the ranks did see different data


def _ddp_env(rank: int, world_size: int) -> None:
    """Processes exist already (run_distributed): tell Lightning so it does not launch its own."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size))


def _quiet_trainer(world_size: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp" if world_size > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _lightning_fit(rank: int, world_size: int) -> dict:
    """Fit PCLLightningModule with pl.Trainer (DDP over the helper's gloo group when world_size > 1)."""
    from integration_tests.lightly_pcl.test_lightning_module import LossRecorder

    if world_size > 1:
        _ddp_env(rank, world_size)
    module = tiny_module(
        0,
        batch_norm=False,
        cluster_batch_size=5,
        clustering_kwargs=dict(num_redo=2, min_points_per_centroid=1, backend="torch", progress=False),
        knn_dataloader=DataLoader(TwoViewToy(32, eval_view=True), batch_size=16),
        num_classes=4,
        knn_k=5,
    )
    recorder = LossRecorder()
    trainer = _quiet_trainer(world_size, max_epochs=2, callbacks=[recorder])
    train_set = IndexedDataset(TwoViewToy(32))
    # Lightning would shuffle the training shards; deal them round-robin in order to compare with one process.
    sampler = DistributedSampler(train_set, shuffle=False) if world_size > 1 else None
    train = DataLoader(train_set, batch_size=GLOBAL_BATCH // world_size, sampler=sampler)
    val = DataLoader(TwoViewToy(16, seed=1, eval_view=True), batch_size=4)
    trainer.fit(module, train, val)
    return {
        "losses": torch.tensor([recorder.losses[k] for k in sorted(recorder.losses)]),
        "labels": module.clustering.labels.clone(),
        "phi": torch.cat(module.clustering.concentrations),
        "knn": torch.tensor(module.knn_accuracies),
        "estep_count": module.estep_count,
        "bank": module.criterion.memory_bank.bank.clone(),
    }


def _default_module_bank(rank: int, world_size: int) -> dict:
    """Two DDP steps of PCLLightningModule with its default loss, strategy and DDP settings."""
    _ddp_env(rank, world_size)
    # A different seed per rank: different initial banks, which on_fit_start must make identical.
    module = tiny_module(rank, loss_kwargs=None, memory_bank_size=24, warmup_epochs=0)
    keys: list[torch.Tensor] = []
    terms = module.criterion.terms

    def record(out0, out1, prototypes=None):
        keys.append(F.normalize(out1.detach(), dim=1))
        return terms(out0, out1, prototypes)

    module.criterion.terms = record
    train = DataLoader(IndexedDataset(TwoViewToy(32)), batch_size=GLOBAL_BATCH // world_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_trainer(world_size, max_epochs=1, limit_train_batches=2).fit(module, train)
    return {
        "bank": module.criterion.memory_bank.bank.clone(),
        "bank_ptr": module.criterion.memory_bank.bank_ptr.clone(),
        "keys": torch.stack(keys),
        "ignored": sorted(module._ddp_params_and_buffers_to_ignore),
        "warnings": [str(w.message) for w in caught],
        "plain": _plain_loss_per_rank_bank(rank, world_size),
    }


@pytest.fixture(scope="module")
def ddp_banks() -> list[dict]:
    """One 2-rank gloo run for the bank tests: spawning and importing cost ~10 s of CPU per process here,
    and Lightning's own DDP strategy adds under a second to it, so the test goes through Lightning itself."""
    return run_distributed(_default_module_bank, world_size=2)


@pytest.mark.distributed
def test_default_lightning_ddp_banks_hold_every_ranks_keys(ddp_banks):
    """Issue #15: the default module under Lightning's DDP strategy (2 gloo ranks, broadcast_buffers=True).

    Lightning itself is used (not a DDP imitation): the broadcast of rank 0's buffers happens inside its
    forward redirection, which is what overwrote rank 1's bank before.
    """
    ranks = ddp_banks
    steps, local = ranks[0]["keys"].shape[:2]
    # The official order: each step enqueues the keys of rank 0, then rank 1.
    expected = torch.cat([torch.cat([ranks[0]["keys"][s], ranks[1]["keys"][s]]) for s in range(steps)])
    filled = steps * 2 * local
    for result in ranks:
        torch.testing.assert_close(result["bank"][:filled], expected, rtol=0, atol=1e-6)
        assert int(result["bank_ptr"]) == filled
        assert "criterion.memory_bank.bank" in result["ignored"] and "clustering.labels" in result["ignored"]
        assert not [w for w in result["warnings"] if "gather_distributed" in w]
    assert not torch.allclose(ranks[0]["keys"], ranks[1]["keys"])  # the ranks did see different data
    # The rows not yet written are rank 0's initial bank on both ranks (broadcast once in on_fit_start).
    assert torch.equal(ranks[0]["bank"][filled:], ranks[1]["bank"][filled:])


def _plain_loss_per_rank_bank(rank: int, world_size: int) -> dict:
    """ProtoNCELoss alone: gathers by default; gather_distributed=False keeps a per-rank bank, warns once."""
    torch.manual_seed(0)
    default = ProtoNCELoss(memory_bank_size=(8, 4))
    per_rank = ProtoNCELoss(memory_bank_size=(8, 4), gather_distributed=False)
    q = torch.randn(2, 4, requires_grad=True)
    k = F.normalize(torch.randn(2, 4) + rank, dim=1)
    default(q, k)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per_rank(q, k)
        per_rank(q, k)  # warned once
    return {
        "default": default.memory_bank.bank.clone(),
        "per_rank": per_rank.memory_bank.bank.clone(),
        "key": k,
        "warnings": [str(w.message) for w in caught],
    }


@pytest.mark.distributed
def test_plain_loss_gathers_by_default_and_warns_when_told_not_to(ddp_banks):
    ranks = [result["plain"] for result in ddp_banks]
    both = torch.cat([ranks[0]["key"], ranks[1]["key"]])
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["default"][:4], both)
        torch.testing.assert_close(result["per_rank"][:2], ranks[rank]["key"])
        assert len(result["warnings"]) == 1 and "gather_distributed=False" in result["warnings"][0]


@pytest.mark.slow  # ~20 s of CPU: three Lightning start-ups
@pytest.mark.distributed
def test_lightning_ddp_matches_one_process():
    single = _lightning_fit(0, 1)
    ranks = run_distributed(_lightning_fit, world_size=2)
    for result in ranks:
        assert result["estep_count"] == 1
        assert torch.equal(result["bank"], ranks[0]["bank"])
        assert torch.equal(result["labels"], single["labels"])
        torch.testing.assert_close(result["phi"], single["phi"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["knn"], single["knn"])
    # Rank r gets samples r, r + 2, ... of each global batch; the mean of the two half-batch losses is the
    # full-batch loss (ProtoNCE is a mean over samples and invariant to the order of its columns).
    torch.testing.assert_close(
        (ranks[0]["losses"] + ranks[1]["losses"]) / 2, single["losses"], rtol=0, atol=1e-5
    )
