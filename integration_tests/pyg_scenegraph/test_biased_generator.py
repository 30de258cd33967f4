"""BiasedSceneGraphs: VG's statistics where the EBM claim needs them, and the CE profile it produces."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import pytest
import torch
import torch_geometric.transforms as T
from pyg_scenegraph.datasets.biased import CHILD_TABLE, PREDICATES, SIGNATURES, BiasedSceneGraphs

from integration_tests.helpers.examples import load_example

PARENT = torch.tensor(BiasedSceneGraphs.parent)
SIGNATURE_TYPE = {
    BiasedSceneGraphs.object_classes.index(c): t for t, sig in enumerate(SIGNATURES) for c in sig
}


@pytest.fixture(scope="module")
def scenes() -> BiasedSceneGraphs:
    return BiasedSceneGraphs(num_graphs=150, seed=3)


def test_long_tail_whose_heads_are_generic_parents(scenes: BiasedSceneGraphs) -> None:
    counts = Counter(scenes._data.edge_predicate.tolist())
    total = sum(counts.values())
    ranked = [p for p, _ in counts.most_common()]
    assert set(ranked[:3]) == set(BiasedSceneGraphs.head_predicates)  # the generic parents lead
    head_share = sum(counts[p] for p in BiasedSceneGraphs.head_predicates) / total
    tail_share = sum(counts[p] for p in BiasedSceneGraphs.tail_predicates) / total
    assert 0.5 < head_share < 0.75 and 0.12 < tail_share < 0.35
    assert counts.most_common()[-1][1] / total < 0.02  # a long tail: the rarest below 2 %
    for p in BiasedSceneGraphs.tail_predicates:
        assert BiasedSceneGraphs.parent[p] in BiasedSceneGraphs.head_predicates


@pytest.mark.parametrize("rate", [0.0, 0.7, 1.0])
def test_annotation_bias_towards_the_generic_parent(rate: float) -> None:
    data = BiasedSceneGraphs(num_graphs=60, seed=1, generic_rate=rate)._data
    true, annotated = data.edge_true_predicate, data.edge_predicate
    family = PARENT[true] != true
    # an annotation is the truth or its generic parent; stand-alone predicates are never changed
    assert bool(((annotated == true) | (annotated == PARENT[true])).all())
    assert torch.equal(annotated[~family], true[~family])
    n = int(family.sum())
    generic = float((annotated[family] == PARENT[true[family]]).float().mean())
    assert abs(generic - rate) <= 4 * math.sqrt(rate * (1 - rate) / n) + 1e-9


def test_specific_predicate_is_fixed_by_context_not_by_the_pair(scenes: BiasedSceneGraphs) -> None:
    names = PREDICATES
    by_pair: dict[tuple[int, int, int], set[int]] = defaultdict(set)
    checked = 0
    for data in scenes:
        votes = Counter(SIGNATURE_TYPE[int(c)] for c in data.y if int(c) in SIGNATURE_TYPE)
        scene = votes.most_common(1)[0][0]  # the majority signature type of the other objects
        assert scene == int(data.scene_type)
        s, o = data.edge_index
        true = data.edge_true_predicate
        on_subjects = {int(i) for i, p in zip(s, true, strict=True) if int(PARENT[p]) == names.index("on")}
        for i, j, p in zip(s.tolist(), o.tolist(), true.tolist(), strict=True):
            parent = names[int(PARENT[p])]
            if parent == names[p]:
                continue
            expected = "holding" if parent == "has" and i in on_subjects else CHILD_TABLE[parent][scene]
            assert names[p] == expected
            by_pair[(int(data.y[i]), int(data.y[j]), int(PARENT[p]))].add(p)
            checked += 1
    assert checked > 300
    recurring = [children for children in by_pair.values() if len(children) > 0]
    ambiguous = sum(len(children) > 1 for children in recurring)
    assert ambiguous / len(recurring) > 0.3  # the pair's classes alone leave the child open


def test_node_features_make_classes_learnable_but_not_trivially(scenes: BiasedSceneGraphs) -> None:
    train, test = scenes._data, BiasedSceneGraphs(num_graphs=40, seed=4)._data
    means = torch.zeros(len(BiasedSceneGraphs.object_classes), train.x.size(1)).index_add_(
        0, train.y, train.x
    )
    means /= torch.bincount(train.y, minlength=means.size(0)).clamp(min=1).unsqueeze(-1)
    nearest = torch.cdist(test.x, means[1:]).argmin(-1) + 1  # nearest class mean, background excluded
    accuracy = float((nearest == test.y).float().mean())
    assert 0.3 < accuracy < 0.9


def test_deterministic_cached_and_guarded(tmp_path) -> None:
    a = BiasedSceneGraphs(str(tmp_path), num_graphs=12, seed=7)
    b = BiasedSceneGraphs(str(tmp_path), num_graphs=12, seed=7)
    fresh = BiasedSceneGraphs(num_graphs=12, seed=7)
    assert torch.equal(a._data.x, fresh._data.x) and torch.equal(
        b._data.edge_predicate, fresh._data.edge_predicate
    )
    assert not torch.equal(BiasedSceneGraphs(num_graphs=12, seed=8)._data.y[:20], fresh._data.y[:20])
    again = BiasedSceneGraphs(str(tmp_path), num_graphs=12, seed=7, force_reload=True)
    assert torch.equal(again._data.box, fresh._data.box)
    with pytest.raises(ValueError, match="ToUndirected"):
        BiasedSceneGraphs(num_graphs=2, seed=7, transform=T.ToUndirected())[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_graphs": 0}, "num_graphs"), ({"generic_rate": 1.5}, "generic_rate"),
     ({"distractor_rate": -0.1}, "distractor_rate"), ({"feature_noise": float("nan")}, "feature_noise")],
)  # fmt: skip
def test_rejects_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BiasedSceneGraphs(**kwargs)


@pytest.mark.slow
def test_ce_baseline_has_visual_genome_profile(tmp_path) -> None:
    """A briefly trained CE RelationPredictor: R@50 / mR@50 in [2.5, 6] (Motifs on VG150 PredCls: 4.4)."""
    claim = load_example("ebm_claim.py")
    out = tmp_path / "ce"
    claim.main(["--ce-only", "--seeds", "1", "--out", str(out), "--device", "cpu", "--no-progress",
                "--train-graphs", "300", "--test-graphs", "150", "--epochs", "3"])  # fmt: skip
    import json

    ce = json.loads((out / "results.json").read_text())["CE"][0]
    assert 2.5 <= ce["R@50"] / ce["mR@50"] <= 6.0


@pytest.mark.slow
def test_quick_protocol_writes_the_report(tmp_path) -> None:
    claim = load_example("ebm_claim.py")
    claim.main(["--quick", "--out", str(tmp_path), "--device", "cpu", "--no-progress"])
    text = (tmp_path / "report.md").read_text()
    assert "Δ mR@50" in text and "SGLD" in text and (tmp_path / "energy_gap.png").is_file()


def test_sign_ablation_reverses_only_the_base_models_ebm_gradient() -> None:
    """``BaseLowersNegativeEnergy``: the base's EBM gradient flips sign, the energy model's does not."""
    from pyg_scenegraph import (
        EBMLoss,
        GraphEnergyModel,
        RelationPredictor,
        SGLDSampler,
        sample_relation_pairs,
        scene_graph_losses,
    )
    from torch_geometric.loader import DataLoader

    claim = load_example("ebm_claim.py")
    scenes = BiasedSceneGraphs(num_graphs=4, seed=3)
    data = next(iter(DataLoader(scenes, batch_size=4)))
    c, p, d = scenes.num_object_classes, scenes.num_predicate_classes, data.x.size(-1)
    pairs, labels = sample_relation_pairs(data.edge_index, data.edge_predicate, data.batch, 1024,
                                          generator=torch.Generator().manual_seed(0))  # fmt: skip

    def ebm_grads(wrap: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(0)
        base = RelationPredictor(d, c, p, hidden_channels=16, heads=2)
        energy = GraphEnergyModel(c, p, d, hidden_channels=16, pooling_channels=16)
        fn = claim.BaseLowersNegativeEnergy(energy) if wrap else energy
        sampler = SGLDSampler(num_steps=3, generator=torch.Generator().manual_seed(1))
        batch = data.clone()
        out = scene_graph_losses(base, batch, pairs, labels, fn, sampler, EBMLoss())
        base_params = [q for q in base.parameters() if q.requires_grad]
        grads = torch.autograd.grad(out["ebm"], [*base_params, *energy.parameters()], allow_unused=True)
        grads = [torch.zeros_like(q) if g is None else g for g, q in zip(grads, [*base_params,
                 *energy.parameters()], strict=True)]  # fmt: skip
        return grads[: len(base_params)], grads[len(base_params) :]

    base_official, energy_official = ebm_grads(wrap=False)
    base_reversed, energy_reversed = ebm_grads(wrap=True)
    assert sum(float(g.abs().sum()) for g in base_official) > 0  # the official recipe does reach the base
    for a, b in zip(base_official, base_reversed, strict=True):
        torch.testing.assert_close(b, -a)
    for a, b in zip(energy_official, energy_reversed, strict=True):
        torch.testing.assert_close(b, a)


def test_base_model_signal_is_the_normalised_ebm_gradient_into_the_negatives() -> None:
    """1 at zero energy, 0 at the summed regulariser's equilibrium T/(2λB), |autograd| / (T/B) elsewhere."""
    from pyg_scenegraph import EBMLoss

    claim = load_example("ebm_claim.py")
    loss = EBMLoss(temperature=2.0, regularization=0.5)
    b = 8
    assert claim.base_model_signal(torch.zeros(b), loss) == pytest.approx(1.0)
    equilibrium = torch.full((b,), 2.0 / (2 * 0.5 * b))
    assert claim.base_model_signal(equilibrium, loss) == pytest.approx(0.0, abs=1e-7)
    e_neg = torch.randn(b, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(torch.randn(b, dtype=torch.float64), e_neg), e_neg)
    expected = float((grad / (2.0 / b)).abs().mean())
    assert claim.base_model_signal(e_neg.detach(), loss) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("variants", "match"), [(["CE + EBM"], "must include CE"), (["CE", "nope"], "unknown")]
)
def test_variant_selection_is_checked(variants: list[str], match: str, capsys, tmp_path) -> None:
    claim = load_example("ebm_claim.py")
    with pytest.raises(SystemExit):
        claim.main(["--quick", "--out", str(tmp_path), "--variants", *variants])
    assert match in capsys.readouterr().err
