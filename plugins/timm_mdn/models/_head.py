"""What the registered ``mdn_*`` models share: MDN on the pre-logits, optionally after every trunk norm layer.

These are the paper's "MDN-Linear" and "MDN-Conv" placements (https://arxiv.org/abs/2104.09052).
"""

from __future__ import annotations

from typing import Any, Literal

from timm.models import build_model_with_cfg
from torch import nn

from ..convert import convert_metadata_norm, is_norm_layer
from ..kernel import MetadataKernel
from ..metadata import MetadataKwargHook, enable_metadata_kwarg, set_metadata_kernel
from ..metadata_norm import MetadataNorm, MetadataNorm2d, MetadataNormBase

__all__ = ["MdnSites", "MetadataHeadMixin", "build_mdn_model", "default_cfg", "reject_pretrained"]

MdnSites = Literal["head", "all"]


def reject_pretrained(pretrained: bool, variant: str) -> None:
    """MDN models have no published weights; say how to start from a plain timm checkpoint instead."""
    if pretrained:
        raise ValueError(
            f"{variant} has no pretrained weights. Build it with pretrained=False and load a plain timm "
            f"checkpoint with model.load_state_dict(state_dict, strict=True): MDN adds no parameters"
        )


def default_cfg(**kwargs: Any) -> dict[str, Any]:
    """A timm pretrained-cfg dict without weights (nothing is ever downloaded)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "paper_ids": "arXiv:2104.09052",
        "paper_name": "Metadata Normalization",
        "license": "apache-2.0",
        **kwargs,
    }


def build_mdn_model(model_cls: type[nn.Module], variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """Build with timm's ``build_model_with_cfg``, with ``features_only`` taking metadata too.

    A feature extractor has no head, so it keeps MDN only where ``mdn_sites="all"`` puts it (after every trunk
    norm layer, and every ``norm_layer=`` MDN); it takes ``model(x, metadata=X_b)`` like the full model.

    Raises:
        ValueError: for ``features_only=True`` with no MDN left in the trunk (``mdn_sites="head"`` and no MDN
            ``norm_layer``): the extractor would silently be a plain model.
    """
    reject_pretrained(pretrained, variant)
    model: nn.Module = build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    if kwargs.get("features_only"):
        from ..metadata import metadata_norm_layers

        if not metadata_norm_layers(model):
            raise ValueError(
                f"{variant}(features_only=True) has no MetadataNorm left: mdn_sites='head' puts it on the "
                "pooled pre-logits, which a feature extractor drops; pass mdn_sites='all' (MDN after every "
                "trunk norm layer) or norm_layer=MetadataNorm2d"
            )
        enable_metadata_kwarg(model)
    return model


def _trunk_norm(name: str, module: nn.Module) -> bool:
    # The head's own norms (ConvNeXt's head.norm, ViT's fc_norm) see the pooled features, already covered.
    return is_norm_layer(module) and not name.startswith(("head", "fc_norm"))


class MetadataHeadMixin(nn.Module):
    """Adds ``self.metadata_norm`` (MDN on the pre-logits); ``sites="all"`` adds MDN after trunk norms too."""

    metadata_norm: MetadataNormBase
    mdn_sites: str

    def _init_metadata_norm(
        self,
        width: int,
        kernel: MetadataKernel | None,
        momentum: float,
        sites: MdnSites,
        spatial: bool = False,
        validate_args: bool = True,
    ) -> None:
        if sites not in ("head", "all"):
            raise ValueError(f"mdn_sites must be 'head' or 'all', got {sites!r}")
        self.mdn_sites = sites
        if sites == "all":
            convert_metadata_norm(
                self, kernel, layers=_trunk_norm, mode="after", momentum=momentum, validate_args=validate_args
            )
        reference = next(self.parameters())
        cls = MetadataNorm2d if spatial else MetadataNorm  # no pooling (global_pool=""): a feature map
        self.metadata_norm = cls(
            width,
            momentum=momentum,
            validate_args=validate_args,
            device=reference.device,
            dtype=reference.dtype,
        )
        if kernel is not None:  # also reaches MDN layers injected with norm_layer=...
            set_metadata_kernel(self, kernel)
        enable_metadata_kwarg(self)

    def _rebuild_metadata_norm(self, width: int, spatial: bool) -> None:
        """After ``reset_classifier``: a fresh head MDN for the new pre-logit layout, keeping the kernel."""
        old = self.metadata_norm
        cls = MetadataNorm2d if spatial else MetadataNorm
        new = cls(
            width, momentum=old.momentum, device=old.moment_inverse.device, dtype=old.running_beta.dtype
        )
        new.copy_kernel_from(old)
        new.validate_args = old.validate_args
        new.metadata = old.metadata
        new.train(old.training)
        self.metadata_norm = new

    def forward_intermediates(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Run timm's ``forward_intermediates``, also taking ``metadata=X_b`` as ``forward`` does."""
        for hook in list(self._forward_pre_hooks.values()):
            if isinstance(hook, MetadataKwargHook):
                _, kwargs = hook(self, (x, *args), kwargs)
        return super().forward_intermediates(x, *args, **kwargs)  # type: ignore[misc]
