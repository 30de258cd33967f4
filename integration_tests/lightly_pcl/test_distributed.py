from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from integration_tests.helpers.distributed import run_distributed
from integration_tests.lightly_pcl.toy import TwoViewToy, tiny_pcl
from lightly_pcl import IndexedDataset, ProtoNCELoss, PrototypeClustering

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
