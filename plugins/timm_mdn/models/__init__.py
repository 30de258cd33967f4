"""timm models with Metadata Normalization, registered on import (prefixed ``mdn_``: no timm name clashes)."""

from .convnext import MetadataNormConvNeXt
from .resnet import MetadataNormResNet
from .vision_transformer import MetadataNormVisionTransformer

__all__ = ["MetadataNormConvNeXt", "MetadataNormResNet", "MetadataNormVisionTransformer"]
