from __future__ import annotations

import pytest
import torch
import torchvision
from pyg_scenegraph import SceneGraphData, box_code, box_iou, cxcywh_to_xyxy, xywh_to_xyxy
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader


def _graph(n: int, triplets: list[list[int]]) -> SceneGraphData:
    t = torch.tensor(triplets)
    return SceneGraphData(
        y=torch.arange(1, n + 1), box=torch.rand(n, 4), image_size=torch.tensor([[64.0, 48.0]]),
        edge_index=t[:, :2].t(), edge_predicate=t[:, 2], pred_triplet=t.flip(0),
    )  # fmt: skip


def test_triplet_fields_shift_only_their_index_columns_when_batched():
    a, b = _graph(3, [[0, 1, 4], [2, 0, 1]]), _graph(2, [[1, 0, 2]])
    batch = Batch.from_data_list([a, b])
    assert batch.edge_index.tolist() == [[0, 2, 4], [1, 0, 3]]
    assert batch.pred_triplet.tolist() == [[2, 0, 1], [0, 1, 4], [4, 3, 2]]  # predicate column untouched
    assert batch.image_size.shape == (2, 2)
    for i, original in enumerate((a, b)):
        example = batch.get_example(i)
        assert torch.equal(example.pred_triplet, original.pred_triplet)
        assert torch.equal(example.triplets(), original.triplets())


def test_plain_data_would_corrupt_the_triplet_field():
    # Why the subclass exists: PyG does not shift a [T, 3] field whose name has no "index".
    plain = [
        Data(num_nodes=3, pred_triplet=torch.tensor([[0, 1, 4]])),
        Data(num_nodes=2, pred_triplet=torch.tensor([[1, 0, 2]])),
    ]
    assert Batch.from_data_list(plain).pred_triplet.tolist() == [[0, 1, 4], [1, 0, 2]]


def test_data_loader_batches_scene_graphs():
    loader = DataLoader([_graph(3, [[0, 1, 4]]), _graph(4, [[3, 2, 1]])], batch_size=2)
    batch = next(iter(loader))
    assert batch.num_graphs == 2 and batch.num_nodes == 7
    assert batch.triplets().tolist() == [[0, 1, 4], [6, 5, 1]]


def test_validate_scene_graph_errors():
    good = _graph(3, [[0, 1, 4]])
    assert good.validate_scene_graph(num_object_classes=4, num_predicate_classes=5) is good
    with pytest.raises(ValueError, match=r"object labels must lie in \[1, 2\]"):
        good.validate_scene_graph(num_object_classes=3)
    with pytest.raises(ValueError, match=r"predicate labels must lie in \[1, 3\]"):
        good.validate_scene_graph(num_predicate_classes=4)
    with pytest.raises(ValueError, match="graph without relations"):
        SceneGraphData(
            y=torch.tensor([1, 2]),
            edge_index=torch.zeros(2, 0, dtype=torch.long),
            edge_predicate=torch.zeros(0, dtype=torch.long),
        ).validate_scene_graph()
    with pytest.raises(ValueError, match="empty graph"):
        SceneGraphData(y=torch.zeros(0, dtype=torch.long)).validate_scene_graph()
    with pytest.raises(ValueError, match="out-of-range"):
        _graph(2, [[0, 2, 1]]).validate_scene_graph()
    with pytest.raises(ValueError, match=r"'box' must be \[2, 4\]"):
        SceneGraphData(y=torch.tensor([1, 2]), box=torch.rand(3, 4)).validate_scene_graph()
    with pytest.raises(ValueError, match="'edge_index' has 1 pairs but 'edge_predicate' has 2"):
        SceneGraphData(
            y=torch.tensor([1, 2]), edge_index=torch.tensor([[0], [1]]), edge_predicate=torch.tensor([1, 2])
        ).triplets()


def test_box_conversions():
    cxcywh = torch.tensor([[512.0, 256.0, 100.0, 50.0]])
    assert cxcywh_to_xyxy(cxcywh).tolist() == [[462.0, 231.0, 562.0, 281.0]]
    assert xywh_to_xyxy(torch.tensor([[10.0, 20.0, 5.0, 6.0]])).tolist() == [[10.0, 20.0, 15.0, 26.0]]
    with pytest.raises(ValueError, match=r"'boxes' must have shape \[num_boxes, 4\]"):
        cxcywh_to_xyxy(torch.zeros(3))


def test_box_code_is_the_sgb_encoding():
    boxes = torch.tensor([[10.0, 20.0, 29.0, 59.0]], dtype=torch.double)  # w = 20, h = 40 with the +1
    code = box_code(boxes, torch.tensor([100.0, 200.0], dtype=torch.double))
    expected = [20 / 100, 40 / 200, 20 / 100, 40 / 200, 10 / 100, 20 / 200, 29 / 100, 59 / 200, 800 / 20000]
    torch.testing.assert_close(code, torch.tensor([expected], dtype=torch.double))
    with pytest.raises(ValueError, match="'image_size' must be positive"):
        box_code(boxes, torch.tensor([0.0, 10.0], dtype=torch.double))


def test_box_iou_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(5, 2, generator=g) * 10
    b = torch.rand(4, 2, generator=g) * 10
    boxes1 = torch.cat([a, a + torch.rand(5, 2, generator=g) * 5 + 0.1], -1)
    boxes2 = torch.cat([b, b + torch.rand(4, 2, generator=g) * 5 + 0.1], -1)
    torch.testing.assert_close(box_iou(boxes1, boxes2), torchvision.ops.box_iou(boxes1, boxes2))
