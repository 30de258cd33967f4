from __future__ import annotations

import pytest
import torch
from pyg_scenegraph import RelationPredictor, all_pairs, box_code


def test_relation_predictor_shapes_and_repr(scene_batch):
    model = RelationPredictor(6, 7, 5, hidden_channels=16, heads=2)
    assert str(model) == (
        "RelationPredictor(6, num_object_classes=7, num_predicate_classes=5, hidden_channels=16, "
        "task='predcls', frequency_bias=False)"
    )
    code = box_code(scene_batch.box, scene_batch.image_size[scene_batch.batch])
    pairs = all_pairs(scene_batch.batch)
    rel, obj = model(scene_batch.x, code, pairs, scene_batch.y, scene_batch.batch)
    assert rel.shape == (pairs.size(1), 5) and obj.shape == (scene_batch.num_nodes, 7)


def test_frequency_bias_starts_at_log_conditional_frequencies():
    counts = torch.zeros(3, 3, 4)
    counts[1, 2] = torch.tensor([0.0, 9.0, 0.0, 1.0])
    model = RelationPredictor(2, 3, 4, hidden_channels=8, heads=2, frequency_bias=counts)
    probs = (counts[1, 2] + 1) / (counts[1, 2] + 1).sum()
    torch.testing.assert_close(model.frequency.weight[1 * 3 + 2], probs.log())
    model.reset_parameters()
    torch.testing.assert_close(model.frequency.weight[1 * 3 + 2], probs.log())


def test_predictions_of_a_graph_do_not_depend_on_other_graphs(scene_batch):
    model = RelationPredictor(6, 7, 5, hidden_channels=16, heads=2).eval()
    code = box_code(scene_batch.box, scene_batch.image_size[scene_batch.batch])
    pairs = all_pairs(scene_batch.batch)
    rel, _ = model(scene_batch.x, code, pairs, scene_batch.y, scene_batch.batch)
    k = int(scene_batch.ptr[1])
    first = all_pairs(None, num_nodes=k)
    alone, _ = model(scene_batch.x[:k], code[:k], first, scene_batch.y[:k])
    torch.testing.assert_close(rel[: first.size(1)], alone)


def test_relation_predictor_validation(scene_batch):
    with pytest.raises(ValueError, match="'task' must be one of"):
        RelationPredictor(6, 7, 5, task="sgdet")
    with pytest.raises(ValueError, match=r"'frequency_bias' must be \[7, 7, 5\]"):
        RelationPredictor(6, 7, 5, hidden_channels=16, heads=2, frequency_bias=torch.zeros(7, 5))
    model = RelationPredictor(6, 7, 5, hidden_channels=16, heads=2)
    code = box_code(scene_batch.box, scene_batch.image_size[scene_batch.batch])
    with pytest.raises(ValueError, match="needs the given object labels"):
        model(scene_batch.x, code, all_pairs(scene_batch.batch), None, scene_batch.batch)
    with pytest.raises(ValueError, match=r"'x' must be \[num_nodes, 6\]"):
        model(scene_batch.x[:, :2], code, all_pairs(scene_batch.batch), scene_batch.y, scene_batch.batch)
