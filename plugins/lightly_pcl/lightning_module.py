"""A LightningModule that trains PCL with EM: an E-step at the start of each epoch after warm-up."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict
from lightly.utils.scheduler import cosine_schedule
from pytorch_lightning import LightningModule
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR, MultiStepLR
from torch.utils.data import DataLoader, DistributedSampler

from . import _distributed as ddp
from ._builders import build_backbone, build_projection_head, optimizer_class
from .indexed_dataset import IndexedSample, unpack_indexed_batch
from .pcl import PCL
from .proto_nce_loss import ProtoNCELoss
from .prototype_clustering import PrototypeClustering

__all__ = ["PCLLightningModule"]


@contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    flags = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, flag in zip(modules, flags, strict=True):
            module.train(flag)


def _clock() -> tuple[float, float]:
    """Wall-clock and CPU (this process, all threads) seconds; on a shared machine the CPU clock is fairer."""
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    now = _clock()
    return now[0] - start[0], now[1] - start[1]


def _official_cosine(step: int, total_steps: int) -> float:
    """PCL v2's ``0.5 * (1 + cos(pi * t / T))``, per step: from 1 at the first step to near 0 at the last."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def _images_and_targets(batch: Any) -> tuple[Tensor, Tensor]:
    sample = batch.sample if isinstance(batch, IndexedSample) else batch
    return sample[0], sample[1]


class PCLLightningModule(LightningModule):
    r"""Train :class:`~lightly_pcl.PCL` with ``pl.Trainer``: EM, an E-step before every epoch after warm-up.

    Built from plain hyperparameters, like Lightly's benchmark modules, so that
    ``PCLLightningModule.load_from_checkpoint(path)`` alone rebuilds it: the encoders
    (:class:`~lightly_pcl.PCL` on ``backbone`` with ``projection_head``), the loss
    (:class:`~lightly_pcl.ProtoNCELoss`) and the E-step (:class:`~lightly_pcl.PrototypeClustering`), with one
    ``temperature`` for the instance term and the mean concentration, as in the official code. A backbone or
    head given as an ``nn.Module`` is recorded by its class name only; pass it again to
    ``load_from_checkpoint(path, backbone=...)`` (Lightning's rule for module arguments), else a
    ``ValueError`` says so. Dataloaders are not hyperparameters either.

    Each epoch ``e >= warmup_epochs`` starts with the E-step
    (:meth:`PrototypeClustering.update <lightly_pcl.PrototypeClustering.update>` on the momentum encoder in
    eval mode over ``cluster_dataloader``); every training step then updates the momentum encoder, encodes the
    query and key views and minimises ProtoNCE with the batch's prototypes (the instance term alone during
    warm-up, which is exactly Lightly's ``NTXentLoss(temperature, memory_bank_size)``). With
    ``num_clusters=()`` the module is the MoCo v2 baseline.

    Defaults follow the official PCL v2 code: SGD (lr 0.03, momentum 0.9, weight decay 1e-4), the
    official cosine learning-rate schedule ``lr * 0.5 * (1 + cos(pi * t / T))``, applied per step (the
    official code applies it per epoch) so it ends near 0 (not at the ``lr * 1e-3`` of Lightly's
    ``CosineWarmupScheduler`` default), and a constant EMA momentum ``m = 0.999``; ``ema_schedule="cosine"``
    gives Lightly's MoCo schedule ``cosine_schedule(step, max_steps, ema_momentum, 1)`` instead (e.g. with
    ``ema_momentum=0.996``). For anything else, override :meth:`configure_optimizers` (Lightning's idiom).

    Distributed: the memory bank gathers the keys of all ranks (as the official code), so every rank's bank
    holds every rank's keys; the bank and the clustering are kept out of ``DistributedDataParallel``'s buffer
    broadcast (they are identical on every rank by construction, and broadcasting them would re-send the bank
    and the ``M x N`` label table every step), and the initial bank is broadcast from rank 0 once in
    :meth:`on_fit_start`. The cluster dataloader is sharded with ``DistributedSampler(shuffle=False)``
    unless it already has a distributed sampler; keys are shuffled across ranks (MoCo's shuffling BN) with
    ``shuffle_bn``.

    Validation, when ``knn_dataloader`` is given, is Lightly's kNN protocol: the query backbone's features of
    ``knn_dataloader`` (labelled training images, eval transform) form the bank and
    ``lightly.utils.benchmarking.knn_predict`` classifies the validation batches; logged as ``val_knn_top1``.

    Batches must come from an :class:`~lightly_pcl.IndexedDataset` whose sample starts with the two views,
    e.g. ``IndexedDataset(LightlyDataset(..., transform=MoCoV2Transform()))`` gives
    ``IndexedSample(((x_query, x_key), target, filename), index)``. The clustering (buffers), the memory bank
    and the negative sampler's generator (loss extra state) are in the ``state_dict``, so a Lightning
    checkpoint resumes identically; when resuming inside an epoch whose E-step already ran, the stored
    clustering is reused (and checked against the dataset size).

    Args:
        backbone: A torchvision model name (default: ``"resnet50"``; randomly initialised, its classifier
            replaced by ``nn.Identity``) or an ``nn.Module`` mapping images to ``(B, input_dim)`` features.
        input_dim: Backbone feature dimension (default: from the torchvision model; ``2048`` for a module).
        hidden_dim: Hidden width of the MLP head (default: ``2048``).
        output_dim: Projection dimension (default: ``128``).
        projection_head: ``"mlp"`` (PCL v2, Lightly's ``MoCoProjectionHead``; default), ``"linear"``
            (PCL v1) or an ``nn.Module`` ``(B, input_dim) -> (B, output_dim)``.
        temperature: :math:`\tau`, the instance temperature and the mean of the concentrations
            (default: ``0.2``).
        memory_bank_size: Number of negative keys (default: ``16384``).
        num_negative_prototypes: ``r`` (default: ``16384``).
        num_clusters: Granularities :math:`K_m` of the E-step (default: PCL's ImageNet
            ``(25000, 50000, 100000)``; scale them to the dataset), or ``()`` for MoCo.
        cluster_dataloader: Dataloader over the whole training set with the evaluation transform, wrapped
            in :class:`~lightly_pcl.IndexedDataset`; needed by the first E-step.
        warmup_epochs: Epochs trained with the instance term only (default: ``20``, PCL's 20 of 200).
        optimizer: A ``torch.optim`` class name or ``"LARS"`` (default: ``"SGD"``).
        lr: Learning rate (default: ``0.03``, for batch size 256).
        weight_decay: Weight decay (default: ``1e-4``).
        optimizer_kwargs: Further optimizer arguments (default: ``{"momentum": 0.9}`` for SGD, else none).
        lr_schedule: ``"cosine"`` (per step to 0; default), ``"step"`` (x0.1 at ``lr_milestones`` epochs,
            PCL v1) or ``"constant"``.
        lr_milestones: Epochs of the ``"step"`` schedule (default: ``(120, 160)``).
        ema_momentum: Momentum-encoder EMA coefficient ``m`` (default: ``0.999``), the start value with
            ``ema_schedule="cosine"``.
        ema_schedule: ``"constant"`` (official PCL; default) or ``"cosine"`` (Lightly's MoCo examples).
        shuffle_bn: Shuffle the key batch across ranks under DDP (MoCo's shuffling BN; default: ``True``).
        loss_kwargs: Other :class:`~lightly_pcl.ProtoNCELoss` arguments (``mask_duplicate_positives``,
            ``seed``, ``validate_args``, ``gather_distributed``).
        clustering_kwargs: Other :class:`~lightly_pcl.PrototypeClustering` arguments (``alpha``,
            ``num_iters``, ``num_redo``, ``backend``, ``seed``, ...).
        knn_dataloader: Labelled training images for the kNN bank, or ``None`` (no kNN validation).
        num_classes: Number of classes for kNN; required with ``knn_dataloader``.
        knn_k: Neighbours (default: ``200``). knn_t: kNN temperature (default: ``0.1``).

    Raises:
        ValueError: For ``knn_dataloader`` without ``num_classes``, a negative ``warmup_epochs``,
            ``ema_momentum`` outside ``[0, 1]``, an unknown schedule, optimizer or head, ``temperature``,
            ``memory_bank_size`` or ``num_clusters`` repeated in ``loss_kwargs``/``clustering_kwargs`` (one
            source of truth), a recorded custom module that was not passed again, and the errors of the
            built parts.

    Examples:
        >>> module = PCLLightningModule("resnet18", num_clusters=(100, 200), cluster_dataloader=loader)
        >>> pl.Trainer(max_epochs=200).fit(module, train_loader)
        >>> module = PCLLightningModule.load_from_checkpoint("last.ckpt")  # no other argument needed
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        input_dim: int | None = None,
        hidden_dim: int = 2048,
        output_dim: int = 128,
        projection_head: str | nn.Module = "mlp",
        temperature: float = 0.2,
        memory_bank_size: int = 16384,
        num_negative_prototypes: int = 16384,
        num_clusters: Sequence[int] = (25000, 50000, 100000),
        cluster_dataloader: DataLoader[Any] | None = None,
        warmup_epochs: int = 20,
        optimizer: str = "SGD",
        lr: float = 0.03,
        weight_decay: float = 1e-4,
        optimizer_kwargs: dict[str, Any] | None = None,
        lr_schedule: Literal["cosine", "step", "constant"] = "cosine",
        lr_milestones: Sequence[int] = (120, 160),
        ema_momentum: float = 0.999,
        ema_schedule: Literal["constant", "cosine"] = "constant",
        shuffle_bn: bool = True,
        loss_kwargs: dict[str, Any] | None = None,
        clustering_kwargs: dict[str, Any] | None = None,
        knn_dataloader: DataLoader[Any] | None = None,
        num_classes: int | None = None,
        knn_k: int = 200,
        knn_t: float = 0.1,
    ) -> None:
        super().__init__()
        if knn_dataloader is not None and num_classes is None:
            raise ValueError("knn_dataloader needs num_classes")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if not 0.0 <= ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1], got {ema_momentum}")
        if lr_schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine', 'step' or 'constant', got {lr_schedule!r}")
        if ema_schedule not in ("constant", "cosine"):
            raise ValueError(f"ema_schedule must be 'constant' or 'cosine', got {ema_schedule!r}")
        optimizer_class(optimizer)  # fail now, not at trainer.fit
        for name, extra in (("loss_kwargs", loss_kwargs), ("clustering_kwargs", clustering_kwargs)):
            repeated = {"temperature", "memory_bank_size", "num_clusters"} & set(extra or {})
            if repeated:
                raise ValueError(
                    f"{name} must not set {sorted(repeated)}: they are PCLLightningModule arguments, one "
                    "source of truth for the loss and the clustering"
                )
        encoder, input_dim, backbone = build_backbone(backbone, input_dim)
        head, projection_head = build_projection_head(projection_head, input_dim, hidden_dim, output_dim)
        # Lightning records the __init__ arguments' current values: the name of the backbone and head (a
        # module as "custom:<class>") and the resolved input_dim, i.e. only plain values.
        self.save_hyperparameters(ignore=["cluster_dataloader", "knn_dataloader"])
        self.model = PCL(encoder, input_dim, hidden_dim, output_dim, projection_head=head)
        self.criterion = ProtoNCELoss(
            temperature, (memory_bank_size, output_dim), num_negative_prototypes, **(loss_kwargs or {})
        )
        self.clustering = (
            PrototypeClustering(tuple(num_clusters), temperature=temperature, **(clustering_kwargs or {}))
            if len(num_clusters)
            else None
        )
        # Identical on every rank by construction: out of DDP's per-step buffer broadcast (see on_fit_start).
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self,
            [f"criterion.{n}" for n, _ in self.criterion.named_buffers()]
            + [f"clustering.{n}" for n, _ in (self.clustering.named_buffers() if self.clustering else [])],
        )
        self.cluster_dataloader = cluster_dataloader
        self.knn_dataloader = knn_dataloader
        self.warmup_epochs = warmup_epochs
        self.num_classes = num_classes
        self.knn_k, self.knn_t = knn_k, knn_t
        self.estep_count = 0
        self.epoch_timings: list[dict[str, float]] = []
        self.knn_accuracies: list[float] = []
        self._epoch_start = (0.0, 0.0)  # (wall, CPU) clocks, see _clock()
        self._estep_seconds = (0.0, 0.0)
        self._val_seconds = (0.0, 0.0)
        self._val_start = (0.0, 0.0)
        self._bank: tuple[Tensor, Tensor] | None = None
        self._knn_correct = torch.zeros(())
        self._knn_total = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        """Backbone features of the query encoder (for evaluation)."""
        return self.model.forward_features(x)

    @property
    def clustering_active(self) -> bool:
        """Whether this epoch trains with the prototype term."""
        return self.clustering is not None and self.current_epoch >= self.warmup_epochs

    def on_fit_start(self) -> None:
        """Start every rank from rank 0's memory bank (it is outside DDP's buffer broadcast)."""
        ddp.broadcast_(self.criterion.memory_bank.bank)
        ddp.broadcast_(self.criterion.memory_bank.bank_ptr)

    # ------------------------------------------------------------------ E-step
    def on_train_epoch_start(self) -> None:
        """Run the E-step when this epoch is past warm-up and its clustering does not exist yet."""
        self._epoch_start = _clock()
        self._estep_seconds = self._val_seconds = (0.0, 0.0)
        if self.clustering is None or not self.clustering_active:
            return
        if self.cluster_dataloader is None:
            raise ValueError(
                f"epoch {self.current_epoch} needs an E-step but cluster_dataloader is None: pass it to "
                "PCLLightningModule(..., cluster_dataloader=...) or load_from_checkpoint(path, "
                "cluster_dataloader=...)"
            )
        dataset_size = len(self.cluster_dataloader.dataset)  # type: ignore[arg-type]
        if self.clustering.is_fitted and int(self.clustering.epoch) == self.current_epoch:
            if self.clustering.num_samples != dataset_size:
                raise ValueError(
                    f"the stored clustering of epoch {self.current_epoch} covers "
                    f"{self.clustering.num_samples} samples but the dataset has {dataset_size}: the "
                    "clustering is older than the dataset"
                )
            return  # resumed after this epoch's E-step: reuse the checkpointed clustering
        start = _clock()
        with _eval_mode(self.model.backbone_momentum, self.model.projection_head_momentum):
            self.clustering.update(
                self.model.forward_momentum,
                self._sharded(self.cluster_dataloader),
                epoch=self.current_epoch,
                num_samples=dataset_size,
                device=self.device,
            )
        self._estep_seconds = _since(start)
        self.estep_count += 1
        self.log("estep_seconds", self._estep_seconds[0], on_epoch=True, on_step=False, rank_zero_only=True)

    def on_train_epoch_end(self) -> None:
        """Record wall and CPU seconds of the epoch and of its E-step (no validation) in ``epoch_timings``."""
        spent = _since(self._epoch_start)
        timing = {
            "epoch": float(self.current_epoch),
            "epoch_seconds": spent[0] - self._val_seconds[0],
            "estep_seconds": self._estep_seconds[0],
            "epoch_cpu_seconds": spent[1] - self._val_seconds[1],
            "estep_cpu_seconds": self._estep_seconds[1],
        }
        if self._estep_seconds[0] and self.clustering is not None:
            timing.update({f"estep_{k}_seconds": v for k, v in self.clustering.last_timing.items()})
        self.epoch_timings.append(timing)

    def _sharded(self, loader: DataLoader[Any]) -> DataLoader[Any]:
        if not ddp.is_distributed() or isinstance(loader.sampler, DistributedSampler):
            return loader
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=DistributedSampler(loader.dataset, shuffle=False),  # type: ignore[arg-type]
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
        )

    # ------------------------------------------------------------------ M-step
    @property
    def current_ema_momentum(self) -> float:
        """The EMA momentum ``m`` of this step: constant, or ``cosine_schedule(step, max_steps, m, 1)``."""
        start = float(self.hparams["ema_momentum"])
        if self.hparams["ema_schedule"] == "constant":
            return start
        max_steps = int(self.trainer.estimated_stepping_batches)
        return cosine_schedule(self.trainer.global_step, max_steps, start, 1.0)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One M-step: momentum update, query/key projections, ProtoNCE (InfoNCE during warm-up)."""
        if self.clustering is not None:
            sample, indices = unpack_indexed_batch(batch)
        else:
            sample, indices = batch.sample if isinstance(batch, IndexedSample) else batch, None
        x_query, x_key = sample[0][0], sample[0][1]
        self.model.update_momentum(self.current_ema_momentum)
        query = self.model(x_query)
        key = self.model.forward_momentum(x_key, shuffle=self.hparams["shuffle_bn"] and ddp.is_distributed())
        batch_size = query.shape[0]
        prototypes = None
        if self.clustering is not None and self.clustering_active:
            assert indices is not None
            prototypes = self.clustering(indices)
        instance, prototype = self.criterion.terms(query, key, prototypes)
        loss = instance if prototype is None else instance + prototype
        if prototype is not None:
            self.log("train_loss_instance", instance, batch_size=batch_size)
            self.log("train_loss_prototype", prototype, batch_size=batch_size)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def configure_optimizers(self) -> Any:
        """The optimizer named by ``optimizer`` and the ``lr_schedule`` (override for anything else)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        name = self.hparams["optimizer"]
        kwargs = self.hparams["optimizer_kwargs"]
        if kwargs is None:
            kwargs = {"momentum": 0.9} if name == "SGD" else {}
        optimizer = optimizer_class(name)(
            params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"], **kwargs
        )
        schedule = self.hparams["lr_schedule"]
        if schedule == "constant":
            return optimizer
        if schedule == "step":
            step = MultiStepLR(optimizer, milestones=list(self.hparams["lr_milestones"]), gamma=0.1)
            return [optimizer], [{"scheduler": step, "interval": "epoch"}]
        total = int(self.trainer.estimated_stepping_batches)
        cosine = LambdaLR(optimizer, partial(_official_cosine, total_steps=total))
        return [optimizer], [{"scheduler": cosine, "interval": "step"}]

    # ------------------------------------------------------------------ kNN evaluation
    @torch.no_grad()
    def on_validation_epoch_start(self) -> None:
        """Build the kNN bank from ``knn_dataloader`` with the query backbone."""
        self._val_start = _clock()
        self._knn_correct = torch.zeros((), device=self.device)
        self._knn_total = torch.zeros((), device=self.device)
        self._bank = None
        if self.knn_dataloader is None:
            return
        features, targets = [], []
        with _eval_mode(self.model):
            for batch in self.knn_dataloader:
                images, labels = _images_and_targets(batch)
                features.append(F.normalize(self.model.forward_features(images.to(self.device)), dim=1))
                targets.append(labels.to(self.device))
        self._bank = (torch.cat(features).t().contiguous(), torch.cat(targets))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Classify a batch with ``lightly.utils.benchmarking.knn_predict`` and count the top-1 hits."""
        if self._bank is None or self.num_classes is None:
            return
        images, targets = _images_and_targets(batch)
        features = F.normalize(self.model.forward_features(images), dim=1)
        bank, bank_labels = self._bank
        predicted = knn_predict(
            features, bank, bank_labels, self.num_classes, min(self.knn_k, bank.shape[1]), self.knn_t
        )
        self._knn_correct += (predicted[:, 0] == targets).sum()
        self._knn_total += targets.numel()

    def on_validation_epoch_end(self) -> None:
        """Log the kNN top-1 accuracy over all ranks as ``val_knn_top1``."""
        if self._bank is not None:
            correct = self.trainer.strategy.reduce(self._knn_correct, reduce_op="sum")
            total = self.trainer.strategy.reduce(self._knn_total, reduce_op="sum")
            accuracy = float(correct / total.clamp_min(1))
            if not self.trainer.sanity_checking:
                self.knn_accuracies.append(accuracy)
            self.log("val_knn_top1", accuracy, prog_bar=True, rank_zero_only=True)
        self._bank = None
        spent = _since(self._val_start)
        self._val_seconds = (self._val_seconds[0] + spent[0], self._val_seconds[1] + spent[1])
