from __future__ import annotations

import itertools
import math

import pytest
import torch
from pyg_scenegraph import SceneGraphData, SceneGraphEvaluator
from torch_geometric.data import Batch

P = 5  # background + 4 predicates

# These hand cases have no boxes: they pin the ranking and averaging rules with matching="index" (the default
# before issue #14). Scene-Graph-Benchmark's default, label + IoU >= 0.5 in every mode, is tested against an
# independent port of its evaluation in test_evaluator_sgb.py.


def _ev(*args, **kwargs):
    return SceneGraphEvaluator(*args, matching="index", **kwargs)


def _floats(out):
    return {k: float(v) for k, v in out.items()}


def _image1():
    # Pair (0, 1) is annotated twice (predicates 1 and 3): under the graph constraint only one can be hit.
    return dict(
        gt_labels=torch.tensor([1, 2, 3]),
        gt_triplets=torch.tensor([[0, 1, 1], [1, 2, 2], [0, 1, 3]]),
        pair_index=torch.tensor([[0, 1, 2], [1, 2, 0]]),
        rel_scores=torch.tensor(
            [[0.1, 0.6, 0.1, 0.2, 0.0], [0.1, 0.1, 0.5, 0.3, 0.0], [0.0, 0.9, 0.05, 0.05, 0.0]]
        ),
    )


def _image2():
    return dict(
        gt_labels=torch.tensor([1, 1]),
        gt_triplets=torch.tensor([[0, 1, 1], [1, 0, 1]]),
        pair_index=torch.tensor([[0, 1], [1, 0]]),
        rel_scores=torch.tensor([[0.2, 0.8, 0.0, 0.0, 0.0], [0.1, 0.2, 0.7, 0.0, 0.0]]),
    )


def test_recall_with_duplicate_gt_pairs_hand_computed():
    ev = _ev(P, ks=(1, 2, 3, 4, 5))
    ev.update(**_image1())
    out = _floats(ev.compute())
    # ranking: (2,0,p1) .9, (0,1,p1) .6, (1,2,p2) .5 -> (0,1,p3) is unreachable with one predicate per pair
    assert out["R@1"] == 0.0
    assert out["R@2"] == pytest.approx(1 / 3)
    assert out["R@3"] == pytest.approx(2 / 3)
    assert out["R@5"] == pytest.approx(2 / 3)
    # no graph constraint: ... (1,2,p3) .3 at rank 4, (0,1,p3) .2 at rank 5 reaches the duplicate
    assert out["ngR@4"] == pytest.approx(2 / 3)
    assert out["ngR@5"] == pytest.approx(1.0)


def test_mean_recall_averages_per_image_then_per_predicate_hand_computed():
    ev = _ev(P, ks=(2, 3))
    ev.update(**_image1())
    ev.update(**_image2())
    out = _floats(ev.compute())
    assert out["R@2"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert out["R@3"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # p1: image1 1/1, image2 1/2 -> 0.75 (pooling the hits would give 2/3); p2, p3 0; p4 never seen -> 0
    per_pred = ev.per_predicate_recall(2).tolist()
    assert per_pred[1] == pytest.approx(0.75)
    assert per_pred[2] == 0.0 and per_pred[3] == 0.0 and math.isnan(per_pred[4])
    assert out["mR@2"] == pytest.approx(0.75 / 4)
    assert out["mR@3"] == pytest.approx((0.75 + 1 + 0 + 0) / 4)


def test_zero_shot_recall_hand_computed():
    zs = torch.tensor([[2, 3, 2], [9, 9, 1]])  # (subject class, object class, predicate)
    ev = _ev(P, ks=(2, 3), zero_shot_triplets=zs)
    ev.update(**_image1())
    ev.update(**_image2())  # no zero-shot triplet: does not count
    out = _floats(ev.compute())
    assert out["zR@2"] == 0.0 and out["zR@3"] == 1.0


def test_sgcls_needs_right_labels_and_ranks_by_object_scores():
    ev = _ev(P, mode="sgcls", ks=(1, 2))
    args = _image1()
    ev.update(**args, pred_labels=torch.tensor([1, 2, 3]), pred_scores=torch.tensor([1.0, 1.0, 0.1]))
    # (2,0,p1) .9 * 0.1 * 1 = .09 now ranks last; (0,1,p1) .6 first
    assert float(ev.compute()["R@1"]) == pytest.approx(1 / 3)
    ev.reset()
    ev.update(**args, pred_labels=torch.tensor([1, 4, 3]), pred_scores=torch.ones(3))  # object 1 mislabelled
    assert float(ev.compute()["R@2"]) == 0.0


def test_sgdet_matches_boxes_at_iou_half():
    gt_boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    common = dict(gt_labels=torch.tensor([1, 2]), gt_triplets=torch.tensor([[0, 1, 1]]), gt_boxes=gt_boxes)
    scores = torch.tensor([[0.0, 1.0, 0, 0, 0]])
    ev = SceneGraphEvaluator(P, mode="sgdet", ks=(1,))
    # +1-pixel IoU 100/142 = 0.70 and 121/132 = 0.92: hit
    pair = torch.tensor([[0], [1]])
    labels = torch.tensor([1, 2])
    ev.update(**common, pair_index=pair, rel_scores=scores, pred_labels=labels,
              pred_boxes=torch.tensor([[1.0, 1, 11, 11], [20, 20, 30, 31]]))  # fmt: skip
    assert float(ev.compute()["R@1"]) == 1.0
    ev.reset()
    # object box IoU 36/206 = 0.17: miss
    ev.update(**common, pair_index=pair, rel_scores=scores, pred_labels=labels,
              pred_boxes=torch.tensor([[1.0, 1, 11, 11], [25, 25, 35, 35]]))  # fmt: skip
    assert float(ev.compute()["R@1"]) == 0.0


def test_images_without_relations_or_pairs_are_skipped_and_no_image_raises():
    ev = _ev(P, ks=(1,))
    ev.update(gt_labels=torch.tensor([1, 2]), gt_triplets=torch.zeros(0, 3, dtype=torch.long),
              pair_index=torch.tensor([[0], [1]]), rel_scores=torch.rand(1, P))  # fmt: skip
    ev.update(gt_labels=torch.tensor([1, 2]), gt_triplets=torch.tensor([[0, 1, 1]]),
              pair_index=torch.zeros(2, 0, dtype=torch.long), rel_scores=torch.rand(0, P))  # fmt: skip
    assert ev.num_images == 0
    with pytest.raises(ValueError, match="no image with ground-truth relations"):
        ev.compute()  # a recall over no images is undefined: raise rather than report 0 (docs/reliability.md)


def _naive(images, ks):
    """Scene-Graph-Benchmark's definitions as plain loops."""
    recall = {k: [] for k in ks}
    ng = {k: [] for k in ks}
    per_pred = {k: {p: [] for p in range(1, P)} for k in ks}
    for im in images:
        gt = [tuple(t) for t in im["gt_triplets"].tolist()]
        preds = []
        ng_preds = []
        for q, (s, o) in enumerate(im["pair_index"].t().tolist()):
            row = im["rel_scores"][q].tolist()
            best = max(range(1, P), key=lambda p: (row[p], -p))
            preds.append((row[best], -q, (s, o, best)))
            ng_preds += [(row[p], -(q * (P - 1) + p - 1), (s, o, p)) for p in range(1, P)]
        preds = [t for *_, t in sorted(preds, reverse=True)]
        ng_preds = [t for *_, t in sorted(ng_preds, reverse=True)]
        for k in ks:
            hits = [t in preds[:k] for t in gt]
            recall[k].append(sum(hits) / len(gt))
            ng[k].append(sum(t in ng_preds[:k] for t in gt) / len(gt))
            for p in {t[2] for t in gt}:
                sel = [h for h, t in zip(hits, gt, strict=True) if t[2] == p]
                per_pred[k][p].append(sum(sel) / len(sel))
    out = {}
    for k in ks:
        out[f"R@{k}"] = sum(recall[k]) / len(recall[k])
        out[f"ngR@{k}"] = sum(ng[k]) / len(ng[k])
        out[f"mR@{k}"] = sum(sum(v) / len(v) if v else 0.0 for v in per_pred[k].values()) / (P - 1)
    return out


def test_against_naive_loops_on_random_images():
    g = torch.Generator().manual_seed(0)
    images = []
    for _ in range(6):
        n = int(torch.randint(3, 6, (), generator=g))
        pairs = torch.tensor([p for p in itertools.permutations(range(n), 2)]).t()
        gt_pick = torch.randperm(pairs.size(1), generator=g)[:4]
        gt = torch.cat([pairs[:, gt_pick].t(), torch.randint(1, P, (4, 1), generator=g)], -1)
        gt = torch.cat([gt, torch.cat([gt[:1, :2], torch.tensor([[1]])], -1)])  # a duplicate GT pair
        images.append(dict(gt_labels=torch.randint(1, 4, (n,), generator=g), gt_triplets=gt,
                           pair_index=pairs,
                           rel_scores=torch.rand(pairs.size(1), P, generator=g)))  # fmt: skip
    ev = _ev(P, ks=(1, 3, 5, 20))
    for im in images:
        ev.update(**im)
    out = _floats(ev.compute())
    for key, value in _naive(images, (1, 3, 5, 20)).items():
        assert out[key] == pytest.approx(value), key


@pytest.mark.parametrize("matching", ["iou", "index"])
@pytest.mark.parametrize("mode", ["predcls", "sgcls"])
def test_update_batch_equals_per_image_updates(matching, mode):
    # image 2 has two same-label objects with overlapping boxes: a twin under IoU matching
    boxes = [
        torch.tensor([[0.0, 0, 9, 9], [20, 0, 29, 9], [0, 20, 9, 29]]),
        torch.tensor([[0.0, 0, 9, 9], [1, 1, 10, 10]]),
    ]
    images = [{**_image1(), "gt_boxes": boxes[0]}, {**_image2(), "gt_boxes": boxes[1]}]
    graphs = [SceneGraphData(y=im["gt_labels"], box=im["gt_boxes"], image_size=torch.tensor([[40.0, 40.0]]),
                             edge_index=im["gt_triplets"][:, :2].t(), edge_predicate=im["gt_triplets"][:, 2])
              for im in images]  # fmt: skip
    batch = Batch.from_data_list(graphs)
    pairs = torch.cat([images[0]["pair_index"], images[1]["pair_index"] + 3], 1)
    scores = torch.cat([im["rel_scores"] for im in images])
    object_scores = torch.tensor([[0.0, 0.9, 0.1, 0, 0], [0, 0.1, 0.8, 0, 0], [0, 0, 0.3, 0.7, 0],
                                  [0, 0.6, 0.4, 0, 0], [0, 0.2, 0.5, 0, 0]])  # fmt: skip
    ev = SceneGraphEvaluator(P, mode=mode, ks=(1, 2, 3), matching=matching)
    ev.update_batch(batch, pairs, scores, object_scores if mode == "sgcls" else None)
    ref = SceneGraphEvaluator(P, mode=mode, ks=(1, 2, 3), matching=matching)
    for im, nodes in zip(images, (slice(0, 3), slice(3, 5)), strict=True):
        if mode == "sgcls":
            score, label = object_scores[nodes, 1:].max(-1)
            im = {**im, "pred_labels": label + 1, "pred_scores": score}
        ref.update(**im)
    assert _floats(ev.compute()) == _floats(ref.compute())
    # pairs given graph-interleaved are regrouped by graph, their order within a graph kept
    perm = torch.tensor([3, 0, 4, 1, 2])
    ev.reset()
    ev.update_batch(batch, pairs[:, perm], scores[perm], object_scores if mode == "sgcls" else None)
    assert _floats(ev.compute()) == _floats(ref.compute())


def test_evaluator_validation():
    with pytest.raises(ValueError, match="'mode' must be one of"):
        SceneGraphEvaluator(P, mode="det")
    with pytest.raises(ValueError, match="zero_shot_triplets"):
        SceneGraphEvaluator(P, zero_shot_triplets=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="matching='index' needs the ground-truth objects"):
        SceneGraphEvaluator(P, mode="sgdet", matching="index")
    ev = _ev(P)
    args = _image1()
    with pytest.raises(ValueError, match=r"'rel_scores' must be \[3, 5\]"):
        ev.update(**{**args, "rel_scores": torch.rand(3, 4)})
    with pytest.raises(ValueError, match="predicates must lie in"):
        ev.update(**{**args, "gt_triplets": torch.tensor([[0, 1, 5]])})
    with pytest.raises(ValueError, match="object indices"):
        ev.update(**{**args, "gt_triplets": torch.tensor([[0, 3, 1]])})
    with pytest.raises(ValueError, match="'pair_index' must point into"):
        ev.update(**{**args, "pair_index": torch.tensor([[0, 1, 7], [1, 2, 0]])})
    with pytest.raises(ValueError, match="'sgdet' needs 'pred_boxes'"):
        SceneGraphEvaluator(P, mode="sgdet").update(
            **args, gt_boxes=torch.rand(3, 4), pred_labels=torch.tensor([1, 2, 3])
        )
    with pytest.raises(ValueError, match="needs 'gt_boxes'"):
        SceneGraphEvaluator(P).update(**args)  # the default IoU matching needs boxes in every mode
    assert ev.num_images == 0  # nothing was counted from the rejected calls


def test_forward_returns_the_image_value_and_accumulates():
    # torchmetrics' forward: the value of this call's input, while the state keeps every image
    ev = _ev(P, ks=(2, 3))
    first = _floats(ev(**_image1()))
    second = _floats(ev(**_image2()))
    assert first["R@2"] == pytest.approx(1 / 3) and second["R@2"] == pytest.approx(1 / 2)
    assert float(ev.compute()["R@2"]) == pytest.approx((1 / 3 + 1 / 2) / 2) and ev.num_images == 2
