"""Disentangled-VAE for generalized zero-shot learning (Li et al., AAAI 2021) and its CADA-VAE baseline.

Paper: "Generalized Zero-Shot Learning via Disentangled Representation", Xiangyu Li, Zhe Xu, Kun Wei, Cheng
    Deng,
AAAI 2021, https://ojs.aaai.org/index.php/AAAI/article/view/16292. Baseline: "Generalized Zero- and Few-Shot
Learning via Aligned Variational Autoencoders", Schonfeld et al., CVPR 2019, https://arxiv.org/abs/1812.01784.
"""

from .cada_vae import CADAVAE
from .data import GZSLData, carve_validation_split
from .disentangled_vae import DisentangledVAE
from .estimator import GZSLClassifier
from .features import extract_features, image_folder
from .final_classifier import (
    ClassifierProtocol,
    build_classifier_training_set,
    encode_mean,
    train_softmax_classifier,
)
from .kl_loss import GaussianKLLoss
from .metrics import GZSLScores, evaluate_gzsl, harmonic_mean
from .mlp import GaussianMLPEncoder, MLPDecoder, reparameterize
from .reconstruction_loss import ReconstructionLoss
from .shuffling_classification_loss import ShufflingClassificationLoss
from .training import train_vae
from .warmup import LinearWarmup
from .wasserstein_loss import GaussianWassersteinLoss
from .xlsa17 import AttSplits, load_att_splits, load_xlsa17

__all__ = [
    "CADAVAE",
    "AttSplits",
    "ClassifierProtocol",
    "DisentangledVAE",
    "GZSLClassifier",
    "GZSLData",
    "GZSLScores",
    "GaussianKLLoss",
    "GaussianMLPEncoder",
    "GaussianWassersteinLoss",
    "LinearWarmup",
    "MLPDecoder",
    "ReconstructionLoss",
    "ShufflingClassificationLoss",
    "build_classifier_training_set",
    "carve_validation_split",
    "encode_mean",
    "evaluate_gzsl",
    "extract_features",
    "harmonic_mean",
    "image_folder",
    "load_att_splits",
    "load_xlsa17",
    "reparameterize",
    "train_softmax_classifier",
    "train_vae",
]

__version__ = "0.1.0"
