"""The README's training recipe ("Energy-based scene graphs", first snippet) on every dataset of the package.

The steps below are the snippet's, with ``in_channels = train.num_node_features`` so that they hold for
region features (synthetic) and for the default :class:`~pyg_scenegraph.ObjectFeatures` (GQA, VG, CLEVR,
which have no visual features). Each raw format runs on the real sample of the shared data folder
(skipped when absent) and on small files written in that format.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pyg_scenegraph import (
    CLEVRSceneGraphs,
    EBMLoss,
    GQASceneGraphs,
    GraphEnergyModel,
    RelationPredictor,
    SceneGraphEvaluator,
    SGLDSampler,
    SyntheticSceneGraphs,
    VisualGenomeSceneGraphs,
    all_pairs,
    box_code,
    sample_relation_pairs,
    scene_graph_losses,
)
from torch_geometric.loader import DataLoader

from integration_tests.conftest import SHARED_DATA

NAMES = ["cup", "table", "man", "dog", "tree", "hat"]
PREDICATES = ["on", "near", "has", "holding"]


def _objects(g: torch.Generator, n: int) -> list[tuple[str, list[int]]]:
    out = []
    for _ in range(n):
        x, y = (int(v) for v in torch.randint(0, 300, (2,), generator=g))
        w, h = (int(v) for v in torch.randint(5, 80, (2,), generator=g))
        out.append((NAMES[int(torch.randint(len(NAMES), (1,), generator=g))], [x, y, w, h]))
    return out


def _relations(g: torch.Generator, n: int) -> list[tuple[int, int, str]]:
    rels = []
    for _ in range(2 * n):
        s, o = (int(v) for v in torch.randint(n, (2,), generator=g))
        rels.append((s, o, PREDICATES[int(torch.randint(len(PREDICATES), (1,), generator=g))]))
    return rels  # self-relations and repeated pairs included on purpose: the readers clean them


def write_visual_genome(root: Path, num_images: int = 10) -> Path:
    g = torch.Generator().manual_seed(1)
    graphs = []
    for image in range(num_images):
        objs = _objects(g, 3 + image % 4)
        graphs.append({
            "image_id": image,
            "objects": [{"object_id": 100 + i, "names": [n], "x": b[0], "y": b[1], "w": b[2], "h": b[3]}
                        for i, (n, b) in enumerate(objs)],
            "relationships": [{"subject_id": 100 + s, "object_id": 100 + o, "predicate": p}
                              for s, o, p in _relations(g, len(objs))],
        })  # fmt: skip
    (root / "raw").mkdir(parents=True)
    (root / "raw" / "scene_graphs.json").write_text(json.dumps(graphs))
    return root


def write_gqa(root: Path, num_images: int = 10) -> Path:
    g = torch.Generator().manual_seed(2)
    graphs = {}
    for image in range(num_images):
        objs = _objects(g, 3 + image % 4)
        rels = _relations(g, len(objs))
        graphs[str(1000 + image)] = {"width": 400, "height": 400, "objects": {
            str(i): {"name": n, "x": b[0], "y": b[1], "w": b[2], "h": b[3],
                     "relations": [{"object": str(o), "name": p} for s, o, p in rels if s == i]}
            for i, (n, b) in enumerate(objs)}}  # fmt: skip
    (root / "raw").mkdir(parents=True)
    (root / "raw" / "train_sceneGraphs.json").write_text(json.dumps(graphs))
    return root


def write_clevr(root: Path, num_images: int = 10) -> Path:
    g = torch.Generator().manual_seed(3)
    scenes = []
    for image in range(num_images):
        n = 3 + image % 4
        coords = (torch.rand(n, 2, generator=g) * 6 - 3).tolist()
        objects = [{"shape": ["cube", "sphere", "cylinder"][i % 3], "size": ["large", "small"][i % 2],
                    "color": "red", "material": "metal", "3d_coords": [*c, 0.7],
                    "pixel_coords": [int(240 + 40 * c[0]), int(160 + 30 * c[1]), 10.0]}
                   for i, c in enumerate(coords)]  # fmt: skip
        directions = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "front": (0.0, -1.0), "behind": (0.0, 1.0)}
        relationships = {
            rel: [[j for j in range(n) if j != i and (coords[j][0] - coords[i][0]) * d[0]
                   + (coords[j][1] - coords[i][1]) * d[1] > 0] for i in range(n)]
            for rel, d in directions.items()
        }  # fmt: skip
        scenes.append({"image_index": image, "objects": objects, "relationships": relationships})
    (root / "raw").mkdir(parents=True)
    (root / "raw" / "CLEVR_train_scenes.json").write_text(json.dumps({"scenes": scenes}))
    return root


def _shared(path: str, name: str, target: Path, as_name: str, use: bool) -> Path | None:
    source = SHARED_DATA / "scenegraphs" / path / name
    if not use:
        return None
    if not source.is_file():
        pytest.skip(f"shared sample {source} not present")
    (target / "raw").mkdir(parents=True)
    (target / "raw" / as_name).write_text(source.read_text())
    return target


def dataset(kind: str, root: Path, shared: bool):
    """The dataset of one kind: the shared real sample (``shared``), or a small written one."""
    if kind == "synthetic":
        return SyntheticSceneGraphs(12, seed=0), "generated"
    if kind == "visual_genome":
        real = _shared("visual_genome", "scene_graphs_sample100.json", root, "scene_graphs.json", shared)
        with pytest.warns(UserWarning, match="self-relation"):  # the VG sample holds one, and so does ours
            return VisualGenomeSceneGraphs(str(real or write_visual_genome(root))), real
    if kind == "gqa":
        real = _shared("gqa", "train_sceneGraphs_sample100.json", root, "train_sceneGraphs.json", shared)
        with pytest.warns(UserWarning, match="self-relation"):
            return GQASceneGraphs(str(real or write_gqa(root))), real
    real = _shared("clevr", "CLEVR_train_scenes_sample100.json", root, "CLEVR_train_scenes.json", shared)
    return CLEVRSceneGraphs(str(real or write_clevr(root))), real


KINDS = [("synthetic", False)] + [(k, s) for k in ("visual_genome", "gqa", "clevr") for s in (True, False)]


@pytest.mark.parametrize(
    ("kind", "shared"), KINDS, ids=[f"{k}-{'shared' if s else 'written'}" for k, s in KINDS]
)
def test_readme_recipe_runs_on_every_dataset(kind, shared, tmp_path):
    full, _ = dataset(kind, tmp_path, shared)
    train, test = full[:8], full[8:12]
    # --- the README snippet's steps ---
    C, P = full.num_object_classes, full.num_predicate_classes
    F = train.num_node_features  # region features, or the default ObjectFeatures (C + 9)
    base = RelationPredictor(F, C, P, hidden_channels=16, num_layers=1, heads=2)
    energy = GraphEnergyModel(C, P, F, hidden_channels=16, pooling_channels=16)
    optimizer = torch.optim.SGD([*base.parameters(), *energy.parameters()], lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in base.parameters()]
    for data in DataLoader(train, batch_size=4, shuffle=True):
        pairs, labels = sample_relation_pairs(data.edge_index, data.edge_predicate, data.batch)
        out = scene_graph_losses(base, data, pairs, labels, energy, SGLDSampler(num_steps=2), EBMLoss())
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        assert math.isfinite(float(out["loss"])) and out["positive_energy"].shape == (data.num_graphs,)
    assert any(not torch.equal(a, b) for a, b in zip(before, base.parameters(), strict=True))
    evaluator = SceneGraphEvaluator(P, mode="predcls", ks=(20, 50))
    with torch.no_grad():
        for data in DataLoader(test, batch_size=4):
            pairs = all_pairs(data.batch)
            logits, _ = base(
                data.x, box_code(data.box, data.image_size[data.batch]), pairs, data.y, data.batch
            )
            evaluator.update_batch(data, pairs, logits.softmax(-1))
    result = evaluator.compute()
    assert 0.0 <= float(result["R@20"]) <= float(result["R@50"]) <= 1.0
