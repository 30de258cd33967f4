from __future__ import annotations

import pytest
import torch
from pyg_scenegraph import (
    EBMLoss,
    GraphEnergyModel,
    RelationPredictor,
    SGLDSampler,
    SyntheticSceneGraphs,
    sample_relation_pairs,
    scene_graph_losses,
)
from torch_geometric.data import Batch
from torch_geometric.loader import DataLoader

from integration_tests.helpers.distributed import run_distributed


def _models(seed: int = 0):
    torch.manual_seed(seed)
    base = RelationPredictor(32, 13, 11, hidden_channels=16, num_layers=1, heads=2)
    ebm = GraphEnergyModel(13, 11, 32, hidden_channels=16, pooling_channels=8, box_norm=False)
    return base, ebm


def _grads(*models):
    return torch.cat(
        [
            (torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
            for m in models
            for p in m.parameters()
        ]
    )


def _step(data_list, pairs, labels, base, ebm, normalizer, gather):
    data = Batch.from_data_list(data_list)
    sampler = SGLDSampler(num_steps=2, noise_std=0.0)
    out = scene_graph_losses(base, data, pairs, labels, ebm, sampler, EBMLoss(gather_distributed=gather),
                             ce_normalizer=normalizer)  # fmt: skip
    out["loss"].backward()
    return out


def _ddp_worker(rank, world_size, shards):
    base, ebm = _models()
    # PredCls leaves the object head without gradient: DDP must be told, or its bucket is never reduced.
    base = torch.nn.parallel.DistributedDataParallel(base, find_unused_parameters=True)
    ebm = torch.nn.parallel.DistributedDataParallel(ebm)
    data_list, pairs, labels, total_pairs = shards[rank]
    _step(data_list, pairs, labels, base, ebm, total_pairs / world_size, True)
    return _grads(base.module, ebm.module)


@pytest.mark.distributed
def test_two_process_ddp_training_step_equals_one_process():
    graphs = list(SyntheticSceneGraphs(4, seed=3))
    shards, all_pairs, all_labels = [], [], []
    offset = 0
    g = torch.Generator().manual_seed(0)
    per_graph = []
    for data in graphs:
        b = Batch.from_data_list([data])
        pairs, labels = sample_relation_pairs(
            b.edge_index, b.edge_predicate, b.batch, pairs_per_image=12, generator=g
        )
        per_graph.append((pairs, labels))
    total = sum(p.size(1) for p, _ in per_graph)
    for rank in range(2):
        chunk = graphs[2 * rank : 2 * rank + 2]
        pairs = torch.cat([per_graph[2 * rank][0], per_graph[2 * rank + 1][0] + chunk[0].num_nodes], 1)
        labels = torch.cat([per_graph[2 * rank][1], per_graph[2 * rank + 1][1]])
        shards.append((chunk, pairs, labels, float(total)))
    for data, (pairs, labels) in zip(graphs, per_graph, strict=True):
        all_pairs.append(pairs + offset)
        all_labels.append(labels)
        offset += data.num_nodes
    base, ebm = _models()
    _step(graphs, torch.cat(all_pairs, 1), torch.cat(all_labels), base, ebm, float(total), False)
    expected = _grads(base, ebm)
    for grads in run_distributed(_ddp_worker, shards, world_size=2):
        # the 1e-4 label noise of G+ and G- is drawn per process: agreement is to ~1e-5, not bitwise
        torch.testing.assert_close(grads, expected, rtol=1e-4, atol=2e-5)


def test_ebm_step_trains_both_models_and_reports_sgld_time():
    base, ebm = _models()
    data = next(iter(DataLoader(SyntheticSceneGraphs(6, seed=1), batch_size=6)))
    pairs, labels = sample_relation_pairs(data.edge_index, data.edge_predicate, data.batch)
    out = _step(data.to_data_list(), pairs, labels, base, ebm, None, False)
    assert out["sgld_seconds"] > 0 and out["positive_energy"].shape == (6,)
    assert all(p.grad is not None for p in ebm.parameters())
    assert base.pair_head[0].weight.grad.abs().sum() > 0


def test_ce_training_reduces_the_loss_on_synthetic_scenes():
    base, _ = _models()
    data = next(iter(DataLoader(SyntheticSceneGraphs(8, seed=2), batch_size=8)))
    pairs, labels = sample_relation_pairs(
        data.edge_index, data.edge_predicate, data.batch, generator=torch.Generator().manual_seed(0)
    )
    opt = torch.optim.Adam(base.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = scene_graph_losses(base, data, pairs, labels)["loss"]
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
