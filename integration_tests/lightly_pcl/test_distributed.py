from __future__ import annotations

import pytest
import torch
from lightly_pcl import IndexedDataset, ProtoNCELoss, PrototypeClustering
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from integration_tests.helpers.distributed import run_distributed
from integration_tests.lightly_pcl.toy import TwoViewToy, tiny_pcl

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


def _lightning_fit(rank: int, world_size: int) -> dict:
    """Fit PCLLightningModule with pl.Trainer (DDP over the helper's gloo group when world_size > 1)."""
    import os

    import pytorch_lightning as pl
    from lightly_pcl import PCLLightningModule

    from integration_tests.lightly_pcl.test_lightning_module import LossRecorder

    if world_size > 1:  # processes exist already: tell Lightning so it does not launch its own
        os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size))
    model = tiny_pcl(0, batch_norm=False)
    criterion = ProtoNCELoss(memory_bank_size=(16, 8), num_negative_prototypes=4, gather_distributed=True)
    clustering = PrototypeClustering(
        num_clusters=(4, 8), num_redo=2, min_points_per_centroid=1, backend="torch", progress=False
    )
    module = PCLLightningModule(
        model,
        criterion,
        clustering,
        DataLoader(IndexedDataset(TwoViewToy(32, eval_view=True)), batch_size=5),
        warmup_epochs=1,
        lr=0.05,
        ema_momentum=0.9,
        knn_dataloader=DataLoader(TwoViewToy(32, eval_view=True), batch_size=16),
        num_classes=4,
        knn_k=5,
    )
    recorder = LossRecorder()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=world_size,
        strategy="ddp" if world_size > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder],
    )
    train_set = IndexedDataset(TwoViewToy(32))
    # Lightning would shuffle the training shards; deal them round-robin in order to compare with one process.
    sampler = DistributedSampler(train_set, shuffle=False) if world_size > 1 else None
    train = DataLoader(train_set, batch_size=GLOBAL_BATCH // world_size, sampler=sampler)
    val = DataLoader(TwoViewToy(16, seed=1, eval_view=True), batch_size=4)
    trainer.fit(module, train, val)
    return {
        "losses": torch.tensor([recorder.losses[k] for k in sorted(recorder.losses)]),
        "labels": clustering.labels.clone(),
        "phi": torch.cat(clustering.concentrations),
        "knn": torch.tensor(module.knn_accuracies),
        "estep_count": module.estep_count,
    }


@pytest.mark.slow  # ~20 s of CPU: three Lightning start-ups
@pytest.mark.distributed
def test_lightning_ddp_matches_one_process():
    single = _lightning_fit(0, 1)
    ranks = run_distributed(_lightning_fit, world_size=2)
    for result in ranks:
        assert result["estep_count"] == 1
        assert torch.equal(result["labels"], single["labels"])
        torch.testing.assert_close(result["phi"], single["phi"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["knn"], single["knn"])
    # Rank r gets samples r, r + 2, ... of each global batch; the mean of the two half-batch losses is the
    # full-batch loss (ProtoNCE is a mean over samples and invariant to the order of its columns).
    torch.testing.assert_close(
        (ranks[0]["losses"] + ranks[1]["losses"]) / 2, single["losses"], rtol=0, atol=1e-5
    )
