"""Small seeded scene graphs shared by the pyg_scenegraph tests."""

from __future__ import annotations

import pytest
import torch
from pyg_scenegraph import SceneGraphData
from torch_geometric.data import Batch


def random_scene(num_nodes: int, num_edges: int, num_classes: int, num_predicates: int, feat: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    pairs = torch.stack(
        torch.meshgrid(torch.arange(num_nodes), torch.arange(num_nodes), indexing="ij"), -1
    ).view(-1, 2)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pick = torch.randperm(pairs.size(0), generator=g)[:num_edges]
    xy = torch.rand(num_nodes, 2, generator=g) * 80
    wh = torch.rand(num_nodes, 2, generator=g) * 40 + 2
    return SceneGraphData(
        x=torch.randn(num_nodes, feat, generator=g),
        y=torch.randint(1, num_classes, (num_nodes,), generator=g),
        box=torch.cat([xy, xy + wh], -1),
        image_size=torch.tensor([[128.0, 100.0]]),
        edge_index=pairs[pick].t().contiguous(),
        edge_predicate=torch.randint(1, num_predicates, (pick.numel(),), generator=g),
    )


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny graphs gain nothing from intra-op threads, and on a busy machine OpenMP spinning costs 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def scene_batch() -> Batch:
    """Three directed graphs (4, 5 and 3 nodes) with unique pairs; 7 object and 5 predicate classes."""
    graphs = [random_scene(n, e, 7, 5, 6, seed) for seed, (n, e) in enumerate([(4, 6), (5, 9), (3, 2)])]
    return Batch.from_data_list(graphs)
