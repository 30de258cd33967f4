"""Energy-based scene-graph learning for torch-geometric (Suhail et al., CVPR 2021, arXiv:2103.02221)."""

from .boxes import box_code, box_iou, cxcywh_to_xyxy, xywh_to_xyxy
from .data import SceneGraphData
from .datasets import VG150, GQASceneGraphs, SyntheticSceneGraphs, VisualGenomeSceneGraphs, Vocabulary
from .evaluator import SceneGraphEvaluator
from .graphs import all_pairs, negative_scene_graph, positive_scene_graph, sample_relation_pairs
from .loss import EBMLoss
from .nn import EdgeGatedPooling, EGNNConv, GatedPooling, GraphEnergyModel, ImageGraphConv, RelationPredictor
from .recipe import scene_graph_losses
from .sgld import SGLDSampler, minmax_normalize

__all__ = [
    "VG150",
    "EBMLoss",
    "EGNNConv",
    "EdgeGatedPooling",
    "GQASceneGraphs",
    "GatedPooling",
    "GraphEnergyModel",
    "ImageGraphConv",
    "RelationPredictor",
    "SGLDSampler",
    "SceneGraphData",
    "SceneGraphEvaluator",
    "SyntheticSceneGraphs",
    "VisualGenomeSceneGraphs",
    "Vocabulary",
    "all_pairs",
    "box_code",
    "box_iou",
    "cxcywh_to_xyxy",
    "minmax_normalize",
    "negative_scene_graph",
    "positive_scene_graph",
    "sample_relation_pairs",
    "scene_graph_losses",
    "xywh_to_xyxy",
]
