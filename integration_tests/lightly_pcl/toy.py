"""Tiny seeded data and models shared by the lightly_pcl tests (CPU, a few dozen samples)."""

from __future__ import annotations

import torch
from lightly_pcl import PCL
from torch import Tensor, nn
from torch.utils.data import Dataset

IMAGE = (1, 6, 6)


def blobs(
    num_per_blob: int = 10, num_blobs: int = 4, dim: int = 8, spread: float = 0.05, seed: int = 0
) -> Tensor:
    """Unit vectors around ``num_blobs`` well separated directions, blob by blob."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_blobs, dim, generator=g), dim=1) * 3
    points = centres.repeat_interleave(num_per_blob, 0) + spread * torch.randn(
        num_blobs * num_per_blob, dim, generator=g
    )
    return torch.nn.functional.normalize(points, dim=1)


class TwoViewToy(Dataset):
    """``((view_a, view_b), target)``: two fixed noisy views per image, deterministic by index.

    ``num_classes`` image prototypes plus noise, so clusters exist; no global RNG is touched, so a resumed
    Trainer sees exactly the data of an uninterrupted one.
    """

    def __init__(
        self, num_samples: int = 32, num_classes: int = 4, seed: int = 0, eval_view: bool = False
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(num_classes, *IMAGE, generator=g)
        self.targets = torch.arange(num_samples) % num_classes
        self.images = base[self.targets] + 0.3 * torch.randn(num_samples, *IMAGE, generator=g)
        self.noise = 0.1 * torch.randn(2, num_samples, *IMAGE, generator=g)
        self.eval_view = eval_view

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        if self.eval_view:
            return self.images[i], int(self.targets[i])
        return (self.images[i] + self.noise[0, i], self.images[i] + self.noise[1, i]), int(self.targets[i])


def tiny_backbone(batch_norm: bool = True) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(1, 4, 3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()]
    return nn.Sequential(*layers)


def tiny_pcl(seed: int = 0, batch_norm: bool = True, output_dim: int = 8) -> PCL:
    torch.manual_seed(seed)
    return PCL(tiny_backbone(batch_norm), input_dim=16, hidden_dim=16, output_dim=output_dim)
