"""Offline loaders for the SoftTriple paper's benchmarks, with their class-disjoint splits."""

from ._base import RetrievalFolderDataset
from .cars196 import Cars196
from .cub import CUB
from .sop import StanfordOnlineProducts

__all__ = ["CUB", "Cars196", "RetrievalFolderDataset", "StanfordOnlineProducts"]
