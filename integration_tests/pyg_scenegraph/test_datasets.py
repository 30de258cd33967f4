from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from pyg_scenegraph import (
    VG150,
    GQASceneGraphs,
    SceneGraphEvaluator,
    SyntheticSceneGraphs,
    VisualGenomeSceneGraphs,
    Vocabulary,
)
from pyg_scenegraph.datasets.synthetic import _rule

# --------------------------------------------------------------------------------------------------- VG150


def _write_vg150(root: Path, bad_label: bool = False) -> None:
    """A 5-image VG150 file pair in the real layout (h5 + dicts + image_data with a corrupted image)."""
    raw = root / "raw"
    raw.mkdir(parents=True)
    # objects: img0 rows 0-2, img1 rows 3-4 (no relations), img2 none, img3 rows 5-6, img4 rows 7-8
    boxes = np.array(
        [[512, 256, 100, 50], [100, 100, 40, 40], [600, 600, 200, 100], [50, 50, 10, 10], [60, 60, 10, 10],
         [300, 300, 100, 100], [500, 500, 50, 50], [200, 200, 20, 20], [400, 400, 40, 40]],
        dtype=np.int32,
    )  # fmt: skip
    labels = np.array([[1], [2], [3], [1], [1], [2], [3], [1], [2]], dtype=np.int32)
    if bad_label:
        labels[0, 0] = 4
    with h5py.File(raw / "VG-SGG-with-attri.h5", "w") as h5:
        h5["split"] = np.array([0, 0, 0, 0, 2], dtype=np.int32)
        h5["img_to_first_box"] = np.array([0, 3, -1, 5, 7], dtype=np.int32)
        h5["img_to_last_box"] = np.array([2, 4, -1, 6, 8], dtype=np.int32)
        h5["img_to_first_rel"] = np.array([0, -1, -1, 2, 5], dtype=np.int32)
        h5["img_to_last_rel"] = np.array([1, -1, -1, 4, 5], dtype=np.int32)
        h5["labels"] = labels
        h5["boxes_1024"] = boxes
        h5["boxes_512"] = boxes // 2
        h5["relationships"] = np.array([[0, 1], [2, 0], [5, 6], [5, 6], [6, 5], [8, 7]], dtype=np.int32)
        h5["predicates"] = np.array([[3], [2], [1], [2], [4], [2]], dtype=np.int32)
        h5["attributes"] = np.zeros((9, 10), dtype=np.int32)
    dicts = {
        "idx_to_label": {"1": "man", "2": "horse", "3": "tree"},
        "label_to_idx": {"man": 1, "horse": 2, "tree": 3},
        "idx_to_predicate": {"1": "on", "2": "near", "3": "riding", "4": "has"},
        "predicate_to_idx": {"on": 1, "near": 2, "riding": 3, "has": 4},
    }
    (raw / "VG-SGG-dicts-with-attri.json").write_text(json.dumps(dicts))
    sizes = [(1, 800, 600), (1592, 10, 10), (2, 500, 500), (3, 640, 480), (4, 1024, 768), (5, 300, 400)]
    image_data = [
        {"image_id": i, "width": w, "height": h, "url": "", "coco_id": None, "flickr_id": None}
        for i, w, h in sizes
    ]
    (raw / "image_data.json").write_text(json.dumps(image_data))


def test_vg150_splits_ranges_boxes_and_duplicates(tmp_path):
    _write_vg150(tmp_path)
    val = VG150(str(tmp_path), split="val", num_val_images=1)
    train = VG150(str(tmp_path), split="train", num_val_images=1)
    test = VG150(str(tmp_path), split="test", num_val_images=1)
    assert (len(train), len(val), len(test)) == (1, 1, 1)  # image rows 1 (no rels) and 2 (no boxes) dropped
    v = val[0]
    assert int(v.image_id) == 1 and v.y.tolist() == [1, 2, 3]  # inclusive range 0..2
    # (512, 256, 100, 50) at 1024 -> (462, 231, 562, 281) * 800 / 1024
    torch.testing.assert_close(v.box[0], torch.tensor([462.0, 231.0, 562.0, 281.0]) * 800 / 1024)
    assert v.triplets().tolist() == [[0, 1, 3], [2, 0, 2]]  # global rows minus the first box
    t = train[0]  # image row 3 = image_id 4 after dropping the corrupted 1592
    assert int(t.image_id) == 4 and t.image_size.tolist() == [[1024.0, 768.0]]
    assert t.triplets().tolist() == [[0, 1, 1], [1, 0, 4]]  # duplicate pair (0, 1) kept once in train
    assert test[0].triplets().tolist() == [[1, 0, 2]]
    assert (
        VG150(
            str(tmp_path), split="test", num_val_images=1, filter_duplicate_rels=False
        ).filter_duplicate_rels
        is False
    )
    all_train = VG150(
        str(tmp_path), split="train", num_val_images=0, filter_duplicate_rels=False, force_reload=True
    )
    assert [d.triplets().tolist() for d in all_train][1] == [[0, 1, 1], [0, 1, 2], [1, 0, 4]]
    kept_empty = VG150(str(tmp_path), split="train", num_val_images=0, filter_empty_rels=False)
    assert len(kept_empty) == 3 and kept_empty[1].edge_predicate.numel() == 0
    half = VG150(str(tmp_path), split="val", num_val_images=1, box_scale=512)
    torch.testing.assert_close(half[0].box[0], torch.tensor([231.0, 115.5, 281.0, 140.5]) * 800 / 512)


def test_vg150_errors(tmp_path):
    with pytest.raises(ValueError, match="'split' must be"):
        VG150(str(tmp_path), split="dev")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        VG150(str(tmp_path / "missing"))
    _write_vg150(tmp_path / "bad", bad_label=True)
    with pytest.raises(ValueError, match=r"object labels must lie in \[1, 3\]"):
        VG150(str(tmp_path / "bad"))


# ----------------------------------------------------------------------------------------- raw VG and GQA


def _write_raw_vg(root: Path) -> None:
    (root / "raw").mkdir(parents=True)
    graphs = [
        {"image_id": 7, "objects": [
            {"object_id": 1, "names": ["Man "], "x": 0, "y": 0, "w": 10, "h": 20},
            {"object_id": 2, "names": ["horse"], "x": 5, "y": 10, "w": 30, "h": 20},
            {"object_id": 3, "names": ["spaceship"], "x": 1, "y": 1, "w": 2, "h": 2}],
         "relationships": [{"subject_id": 1, "object_id": 2, "predicate": "RIDING", "relationship_id": 1},
                           {"subject_id": 3, "object_id": 2, "predicate": "near", "relationship_id": 2},
                           {"subject_id": 2, "object_id": 1, "predicate": "under", "relationship_id": 3}]},
        {"image_id": 8, "objects": [{"object_id": 4, "names": ["man"], "x": 0, "y": 0, "w": 1, "h": 1}],
         "relationships": []},
    ]  # fmt: skip
    (root / "raw" / "scene_graphs.json").write_text(json.dumps(graphs))
    (root / "raw" / "image_data.json").write_text(json.dumps([{"image_id": 7, "width": 100, "height": 80}]))


def test_visual_genome_reader_with_given_and_built_vocabularies(tmp_path):
    _write_raw_vg(tmp_path)
    ds = VisualGenomeSceneGraphs(str(tmp_path), objects=["man", "horse"], predicates=["riding", "near"])
    assert len(ds) == 1  # image 8 has no relations
    d = ds[0]
    assert d.y.tolist() == [1, 2] and d.image_size.tolist() == [[100.0, 80.0]]
    assert d.box.tolist() == [[0.0, 0.0, 10.0, 20.0], [5.0, 10.0, 35.0, 30.0]]
    assert d.triplets().tolist() == [[0, 1, 1]]  # "spaceship" and "under" are outside the vocabularies
    built = VisualGenomeSceneGraphs(str(tmp_path), num_object_classes=2, num_predicate_classes=3)
    assert built.objects.names == ["__background__", "man", "horse"]  # man x2, horse x1
    assert built.num_predicate_classes == 4 and "riding" in built.predicates


def test_visual_genome_reader_rejects_unknown_object_ids(tmp_path):
    (tmp_path / "raw").mkdir()
    bad = [{"image_id": 1, "objects": [{"object_id": 1, "names": ["a"], "x": 0, "y": 0, "w": 1, "h": 1}],
            "relationships": [{"subject_id": 1, "object_id": 9, "predicate": "on"}]}]  # fmt: skip
    (tmp_path / "raw" / "scene_graphs.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unknown object id"):
        VisualGenomeSceneGraphs(str(tmp_path))


def test_gqa_reader(tmp_path):
    (tmp_path / "raw").mkdir()
    graphs = {
        "2386621": {"width": 500, "height": 333, "objects": {
            "11": {"name": "Banana", "x": 248, "y": 55, "w": 64, "h": 34, "attributes": [],
                   "relations": [{"object": "12", "name": "to the left of"}]},
            "12": {"name": "straw", "x": 402, "y": 55, "w": 15, "h": 95, "attributes": [],
                   "relations": [{"object": "11", "name": "to the right of"},
                                 {"object": "11", "name": "near"}]}}},
        "1": {"width": 10, "height": 10,
              "objects": {"5": {"name": "banana", "x": 0, "y": 0, "w": 1, "h": 1, "relations": []}}},
    }  # fmt: skip
    (tmp_path / "raw" / "val_sceneGraphs.json").write_text(json.dumps(graphs))
    ds = GQASceneGraphs(str(tmp_path), split="val")
    assert len(ds) == 1 and ds.objects.names == ["__background__", "banana", "straw"]
    d = ds[0]
    assert d.image_size.tolist() == [[500.0, 333.0]] and d.box[0].tolist() == [248.0, 55.0, 312.0, 89.0]
    names = ds.predicates.names
    # one predicate per pair, the first in file order (VG150's training split does the same)
    assert sorted((s, o, names[p]) for s, o, p in d.triplets().tolist()) == [
        (0, 1, "to the left of"), (1, 0, "to the right of")
    ]  # fmt: skip
    both = GQASceneGraphs(str(tmp_path), split="val", filter_duplicate_rels=False)
    assert sorted((s, o, names[p]) for s, o, p in both[0].triplets().tolist()) == [
        (0, 1, "to the left of"), (1, 0, "near"), (1, 0, "to the right of")
    ]  # fmt: skip
    with pytest.raises(ValueError, match="'split' must be 'train' or 'val'"):
        GQASceneGraphs(str(tmp_path), split="test")


def test_vocabulary():
    vocab = Vocabulary.build(["on", "On ", "near", "has", "near", "on"], max_size=2)
    assert vocab.names == ["__background__", "on", "near"] and len(vocab) == 3
    assert vocab["ON"] == 1 and "has" not in vocab
    with pytest.raises(ValueError, match="unique"):
        Vocabulary(["a", "A"])


# ----------------------------------------------------------------------------------------------- synthetic


def test_synthetic_relations_follow_exactly_from_geometry():
    ds = SyntheticSceneGraphs(20, seed=5)
    for data in ds:
        size = tuple(data.image_size[0].tolist())
        expected = set()
        # recompute every ordered pair with the rule on the stored boxes and the hidden facing direction
        hidden = data.facing
        for s in range(data.num_nodes):
            for o in range(data.num_nodes):
                if s != o and (p := _rule(s, o, data.y, data.box, hidden, size)):
                    expected.add((s, o, p))
        assert {tuple(t) for t in data.triplets().tolist()} == expected


def test_synthetic_predicates_are_long_tailed_and_seeded():
    ds = SyntheticSceneGraphs(300, seed=0)
    counts = Counter(ds._data.edge_predicate.tolist())
    assert set(counts) == set(range(1, len(ds.predicates)))
    assert max(counts.values()) > 10 * min(counts.values())
    again = SyntheticSceneGraphs(300, seed=0)
    assert torch.equal(again._data.edge_predicate, ds._data.edge_predicate)
    assert torch.equal(again._data.x, ds._data.x)
    assert not torch.equal(SyntheticSceneGraphs(300, seed=1)._data.box[:50], ds._data.box[:50])


def test_synthetic_features_encode_class_and_facing():
    ds = SyntheticSceneGraphs(200, seed=0)
    x, y, facing = ds._data.x, ds._data.y, ds._data.facing
    # least squares read-out of the class one-hot and of the facing sign: both far above chance
    design = torch.cat([x, torch.ones(x.size(0), 1)], -1)
    onehot = torch.nn.functional.one_hot(y, ds.num_object_classes).float()
    pred = (design @ torch.linalg.lstsq(design, onehot).solution).argmax(-1)
    assert (pred == y).float().mean() > 0.8
    agents = facing != 0
    w = torch.linalg.lstsq(design[agents], facing[agents].view(-1, 1)).solution
    assert (torch.sign(design[agents] @ w).view(-1) == facing[agents]).float().mean() > 0.8


# ------------------------------------------------------------------------------------------- real samples


def test_real_vg150_dicts_and_zero_shot_list(shared_data):
    objects, predicates = Vocabulary.from_vg150_dicts(
        shared_data / "scenegraphs/vg150/VG-SGG-dicts-with-attri.json"
    )
    assert (len(objects), len(predicates)) == (151, 51)
    zs = torch.load(shared_data / "scenegraphs/vg150/zeroshot_triplet.pytorch", weights_only=True)
    assert zs.shape == (5971, 3) and zs.dtype == torch.int64
    assert zs[:, :2].min() >= 1 and zs[:, :2].max() <= 150 and zs[:, 2].min() >= 1 and zs[:, 2].max() <= 50
    ev = SceneGraphEvaluator(51, ks=(1,), zero_shot_triplets=zs, matching="index")
    s, o, p = zs[0].tolist()
    ev.update(gt_labels=torch.tensor([s, o]), gt_triplets=torch.tensor([[0, 1, p]]),
              pair_index=torch.tensor([[0], [1]]),
              rel_scores=torch.nn.functional.one_hot(torch.tensor([p]), 51).float())  # fmt: skip
    assert ev.compute()["zR@1"] == 1.0


def test_real_visual_genome_sample(shared_data, tmp_path):
    src = shared_data / "scenegraphs/visual_genome"
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "scene_graphs.json").write_text((src / "scene_graphs_sample100.json").read_text())
    (tmp_path / "raw" / "image_data.json").write_text((src / "image_data_sample100.json").read_text())
    objects, predicates = Vocabulary.from_vg150_dicts(
        shared_data / "scenegraphs/vg150/VG-SGG-dicts-with-attri.json"
    )
    ds = VisualGenomeSceneGraphs(str(tmp_path), objects=objects, predicates=predicates)
    assert 50 <= len(ds) <= 100
    for data in ds:
        data.validate_scene_graph(151, 51)
        assert (data.box[:, 2:] >= data.box[:, :2]).all()
        assert (data.box[:, 2] <= data.image_size[0, 0] + 1).all()


def test_real_gqa_sample(shared_data, tmp_path):
    (tmp_path / "raw").mkdir()
    name = "train_sceneGraphs_sample100.json"
    (tmp_path / "raw" / name).write_text((shared_data / "scenegraphs/gqa" / name).read_text())
    ds = GQASceneGraphs(str(tmp_path), file_name=name)
    assert 50 <= len(ds) <= 100 and ds.num_object_classes <= 201 and ds.num_predicate_classes <= 101
    for data in ds:
        data.validate_scene_graph(ds.num_object_classes, ds.num_predicate_classes)
