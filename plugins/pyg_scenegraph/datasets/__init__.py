from .biased import BiasedSceneGraphs
from .clevr import CLEVRSceneGraphs
from .raw_json import GQASceneGraphs, VisualGenomeSceneGraphs
from .synthetic import SyntheticSceneGraphs
from .vg150 import VG150
from .vocabulary import Vocabulary, encode_scene, normalize_name

__all__ = [
    "VG150",
    "BiasedSceneGraphs",
    "CLEVRSceneGraphs",
    "GQASceneGraphs",
    "SyntheticSceneGraphs",
    "VisualGenomeSceneGraphs",
    "Vocabulary",
    "encode_scene",
    "normalize_name",
]
