"""Energy-based scene-graph learning for torch-geometric (Suhail et al., CVPR 2021, arXiv:2103.02221)."""

from .boxes import box_code, box_iou, cxcywh_to_xyxy, xywh_to_xyxy
from .data import SceneGraphData, first_predicate_per_pair
from .datasets import (
    VG150,
    BiasedSceneGraphs,
    CLEVRSceneGraphs,
    GQASceneGraphs,
    SyntheticSceneGraphs,
    VisualGenomeSceneGraphs,
    Vocabulary,
)
from .evaluator import SceneGraphEvaluator
from .graphs import (
    EBM_PAIRS_PER_IMAGE,
    all_pairs,
    negative_scene_graph,
    positive_scene_graph,
    sample_relation_pairs,
)
from .loss import EBMLoss
from .nn import EdgeGatedPooling, EGNNConv, GatedPooling, GraphEnergyModel, ImageGraphConv, RelationPredictor
from .recipe import scene_graph_losses
from .sgld import SGLDSampler, minmax_normalize
from .transforms import ObjectFeatures, SceneGraphTransform, check_relations

__all__ = [
    "EBM_PAIRS_PER_IMAGE",
    "VG150",
    "BiasedSceneGraphs",
    "CLEVRSceneGraphs",
    "EBMLoss",
    "EGNNConv",
    "EdgeGatedPooling",
    "GQASceneGraphs",
    "GatedPooling",
    "GraphEnergyModel",
    "ImageGraphConv",
    "ObjectFeatures",
    "RelationPredictor",
    "SGLDSampler",
    "SceneGraphData",
    "SceneGraphEvaluator",
    "SceneGraphTransform",
    "SyntheticSceneGraphs",
    "VisualGenomeSceneGraphs",
    "Vocabulary",
    "all_pairs",
    "box_code",
    "box_iou",
    "check_relations",
    "cxcywh_to_xyxy",
    "first_predicate_per_pair",
    "minmax_normalize",
    "negative_scene_graph",
    "positive_scene_graph",
    "sample_relation_pairs",
    "scene_graph_losses",
    "xywh_to_xyxy",
]
