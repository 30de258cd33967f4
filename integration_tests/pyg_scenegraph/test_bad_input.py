"""Bad and edge-case input to every public entry of pyg_scenegraph: a clear error or a handled result.

One table (docs/reliability.md, issue #16): each :class:`BadInputCase` is a call, and either the exception
type with a message fragment, or a check of the handled result. The evaluator's cases live in
``bad_input_evaluator_cases.EVALUATOR_CASES`` and join the table when that module exists.
"""

from __future__ import annotations

import importlib
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch_geometric.transforms as T
from pyg_scenegraph import (
    EBMLoss,
    EGNNConv,
    GraphEnergyModel,
    ObjectFeatures,
    RelationPredictor,
    SceneGraphData,
    SGLDSampler,
    box_code,
    negative_scene_graph,
    positive_scene_graph,
    sample_relation_pairs,
    scene_graph_losses,
)
from torch_geometric.data import Batch

from integration_tests.pyg_scenegraph.bad_input_case import BadInputCase, run_case
from integration_tests.pyg_scenegraph.conftest import random_scene

NAN, INF = float("nan"), float("inf")
EDGES = torch.tensor([[0, 0, 1, 2, 1], [1, 2, 2, 3, 3]])


def conv_inputs(dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 8, generator=g).to(dtype), EDGES.clone(), torch.randn(5, 6, generator=g).to(dtype)


def conv(x, edge_index, edge_attr):
    torch.manual_seed(0)
    return EGNNConv(8, 6)(x, edge_index, edge_attr)


def energy_inputs(num_graphs: int = 3):
    """``num_graphs`` scene graphs (7 object, 5 predicate classes, 6-d features) as energy-model inputs."""
    graphs = [random_scene(n, e, 7, 5, 6, seed) for seed, (n, e) in enumerate([(4, 6), (5, 9), (3, 2)])]
    batch = Batch.from_data_list(graphs[:num_graphs])
    code = box_code(batch.box, batch.image_size[batch.batch])
    nodes = torch.rand(batch.num_nodes, 7)
    edges = torch.rand(batch.num_edges, 5)
    return [batch.x, nodes, batch.edge_index, edges, code, batch.batch, batch.num_graphs]


def energy(*, replace: dict | None = None, train: bool = False):
    torch.manual_seed(0)
    model = GraphEnergyModel(7, 5, 6, hidden_channels=8, pooling_channels=8).train(train)
    args = energy_inputs()
    original = list(args)
    for position, value in (replace or {}).items():
        args[position] = value(original) if callable(value) else value
    return model(*args)


def bn_state_after_nan_box_code():
    """A training-mode forward with a NaN box code is refused and leaves BatchNorm's statistics unchanged."""
    torch.manual_seed(0)
    model = GraphEnergyModel(7, 5, 6, hidden_channels=8, pooling_channels=8).train()
    norm = model.box_embedding[1]
    before = [b.clone() for b in norm.buffers()]
    args = energy_inputs()
    args[4] = args[4].clone()
    args[4][0, 0] = NAN
    with pytest.raises(ValueError, match="'box_code' contains non-finite values"):
        model(*args)
    return before, [b.clone() for b in norm.buffers()]


def optimizer_step_with_nan_input():
    """One training step on a NaN feature: EBMLoss refuses the energies, the step never runs."""
    torch.manual_seed(0)
    model = GraphEnergyModel(7, 5, 6, hidden_channels=8, pooling_channels=8, box_norm=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    args = energy_inputs()
    args[0] = args[0].clone()
    args[0][2, 1] = NAN  # one region feature of graph 0
    raised = False
    try:
        loss = EBMLoss()(model(*args), model(*energy_inputs()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    except ValueError:
        raised = True
    return raised, before, [p.detach().clone() for p in model.parameters()]


def scaled_step_with_nan_loss():
    """``validate_args=False``: the NaN loss is returned and GradScaler's finite check skips the step."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    loss = EBMLoss(validate_args=False)(weight * torch.tensor([1.0, NAN, 2.0]), weight.sum().view(1))
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, weight.detach()


def sgld(states_nodes=None, states_edges=None, energy_fn=None, **kwargs):
    nodes = torch.rand(3, 4) if states_nodes is None else states_nodes
    edges = torch.rand(2, 5) if states_edges is None else states_edges
    fn = energy_fn or (lambda n, e: (e**2).sum().view(1) + n.sum() * 0)
    return SGLDSampler(num_steps=2, **kwargs).sample(fn, nodes, edges, task="sgcls")


def scene(**kwargs) -> SceneGraphData:
    fields = dict(y=torch.tensor([1, 2, 3]), box=torch.tensor([[0.0, 0, 5, 5], [2, 2, 9, 9], [1, 0, 4, 8]]),
                  image_size=torch.tensor([[10.0, 10.0]]), edge_index=torch.tensor([[0, 1], [1, 2]]),
                  edge_predicate=torch.tensor([1, 2]))  # fmt: skip
    fields.update(kwargs)
    return SceneGraphData(**fields)


def predictor(x=None, pair_index=None, dtype=torch.float32):
    torch.manual_seed(0)
    model = RelationPredictor(6, 7, 5, hidden_channels=8, num_layers=1, heads=2)
    x = torch.randn(4, 6, dtype=dtype) if x is None else x
    code = torch.rand(4, 9, dtype=dtype)
    pairs = torch.tensor([[0, 1], [1, 2]]) if pair_index is None else pair_index
    return model(x, code, pairs, torch.tensor([1, 2, 3, 4]), torch.zeros(4, dtype=torch.long))


def _finite_same(before, after):
    assert all(torch.isfinite(b).all() for b in after)
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))


def _nan_through(out):
    x, e = out
    assert torch.isnan(x).any() and x.shape == (4, 8) and e.shape == (5, 6)


def _shape(*shape, edges: int | None = None):
    def check(out):
        first = out[0] if isinstance(out, tuple) else out
        assert first.shape == shape and torch.isfinite(first).all()
        if edges is not None:
            assert out[1].shape == (edges, 6)

    return check


def _refused_and_unchanged(out):
    raised, before, after = out
    assert raised, "the NaN step was not refused"
    _finite_same(before, after)


def _nan_returned_step_skipped(out):
    loss, weight = out
    assert torch.isnan(loss) and torch.equal(weight, torch.ones(3))


def _duplicate_first_pair(args):
    n = args[2].size(1)
    return args[2][:, [0, *range(n)]], args[3][[0, *range(n)]]


def _across_graphs(args):
    return torch.cat([args[2], torch.tensor([[0], [11]])], 1), torch.cat([args[3], args[3][:1]])


def _one_graph():
    torch.manual_seed(0)
    return GraphEnergyModel(7, 5, 6, hidden_channels=8, pooling_channels=8).eval()(*energy_inputs(1))


def _nan_energy(nodes, edges):
    return (edges * NAN).sum().view(1) + nodes.sum()


def _nan_x() -> torch.Tensor:
    x = conv_inputs()[0]
    x[0, 0] = NAN
    return x


E, H = ValueError, TypeError
CASES = [
    # --- EGNNConv: a pure layer; dtype, shape and index errors before any kernel, NaN passes through
    BadInputCase(
        "EGNNConv-float64-x",
        lambda: conv(*conv_inputs(torch.float64)),
        H,
        r"'x' is torch.float64 but the module's parameters are torch.float32.*module.to",
        covers="dtype",
    ),
    BadInputCase(
        "EGNNConv-int64-x",
        lambda: conv(torch.ones(4, 8, dtype=torch.long), EDGES, conv_inputs()[2]),
        H,
        r"'x' must be a floating tensor \(got torch.int64\)",
        covers="dtype",
    ),
    BadInputCase(
        "EGNNConv-float-edge_index",
        lambda: conv(conv_inputs()[0], EDGES.float(), conv_inputs()[2]),
        H,
        r"'edge_index' must be an integer tensor",
        covers="dtype",
    ),
    BadInputCase(
        "EGNNConv-wrong-rank-x",
        lambda: conv(torch.randn(8), EDGES, conv_inputs()[2]),
        E,
        r"'x' must be \[num_nodes, 8\] \(got \[8\]\)",
        covers="rank",
    ),
    BadInputCase(
        "EGNNConv-wrong-feature-size",
        lambda: conv(conv_inputs()[0], EDGES, torch.randn(5, 4)),
        E,
        r"'edge_attr' must be \[5, 6\] \(got \[5, 4\]\)",
        covers="feature size",
    ),
    BadInputCase(
        "EGNNConv-edge-attr-one-short",
        lambda: conv(conv_inputs()[0], EDGES, torch.randn(4, 6)),
        E,
        r"'edge_attr' must be \[5, 6\]",
        covers="lengths",
    ),
    BadInputCase(
        "EGNNConv-index-out-of-range",
        lambda: conv(conv_inputs()[0], EDGES + 1, conv_inputs()[2]),
        E,
        "out-of-range",
        covers="index",
    ),
    BadInputCase(
        "EGNNConv-negative-index",
        lambda: conv(conv_inputs()[0], EDGES - 1, conv_inputs()[2]),
        E,
        "out-of-range",
        covers="index",
    ),
    BadInputCase(
        "EGNNConv-no-nodes",
        lambda: conv(torch.zeros(0, 8), EDGES[:, :0], torch.zeros(0, 6)),
        E,
        "empty graph",
        covers="empty",
    ),
    BadInputCase(
        "EGNNConv-nan-passes-through",
        lambda: conv(_nan_x(), EDGES, conv_inputs()[2]),
        check=_nan_through,
        covers="nan",
    ),
    BadInputCase(
        "EGNNConv-no-edges",
        lambda: conv(conv_inputs()[0], EDGES[:, :0], torch.zeros(0, 6)),
        check=_shape(4, 8, edges=0),
        covers="empty",
    ),
    BadInputCase(
        "EGNNConv-one-node",
        lambda: conv(torch.randn(1, 8), EDGES[:, :0], torch.zeros(0, 6)),
        check=_shape(1, 8),
        covers="batch of 1",
    ),
    # --- GraphEnergyModel
    BadInputCase(
        "GraphEnergyModel-batch-one-short",
        lambda: energy(replace={5: lambda a: a[5][:-1]}),
        E,
        r"'batch' must be \[12\] \(one graph id per node\) \(got \[11\]\)",
        covers="lengths",
    ),
    BadInputCase(
        "GraphEnergyModel-batch-out-of-range",
        lambda: energy(replace={6: 2}),
        E,
        r"'batch' must lie in \[0, 2\) \(got \[0, 2\]\)",
        covers="index",
    ),
    BadInputCase(
        "GraphEnergyModel-float-batch",
        lambda: energy(replace={5: lambda a: a[5].float()}),
        H,
        r"'batch' must be an integer tensor",
        covers="dtype",
    ),
    BadInputCase(
        "GraphEnergyModel-float64-states",
        lambda: energy(replace={1: lambda a: a[1].double()}),
        H,
        r"'node_states' is torch.float64",
        covers="dtype",
    ),
    BadInputCase(
        "GraphEnergyModel-wrong-class-count",
        lambda: energy(replace={1: torch.rand(12, 6)}),
        E,
        r"'node_states' must be \[12, 7\] \(got \[12, 6\]\)",
        covers="feature size",
    ),
    BadInputCase(
        "GraphEnergyModel-duplicate-pairs",
        lambda: energy(
            replace={2: lambda a: _duplicate_first_pair(a)[0], 3: lambda a: _duplicate_first_pair(a)[1]}
        ),
        E,
        "duplicate relation pairs",
        covers="index",
    ),
    BadInputCase(
        "GraphEnergyModel-relation-across-graphs",
        lambda: energy(replace={2: lambda a: _across_graphs(a)[0], 3: lambda a: _across_graphs(a)[1]}),
        E,
        "connects nodes of two different graphs",
        covers="index",
    ),
    BadInputCase("GraphEnergyModel-one-graph", _one_graph, check=_shape(1), covers="batch of 1"),
    BadInputCase(
        "GraphEnergyModel-state-nan-box-code",
        bn_state_after_nan_box_code,
        check=lambda out: _finite_same(*out),
        covers="state",
    ),
    # --- SGLDSampler
    BadInputCase(
        "SGLDSampler-step_size-nan",
        lambda: SGLDSampler(step_size=NAN),
        E,
        r"finite 'step_size' >= 0 \(got nan\)",
        covers="nan",
    ),
    BadInputCase(
        "SGLDSampler-noise-inf", lambda: SGLDSampler(noise_std=INF), E, r"finite 'noise_std'", covers="inf"
    ),
    BadInputCase(
        "SGLDSampler-float-num_steps",
        lambda: SGLDSampler(num_steps=2.5),
        E,  # type: ignore[arg-type]
        r"integer 'num_steps' >= 0 \(got 2.5\)",
        covers="dtype",
    ),
    BadInputCase(
        "SGLDSampler-nan-states",
        lambda: sgld(states_edges=torch.tensor([[0.0, NAN, 1, 0, 0]])),
        E,
        r"'edge_states' contains non-finite values",
        covers="nan",
    ),
    BadInputCase(
        "SGLDSampler-integer-states",
        lambda: sgld(states_nodes=torch.ones(3, 4, dtype=torch.long)),
        H,
        r"'node_states' must be a floating tensor \(got torch.int64\)",
        covers="dtype",
    ),
    BadInputCase(
        "SGLDSampler-nan-energy-gradient",
        lambda: sgld(energy_fn=_nan_energy),
        E,
        "gradient w.r.t. the edge states is not finite",
        covers="nan",
    ),
    BadInputCase(
        "SGLDSampler-wrong-rank",
        lambda: sgld(states_edges=torch.rand(5)),
        E,
        r"must be 2-D \[rows, classes\]",
        covers="rank",
    ),
    # --- EBMLoss: refuses non-finite energies; never lets a NaN step reach the parameters
    BadInputCase(
        "EBMLoss-nan-positive",
        lambda: EBMLoss()(torch.tensor([0.1, NAN]), torch.zeros(2)),
        E,
        r"'positive_energy' contains non-finite values",
        covers="nan",
    ),
    BadInputCase(
        "EBMLoss-inf-negative",
        lambda: EBMLoss()(torch.zeros(2), torch.tensor([INF, 0.0])),
        E,
        r"'negative_energy' contains non-finite values",
        covers="inf",
    ),
    BadInputCase(
        "EBMLoss-empty",
        lambda: EBMLoss()(torch.zeros(0), torch.zeros(2)),
        E,
        r"'positive_energy' must be a non-empty 1-D tensor of energies \(got \[0\]\)",
        covers="empty",
    ),
    BadInputCase(
        "EBMLoss-wrong-rank",
        lambda: EBMLoss()(torch.zeros(2), torch.zeros(2, 1)),
        E,
        r"'negative_energy' must be a non-empty 1-D",
        covers="rank",
    ),
    BadInputCase(
        "EBMLoss-integer-energies",
        lambda: EBMLoss()(torch.zeros(2, dtype=torch.long), torch.zeros(2)),
        H,
        r"'positive_energy' must be a floating tensor",
        covers="dtype",
    ),
    BadInputCase(
        "EBMLoss-temperature-nan", lambda: EBMLoss(temperature=NAN), E, "finite 'temperature'", covers="nan"
    ),
    BadInputCase(
        "EBMLoss-batch-of-1",
        lambda: EBMLoss()(torch.tensor([0.5]), torch.tensor([0.25])),
        check=lambda loss: torch.testing.assert_close(loss, torch.tensor(0.25 + 0.25 + 0.0625)),
        covers="batch of 1",
    ),
    BadInputCase(
        "EBMLoss-state-optimizer-step-on-nan",
        optimizer_step_with_nan_input,
        check=_refused_and_unchanged,
        covers="state",
    ),
    BadInputCase(
        "EBMLoss-validate_args-off-GradScaler-skips",
        scaled_step_with_nan_loss,
        check=_nan_returned_step_skipped,
        covers="state",
    ),
    # --- graph builders and the pair sampler
    BadInputCase(
        "positive_scene_graph-float-labels",
        lambda: positive_scene_graph(torch.tensor([1.0, 2.0]), EDGES[:, :1], torch.tensor([1]), 3, 3),
        H,
        r"'y' must hold integer class ids \(got torch.float32\)",
        covers="labels float",
    ),
    BadInputCase(
        "positive_scene_graph-predicate-out-of-range",
        lambda: positive_scene_graph(torch.tensor([1, 2]), EDGES[:, :1], torch.tensor([3]), 3, 3),
        E,
        r"'edge_predicate' ids must lie in \[0, 3\) \(got \[3, 3\]\)",
        covers="labels range",
    ),
    BadInputCase(
        "positive_scene_graph-negative-label",
        lambda: positive_scene_graph(torch.tensor([-1, 2]), EDGES[:, :1], torch.tensor([1]), 3, 3),
        E,
        r"'y' ids must lie in \[0, 3\) \(got \[-1, 2\]\)",
        covers="labels negative",
    ),
    BadInputCase(
        "positive_scene_graph-mismatched-lengths",
        lambda: positive_scene_graph(torch.tensor([1, 2]), EDGES[:, :1], torch.tensor([1, 2]), 3, 3),
        E,
        r"'edge_index' has 1 pairs but 'edge_predicate' has 2",
        covers="lengths",
    ),
    BadInputCase(
        "negative_scene_graph-unknown-task",
        lambda: negative_scene_graph(torch.rand(2, 3), task="det"),
        E,
        r"'task' must be one of",
        covers="value",
    ),
    BadInputCase(
        "sample_relation_pairs-self-relation",
        lambda: sample_relation_pairs(
            torch.tensor([[1], [1]]), torch.tensor([2]), torch.zeros(3, dtype=torch.long)
        ),
        E,
        r"relation \(1 -> 1\) is a self-relation",
        covers="index",
    ),
    BadInputCase(
        "sample_relation_pairs-index-out-of-range",
        lambda: sample_relation_pairs(
            torch.tensor([[0], [3]]), torch.tensor([2]), torch.zeros(3, dtype=torch.long)
        ),
        E,
        r"'edge_index' must point into \[0, 3\)",
        covers="index",
    ),
    BadInputCase(
        "sample_relation_pairs-mismatched-lengths",
        lambda: sample_relation_pairs(EDGES, torch.tensor([1, 2]), torch.zeros(4, dtype=torch.long)),
        E,
        r"'edge_index' must be \[2, 2\] to match 'edge_predicate' \(got \[2, 5\]\)",
        covers="lengths",
    ),
    # --- SceneGraphData, transforms, recipe
    BadInputCase(
        "SceneGraphData-labels-out-of-range",
        lambda: scene().validate_scene_graph(num_object_classes=3),
        E,
        r"object labels must lie in \[1, 2\] \(got \[1, 3\]\)",
        covers="labels range",
    ),
    BadInputCase(
        "SceneGraphData-float-predicates",
        lambda: scene(edge_predicate=torch.tensor([1.0, 2.0])).triplets(),
        H,
        r"'edge_predicate' must hold integer predicate ids",
        covers="labels float",
    ),
    BadInputCase(
        "SceneGraphData-self-relation",
        lambda: scene(edge_index=torch.tensor([[0, 1], [0, 2]])).validate_scene_graph(),
        E,
        "self-relation",
        covers="index",
    ),
    BadInputCase(
        "SceneGraphData-unguarded-AddSelfLoops",
        lambda: T.AddSelfLoops()(scene()).triplets(),
        E,
        r"'edge_index' has 5 pairs but 'edge_predicate' has 2 predicates; a transform changed the edges",
        covers="lengths",
    ),
    BadInputCase(
        "ObjectFeatures-label-out-of-range",
        lambda: ObjectFeatures(3)(scene()),
        E,
        r"'y' must lie in \[0, 3\) \(got \[1, 3\]\)",
        covers="labels range",
    ),
    BadInputCase(
        "RelationPredictor-float64-x",
        lambda: predictor(dtype=torch.float64),
        H,
        r"'x' is torch.float64 but the module's parameters are torch.float32",
        covers="dtype",
    ),
    BadInputCase(
        "RelationPredictor-pair-out-of-range",
        lambda: predictor(pair_index=torch.tensor([[0], [4]])),
        E,
        r"'pair_index' must point into \[0, 4\) \(got \[0, 4\]\)",
        covers="index",
    ),
    BadInputCase(
        "scene_graph_losses-no-x",
        lambda: scene_graph_losses(torch.nn.Identity(), scene(), EDGES[:, :1], torch.tensor([1])),
        E,
        r"'data' has no node features 'x'.*ObjectFeatures",
        covers="feature size",
    ),
]

_EVALUATOR_MODULE = Path(__file__).with_name("bad_input_evaluator_cases.py")
EVALUATOR_CASES: list[BadInputCase] = (
    importlib.import_module("integration_tests.pyg_scenegraph.bad_input_evaluator_cases").EVALUATOR_CASES
    if _EVALUATOR_MODULE.exists()
    else []
)
ALL_CASES = CASES + EVALUATOR_CASES


def test_the_table_covers_the_policy():
    assert len(CASES) >= 25 and len({c.id for c in ALL_CASES}) == len(ALL_CASES)
    covered = {c.covers for c in CASES}
    for problem in ("nan", "inf", "empty", "batch of 1", "rank", "feature size", "dtype", "labels range",
                    "labels negative", "labels float", "lengths", "index", "state"):  # fmt: skip
        assert problem in covered, problem
    counts = Counter((c.id.split("-")[0], c.outcome) for c in ALL_CASES)
    print("\n".join(f"{entry:28s} {outcome:12s} {n}" for (entry, outcome), n in sorted(counts.items())))


@pytest.mark.parametrize("case", [c.param() for c in ALL_CASES])
def test_bad_input(case: BadInputCase):
    run_case(case)
