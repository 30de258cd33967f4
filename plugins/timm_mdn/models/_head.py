"""What the registered ``mdn_*`` models share: MDN on the pre-logits, optionally after every trunk norm layer.

These are the paper's "MDN-Linear" and "MDN-Conv" placements (https://arxiv.org/abs/2104.09052).
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from ..convert import convert_metadata_norm, is_norm_layer
from ..kernel import MetadataKernel
from ..metadata import enable_metadata_kwarg, set_metadata_kernel
from ..metadata_norm import MetadataNorm, MetadataNorm2d, MetadataNormBase

__all__ = ["MdnSites", "MetadataHeadMixin", "default_cfg", "reject_pretrained"]

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


def _trunk_norm(name: str, module: nn.Module) -> bool:
    # The head's own norms (ConvNeXt's head.norm, ViT's fc_norm) see the pooled features, already covered.
    return is_norm_layer(module) and not name.startswith(("head", "fc_norm"))


class MetadataHeadMixin(nn.Module):
    """Adds ``self.metadata_norm`` (MDN on the pre-logits); ``sites="all"`` adds MDN after trunk norms too."""

    metadata_norm: MetadataNormBase
    mdn_sites: str

    def _init_metadata_norm(
        self, width: int, kernel: MetadataKernel | None, momentum: float, sites: MdnSites
    ) -> None:
        if sites not in ("head", "all"):
            raise ValueError(f"mdn_sites must be 'head' or 'all', got {sites!r}")
        self.mdn_sites = sites
        if sites == "all":
            convert_metadata_norm(self, kernel, layers=_trunk_norm, mode="after", momentum=momentum)
        reference = next(self.parameters())
        self.metadata_norm = MetadataNorm(
            width, momentum=momentum, device=reference.device, dtype=reference.dtype
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
        new.metadata = old.metadata
        new.train(old.training)
        self.metadata_norm = new
