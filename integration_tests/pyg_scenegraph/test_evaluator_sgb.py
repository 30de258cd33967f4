"""SceneGraphEvaluator against an independent port of Scene-Graph-Benchmark's evaluation (sgb_reference.py).

Hand cases pin what the label + IoU matching changes (same-label twins, duplicate boxes, the +1-pixel
boundary); seeded random images with many twins and the real GQA / Visual Genome samples (a deterministic
weak predictor) must agree with the port to 1e-6 in PredCls, SGCls and SGDet; 2-process DDP ``compute()``
must equal one process.
"""

from __future__ import annotations

import inspect
import math
import shutil

import numpy as np
import pytest
import torch
from pyg_scenegraph import GQASceneGraphs, SceneGraphEvaluator, VisualGenomeSceneGraphs, Vocabulary, all_pairs
from torch_geometric.data import Batch

from integration_tests.helpers.distributed import run_distributed

from .sgb_reference import SGBReference, iou_plus_one

P = 4  # background + 3 predicates


def _floats(out: dict) -> dict[str, float]:
    return {k: float(v) for k, v in out.items()}


def _assert_agree(out: dict, ref: dict, tol: float = 1e-6) -> None:
    assert set(out) == set(ref)
    for key, value in ref.items():
        if math.isnan(value):
            assert math.isnan(out[key]), key
        else:
            assert abs(out[key] - value) <= tol, (key, out[key], value)


def _one_hot_scores(predicates: list[int], num_pred: int = P) -> torch.Tensor:
    """Relation scores whose best predicate is ``predicates[q]``, ranked in the given order."""
    scores = torch.full((len(predicates), num_pred), 0.01)
    for q, p in enumerate(predicates):
        scores[q, p] = 1.0 - 0.1 * q
    return scores


# ----------------------------------------------------------------------------------------------- hand cases
def test_same_label_twin_at_iou_half_hits_in_predcls_as_in_sgb():
    # objects 0 and 2 are both "1" and overlap at IoU 0.68 (+1 pixels); only (0 -> 1, p1) is annotated
    image = dict(
        gt_labels=torch.tensor([1, 2, 1]),
        gt_boxes=torch.tensor([[0.0, 0, 19, 19], [50, 50, 69, 69], [2, 2, 21, 21]]),
        gt_triplets=torch.tensor([[0, 1, 1]]),
        pair_index=torch.tensor([[2], [1]]),  # the model names the twin as subject
        rel_scores=_one_hot_scores([1]),
    )
    assert iou_plus_one(image["gt_boxes"][0].numpy(), image["gt_boxes"][2].numpy()) >= 0.5
    sgb = SceneGraphEvaluator(P, ks=(1,))
    sgb.update(**image)
    by_index = SceneGraphEvaluator(P, ks=(1,), matching="index")
    by_index.update(**image)
    ref = SGBReference(P, "predcls", (1,))
    ref.add_image(
        image["gt_triplets"],
        image["gt_labels"],
        image["gt_boxes"],
        image["pair_index"].t(),
        image["rel_scores"],
    )
    assert float(sgb.compute()["R@1"]) == ref.results()["R@1"] == 1.0
    assert float(by_index.compute()["R@1"]) == 0.0


def test_one_prediction_hits_both_duplicate_boxes():
    # objects 0 and 2 are the same box and label (a duplicated annotation), each with a relation to 1
    box = [10.0, 10, 40, 30]
    image = dict(
        gt_labels=torch.tensor([3, 1, 3]),
        gt_boxes=torch.tensor([box, [0.0, 0, 5, 5], box]),
        gt_triplets=torch.tensor([[0, 1, 2], [2, 1, 2], [1, 0, 3]]),
        pair_index=torch.tensor([[0, 1], [1, 0]]),
        rel_scores=_one_hot_scores([2, 1]),
    )
    ev = SceneGraphEvaluator(P, ks=(1, 2))
    ev.update(**image)
    out = _floats(ev.compute())
    ref = SGBReference(P, "predcls", (1, 2))
    ref.add_image(
        image["gt_triplets"],
        image["gt_labels"],
        image["gt_boxes"],
        image["pair_index"].t(),
        image["rel_scores"],
    )
    _assert_agree(out, ref.results())
    assert out["R@1"] == pytest.approx(2 / 3)  # the top prediction hits both duplicates at once
    assert out["R@2"] == pytest.approx(2 / 3)  # (1 -> 0) predicts p1, the annotation is p3
    # p2: 2/2 at K = 1 -> per-predicate recall 1; p3: 0; p1 never annotated -> counts 0 in mR
    per_predicate = ev.per_predicate_recall(1).tolist()
    assert math.isnan(per_predicate[1]) and per_predicate[2:] == [1.0, 0.0]
    assert out["mR@1"] == pytest.approx(1 / 3)


def test_plus_one_pixel_boundary_in_sgdet():
    # [0, 0, 9, 9] vs [0, 0, 9, 19]: 100 / 200 = 0.5 exactly with +1 pixels (continuous IoU: 81 / 171 = 0.47)
    gt = dict(
        gt_labels=torch.tensor([1, 2]),
        gt_boxes=torch.tensor([[0.0, 0, 9, 9], [30, 30, 39, 39]]),
        gt_triplets=torch.tensor([[0, 1, 1]]),
    )
    pred = dict(
        pred_labels=torch.tensor([1, 2]),
        pred_boxes=torch.tensor([[0.0, 0, 9, 19], [30, 30, 39, 39]]),
        pair_index=torch.tensor([[0], [1]]),
        rel_scores=_one_hot_scores([1]),
    )
    ev = SceneGraphEvaluator(P, mode="sgdet", ks=(1,))
    ev.update(**gt, **pred)
    assert float(ev.compute()["R@1"]) == 1.0
    ev = SceneGraphEvaluator(P, mode="sgdet", ks=(1,), iou_threshold=0.51)
    ev.update(**gt, **pred)
    assert float(ev.compute()["R@1"]) == 0.0


def test_index_matching_still_ignores_twins():
    image = dict(
        gt_labels=torch.tensor([1, 1]),
        gt_boxes=torch.tensor([[0.0, 0, 9, 9], [0, 0, 9, 9]]),
        gt_triplets=torch.tensor([[0, 1, 1]]),
        pair_index=torch.tensor([[1], [0]]),
        rel_scores=_one_hot_scores([1]),
    )
    results = {}
    for matching in ("iou", "index"):
        ev = SceneGraphEvaluator(P, ks=(1,), matching=matching)
        ev.update(**image)
        results[matching] = float(ev.compute()["R@1"])
    assert results == {"iou": 1.0, "index": 0.0}  # (1 -> 0) is (0 -> 1) under IoU matching: same boxes


# ------------------------------------------------------------------------------------ random images vs port
def _random_image(g: torch.Generator, mode: str, num_pred: int = P, num_labels: int = 3) -> dict:
    n = int(torch.randint(3, 7, (), generator=g))
    labels = torch.randint(1, num_labels + 1, (n,), generator=g)
    xy = torch.randint(0, 60, (n, 2), generator=g).float()
    wh = torch.randint(4, 30, (n, 2), generator=g).float()
    boxes = torch.cat([xy, xy + wh], -1)
    twin = torch.randint(0, n, (), generator=g)  # a same-label twin of object `twin`, shifted by 0-3 pixels
    labels = torch.cat([labels, labels[twin : twin + 1]])
    boxes = torch.cat([boxes, boxes[twin : twin + 1] + torch.randint(0, 4, (1, 4), generator=g).float()])
    n += 1
    pairs = torch.tensor([(i, j) for i in range(n) for j in range(n) if i != j]).t()
    pick = torch.randperm(pairs.size(1), generator=g)[:5]
    gt = torch.cat([pairs[:, pick].t(), torch.randint(1, num_pred, (5, 1), generator=g)], -1)
    gt = torch.cat(
        [gt, torch.cat([gt[:1, :2], torch.randint(1, num_pred, (1, 1), generator=g)], -1)]
    )  # repeat
    image = dict(gt_labels=labels, gt_boxes=boxes, gt_triplets=gt)
    num_objects = n
    if mode == "sgcls":
        flip = torch.rand(n, generator=g) < 0.2
        image["pred_labels"] = torch.where(flip, labels % num_labels + 1, labels)
        image["pred_scores"] = torch.rand(n, generator=g) * 0.7 + 0.3
    elif mode == "sgdet":
        keep = torch.randperm(n, generator=g)[: n - 1]  # one object missed, one detected twice
        extra = keep[:1]
        idx = torch.cat([keep, extra])
        jitter = torch.randint(-4, 5, (idx.numel(), 4), generator=g).float()
        image["pred_boxes"] = boxes[idx] + jitter
        flip = torch.rand(idx.numel(), generator=g) < 0.15
        image["pred_labels"] = torch.where(flip, labels[idx] % num_labels + 1, labels[idx])
        image["pred_scores"] = torch.rand(idx.numel(), generator=g) * 0.7 + 0.3
        num_objects = idx.numel()
    q = torch.tensor([(i, j) for i in range(num_objects) for j in range(num_objects) if i != j]).t()
    image["pair_index"] = q[:, torch.randperm(q.size(1), generator=g)]
    image["rel_scores"] = torch.rand(q.size(1), num_pred, generator=g).softmax(-1)
    return image


def _reference_add(ref: SGBReference, image: dict) -> None:
    ref.add_image(
        image["gt_triplets"].numpy(),
        image["gt_labels"].numpy(),
        image["gt_boxes"].numpy(),
        image["pair_index"].t().numpy(),
        image["rel_scores"].numpy(),
        *(image[k].numpy() if k in image else None for k in ("pred_labels", "pred_scores", "pred_boxes")),
    )


@pytest.mark.parametrize("mode", ["predcls", "sgcls", "sgdet"])
def test_random_images_with_twins_agree_with_sgb_port(mode):
    g = torch.Generator().manual_seed({"predcls": 0, "sgcls": 1, "sgdet": 2}[mode])
    zero_shot = torch.tensor([[a, b, p] for a in (1, 2) for b in (2, 3) for p in (1, 3)])
    ks = (1, 3, 5, 10, 20)
    ev = SceneGraphEvaluator(P, mode=mode, ks=ks, zero_shot_triplets=zero_shot)
    ref = SGBReference(P, mode, ks, zero_shot=zero_shot.numpy())
    for _ in range(12):
        image = _random_image(g, mode)
        ev.update(**image)
        _reference_add(ref, image)
    out, expected = _floats(ev.compute()), ref.results()
    _assert_agree(out, expected)
    for k in ks:
        np.testing.assert_allclose(ev.per_predicate_recall(k)[1:].numpy(), ref.per_predicate(k), atol=1e-6)
    assert 0 < out["R@20"] and out["R@1"] < 1  # the cases are neither trivial nor hopeless


# ------------------------------------------------------------------------------------- real GQA / VG samples
def _keep_duplicates(cls) -> dict:
    """Scene-Graph-Benchmark evaluates on every annotated relation, repeated pairs included."""
    return (
        {"filter_duplicate_rels": False}
        if "filter_duplicate_rels" in inspect.signature(cls).parameters
        else {}
    )


def _real_dataset(name: str, shared_data, tmp_path):
    if name == "gqa":
        file_name = "val_sceneGraphs_sample100.json"
        (tmp_path / "raw").mkdir()
        shutil.copy(shared_data / "scenegraphs/gqa" / file_name, tmp_path / "raw" / file_name)
        return GQASceneGraphs(str(tmp_path), file_name=file_name, **_keep_duplicates(GQASceneGraphs)), None
    src = shared_data / "scenegraphs/visual_genome"
    (tmp_path / "raw").mkdir()
    shutil.copy(src / "scene_graphs_sample100.json", tmp_path / "raw" / "scene_graphs.json")
    shutil.copy(src / "image_data_sample100.json", tmp_path / "raw" / "image_data.json")
    objects, predicates = Vocabulary.from_vg150_dicts(
        shared_data / "scenegraphs/vg150/VG-SGG-dicts-with-attri.json"
    )
    ds = VisualGenomeSceneGraphs(
        str(tmp_path), objects=objects, predicates=predicates, **_keep_duplicates(VisualGenomeSceneGraphs)
    )
    zero_shot = torch.load(shared_data / "scenegraphs/vg150/zeroshot_triplet.pytorch", weights_only=True)
    return ds, zero_shot


def _weak_predictor(batch: Batch, num_classes: int, num_pred: int):
    """Deterministic, weak: a fixed random (subject class, object class) -> predicate table plus geometry."""
    table = torch.rand(num_classes, num_classes, num_pred, generator=torch.Generator().manual_seed(7))
    pairs = all_pairs(batch.batch)
    centre = (batch.box[:, :2] + batch.box[:, 2:]) / 2 / batch.image_size[batch.batch]
    geometry = (centre[pairs[0]] - centre[pairs[1]]) @ torch.linspace(-1, 1, 2 * num_pred).view(2, num_pred)
    logits = 4 * table[batch.y[pairs[0]], batch.y[pairs[1]]] + geometry
    return pairs, logits.softmax(-1)


@pytest.mark.parametrize("name", ["gqa", "vg"])
def test_real_samples_agree_with_sgb_port(name, shared_data, tmp_path):
    ds, zero_shot = _real_dataset(name, shared_data, tmp_path)
    num_classes, num_pred = ds.num_object_classes, ds.num_predicate_classes
    batch = Batch.from_data_list(list(ds))
    pairs, rel_scores = _weak_predictor(batch, num_classes, num_pred)
    # SGCls: every 4th object's class is wrong, scores in (0.4, 1)
    wrong = torch.arange(batch.num_nodes) % 4 == 0
    pred_labels = torch.where(wrong, batch.y % (num_classes - 1) + 1, batch.y)
    pred_scores = 0.4 + 0.6 * torch.rand(batch.num_nodes, generator=torch.Generator().manual_seed(3))
    object_scores = torch.zeros(batch.num_nodes, num_classes).scatter_(
        1, pred_labels.view(-1, 1), pred_scores.view(-1, 1)
    )
    ks = (20, 50, 100)
    twins = 0
    for mode in ("predcls", "sgcls"):
        ev = SceneGraphEvaluator(num_pred, mode=mode, ks=ks, zero_shot_triplets=zero_shot)
        ev.update_batch(batch, pairs, rel_scores, object_scores if mode == "sgcls" else None)
        ref = SGBReference(num_pred, mode, ks, zero_shot=None if zero_shot is None else zero_shot.numpy())
        for g in range(batch.num_graphs):
            data, lo = batch.get_example(g), int(batch.ptr[g])
            in_graph = batch.batch[pairs[0]] == g
            nodes = slice(lo, lo + data.num_nodes)
            ref.add_image(
                data.triplets().numpy(),
                data.y.numpy(),
                data.box.numpy(),
                (pairs[:, in_graph] - lo).t().numpy(),
                rel_scores[in_graph].numpy(),
                pred_labels[nodes].numpy(),
                pred_scores[nodes].numpy(),
            )
            if mode == "predcls":
                same = (data.y.view(-1, 1) == data.y.view(1, -1)) & ~torch.eye(
                    data.num_nodes, dtype=torch.bool
                )
                twins += int(
                    any(
                        iou_plus_one(data.box[i].numpy(), data.box[j].numpy()) >= 0.5
                        for i, j in same.nonzero().tolist()
                    )
                )
        _assert_agree(_floats(ev.compute()), ref.results())
    assert twins > 0  # the real annotations do contain same-label twins at IoU >= 0.5


def test_real_vg_sample_sgdet_agrees_with_sgb_port(shared_data, tmp_path):
    ds, zero_shot = _real_dataset("vg", shared_data, tmp_path)
    num_pred = ds.num_predicate_classes
    g = torch.Generator().manual_seed(11)
    ev = SceneGraphEvaluator(num_pred, mode="sgdet", ks=(20, 50, 100), zero_shot_triplets=zero_shot)
    ref = SGBReference(num_pred, "sgdet", (20, 50, 100), zero_shot=zero_shot.numpy())
    for data in ds:
        n = data.num_nodes
        idx = torch.cat([torch.arange(n), torch.arange(0, n, 3)])  # every third object detected twice
        size = (data.box[idx, 2:] - data.box[idx, :2]).repeat(1, 2)
        pred_boxes = data.box[idx] + size * (torch.rand(idx.numel(), 4, generator=g) - 0.5) * 0.4
        image = dict(
            gt_labels=data.y,
            gt_boxes=data.box,
            gt_triplets=data.triplets(),
            pred_boxes=pred_boxes,
            pred_labels=data.y[idx],
            pred_scores=torch.rand(idx.numel(), generator=g) * 0.5 + 0.5,
        )
        image["pair_index"] = all_pairs(None, idx.numel())
        image["rel_scores"] = torch.rand(image["pair_index"].size(1), num_pred, generator=g).softmax(-1)
        ev.update(**image)
        _reference_add(ref, image)
    _assert_agree(_floats(ev.compute()), ref.results())


# ----------------------------------------------------------------------------------------------------- DDP
def _ddp_compute(rank: int, world_size: int, images: list[dict], device: str = "cpu") -> dict[str, dict]:
    """Per split of the images over the ranks: ``compute()`` and one per-predicate recall."""
    device = f"cuda:{rank}" if device == "cuda" else device
    splits = {"strided": images[rank::world_size], "all on rank 0": images if rank == 0 else []}
    results = {}
    for split, mine in splits.items():
        ev = SceneGraphEvaluator(P, ks=(1, 3, 10), zero_shot_triplets=torch.tensor([[1, 2, 1], [2, 3, 2]]))
        ev = ev.to(device)
        for image in mine:
            ev.update(**{key: value.to(device) for key, value in image.items()})
        out = _floats(ev.compute())
        out["per_predicate@3"] = ev.per_predicate_recall(3).tolist()
        results[split] = out
    return results


@pytest.mark.distributed
@pytest.mark.parametrize(
    "backend", ["gloo", pytest.param("nccl", marks=[pytest.mark.nccl, pytest.mark.cuda])]
)
def test_ddp_compute_equals_one_process(backend):
    g = torch.Generator().manual_seed(5)
    images = [_random_image(g, "predcls") for _ in range(7)]
    single = _ddp_compute(0, 1, images)["strided"]
    device = "cuda" if backend == "nccl" else "cpu"
    for per_rank in run_distributed(_ddp_compute, images, device, world_size=2, backend=backend):
        for split, out in per_rank.items():  # uneven shares, and a rank without any image
            assert set(out) == set(single), split
            for key, value in single.items():
                np.testing.assert_allclose(out[key], value, rtol=1e-12, atol=1e-12, err_msg=f"{split} {key}")


# ------------------------------------------------------------------------------------------------- devices
def _zero_shot() -> torch.Tensor:
    return torch.tensor([[a, b, p] for a in (1, 2) for b in (2, 3) for p in (1, 3)])


def test_states_and_results_follow_the_input_device(device):
    g = torch.Generator().manual_seed(3)
    images = [_random_image(g, "sgdet") for _ in range(4)]
    on_cpu = SceneGraphEvaluator(P, mode="sgdet", ks=(1, 5), zero_shot_triplets=_zero_shot())
    on_device = SceneGraphEvaluator(P, mode="sgdet", ks=(1, 5), zero_shot_triplets=_zero_shot()).to(device)
    for image in images:
        on_cpu.update(**image)
        on_device.update(**{key: value.to(device) for key, value in image.items()})
    assert all(t.device.type == device.type for t in on_device.hits + on_device.predicate_hits)
    out = on_device.compute()
    assert all(value.device.type == device.type for value in out.values())
    _assert_agree(_floats(out), _floats(on_cpu.compute()), tol=1e-6)
    on_device.reset()
    with pytest.raises(ValueError, match="no image"):
        on_device.compute()


@pytest.mark.cuda
def test_update_without_validation_does_not_synchronise(cuda_device):
    g = torch.Generator().manual_seed(4)
    image = {key: value.to(cuda_device) for key, value in _random_image(g, "sgdet").items()}
    ev = SceneGraphEvaluator(P, mode="sgdet", ks=(1, 5), zero_shot_triplets=_zero_shot(), validate_args=False)
    ev = ev.to(cuda_device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ev.update(**image)
        ev.update(**{**image, "rel_scores": torch.full_like(image["rel_scores"], float("nan"))})  # masked
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference = SceneGraphEvaluator(P, mode="sgdet", ks=(1, 5), zero_shot_triplets=_zero_shot())
    reference.update(**{key: value.cpu() for key, value in image.items()})
    _assert_agree(_floats(ev.compute()), _floats(reference.compute()))
