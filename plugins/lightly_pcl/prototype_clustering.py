"""PCL's E-step: features of the whole dataset by index, k-means at several granularities, concentrations."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import _distributed as ddp
from .concentration import concentration
from .indexed_dataset import unpack_indexed_batch
from .kmeans import Backend, kmeans
from .prototypes import Prototypes

__all__ = ["PrototypeClustering"]


class PrototypeClustering(nn.Module):
    r"""The E-step of Prototypical Contrastive Learning [0]: a module whose buffers are the clustering state.

    Each E-step (:meth:`update`) runs the momentum encoder over the whole training set (evaluation transform,
    features L2-normalised and stored by dataset index), then for each granularity :math:`K_m` runs k-means
    (:func:`~lightly_pcl.kmeans`, seed ``seed + m``; the official code uses seed ``m``), L2-normalises the
    centroids and estimates each cluster's concentration :math:`\phi` (:func:`~lightly_pcl.concentration`).
    Calling the module with a batch's dataset indices returns the :class:`~lightly_pcl.Prototypes` that
    :class:`~lightly_pcl.ProtoNCELoss` needs.

    Under ``torch.distributed`` each rank runs the feature pass on its shard; features are all-gathered and
    placed by index, rank 0 clusters once, and the assignments, centroids and concentrations are broadcast, so
    every rank holds identical state. The state lives in buffers, so ``state_dict()`` (and a Lightning
    checkpoint) carries it; loading resizes the buffers.

    Devices (docs/gpu.md): the clustering is computed where the features are (``compute_features`` encodes on
    this module's device or ``device``): k-means runs with faiss on the GPU when faiss has GPU support, else
    with torch on the features' device, and the buffers are stored on that device. The lookup in
    :meth:`forward` returns tensors on the buffers' device.

    Bad input (docs/reliability.md): non-finite features are refused by :meth:`fit` (the E-step synchronises
    anyway; this check is always on). With ``validate_args=True`` (default) :meth:`forward` checks that the
    dataset indices lie in the clustered range, which synchronises with the device; ``False`` skips it
    (an out-of-range index then fails in the indexing kernel). The dtype and rank of the indices are always
    checked.

    - [0] PCL, 2021, https://arxiv.org/abs/2005.04966

    Args:
        num_clusters: Granularities :math:`K_1..K_M` (default: ``(25000, 50000, 100000)``, PCL on ImageNet;
            scale them to your dataset, e.g. a few per class up to a few hundred per class).
        temperature: Mean of the concentrations, the instance temperature :math:`\tau` (default: ``0.2``).
        alpha: Concentration smoothing :math:`\alpha` (default: ``10``).
        num_iters: k-means iterations (default: ``20``).
        num_redo: k-means restarts (default: ``5``).
        max_points_per_centroid: k-means training subsample cap per centroid (default: ``1000``).
        min_points_per_centroid: Warn below this many points per centroid (default: ``10``).
        backend: k-means backend, ``"auto"`` (faiss if installed), ``"faiss"`` or ``"torch"``.
        seed: Base seed of the k-means runs (default: ``0``).
        progress: Show a tqdm bar over the feature pass on rank 0 (default: ``True``).
        validate_args: Check the range of the dataset indices in :meth:`forward` (default: ``True``).

    Shapes:
        - indices: ``(B,)`` integer dataset indices in ``[0, num_samples)``.
        - output: :class:`~lightly_pcl.Prototypes` with labels ``(M, B)``, centroids ``(K_m, D)`` and
          concentrations ``(K_m,)``.

    Raises:
        ValueError: For an empty or non-positive ``num_clusters``, non-positive ``temperature``/``alpha``,
            iteration counts below 1, or an unknown ``backend``.

    The ``temperature`` must be the instance temperature of :class:`~lightly_pcl.ProtoNCELoss` (PCL has one):
    the looked-up :class:`~lightly_pcl.Prototypes` carry it and the loss refuses a mismatch.

    Examples:
        >>> clustering = PrototypeClustering(num_clusters=(100, 200, 400))
        >>> clustering.update(model.forward_momentum, cluster_loader, epoch=epoch)  # E-step
        >>> loss = criterion(query, key, clustering(indices))  # M-step
    """

    def __init__(
        self,
        num_clusters: Sequence[int] = (25000, 50000, 100000),
        temperature: float = 0.2,
        alpha: float = 10.0,
        num_iters: int = 20,
        num_redo: int = 5,
        max_points_per_centroid: int = 1000,
        min_points_per_centroid: int = 10,
        backend: Backend = "auto",
        seed: int = 0,
        progress: bool = True,
        validate_args: bool = True,
    ) -> None:
        super().__init__()
        clusters = tuple(int(k) for k in num_clusters)
        if not clusters or min(clusters) < 1:
            raise ValueError(
                f"num_clusters must be a non-empty sequence of positive ints, got {num_clusters!r}"
            )
        if temperature <= 0 or alpha <= 0:
            raise ValueError(f"temperature and alpha must be > 0, got {temperature} and {alpha}")
        if num_iters < 1 or num_redo < 1 or max_points_per_centroid < 1:
            raise ValueError(
                "num_iters, num_redo and max_points_per_centroid must be >= 1, got "
                f"{num_iters}, {num_redo} and {max_points_per_centroid}"
            )
        if backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
        self.num_clusters = clusters
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.num_iters = int(num_iters)
        self.num_redo = int(num_redo)
        self.max_points_per_centroid = int(max_points_per_centroid)
        self.min_points_per_centroid = int(min_points_per_centroid)
        self.backend: Backend = backend
        self.seed = int(seed)
        self.progress = progress
        self.validate_args = bool(validate_args)
        self.last_timing: dict[str, float] = {}
        self.labels: Tensor
        self.epoch: Tensor
        self.register_buffer("labels", torch.empty(len(clusters), 0, dtype=torch.long))
        self.register_buffer("epoch", torch.tensor(-1, dtype=torch.long))
        for m, k in enumerate(clusters):
            self.register_buffer(f"centroids_{m}", torch.empty(k, 0))
            self.register_buffer(f"concentrations_{m}", torch.empty(k))

    @property
    def num_samples(self) -> int:
        """Size of the dataset the current clustering was computed on (0 before the first E-step)."""
        return int(self.labels.shape[1])

    @property
    def is_fitted(self) -> bool:
        """Whether an E-step has run (or was loaded from a checkpoint)."""
        return self.num_samples > 0

    @property
    def centroids(self) -> list[Tensor]:
        """The ``M`` L2-normalised centroid matrices ``(K_m, D)``."""
        return [getattr(self, f"centroids_{m}") for m in range(len(self.num_clusters))]

    @property
    def concentrations(self) -> list[Tensor]:
        """The ``M`` concentration vectors ``(K_m,)``."""
        return [getattr(self, f"concentrations_{m}") for m in range(len(self.num_clusters))]

    def forward(self, indices: Tensor) -> Prototypes:
        """Look up the prototypes of a batch by dataset index.

        Args:
            indices: ``(B,)`` integer dataset indices, on any device (moved to the buffers' device).

        Raises:
            RuntimeError: Before the first E-step.
            TypeError: If ``indices`` is not an integer tensor.
            ValueError: If ``indices`` is not 1-D, or (``validate_args``) an index is negative or refers past
                the clustered dataset (the dataset grew after the last E-step: run :meth:`update` again).
        """
        if not self.is_fitted:
            raise RuntimeError("PrototypeClustering has no clustering yet: run update() (the E-step) first")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(
                f"PrototypeClustering: indices must be an integer tensor of dataset indices, got dtype "
                f"{indices.dtype}"
            )
        if indices.dim() != 1:
            raise ValueError(
                f"PrototypeClustering: indices must be a 1-D integer tensor of dataset indices, got shape "
                f"{tuple(indices.shape)}"
            )
        if self.validate_args and indices.numel():
            outside = (indices < 0) | (indices >= self.num_samples)
            if bool(outside.any()):
                first = int(indices[outside][0])
                hint = (
                    "negative dataset index"
                    if first < 0
                    else "the clustering is older than the dataset; run the E-step again"
                )
                raise ValueError(
                    f"PrototypeClustering: indices must lie in [0, {self.num_samples}) (the clustering of "
                    f"epoch {int(self.epoch)}), got {first}: {hint}"
                )
        labels = self.labels[:, indices.to(self.labels.device).long()]
        return Prototypes(
            labels=labels,
            centroids=self.centroids,
            concentrations=self.concentrations,
            temperature=self.temperature,
        )

    @torch.no_grad()
    def compute_features(
        self,
        encoder: Callable[[Tensor], Tensor],
        dataloader: Iterable[Any],
        num_samples: int | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Encode every sample of ``dataloader`` and place the L2-normalised features by dataset index.

        Call with the momentum encoder in eval mode and a dataloader over an
        :class:`~lightly_pcl.IndexedDataset` with the evaluation transform. Under ``torch.distributed`` pass
        each rank its shard (``DistributedSampler(shuffle=False)``); the features are gathered to all ranks.

        Args:
            encoder: Maps a batch of images to features ``(B, D)``.
            dataloader: Yields :class:`~lightly_pcl.IndexedSample` batches; the images are ``sample[0]`` when
                the sample is a tuple/list (``(image, target, ...)``), else the sample itself.
            num_samples: Dataset size ``N`` (default: ``len(dataloader.dataset)``).
            device: Where to move the images (default: this module's device).

        Returns:
            ``(N, D)`` float32 features on ``device`` (default: this module's device).

        Raises:
            ValueError: If a batch carries no dataset indices, or some index in ``[0, N)`` was never visited.
        """
        if num_samples is None:
            num_samples = len(dataloader.dataset)  # type: ignore[attr-defined]
        target = self.epoch.device if device is None else torch.device(device)
        chunks: list[Tensor] = []
        index_chunks: list[Tensor] = []
        bar = tqdm(
            dataloader, desc="PCL E-step: features", leave=False, disable=not self.progress or ddp.rank() != 0
        )
        for batch in bar:
            sample, indices = unpack_indexed_batch(batch)
            images = sample[0] if isinstance(sample, (tuple, list)) else sample
            features = encoder(images.to(target))
            chunks.append(F.normalize(features.detach().float(), dim=1))
            index_chunks.append(torch.as_tensor(indices, device=features.device).long())
        local = torch.cat(chunks) if chunks else torch.empty(0, 0, device=target)
        local_idx = (
            torch.cat(index_chunks) if index_chunks else torch.empty(0, dtype=torch.long, device=target)
        )
        all_features = ddp.all_gather_variable(local.contiguous())
        all_indices = ddp.all_gather_variable(local_idx)
        if all_indices.numel() and (int(all_indices.min()) < 0 or int(all_indices.max()) >= num_samples):
            raise ValueError(f"the dataloader yielded dataset indices outside [0, {num_samples})")
        seen = torch.zeros(num_samples, dtype=torch.bool, device=all_indices.device)
        seen[all_indices] = True
        if not bool(seen.all()):
            raise ValueError(
                f"the feature pass visited {int(seen.sum())} of {num_samples} samples: the clustering "
                "dataloader must cover the whole dataset (no drop_last, no subset sampler)"
            )
        out = torch.empty(num_samples, all_features.shape[1], device=all_features.device)
        out[all_indices] = all_features
        return out

    @torch.no_grad()
    def fit(self, features: Tensor, epoch: int = -1) -> PrototypeClustering:
        """Cluster ``features`` at every granularity and store labels, centroids and concentrations.

        Under ``torch.distributed`` only rank 0 clusters; the result is broadcast, so every rank must call
        this with features of the same shape (as :meth:`compute_features` returns). The clustering runs on
        the features' device and the buffers move there.

        Args:
            features: ``(N, D)`` features by dataset index (L2-normalised).
            epoch: The training epoch this clustering belongs to (kept in the ``epoch`` buffer).

        Returns:
            ``self``.

        Raises:
            ValueError: If ``features`` is not 2-D, holds non-finite values, or some granularity exceeds
                ``N``.
            TypeError: If ``features`` is not a floating tensor.
        """
        if not features.is_floating_point():
            raise TypeError(f"PrototypeClustering: features must be a floating tensor, got {features.dtype}")
        if features.dim() != 2:
            raise ValueError(f"features must have shape (N, D), got {tuple(features.shape)}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError(
                "PrototypeClustering: features contains non-finite values (nan or inf); expected finite "
                "embeddings (the clustering is left as it was)"
            )
        num_samples, dim = features.shape
        if max(self.num_clusters) > num_samples:
            raise ValueError(
                f"num_clusters={self.num_clusters} asks for more clusters than the {num_samples} samples"
            )
        device = features.device
        labels = torch.empty(len(self.num_clusters), num_samples, dtype=torch.long, device=device)
        centroids = [torch.empty(k, dim, device=device) for k in self.num_clusters]
        phis = [torch.empty(k, device=device) for k in self.num_clusters]
        start = time.perf_counter()
        if ddp.rank() == 0:
            for m, k in enumerate(self.num_clusters):
                result = kmeans(
                    features,
                    k,
                    num_iters=self.num_iters,
                    num_redo=self.num_redo,
                    seed=self.seed + m,
                    max_points_per_centroid=self.max_points_per_centroid,
                    min_points_per_centroid=self.min_points_per_centroid,
                    backend=self.backend,
                )
                labels[m] = result.assignments.to(device)
                centroids[m] = F.normalize(result.centroids, dim=1).to(device)
                phis[m] = concentration(
                    result.distances, result.assignments, k, temperature=self.temperature, alpha=self.alpha
                ).to(device)
        for tensor in (labels, *centroids, *phis):
            ddp.broadcast_(tensor)
        self.labels = labels
        for m in range(len(self.num_clusters)):
            setattr(self, f"centroids_{m}", centroids[m])
            setattr(self, f"concentrations_{m}", phis[m])
        self.epoch = torch.tensor(epoch, dtype=torch.long, device=device)
        self.last_timing["kmeans"] = time.perf_counter() - start
        return self

    def update(
        self,
        encoder: Callable[[Tensor], Tensor],
        dataloader: Iterable[Any],
        epoch: int = -1,
        num_samples: int | None = None,
        device: torch.device | str | None = None,
    ) -> PrototypeClustering:
        """Run the whole E-step: :meth:`compute_features` then :meth:`fit`. Timings go to ``last_timing``."""
        start = time.perf_counter()
        features = self.compute_features(encoder, dataloader, num_samples=num_samples, device=device)
        self.last_timing = {"features": time.perf_counter() - start}
        self.fit(features, epoch=epoch)
        self.last_timing["total"] = time.perf_counter() - start
        return self

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The clustering's shapes (N samples, D dims) are only known once it exists: take the checkpoint's.
        for name in ["labels", *(f"centroids_{m}" for m in range(len(self.num_clusters)))]:
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=self.epoch.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        """The clustering hyperparameters and the current dataset size."""
        return (
            f"num_clusters={self.num_clusters}, temperature={self.temperature}, alpha={self.alpha}, "
            f"num_iters={self.num_iters}, num_redo={self.num_redo}, backend={self.backend!r}, "
            f"seed={self.seed}, num_samples={self.num_samples}"
        )
