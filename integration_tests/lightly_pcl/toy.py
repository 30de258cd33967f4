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


def tiny_module(
    seed: int = 0,
    pcl: bool = True,
    num_samples: int = 32,
    batch_norm: bool = True,
    cluster_batch_size: int = 16,
    **overrides,
):
    """A ``PCLLightningModule`` on the tiny backbone (bank 16, r = 4, K = (4, 8), warm-up 1 epoch)."""
    from lightly_pcl import IndexedDataset, PCLLightningModule
    from torch.utils.data import DataLoader

    torch.manual_seed(seed)
    kwargs = dict(
        backbone=tiny_backbone(batch_norm),
        input_dim=16,
        hidden_dim=16,
        output_dim=8,
        memory_bank_size=16,
        num_negative_prototypes=4,
        num_clusters=(4, 8) if pcl else (),
        warmup_epochs=1,
        lr=0.05,
        ema_momentum=0.9,
        loss_kwargs={"seed": seed},
    )
    if pcl:
        kwargs["clustering_kwargs"] = dict(
            num_redo=1, min_points_per_centroid=1, backend="torch", progress=False
        )
        kwargs["cluster_dataloader"] = DataLoader(
            IndexedDataset(TwoViewToy(num_samples, eval_view=True)), batch_size=cluster_batch_size
        )
    kwargs.update(overrides)
    return PCLLightningModule(**kwargs)
