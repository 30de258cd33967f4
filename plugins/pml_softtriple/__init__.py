"""SoftTriple loss (Qian et al., ICCV 2019) for pytorch-metric-learning.

``from pml_softtriple import SoftTripleLoss`` is a drop-in replacement for PML's loss of the same name, with
the paper's centre regulariser on by default, a fused and fast implementation, and fp32 compute under
autocast. Paper: https://arxiv.org/abs/1909.05235
"""

from .accuracy import RecallAtKAccuracyCalculator
from .centers import effective_center_counts
from .functional import soft_triple_losses, soft_triple_similarity
from .optim import param_groups
from .soft_triple_loss import SoftTripleLoss
from .sparse_centers_regularizer import SparseCentersRegularizer

__all__ = [
    "RecallAtKAccuracyCalculator",
    "SoftTripleLoss",
    "SparseCentersRegularizer",
    "effective_center_counts",
    "param_groups",
    "soft_triple_losses",
    "soft_triple_similarity",
]
