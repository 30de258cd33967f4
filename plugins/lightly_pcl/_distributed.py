"""Small ``torch.distributed`` helpers shared by the clustering and the loss (internal)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_variable",
    "all_gather_with_sizes",
    "broadcast_",
    "is_distributed",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of ranks, 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """The rank of this process, 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def all_gather_variable(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, allowing a different length per rank.

    Not differentiable: used for features, indices and labels only. Ranks are concatenated in rank order.
    """
    return all_gather_with_sizes(tensor)[0]


def all_gather_with_sizes(tensor: Tensor) -> tuple[Tensor, list[int]]:
    """Like :func:`all_gather_variable`, and also return each rank's length along dim 0."""
    if not is_distributed():
        return tensor, [tensor.shape[0]]
    length = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    lengths = [torch.zeros_like(length) for _ in range(world_size())]
    dist.all_gather(lengths, length)
    sizes = [int(n.item()) for n in lengths]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(gathered, sizes, strict=True)], dim=0), sizes


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s copy (no-op without a process group)."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor
