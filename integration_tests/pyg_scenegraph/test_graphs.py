from __future__ import annotations

import pytest
import torch
from pyg_scenegraph import (
    all_pairs,
    minmax_normalize,
    negative_scene_graph,
    positive_scene_graph,
    sample_relation_pairs,
)


def test_positive_graph_is_noisy_one_hot_and_merges_duplicate_pairs():
    y = torch.tensor([1, 3, 2])
    edge_index = torch.tensor([[0, 1, 0], [1, 2, 1]])  # pair (0, 1) annotated twice
    nodes, pairs, edges = positive_scene_graph(y, edge_index, torch.tensor([2, 1, 4]), 4, 5, noise_std=0.0)
    assert nodes.tolist() == torch.nn.functional.one_hot(y, 4).float().tolist()
    assert pairs.tolist() == [[0, 1], [1, 2]]
    assert edges.tolist() == [[0, 0, 1, 0, 1], [0, 1, 0, 0, 0]]
    noisy, _, _ = positive_scene_graph(y, edge_index, torch.tensor([2, 1, 4]), 4, 5, noise_std=1e-4)
    assert 0 < (noisy - nodes).abs().max() < 1e-3
    with pytest.raises(ValueError, match=r"'y' ids must lie in \[0, 4\)"):
        positive_scene_graph(torch.tensor([1, 4]), edge_index[:, :1], torch.tensor([1]), 4, 5)


def test_negative_graph_is_minmax_of_the_scores_and_differentiable():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 1.0]], requires_grad=True)
    nodes, edges = negative_scene_graph(logits, y=torch.tensor([1, 2]), num_object_classes=3, noise_std=0.0)
    assert edges.tolist() == [[0.0, 1.0, 0.5], [0.5, 0.0, 1.0]]
    assert nodes.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    edges.sum().backward()
    assert logits.grad is not None
    obj = torch.randn(2, 3)
    nodes, _ = negative_scene_graph(logits, object_logits=obj, task="sgcls")
    torch.testing.assert_close(nodes, minmax_normalize(obj))
    with pytest.raises(ValueError, match="needs 'object_logits'"):
        negative_scene_graph(logits, task="sgcls")
    with pytest.raises(ValueError, match="needs the given labels"):
        negative_scene_graph(logits)


def test_all_pairs_stays_inside_each_graph():
    batch = torch.tensor([0, 0, 0, 1, 1])
    pairs = all_pairs(batch)
    assert pairs.size(1) == 3 * 2 + 2 * 1
    assert (batch[pairs[0]] == batch[pairs[1]]).all() and (pairs[0] != pairs[1]).all()


def test_sample_relation_pairs_keeps_foreground_and_fills_with_background():
    batch = torch.tensor([0] * 5 + [1] * 4)
    edge_index = torch.tensor([[0, 1, 2, 5, 5], [1, 2, 3, 6, 6]])
    edge_label = torch.tensor([3, 1, 2, 4, 2])  # the duplicate pair (5, 6) keeps one of {4, 2}
    g = torch.Generator().manual_seed(0)
    pairs, labels = sample_relation_pairs(
        edge_index, edge_label, batch, 8, positive_fraction=0.5, generator=g
    )
    found = {(s, o): int(lab) for (s, o), lab in zip(pairs.t().tolist(), labels, strict=True)}
    assert found[(0, 1)] == 3 and found[(1, 2)] == 1 and found[(2, 3)] == 2 and found[(5, 6)] in (2, 4)
    assert (batch[pairs[0]] == batch[pairs[1]]).all()
    assert [int((batch[pairs[0]] == g).sum()) for g in (0, 1)] == [8, 8]
    assert int((labels > 0).sum()) == 4
    capped, capped_labels = sample_relation_pairs(
        edge_index, edge_label, batch, pairs_per_image=4, positive_fraction=0.5
    )
    assert int(((batch[capped[0]] == 0) & (capped_labels > 0)).sum()) == 2
