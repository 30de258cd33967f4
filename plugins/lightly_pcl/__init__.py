"""Prototypical Contrastive Learning (Li et al., ICLR 2021) for Lightly.

PCL [0] adds an EM loop to MoCo: the E-step clusters the momentum-encoder features of the whole training set
at several granularities (:class:`PrototypeClustering`), the M-step minimises :class:`ProtoNCELoss`, InfoNCE
plus a prototype term whose logits are scaled by each cluster's concentration. Everything is built from
Lightly blocks (``MoCoProjectionHead``, ``MemoryBankModule``, ``update_momentum``, ``knn_predict``) and trains
with ``pl.Trainer`` through :class:`PCLLightningModule`.

- [0] PCL, 2021, https://arxiv.org/abs/2005.04966
"""

from .concentration import concentration
from .indexed_dataset import IndexedDataset, IndexedSample, unpack_indexed_batch
from .kmeans import KMeansResult, faiss_available, faiss_gpu_available, kmeans
from .lightning_module import PCLLightningModule
from .pcl import PCL
from .proto_nce_loss import ProtoNCELoss
from .prototype_clustering import PrototypeClustering
from .prototypes import Prototypes, negative_prototype_columns, sample_negative_prototypes

__all__ = [
    "PCL",
    "IndexedDataset",
    "IndexedSample",
    "KMeansResult",
    "PCLLightningModule",
    "ProtoNCELoss",
    "PrototypeClustering",
    "Prototypes",
    "concentration",
    "faiss_available",
    "faiss_gpu_available",
    "kmeans",
    "negative_prototype_columns",
    "sample_negative_prototypes",
    "unpack_indexed_batch",
]
