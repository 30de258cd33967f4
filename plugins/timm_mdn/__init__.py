"""Metadata Normalization (Lu et al., CVPR 2021, https://arxiv.org/abs/2104.09052) as a timm norm layer.

Importing this package registers the ``mdn_*`` models with ``timm.create_model``.
"""

from . import models
from .convert import ApplyMetadataNorm, convert_metadata_norm, is_norm_layer, metadata_norm_for
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

__all__ = [
    "ApplyMetadataNorm",
    "MetadataKernel",
    "MetadataKwargHook",
    "MetadataNorm",
    "MetadataNorm1d",
    "MetadataNorm2d",
    "MetadataNormBase",
    "MetadataNormConvNeXt",
    "MetadataNormResNet",
    "MetadataNormVisionTransformer",
    "convert_metadata_norm",
    "distance_correlation_sqr",
    "enable_metadata_kwarg",
    "is_norm_layer",
    "metadata_context",
    "metadata_norm",
    "metadata_norm_for",
    "metadata_norm_layers",
    "metadata_residual",
    "models",
    "set_metadata",
    "set_metadata_kernel",
    "u_distance_covariance_sqr",
]
