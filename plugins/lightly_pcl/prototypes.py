r"""The E-step's output for one batch and the uniform sampler of negative prototypes.

PCL [0] keeps ``M`` clusterings of the training set. For a batch, each clustering contributes the cluster of
every sample (its positive prototype), the L2-normalised centroids and the per-cluster concentration
:math:`\phi`. :class:`Prototypes` carries exactly that to :class:`~lightly_pcl.ProtoNCELoss`.

- [0] PCL, 2021, https://arxiv.org/abs/2005.04966
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Prototypes", "negative_prototype_columns", "sample_negative_prototypes"]


class Prototypes(NamedTuple):
    r"""Prototypes of ``M`` clusterings, looked up for one batch.

    Attributes:
        labels: Cluster index of each sample in each clustering. Shape ``(M, B)``, integer.
        centroids: ``M`` tensors of shape ``(K_m, D)``, the L2-normalised centroids :math:`c^m`.
        concentrations: ``M`` tensors of shape ``(K_m,)``, the concentrations :math:`\phi^m > 0`.
        temperature: The mean :math:`\tau` the concentrations were rescaled to, or ``None`` when unknown
            (prototypes made by hand). :class:`~lightly_pcl.PrototypeClustering` sets it, and
            :class:`~lightly_pcl.ProtoNCELoss` refuses prototypes whose :math:`\tau` is not its own
            instance temperature: the official code has one temperature for both.
    """

    labels: Tensor
    centroids: Sequence[Tensor]
    concentrations: Sequence[Tensor]
    temperature: float | None = None

    @property
    def num_clusterings(self) -> int:
        """The number of clusterings ``M``."""
        return len(self.centroids)


def sample_negative_prototypes(
    excluded: Tensor,
    num_negatives: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample cluster indices uniformly without replacement from the clusters that are not excluded.

    The official code draws ``r`` negatives with ``random.sample`` from the set of clusters that are no
    sample's positive in the batch. Here the same distribution comes from one ``torch.randperm`` of all ``K``
    clusters filtered by the mask: the first ``r`` allowed entries of a uniform permutation are a uniform
    ``r``-subset. ``randperm(K)`` consumes the generator identically whatever the mask, so ranks that share a
    generator state stay in step.

    Args:
        excluded: Boolean mask of shape ``(K,)``; ``True`` marks clusters that must not be drawn (the
            positives of the batch).
        num_negatives: The number ``r`` of negatives. If fewer than ``r`` clusters are allowed, all of them
            are returned (in random order).
        generator: The random generator (CPU). ``None`` uses torch's global generator.

    Returns:
        Long tensor of shape ``(min(r, K - |excluded|),)`` with distinct cluster indices, on ``excluded``'s
        device.

    Raises:
        ValueError: If ``excluded`` is not a 1-D boolean tensor or ``num_negatives`` is negative.
    """
    columns, valid = negative_prototype_columns(excluded, num_negatives, generator)
    return columns[valid]


def negative_prototype_columns(
    excluded: Tensor,
    num_negatives: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The draw of :func:`sample_negative_prototypes` as a fixed number of columns and a validity mask.

    The number of allowed clusters depends on the data, so returning exactly them needs a host-device
    synchronisation. This form returns ``min(r, K)`` columns, the allowed clusters first in permutation order
    (the same draw, in the same order, as :func:`sample_negative_prototypes`), and ``valid`` marks which of
    them are allowed; the loss masks the others. The permutation is drawn on the generator's device (CPU) and
    copied to ``excluded``'s device: nothing waits for the device.

    Args:
        excluded: Boolean mask ``(K,)`` of the clusters that must not be drawn.
        num_negatives: The number ``r`` of negatives.
        generator: The random generator (CPU). ``None`` uses torch's global generator.

    Returns:
        ``(columns, valid)``: long ``(min(r, K),)`` cluster indices and their boolean mask, on ``excluded``'s
        device.

    Raises:
        ValueError: If ``excluded`` is not a 1-D boolean tensor or ``num_negatives`` is negative.
    """
    if excluded.dim() != 1 or excluded.dtype != torch.bool:
        raise ValueError(
            f"excluded must be a 1-D boolean mask over clusters, got dtype {excluded.dtype} and shape "
            f"{tuple(excluded.shape)}"
        )
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    num_clusters = excluded.shape[0]
    permutation = torch.randperm(num_clusters, generator=generator).to(excluded.device, non_blocking=True)
    # rank in the permutation, pushed behind every allowed cluster when excluded
    order = torch.arange(num_clusters, device=excluded.device) + excluded[permutation].long() * num_clusters
    first = torch.topk(order, min(num_negatives, num_clusters), largest=False, sorted=True).indices
    columns = permutation[first]
    return columns, ~excluded[columns]
