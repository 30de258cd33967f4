"""Every edge-touching transform of torch_geometric.transforms on a scene graph: predicates stay aligned and
keep their meaning, or SceneGraphTransform raises a ValueError naming the transform (issue #14)."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torch_geometric.transforms as T
from pyg_scenegraph import ObjectFeatures, SceneGraphData, SceneGraphTransform, VisualGenomeSceneGraphs
from torch_geometric.data import Batch, Data
from torch_geometric.typing import WITH_PYG_LIB
from torch_geometric.utils import coalesce, to_undirected

# Relations (subject, object, predicate): 0 and 1 relate both ways with different predicates, 2 and 3 both
# ways with the same one, 4 -> 5 is a second component, node 6 is isolated. Labels y = 1..7 name the nodes.
RELATIONS = [(0, 1, 3), (1, 0, 5), (2, 3, 2), (3, 2, 2), (1, 2, 1), (4, 5, 4)]


def scene(relations=RELATIONS, num_nodes: int = 7) -> SceneGraphData:
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(relations, dtype=torch.long).view(-1, 3)
    xy = torch.rand(num_nodes, 2, generator=g) * 50
    return SceneGraphData(
        y=torch.arange(1, num_nodes + 1),
        x=torch.randn(num_nodes, 4, generator=g),
        pos=torch.randn(num_nodes, 3, generator=g),
        box=torch.cat([xy, xy + 10], -1),
        image_size=torch.tensor([[80.0, 60.0]]),
        edge_index=t[:, :2].t().contiguous(),
        edge_predicate=t[:, 2].contiguous(),
    )


def labelled(data: Data) -> Counter:
    """Relations named by the nodes' labels: an independent view that survives node relabelling."""
    s, o = data.edge_index
    return Counter(zip(data.y[s].tolist(), data.y[o].tolist(), data.edge_predicate.tolist(), strict=True))


def symmetric() -> SceneGraphData:
    return scene([(2, 3, 2), (3, 2, 2), (0, 1, 4), (1, 0, 4)], num_nodes=4)


def with_self_relation() -> SceneGraphData:
    return scene([*RELATIONS, (5, 5, 1)])


def with_duplicate_pair() -> SceneGraphData:
    return scene([*RELATIONS, (0, 1, 4)])


def with_faces() -> SceneGraphData:
    data = scene()
    data.face = torch.tensor([[0, 1], [1, 2], [2, 3]])
    return data


def with_normals() -> SceneGraphData:
    data = scene()
    data.norm = torch.nn.functional.normalize(torch.randn(7, 3), dim=-1)
    return data


def planar() -> SceneGraphData:
    data = scene()
    data.pos = data.pos[:, :2]
    return data


KEEPS, SAME = "keeps", "same relations"
P = "edge_predicate"
# (id, transform, graph, expected): KEEPS = a sub-multiset of the input relations, SAME = exactly them,
# otherwise the regex of the error (it always starts with the transform's repr).
CASES: list[tuple[str, Callable, Callable[[], Data], str]] = [
    ("ToUndirected", T.ToUndirected(), scene, r"^ToUndirected\(\) changed .* is not one of its input"),
    ("ToUndirected-mean", T.ToUndirected(reduce="mean"), symmetric, r"^ToUndirected.*became torch.float32"),
    ("AddSelfLoops", T.AddSelfLoops(), scene, r"^AddSelfLoops\(\) changed .*'edge_predicate' has 6 entries"),
    ("AddSelfLoops-attr", T.AddSelfLoops(attr="edge_predicate", fill_value=0), scene, r"predicate 0\)"),
    ("AddRemainingSelfLoops", T.AddRemainingSelfLoops(), scene, r"^AddRemainingSelfLoops\(\) changed"),
    ("RemoveSelfLoops-none", T.RemoveSelfLoops(), scene, SAME),
    ("RemoveSelfLoops-default", T.RemoveSelfLoops(), with_self_relation, r"^RemoveSelfLoops\(\) changed"),
    ("RemoveSelfLoops-attr", T.RemoveSelfLoops(attr="edge_predicate"), with_self_relation, KEEPS),
    ("RemoveDuplicatedEdges", T.RemoveDuplicatedEdges(), scene, r"^RemoveDuplicatedEdges\(\) changed"),
    ("RemoveDuplicatedEdges-add", T.RemoveDuplicatedEdges(P), with_duplicate_pair, r"\(0 -> 1, predicate 7"),
    ("RemoveDuplicatedEdges-min", T.RemoveDuplicatedEdges(P, "min"), with_duplicate_pair, KEEPS),
    ("RemoveIsolatedNodes", T.RemoveIsolatedNodes(), scene, SAME),
    ("LargestConnectedComponents", T.LargestConnectedComponents(), scene, KEEPS),
    ("RandomLinkSplit", T.RandomLinkSplit(num_val=1, num_test=1), scene, KEEPS),
    ("RandomLinkSplit-key", T.RandomLinkSplit(num_val=1, num_test=1, key=P), scene, r"^RandomLinkSplit"),
    ("ToSparseTensor", T.ToSparseTensor(), scene, r"^ToSparseTensor.* removed 'edge_index'"),
    ("ToDense", T.ToDense(), scene, r"^ToDense\(.*removed 'edge_index'"),
    ("TwoHop", T.TwoHop(), scene, r"^TwoHop\(\) changed"),
    ("LineGraph", T.LineGraph(), scene, r"^LineGraph\(\) changed"),
    ("GDC", T.GDC(), scene, r"^GDC\(\) changed"),
    ("GCNNorm", T.GCNNorm(), scene, r"^GCNNorm\(.*\) changed"),
    ("VirtualNode", T.VirtualNode(), scene, r"^VirtualNode\(\) changed"),
    ("HalfHop", T.HalfHop(), scene, r"^HalfHop\(.*\) changed"),
    ("Pad", T.Pad(max_num_nodes=9, max_num_edges=10), scene, r"^Pad\(.*\) changed"),
    ("FixedPoints", T.FixedPoints(4, replace=False), scene, r"^FixedPoints\(4.* outside the graph's 4 nodes"),
    ("FaceToEdge", T.FaceToEdge(), with_faces, r"^FaceToEdge\(\) changed"),
    ("Delaunay", T.Delaunay(), planar, SAME),
    ("RootedEgoNets", T.RootedEgoNets(num_hops=1), scene, SAME),
    ("RootedRWSubgraph", T.RootedRWSubgraph(walk_length=2), scene, SAME),
    ("Cartesian", T.Cartesian(), scene, SAME),
    ("Distance", T.Distance(), scene, SAME),
    ("LocalCartesian", T.LocalCartesian(), scene, SAME),
    ("Polar", T.Polar(), planar, SAME),
    ("Spherical", T.Spherical(), scene, SAME),
    ("PointPairFeatures", T.PointPairFeatures(), with_normals, SAME),
    ("TargetIndegree", T.TargetIndegree(), scene, SAME),
    ("LocalDegreeProfile", T.LocalDegreeProfile(), scene, SAME),
    ("OneHotDegree", T.OneHotDegree(max_degree=6), scene, SAME),
    ("SIGN", T.SIGN(K=2), scene, SAME),
    ("LaplacianLambdaMax", T.LaplacianLambdaMax(), scene, SAME),
    ("AddRandomWalkPE", T.AddRandomWalkPE(walk_length=2), scene, SAME),
    ("AddLaplacianEigenvectorPE", T.AddLaplacianEigenvectorPE(k=2, is_undirected=False), scene, SAME),
    ("FeaturePropagation", T.FeaturePropagation(torch.zeros(7, 4, dtype=torch.bool)), scene, SAME),
    ("KNNGraph", T.KNNGraph(k=2), scene, r"^KNNGraph\(k=2\) changed"),
    ("RadiusGraph", T.RadiusGraph(r=5.0), scene, r"^RadiusGraph\(r=5.0\) changed"),
    ("GridSampling", T.GridSampling(size=0.5), scene, r"^GridSampling"),
]  # fmt: skip

#: Transforms that read or write only node or graph features (or are containers), never the edges.
NODE_OR_FEATURE_ONLY = {
    "BaseTransform", "Compose", "ComposeFilters", "ToDevice", "Constant", "NormalizeFeatures",
    "SVDFeatureReduction", "RemoveTrainingClasses", "RandomNodeSplit", "NodePropertySplit", "IndexToMask",
    "MaskToIndex", "Center", "NormalizeRotation", "NormalizeScale", "RandomJitter", "RandomFlip",
    "LinearTransformation", "RandomScale", "RandomRotate", "RandomShear", "SamplePoints",
    "GenerateMeshNormals", "ToSLIC", "AddGPSE",
}  # fmt: skip
#: Transforms defined on HeteroData only (they need edge types; a scene graph is homogeneous).
HETERO_ONLY = {"AddMetaPaths", "AddRandomMetaPaths"}
#: Transforms that need the optional pyg-lib backend; skipped without it.
NEEDS_PYG_LIB = {"KNNGraph", "RadiusGraph", "GridSampling", "RootedRWSubgraph"}


def test_every_transform_of_torch_geometric_is_classified():
    tested = {name.split("-")[0] for name, *_ in CASES}
    unclassified = set(T.__all__) - tested - NODE_OR_FEATURE_ONLY - HETERO_ONLY
    assert not unclassified, f"new PyG transforms to test on scene graphs: {sorted(unclassified)}"


@pytest.mark.parametrize(("name", "transform", "graph", "expected"), CASES, ids=[c[0] for c in CASES])
def test_edge_transform_keeps_predicates_or_names_itself(name, transform, graph, expected):
    if name in NEEDS_PYG_LIB and not WITH_PYG_LIB:
        pytest.skip(f"{name} needs pyg-lib")
    data = graph()
    before = labelled(data)
    guarded = SceneGraphTransform(transform)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. RandomLinkSplit's ratio adjustment on a tiny graph
        if expected not in (KEEPS, SAME):
            with pytest.raises(ValueError, match=expected):
                guarded(data)
            return
        out = guarded(data)
    for result in out if isinstance(out, tuple) else (out,):
        after = labelled(result)
        assert not after - before, "a relation appeared or changed its predicate"
        if expected == SAME:
            assert after == before
        assert result.edge_predicate.dtype == torch.long
        assert "scene_graph_node_id" not in result  # the guard's temporary attribute is gone
    assert labelled(data) == before  # the input is untouched


def test_random_link_split_leaves_link_labels_to_pyg_and_predicates_to_the_scene_graph():
    train, val, test = SceneGraphTransform(T.RandomLinkSplit(num_val=1, num_test=1))(scene())
    for split in (train, val, test):
        assert set(split.edge_label.unique().tolist()) <= {0.0, 1.0}  # PyG's link labels, not predicates
        assert split.edge_label_index.size(1) == split.edge_label.numel()
        assert split.edge_predicate.numel() == split.edge_index.size(1)


def test_compose_names_the_step_that_broke_the_relations():
    guarded = SceneGraphTransform.wrap(T.Compose([T.RemoveIsolatedNodes(), T.ToUndirected()]))
    with pytest.raises(ValueError, match=r"^ToUndirected\(\) changed"):
        guarded(scene())


def test_subgraph_and_edge_subgraph_carry_predicates():
    data = scene()
    sub = data.subgraph(torch.tensor([1, 2, 3]))
    assert labelled(sub) == Counter({(2, 3, 1): 1, (3, 4, 2): 1, (4, 3, 2): 1})
    edge_sub = data.edge_subgraph(torch.tensor([0, 5]))
    assert labelled(edge_sub) == Counter({(1, 2, 3): 1, (5, 6, 4): 1})


def test_coalesce_sorts_and_drops_duplicate_triplets_without_adding_ids():
    data = scene([(1, 0, 5), (0, 1, 3), (0, 1, 3), (0, 1, 4)], num_nodes=2)
    data.edge_weight = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out = data.coalesce()
    assert out.triplets().tolist() == [[0, 1, 3], [0, 1, 4], [1, 0, 5]]
    assert out.edge_weight.tolist() == pytest.approx([0.2, 0.4, 0.1])  # follows the first kept copy
    assert data.edge_index.size(1) == 4  # not in place


def test_batching_and_unbatching_keep_predicates():
    graphs = [scene(), symmetric()]
    batch = Batch.from_data_list(graphs)
    assert batch.edge_predicate.tolist() == [p for g in graphs for p in g.edge_predicate.tolist()]
    for original, example in zip(graphs, batch.to_data_list(), strict=True):
        assert labelled(example) == labelled(original)


def test_edge_label_is_a_deprecated_alias_of_edge_predicate():
    with pytest.warns(DeprecationWarning, match="'edge_predicate'"):
        data = SceneGraphData(
            y=torch.tensor([1, 2]), edge_index=torch.tensor([[0], [1]]), edge_label=torch.tensor([3])
        )
    assert "edge_label" not in data and data.edge_predicate.tolist() == [3]
    with pytest.warns(DeprecationWarning):
        assert data.edge_label.tolist() == [3]
    data.edge_label = torch.tensor([1.0])  # a link-level label set later is a field of its own
    assert data.edge_label.tolist() == [1.0] and data.edge_predicate.tolist() == [3]


def test_datasets_guard_their_transforms(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    graphs = [{"image_id": 1, "objects": [
        {"object_id": 1, "names": ["man"], "x": 0, "y": 0, "w": 10, "h": 20},
        {"object_id": 2, "names": ["horse"], "x": 5, "y": 10, "w": 30, "h": 20}],
        "relationships": [{"subject_id": 1, "object_id": 2, "predicate": "riding"}]}]  # fmt: skip
    (raw / "scene_graphs.json").write_text(__import__("json").dumps(graphs))
    ds = VisualGenomeSceneGraphs(str(tmp_path), transform=T.ToUndirected())
    with pytest.raises(ValueError, match=r"^ToUndirected\(\) changed"):
        ds[0]
    with pytest.raises(ValueError, match=r"^AddSelfLoops\(\) changed"):
        VisualGenomeSceneGraphs(str(tmp_path), pre_transform=T.AddSelfLoops(), force_reload=True)


def test_object_features_is_the_default_x():
    data = scene()
    del data.x
    out = ObjectFeatures(8)(data)
    assert out.x.shape == (7, 8 + 9)
    assert out.x[:, :8].argmax(-1).tolist() == data.y.tolist()
    assert ObjectFeatures(8, with_class=False)(data).x.shape == (7, 9)
    with pytest.raises(ValueError, match=r"'y' must lie in \[0, 5\)"):
        ObjectFeatures(5)(data)


def _utils_to_undirected(data):
    data.edge_index, data.edge_predicate = to_undirected(data.edge_index, data.edge_predicate)
    return data


def _utils_coalesce(data):
    data.edge_index, data.edge_predicate = coalesce(data.edge_index, data.edge_predicate)
    return data


@pytest.mark.parametrize(
    ("fn", "graph"),
    [(_utils_to_undirected, scene), (_utils_coalesce, with_duplicate_pair)],
    ids=["to_undirected", "coalesce"],
)
def test_a_transform_built_on_utils_to_undirected_or_coalesce_is_named(fn, graph):
    # torch_geometric.utils sums the attributes of merged pairs: (0 -> 1) gets 3 + 4, no input predicate
    with pytest.raises(ValueError, match=rf"^<function {fn.__name__} .* is not one of its input relations"):
        SceneGraphTransform(fn)(graph())
    unique_sorted = scene([(0, 1, 2), (2, 3, 1)], num_nodes=4)  # nothing to merge or reverse-add
    if fn is _utils_coalesce:
        assert labelled(SceneGraphTransform(fn)(unique_sorted)) == labelled(unique_sorted)
