"""The small metadata problem most timm_mdn tests share: a binary label and a confounder shifted by it."""

from __future__ import annotations

import torch
from timm_mdn import MetadataKernel

__all__ = ["toy_kernel"]


def toy_kernel(n: int = 40) -> tuple[MetadataKernel, torch.Tensor]:
    """The kernel of X = [label, cf, 1] over ``n`` samples (cf ~ U(0, 1) + label), and that X."""
    g = torch.Generator().manual_seed(0)
    y = (torch.arange(n) % 2).float()
    cf = torch.rand(n, generator=g) + y
    kernel = MetadataKernel.from_columns(confounders=cf, labels=y)
    return kernel, kernel.design(cf, y)
