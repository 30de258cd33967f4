from .egnn_conv import EGNNConv
from .energy_model import GraphEnergyModel
from .image_graph_conv import ImageGraphConv
from .pooling import EdgeGatedPooling, GatedPooling
from .relation_predictor import RelationPredictor

__all__ = [
    "EGNNConv",
    "EdgeGatedPooling",
    "GatedPooling",
    "GraphEnergyModel",
    "ImageGraphConv",
    "RelationPredictor",
]
