"""ConvNeXts with Metadata Normalization on the pre-logits, registered as ``mdn_convnext_*`` in timm.

Paper: https://arxiv.org/abs/2104.09052. timm's own ``ConvNeXt``; :class:`~timm_mdn.MetadataNorm` sits after
the head's pooling + LayerNorm, before dropout and the classifier. ``mdn_sites="all"`` also adds MDN after
every norm layer. To *replace* the norm layers instead, timm accepts ``norm_layer=MetadataNorm2d`` with
``conv_mlp=True`` (every ``mdn_convnext_*`` here uses ``conv_mlp=True``, as timm's atto..nano do).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt, checkpoint_filter_fn

from ..kernel import MetadataKernel
from ._head import MdnSites, MetadataHeadMixin, build_mdn_model, default_cfg

__all__ = ["MetadataNormConvNeXt"]


class MetadataNormConvNeXt(MetadataHeadMixin, ConvNeXt):
    r"""timm's ``ConvNeXt`` with :class:`~timm_mdn.MetadataNorm` on the pre-logits.

    ``model(x, metadata=X_b)`` works out of the box (the model installs :class:`~timm_mdn.MetadataKwargHook`).

    Args:
        *args: timm ``ConvNeXt`` arguments (``in_chans``, ``num_classes``, ``depths``, ``dims``,
            ``drop_rate``, ``norm_layer``, ``conv_mlp``, ...).
        mdn_kernel: the training-set :class:`~timm_mdn.MetadataKernel` (default: ``None``).
        mdn_momentum: momentum of the running :math:`\beta` (default: ``0.1``).
        mdn_sites: ``"head"`` or ``"all"`` (default: ``"head"``).
        mdn_validate_args: the MDN layers' ``validate_args`` (default: ``True``).
        **kwargs: more timm ``ConvNeXt`` arguments.

    Raises:
        ValueError: if the head is not timm's ``NormMlpClassifierHead`` (``head_norm_first=True``).
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
        if not hasattr(self.head, "pre_logits"):
            raise ValueError(
                "MetadataNormConvNeXt needs head_norm_first=False (timm's NormMlpClassifierHead)"
            )
        spatial = not self.head.global_pool.pool_type
        self._init_metadata_norm(
            self.head_hidden_size,
            mdn_kernel,
            mdn_momentum,
            mdn_sites,
            spatial=spatial,
            validate_args=mdn_validate_args,
        )

    def reset_classifier(
        self, num_classes: int, global_pool: str | None = None, reset_other: bool = False
    ) -> None:
        """Reset the classifier (timm's semantics); a new head MDN matches the new pooling, kernel kept."""
        super().reset_classifier(num_classes, global_pool, reset_other=reset_other)
        spatial = not self.head.global_pool.pool_type
        self._rebuild_metadata_norm(self.head_hidden_size, spatial=spatial)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, LayerNorm, remove the confounders' effect, dropout, classify."""
        head: Any = self.head
        x = head.global_pool(x)
        x = head.norm(x)
        x = head.flatten(x)
        x = head.pre_logits(x)
        x = self.metadata_norm(x)
        x = head.drop(x)
        return x if pre_logits else head.fc(x)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> MetadataNormConvNeXt:
    return build_mdn_model(  # type: ignore[return-value]
        MetadataNormConvNeXt,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        name: default_cfg(first_conv="stem.0", classifier="head.fc")
        for name in ("mdn_convnext_atto", "mdn_convnext_femto", "mdn_convnext_nano")
    }
)


@register_model
def mdn_convnext_atto(pretrained: bool = False, **kwargs: Any) -> MetadataNormConvNeXt:
    """ConvNeXt-Atto (timm ``convnext_atto``) with Metadata Normalization on the pre-logits."""
    model_args: dict[str, Any] = dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), conv_mlp=True)
    return _create("mdn_convnext_atto", pretrained, **dict(model_args, **kwargs))


@register_model
def mdn_convnext_femto(pretrained: bool = False, **kwargs: Any) -> MetadataNormConvNeXt:
    """ConvNeXt-Femto (timm ``convnext_femto``) with Metadata Normalization on the pre-logits."""
    model_args: dict[str, Any] = dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384), conv_mlp=True)
    return _create("mdn_convnext_femto", pretrained, **dict(model_args, **kwargs))


@register_model
def mdn_convnext_nano(pretrained: bool = False, **kwargs: Any) -> MetadataNormConvNeXt:
    """ConvNeXt-Nano (timm ``convnext_nano``) with Metadata Normalization on the pre-logits."""
    model_args: dict[str, Any] = dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), conv_mlp=True)
    return _create("mdn_convnext_nano", pretrained, **dict(model_args, **kwargs))
