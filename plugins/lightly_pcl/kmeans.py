r"""Seedable k-means for the E-step: faiss (on the GPU when it has GPU support) or a pure-torch Lloyd loop.

Both backends follow ``faiss.Clustering`` as PCL [0] configures it: Euclidean k-means on the (unit) feature
vectors, ``num_iters`` Lloyd iterations from ``K`` distinct random points, ``num_redo`` restarts keeping the
lowest objective :math:`\sum_i \lVert x_i - \mu_{a_i}\rVert^2`, at most ``max_points_per_centroid * K``
training points (a seeded subsample beyond that), empty clusters re-seeded by splitting a large one. The final
assignment and the L2 distances :math:`D_i = \lVert x_i - \mu_{a_i}\rVert` of every point use the trained
(un-normalised) centroids, as the official code does before it normalises them.

- [0] PCL, 2021, https://arxiv.org/abs/2005.04966
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["KMeansResult", "faiss_available", "faiss_gpu_available", "kmeans"]

Backend = Literal["auto", "faiss", "torch"]
_SPLIT_EPS = 1.0 / 1024.0
_CHUNK = 8192


class KMeansResult(NamedTuple):
    """Result of :func:`kmeans`.

    The tensors are on the device of the points.

    Attributes:
        centroids: ``(K, D)`` float32, the trained centroids (not normalised).
        assignments: ``(N,)`` long, index of the nearest centroid of every point.
        distances: ``(N,)`` float32, L2 (not squared) distance of every point to its centroid.
        objective: Sum of squared distances of all ``N`` points to their centroids.
    """

    centroids: Tensor
    assignments: Tensor
    distances: Tensor
    objective: float


def faiss_available() -> bool:
    """Whether the optional ``faiss`` package (the ``graftkit[faiss]`` extra) can be imported."""
    return importlib.util.find_spec("faiss") is not None


def faiss_gpu_available() -> bool:
    """Whether the installed faiss has GPU support and sees a GPU (``faiss-gpu`` builds)."""
    if not faiss_available():
        return False
    import faiss  # optional extra

    return hasattr(faiss, "StandardGpuResources") and int(faiss.get_num_gpus()) > 0


def kmeans(
    x: Tensor,
    num_clusters: int,
    num_iters: int = 20,
    num_redo: int = 5,
    seed: int = 0,
    max_points_per_centroid: int = 1000,
    min_points_per_centroid: int = 10,
    backend: Backend = "auto",
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``num_clusters`` groups.

    Args:
        x: Points, shape ``(N, D)``; any float dtype and device. Clustering runs in float32 on ``x``'s
            device: with faiss on a GPU when ``x`` is on CUDA and faiss has GPU support, else with the
            torch loop on that device; CPU points use faiss when installed.
        num_clusters: ``K``, with ``1 <= K <= N``.
        num_iters: Lloyd iterations per restart (default: ``20``, PCL's ``niter``).
        num_redo: Restarts; the lowest objective wins (default: ``5``, PCL's ``nredo``).
        seed: Seed; the same seed gives the same result (default: ``0``; PCL uses the clustering's index).
        max_points_per_centroid: Train on a seeded subsample of at most ``K`` times this many points
            (default: ``1000``).
        min_points_per_centroid: Warn when there are fewer than ``K`` times this many points
            (default: ``10``).
        backend: ``"faiss"``, ``"torch"`` or ``"auto"`` (default): faiss for CPU points when importable,
            faiss on the GPU for CUDA points when faiss has GPU support, otherwise torch on the points'
            device. ``"faiss"`` with CUDA points and a CPU-only faiss copies them to the host.

    Returns:
        :class:`KMeansResult` with tensors on ``x``'s device.

    Raises:
        ValueError: If ``x`` is not a finite 2-D float tensor, ``num_clusters`` is not in ``[1, N]``, an
            iteration count is below 1, or ``backend`` is unknown.
        ImportError: If ``backend="faiss"`` and faiss is not installed.
    """
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(
            f"x must be a 2-D float tensor (N, D), got dtype {x.dtype} and shape {tuple(x.shape)}"
        )
    num_points = x.shape[0]
    if not 1 <= num_clusters <= num_points:
        raise ValueError(f"num_clusters must be in [1, N={num_points}], got {num_clusters}")
    if num_iters < 1 or num_redo < 1:
        raise ValueError(f"num_iters and num_redo must be >= 1, got {num_iters} and {num_redo}")
    if max_points_per_centroid < 1:
        raise ValueError(f"max_points_per_centroid must be >= 1, got {max_points_per_centroid}")
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
    points = x.detach().to(torch.float32).contiguous()
    if not bool(torch.isfinite(points).all()):
        raise ValueError("x contains non-finite values (nan or inf); expected finite features")
    if num_points < num_clusters * min_points_per_centroid:
        warnings.warn(
            f"k-means of {num_points} points into {num_clusters} clusters: fewer than "
            f"min_points_per_centroid={min_points_per_centroid} points per cluster",
            stacklevel=2,
        )
    on_gpu = points.is_cuda and faiss_gpu_available()
    if backend == "auto":
        use_faiss = on_gpu or (not points.is_cuda and faiss_available())
    else:
        use_faiss = backend == "faiss"
    args = (num_clusters, num_iters, num_redo, seed, max_points_per_centroid)
    if not use_faiss:
        return _kmeans_torch(points, *args)
    return _kmeans_faiss(points, *args, gpu=on_gpu)


def _kmeans_faiss(
    points: Tensor,
    num_clusters: int,
    num_iters: int,
    num_redo: int,
    seed: int,
    max_points: int,
    gpu: bool = False,
) -> KMeansResult:
    import faiss  # optional extra

    array = points.cpu().numpy()
    dim = array.shape[1]
    clustering = faiss.Clustering(dim, num_clusters)
    clustering.niter = num_iters
    clustering.nredo = num_redo
    clustering.seed = seed
    clustering.max_points_per_centroid = max_points
    clustering.min_points_per_centroid = 1  # we warn ourselves, faiss would print to stderr
    clustering.verbose = False
    if gpu:  # as the official code: a flat L2 index on the points' GPU
        config = faiss.GpuIndexFlatConfig()
        config.device = (
            points.device.index if points.device.index is not None else torch.cuda.current_device()
        )
        resources = faiss.StandardGpuResources()  # kept alive until the search below is done
        index: Any = faiss.GpuIndexFlatL2(resources, dim, config)
    else:
        index = faiss.IndexFlatL2(dim)
    clustering.train(array, index)
    _, assignments = index.search(array, 1)
    centroids = torch.from_numpy(
        faiss.vector_to_array(clustering.centroids).reshape(num_clusters, dim).copy()
    )
    labels = torch.from_numpy(assignments[:, 0].astype(np.int64))
    return _result(points, centroids.to(points.device), labels.to(points.device))


def _result(points: Tensor, centroids: Tensor, labels: Tensor) -> KMeansResult:
    """Pack a result, with each distance computed as ``||x - mu||`` in float64.

    The expanded ``|x|^2 - 2 x.mu + |mu|^2`` of the search loses relative precision for the small distances of
    tight clusters, which the concentration depends on.
    """
    distances = (points.double() - centroids.double()[labels]).norm(dim=1)
    return KMeansResult(
        centroids=centroids,
        assignments=labels,
        distances=distances.float(),
        objective=float((distances**2).sum()),
    )


def _assign(points: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid and squared distance of every point, in chunks of rows."""
    centroid_sq = (centroids * centroids).sum(1)
    labels, sq_dist = [], []
    for chunk in points.split(_CHUNK):
        d2 = (chunk * chunk).sum(1, keepdim=True) - 2.0 * chunk @ centroids.t() + centroid_sq
        best, idx = d2.min(dim=1)
        labels.append(idx)
        sq_dist.append(best.clamp_min_(0.0))
    return torch.cat(labels), torch.cat(sq_dist)


def _split_empty(centroids: Tensor, counts: Tensor, generator: torch.Generator) -> None:
    """Re-seed each empty cluster from a large one (chosen with probability ~ size - 1), faiss-style.

    The choice is drawn on the (CPU) generator; the E-step may synchronise, it is not a training step.
    """
    for empty in torch.nonzero(counts == 0).flatten().tolist():
        weights = (counts - 1).clamp_min(0).double().cpu()
        if float(weights.sum()) <= 0:
            return
        source = int(torch.multinomial(weights, 1, generator=generator))
        sign = torch.ones_like(centroids[source])
        sign[1::2] = -1.0
        centroids[empty] = centroids[source] * (1.0 + sign * _SPLIT_EPS)
        centroids[source] = centroids[source] * (1.0 - sign * _SPLIT_EPS)
        counts[empty] = counts[source] // 2
        counts[source] -= counts[empty]


def _kmeans_torch(
    points: Tensor, num_clusters: int, num_iters: int, num_redo: int, seed: int, max_points: int
) -> KMeansResult:
    generator = torch.Generator().manual_seed(seed)  # CPU draws: the same result on every device
    device = points.device
    num_points = points.shape[0]
    train = points
    if num_points > max_points * num_clusters:
        subset = torch.randperm(num_points, generator=generator)[: max_points * num_clusters]
        train = points[subset.to(device)]
    best_objective, best_centroids = float("inf"), train[:num_clusters].clone()
    for _ in range(num_redo):
        start = torch.randperm(train.shape[0], generator=generator)[:num_clusters]
        centroids = train[start.to(device)].clone()
        objective = float("inf")
        for _ in range(num_iters):
            labels, sq_dist = _assign(train, centroids)
            objective = float(sq_dist.double().sum())
            counts = torch.bincount(labels, minlength=num_clusters)
            sums = torch.zeros_like(centroids).index_add_(0, labels, train)
            filled = counts > 0
            centroids[filled] = sums[filled] / counts[filled].unsqueeze(1).to(sums)
            _split_empty(centroids, counts, generator)
        if objective < best_objective:
            best_objective, best_centroids = objective, centroids
    labels, _ = _assign(points, best_centroids)
    return _result(points, best_centroids, labels)
