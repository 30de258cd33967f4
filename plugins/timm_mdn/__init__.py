"""Metadata Normalization (Lu et al., CVPR 2021, https://arxiv.org/abs/2104.09052) as a timm norm layer.

Importing this package registers the ``mdn_*`` models with ``timm.create_model`` and the MDN layers with
timm's norm and norm-act factories (``norm_layer=MetadataNorm2d`` in EfficientNet, MobileNetV3, RegNet).
"""

from . import models
from .convert import ApplyMetadataNorm, convert_metadata_norm, is_norm_layer, metadata_norm_for
from .data import (
    MetadataCollate,
    MetadataDataset,
    MetadataPrefetchLoader,
    MetadataTable,
    create_metadata_loader,
)
from .distance_correlation import distance_correlation_sqr, u_distance_covariance_sqr
from .functional import metadata_norm, metadata_residual
from .kernel import MetadataKernel
from .metadata import (
    MetadataKwargHook,
    enable_metadata_kwarg,
    metadata_context,
    metadata_norm_layers,
    set_metadata,
    set_metadata_kernel,
)
from .metadata_norm import MetadataNorm, MetadataNorm1d, MetadataNorm2d, MetadataNormBase
from .models import MetadataNormConvNeXt, MetadataNormResNet, MetadataNormVisionTransformer
from .norm_act import MetadataNormAct2d, register_with_timm
from .weights import load_weights, plain_state_dict

__all__ = [
    "ApplyMetadataNorm",
    "MetadataCollate",
    "MetadataDataset",
    "MetadataKernel",
    "MetadataKwargHook",
    "MetadataNorm",
    "MetadataNorm1d",
    "MetadataNorm2d",
    "MetadataNormAct2d",
    "MetadataNormBase",
    "MetadataNormConvNeXt",
    "MetadataNormResNet",
    "MetadataNormVisionTransformer",
    "MetadataPrefetchLoader",
    "MetadataTable",
    "convert_metadata_norm",
    "create_metadata_loader",
    "distance_correlation_sqr",
    "enable_metadata_kwarg",
    "is_norm_layer",
    "load_weights",
    "metadata_context",
    "metadata_norm",
    "metadata_norm_for",
    "metadata_norm_layers",
    "metadata_residual",
    "models",
    "plain_state_dict",
    "register_with_timm",
    "set_metadata",
    "set_metadata_kernel",
    "u_distance_covariance_sqr",
]

register_with_timm()
