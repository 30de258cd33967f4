"""Raw readers: one predicate per pair, self-relations dropped and counted, the CLEVR scenes reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pyg_scenegraph import (
    CLEVRSceneGraphs,
    GQASceneGraphs,
    VisualGenomeSceneGraphs,
    sample_relation_pairs,
)
from torch_geometric.data import Batch

# ------------------------------------------------------------------------------------- VG / GQA cleaning


def _write_vg(root: Path) -> None:
    (root / "raw").mkdir(parents=True)
    objects = [{"object_id": i, "names": [n], "x": 10 * i, "y": 0, "w": 5, "h": 5}
               for i, n in enumerate(["man", "horse", "hat"])]  # fmt: skip
    rels = [(0, 1, "riding"), (0, 1, "on"), (0, 0, "near"), (1, 0, "under"), (2, 0, "on"), (0, 1, "riding")]
    relationships = [{"subject_id": s, "object_id": o, "predicate": p} for s, o, p in rels]
    graph = {"image_id": 3, "objects": objects, "relationships": relationships}
    (root / "raw" / "scene_graphs.json").write_text(json.dumps([graph]))


def test_visual_genome_keeps_the_first_predicate_per_pair_and_drops_self_relations(tmp_path):
    _write_vg(tmp_path)
    with pytest.warns(UserWarning, match="dropped 1 self-relation"):
        ds = VisualGenomeSceneGraphs(str(tmp_path))
    names = ds.predicates.names
    triplets = [(s, o, names[p]) for s, o, p in ds[0].triplets().tolist()]
    assert triplets == [(0, 1, "riding"), (1, 0, "under"), (2, 0, "on")]  # file order, first of each pair
    assert ds.num_self_relations_dropped == 1
    assert ds[0].x.shape == (3, ds.num_object_classes + 9)  # the default ObjectFeatures
    assert VisualGenomeSceneGraphs(str(tmp_path), default_features=False)[0].x is None
    again = VisualGenomeSceneGraphs(str(tmp_path))  # reloaded from the processed files: count kept
    assert again.num_self_relations_dropped == 1
    everything = VisualGenomeSceneGraphs(str(tmp_path), filter_duplicate_rels=False)
    assert everything[0].edge_predicate.numel() == 5  # 6 relations minus the self-relation


def test_sample_relation_pairs_rejects_a_ground_truth_self_relation():
    batch = torch.tensor([0, 0, 0, 1, 1])
    edge_index = torch.tensor([[0, 1, 3], [1, 1, 4]])  # (1 -> 1) is a self-relation; key 1*5+1 = 6 sits
    predicates = torch.tensor([2, 3, 4])  # right before the candidate (1, 2): it used to get predicate 3
    with pytest.raises(ValueError, match=r"relation \(1 -> 1\) is a self-relation"):
        sample_relation_pairs(edge_index, predicates, batch)
    last = torch.tensor([[4], [4]])  # past the last candidate key: it used to raise IndexError
    with pytest.raises(ValueError, match="self-relation"):
        sample_relation_pairs(last, torch.tensor([1]), batch)
    across = torch.tensor([[0], [3]])
    with pytest.raises(ValueError, match="between two graphs"):
        sample_relation_pairs(across, torch.tensor([1]), batch)


def test_sample_relation_pairs_default_budget_is_every_pair_up_to_1024():
    batch = torch.tensor([0] * 6 + [1] * 40)
    edge_index = torch.tensor([[0, 6], [1, 7]])
    pairs, labels = sample_relation_pairs(edge_index, torch.tensor([1, 2]), batch)
    per_graph = torch.bincount(batch[pairs[0]])
    assert per_graph.tolist() == [6 * 5, 1024]  # all 30 pairs of the small image, 1024 of 1560
    assert sorted(labels[labels > 0].tolist()) == [1, 2]


def test_real_samples_have_no_self_relation_or_duplicate_pair_left(shared_data, tmp_path):
    vg_src, gqa_src = shared_data / "scenegraphs/visual_genome", shared_data / "scenegraphs/gqa"
    (tmp_path / "vg" / "raw").mkdir(parents=True)
    (tmp_path / "vg" / "raw" / "scene_graphs.json").write_text(
        (vg_src / "scene_graphs_sample100.json").read_text()
    )
    (tmp_path / "gqa" / "raw").mkdir(parents=True)
    name = "train_sceneGraphs_sample100.json"
    (tmp_path / "gqa" / "raw" / name).write_text((gqa_src / name).read_text())
    with pytest.warns(UserWarning, match="self-relation"):
        vg = VisualGenomeSceneGraphs(str(tmp_path / "vg"))
    with pytest.warns(UserWarning, match="self-relation"):
        gqa = GQASceneGraphs(str(tmp_path / "gqa"), file_name=name)
    for ds in (vg, gqa):
        assert ds.num_self_relations_dropped >= 1
        for data in ds:
            s, o = data.edge_index
            assert bool((s != o).all())
            assert torch.unique(s * data.num_nodes + o).numel() == s.numel()
        batch = Batch.from_data_list(list(ds[:16]))
        _, labels = sample_relation_pairs(batch.edge_index, batch.edge_predicate, batch.batch)
        # one predicate per pair and at most 256 relations per image: every relation is a positive pair
        assert sorted(labels[labels > 0].tolist()) == sorted(batch.edge_predicate.tolist())


# ------------------------------------------------------------------------------------------------- CLEVR


def _clevr_scene(index: int) -> dict:
    # three objects on a line: 0 left of 1 left of 2; 2 behind 0 and 1
    coords = [[-2.0, 0.0, 0.7], [0.0, 0.0, 0.35], [2.0, 1.0, 0.7]]
    objects = [
        {"shape": s, "size": z, "color": c, "material": m, "3d_coords": p, "rotation": 0.0,
         "pixel_coords": [100 + 100 * i, 160, 10.0]}
        for i, (s, z, c, m, p) in enumerate(
            [("cube", "large", "red", "metal", coords[0]), ("sphere", "small", "blue", "rubber", coords[1]),
             ("cylinder", "large", "gray", "rubber", coords[2])])
    ]  # fmt: skip
    # relationships[rel][i]: the objects that are `rel` of object i
    relationships = {
        "left": [[], [0], [0, 1]], "right": [[1, 2], [2], []],
        "front": [[], [], [0, 1]], "behind": [[2], [2], []],
    }  # fmt: skip
    return {"image_index": index, "image_filename": f"CLEVR_val_{index:06d}.png", "split": "val",
            "objects": objects, "relationships": relationships}  # fmt: skip


def _write_clevr(root: Path, scenes: list[dict]) -> None:
    (root / "raw").mkdir(parents=True, exist_ok=True)
    (root / "raw" / "CLEVR_val_scenes.json").write_text(
        json.dumps({"info": {"split": "val"}, "scenes": scenes})
    )


def test_clevr_reader_relations_labels_and_boxes(tmp_path):
    _write_clevr(tmp_path, [_clevr_scene(0), _clevr_scene(1)])
    ds = CLEVRSceneGraphs(str(tmp_path), split="val")
    assert len(ds) == 2 and ds.objects.names == ["__background__", "cube", "sphere", "cylinder"]
    d = ds[0]
    names = ds.predicates.names
    triplets = {(s, o, names[p]) for s, o, p in d.triplets().tolist()}
    # one predicate per ordered pair: its left/right relation ("j is left of i" -> (j, left, i))
    assert triplets == {(0, 1, "left"), (0, 2, "left"), (1, 2, "left"), (1, 0, "right"), (2, 0, "right"),
                        (2, 1, "right")}  # fmt: skip
    assert d.y.tolist() == [1, 2, 3] and d.image_size.tolist() == [[480.0, 320.0]]
    half = 525.0 * 0.7 / 10.0  # focal length * radius / depth
    torch.testing.assert_close(d.box[0], torch.tensor([100 - half, 160 - half, 100 + half, 160 + half]))
    assert d.x.shape == (3, 4 + 9)  # the default ObjectFeatures: one-hot over 3 shapes + background, box code
    both = CLEVRSceneGraphs(str(tmp_path), split="val", filter_duplicate_rels=False)
    assert both[0].edge_predicate.numel() == 6 + 4  # left/right for every pair, front/behind for four
    depth = CLEVRSceneGraphs(str(tmp_path), split="val", predicates=("front", "behind"), label="attributes")
    assert {(s, o) for s, o, _ in depth[0].triplets().tolist()} == {(0, 2), (1, 2), (2, 0), (2, 1)}
    assert depth.objects.names[depth[0].y[0]] == "large red metal cube" and depth.num_object_classes == 97


def test_clevr_reader_is_a_pyg_in_memory_dataset(tmp_path):
    _write_clevr(tmp_path, [_clevr_scene(0), _clevr_scene(1), _clevr_scene(2)])
    calls = []

    def pre_transform(data):
        calls.append(1)
        data.tag = torch.tensor([7])
        return data

    ds = CLEVRSceneGraphs(str(tmp_path), split="val", pre_transform=pre_transform,
                          pre_filter=lambda d: d.image_id != "1")  # fmt: skip
    assert len(ds) == 2 and len(calls) == 2 and ds[0].tag.tolist() == [7]
    CLEVRSceneGraphs(str(tmp_path), split="val", pre_transform=pre_transform, pre_filter=lambda d: True)
    assert len(calls) == 2  # processed files reused
    reloaded = CLEVRSceneGraphs(str(tmp_path), split="val", force_reload=True)
    assert len(reloaded) == 3
    shifted = CLEVRSceneGraphs(
        str(tmp_path), split="val", transform=lambda d: d.update({"flag": torch.ones(1)})
    )
    assert shifted[0].flag.tolist() == [1.0]


def test_clevr_reader_errors(tmp_path):
    with pytest.raises(ValueError, match="'split' must be 'train' or 'val'"):
        CLEVRSceneGraphs(str(tmp_path), split="test")
    with pytest.raises(ValueError, match="'predicates' must be a non-empty subset"):
        CLEVRSceneGraphs(str(tmp_path), predicates=("above",))
    bad = _clevr_scene(0)
    bad["relationships"]["left"][1] = [5]
    _write_clevr(tmp_path / "bad", [bad])
    with pytest.raises(ValueError, match="relates object 5 to 1 but has 3 objects"):
        CLEVRSceneGraphs(str(tmp_path / "bad"), split="val")


def test_real_clevr_sample_relations_follow_the_scene_directions(shared_data, tmp_path):
    src = shared_data / "scenegraphs/clevr/CLEVR_val_scenes_sample100.json"
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "CLEVR_val_scenes.json").write_text(src.read_text())
    ds = CLEVRSceneGraphs(str(tmp_path), split="val", filter_duplicate_rels=False)
    scenes = {str(s["image_index"]): s for s in json.loads(src.read_text())["scenes"]}
    assert len(ds) == 100
    for data in ds[:20]:
        scene = scenes[data.image_id]
        coords = torch.tensor([o["3d_coords"] for o in scene["objects"]])
        for s, o, p in data.triplets().tolist():
            direction = torch.tensor(scene["directions"][ds.predicates.names[p]])
            assert float((coords[s] - coords[o]) @ direction) > 0  # s lies in direction p from o
        data.validate_scene_graph(ds.num_object_classes, ds.num_predicate_classes)
