"""ResNets with Metadata Normalization on the pooled features, registered as ``mdn_resnet*`` in timm.

Paper: https://arxiv.org/abs/2104.09052. ``timm.create_model("mdn_resnet18", mdn_kernel=kernel)`` builds
timm's own ``ResNet`` with one :class:`~timm_mdn.MetadataNorm` between global pooling and the classifier (the
paper's best placement, "MDN-Linear"); ``mdn_sites="all"`` also adds MDN after every BatchNorm ("MDN-Conv").
The parameter names are those of timm's ``resnet*``, so plain checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..kernel import MetadataKernel
from ._head import MdnSites, MetadataHeadMixin, build_mdn_model, default_cfg

__all__ = ["MetadataNormResNet"]


class MetadataNormResNet(MetadataHeadMixin, ResNet):
    r"""timm's ``ResNet`` with :class:`~timm_mdn.MetadataNorm` on the pre-logits.

    ``model(x, metadata=X_b)`` works out of the box (the model installs :class:`~timm_mdn.MetadataKwargHook`).

    Args:
        *args: timm ``ResNet`` arguments (``block``, ``layers``, ``num_classes``, ``in_chans``, ``drop_rate``,
            ``norm_layer``, ...).
        mdn_kernel: the training-set :class:`~timm_mdn.MetadataKernel` (default: ``None``, set it later with
            :func:`~timm_mdn.set_metadata_kernel`).
        mdn_momentum: momentum of the running :math:`\beta` (default: ``0.1``).
        mdn_sites: ``"head"`` (pre-logits only) or ``"all"`` (also after every norm layer) (default:
            ``"head"``).
        mdn_validate_args: the MDN layers' ``validate_args`` (default: ``True``).
        **kwargs: more timm ``ResNet`` arguments.
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
        spatial = not self.global_pool.pool_type
        self._init_metadata_norm(
            self.num_features,
            mdn_kernel,
            mdn_momentum,
            mdn_sites,
            spatial=spatial,
            validate_args=mdn_validate_args,
        )

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Reset the classifier (timm's semantics); a new head MDN matches the new pooling, kernel kept."""
        super().reset_classifier(num_classes, global_pool)
        self._rebuild_metadata_norm(self.num_features, spatial=not self.global_pool.pool_type)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, remove the confounders' effect, dropout, classify."""
        x = self.global_pool(x)
        x = self.metadata_norm(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> MetadataNormResNet:
    return build_mdn_model(MetadataNormResNet, variant, pretrained, **kwargs)  # type: ignore[return-value]


default_cfgs = generate_default_cfgs(
    {
        name: default_cfg(first_conv="conv1", classifier="fc", interpolation="bilinear")
        for name in ("mdn_resnet18", "mdn_resnet34", "mdn_resnet50")
    }
)


@register_model
def mdn_resnet18(pretrained: bool = False, **kwargs: Any) -> MetadataNormResNet:
    """ResNet-18 (timm ``resnet18``) with Metadata Normalization on the pooled features."""
    model_args: dict[str, Any] = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create("mdn_resnet18", pretrained, **dict(model_args, **kwargs))


@register_model
def mdn_resnet34(pretrained: bool = False, **kwargs: Any) -> MetadataNormResNet:
    """ResNet-34 (timm ``resnet34``) with Metadata Normalization on the pooled features."""
    model_args: dict[str, Any] = dict(block=BasicBlock, layers=(3, 4, 6, 3))
    return _create("mdn_resnet34", pretrained, **dict(model_args, **kwargs))


@register_model
def mdn_resnet50(pretrained: bool = False, **kwargs: Any) -> MetadataNormResNet:
    """ResNet-50 (timm ``resnet50``) with Metadata Normalization on the pooled features."""
    model_args: dict[str, Any] = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create("mdn_resnet50", pretrained, **dict(model_args, **kwargs))
