"""Vision Transformers with Metadata Normalization on the pooled token, registered as ``mdn_vit_*`` in timm.

Paper: https://arxiv.org/abs/2104.09052. timm's own ``VisionTransformer``; :class:`~timm_mdn.MetadataNorm`
(channels last) sits after pooling and ``fc_norm``, before dropout and the classifier. ``mdn_sites="all"``
also adds MDN on the :math:`(B, N, C)` tokens after every LayerNorm (one regression per token element). timm's
ViT also accepts ``norm_layer=MetadataNorm`` to replace its LayerNorms.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ..kernel import MetadataKernel
from ._head import MdnSites, MetadataHeadMixin, build_mdn_model, default_cfg

__all__ = ["MetadataNormVisionTransformer"]


class MetadataNormVisionTransformer(MetadataHeadMixin, VisionTransformer):
    r"""timm's ``VisionTransformer`` with :class:`~timm_mdn.MetadataNorm` on the pre-logits.

    Args:
        *args: timm ``VisionTransformer`` arguments (``img_size``, ``patch_size``, ``num_classes``,
            ``embed_dim``, ``depth``, ``num_heads``, ``global_pool``, ``drop_rate``, ``norm_layer``, ...).
        mdn_kernel: the training-set :class:`~timm_mdn.MetadataKernel` (default: ``None``).
        mdn_momentum: momentum of the running :math:`\beta` (default: ``0.1``).
        mdn_sites: ``"head"`` or ``"all"`` (default: ``"head"``).
        mdn_validate_args: the MDN layers' ``validate_args`` (default: ``True``).
        **kwargs: more timm ``VisionTransformer`` arguments.
    """

    def __init__(
        self,
        *args: Any,
        mdn_kernel: MetadataKernel | None = None,
        mdn_momentum: float = 0.1,
        mdn_sites: MdnSites = "head",
        mdn_validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_metadata_norm(
            self.embed_dim, mdn_kernel, mdn_momentum, mdn_sites, validate_args=mdn_validate_args
        )

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Reset the classifier (timm's semantics); the head MDN keeps its kernel, its beta restarts."""
        super().reset_classifier(num_classes, global_pool)
        self._rebuild_metadata_norm(self.embed_dim, spatial=False)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, ``fc_norm``, remove the confounders' effect, dropout, classify."""
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.metadata_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> MetadataNormVisionTransformer:
    return build_mdn_model(  # type: ignore[return-value]
        MetadataNormVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        name: default_cfg(
            first_conv="patch_embed.proj",
            classifier="head",
            crop_pct=0.9,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            pool_size=None,
        )
        for name in ("mdn_vit_tiny_patch16_224", "mdn_vit_small_patch16_224")
    }
)


@register_model
def mdn_vit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> MetadataNormVisionTransformer:
    """ViT-Tiny/16 (timm ``vit_tiny_patch16_224``) with Metadata Normalization on the pre-logits."""
    model_args: dict[str, Any] = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create("mdn_vit_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def mdn_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> MetadataNormVisionTransformer:
    """ViT-Small/16 (timm ``vit_small_patch16_224``) with Metadata Normalization on the pre-logits."""
    model_args: dict[str, Any] = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create("mdn_vit_small_patch16_224", pretrained, **dict(model_args, **kwargs))
