from .synthetic import SyntheticSceneGraphs

__all__ = ["SyntheticSceneGraphs"]
