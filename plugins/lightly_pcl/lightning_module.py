"""A LightningModule that trains PCL with EM: an E-step at the start of each epoch after warm-up."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict
from lightly.utils.scheduler import CosineWarmupScheduler
from pytorch_lightning import LightningModule
from torch import Tensor, nn
from torch.optim import SGD
from torch.utils.data import DataLoader, DistributedSampler

from . import _distributed as ddp
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


def _images_and_targets(batch: Any) -> tuple[Tensor, Tensor]:
    sample = batch.sample if isinstance(batch, IndexedSample) else batch
    return sample[0], sample[1]


class PCLLightningModule(LightningModule):
    """Train :class:`~lightly_pcl.PCL` with ``pl.Trainer``: EM, an E-step before every epoch after warm-up.

    Each epoch ``e >= warmup_epochs`` starts with the E-step
    (:meth:`PrototypeClustering.update <lightly_pcl.PrototypeClustering.update>` on the momentum encoder in
    eval mode over ``cluster_dataloader``); every training step then updates the momentum encoder, encodes the
    query and key views and minimises :class:`~lightly_pcl.ProtoNCELoss` with the batch's prototypes (the
    instance term alone during warm-up). Optimiser and schedule follow PCL v2 / Lightly's MoCo v2 benchmark:
    SGD (lr 0.03, momentum 0.9, weight decay 1e-4) with a per-step cosine schedule. With ``clustering=None``
    and a plain ``NTXentLoss(memory_bank_size=...)`` as ``criterion`` the same module is the MoCo v2 baseline.

    Validation, when ``knn_dataloader`` is given, is Lightly's kNN protocol: the query backbone's features of
    ``knn_dataloader`` (labelled training images, eval transform) form the bank and
    ``lightly.utils.benchmarking.knn_predict`` classifies the validation batches; logged as ``val_knn_top1``.

    Batches must come from an :class:`~lightly_pcl.IndexedDataset` whose sample starts with the two views,
    e.g. ``IndexedDataset(LightlyDataset(..., transform=MoCoV2Transform()))`` gives
    ``IndexedSample(((x_query, x_key), target, filename), index)``. Under DDP the cluster dataloader is
    sharded with a ``DistributedSampler(shuffle=False)`` unless it already has one.

    The clustering (buffers), the memory bank and the negative sampler's generator (loss extra state) are in
    the ``state_dict``, so a Lightning checkpoint resumes identically; when resuming inside an epoch whose
    E-step already ran, the stored clustering is reused (and checked against the dataset size).

    Args:
        model: The encoders.
        criterion: :class:`~lightly_pcl.ProtoNCELoss`, or any ``(query, key) -> loss`` for a baseline.
        clustering: The E-step module, or ``None`` (no E-step: MoCo).
        cluster_dataloader: Dataloader over the whole training set with the evaluation transform, wrapped
            in :class:`~lightly_pcl.IndexedDataset`; required with ``clustering``.
        warmup_epochs: Epochs trained with the instance term only (default: ``20``, PCL's 20 of 200).
        lr: Learning rate (default: ``0.03``, for batch size 256).
        momentum: SGD momentum (default: ``0.9``).
        weight_decay: SGD weight decay (default: ``1e-4``).
        ema_momentum: Momentum-encoder EMA coefficient ``m`` (default: ``0.999``).
        lr_schedule: ``"cosine"`` (per step, PCL v2; default) or ``"constant"``.
        shuffle_bn: Shuffle the key batch across ranks under DDP (MoCo's shuffling BN; default: ``True``).
        knn_dataloader: Labelled training images for the kNN bank, or ``None`` (no kNN validation).
        num_classes: Number of classes for kNN; required with ``knn_dataloader``.
        knn_k: Neighbours (default: ``200``). knn_t: kNN temperature (default: ``0.1``).

    Raises:
        ValueError: For ``clustering`` without ``cluster_dataloader`` (or the reverse), ``knn_dataloader``
            without ``num_classes``, a negative ``warmup_epochs``, ``ema_momentum`` outside ``[0, 1]`` or an
            unknown ``lr_schedule``.
        TypeError: If ``clustering`` is given but ``criterion`` is not a :class:`ProtoNCELoss`.
    """

    def __init__(
        self,
        model: PCL,
        criterion: nn.Module,
        clustering: PrototypeClustering | None = None,
        cluster_dataloader: DataLoader[Any] | None = None,
        warmup_epochs: int = 20,
        lr: float = 0.03,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        ema_momentum: float = 0.999,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        shuffle_bn: bool = True,
        knn_dataloader: DataLoader[Any] | None = None,
        num_classes: int | None = None,
        knn_k: int = 200,
        knn_t: float = 0.1,
    ) -> None:
        super().__init__()
        if (clustering is None) != (cluster_dataloader is None):
            raise ValueError(
                "clustering and cluster_dataloader must be given together (or neither, for MoCo)"
            )
        if clustering is not None and not isinstance(criterion, ProtoNCELoss):
            raise TypeError(
                f"with a clustering, criterion must be a ProtoNCELoss, got {type(criterion).__name__}"
            )
        if knn_dataloader is not None and num_classes is None:
            raise ValueError("knn_dataloader needs num_classes")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if not 0.0 <= ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1], got {ema_momentum}")
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        self.save_hyperparameters(
            ignore=["model", "criterion", "clustering", "cluster_dataloader", "knn_dataloader"]
        )
        self.model = model
        self.criterion = criterion
        self.clustering = clustering
        self.cluster_dataloader = cluster_dataloader
        self.knn_dataloader = knn_dataloader
        self.warmup_epochs = warmup_epochs
        self.ema_momentum = ema_momentum
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

    # ------------------------------------------------------------------ E-step
    def on_train_epoch_start(self) -> None:
        """Run the E-step when this epoch is past warm-up and its clustering does not exist yet."""
        self._epoch_start = _clock()
        self._estep_seconds = self._val_seconds = (0.0, 0.0)
        if self.clustering is None or self.cluster_dataloader is None or not self.clustering_active:
            return
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
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One M-step: momentum update, query/key projections, ProtoNCE (InfoNCE during warm-up)."""
        if self.clustering is not None:
            sample, indices = unpack_indexed_batch(batch)
        else:
            sample, indices = batch.sample if isinstance(batch, IndexedSample) else batch, None
        x_query, x_key = sample[0][0], sample[0][1]
        self.model.update_momentum(self.ema_momentum)
        query = self.model(x_query)
        key = self.model.forward_momentum(x_key, shuffle=self.hparams["shuffle_bn"] and ddp.is_distributed())
        batch_size = query.shape[0]
        if self.clustering is not None and self.clustering_active:
            assert isinstance(self.criterion, ProtoNCELoss) and indices is not None
            instance = self.criterion.instance_term(query, key)
            prototype = self.criterion.prototype_term(query, self.clustering(indices))
            loss = instance + prototype
            self.log("train_loss_instance", instance, batch_size=batch_size)
            self.log("train_loss_prototype", prototype, batch_size=batch_size)
        else:
            loss = self.criterion(query, key)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def configure_optimizers(self) -> Any:
        """SGD with momentum and weight decay, and a per-step cosine schedule (or none)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = SGD(
            params,
            lr=self.hparams["lr"],
            momentum=self.hparams["momentum"],
            weight_decay=self.hparams["weight_decay"],
        )
        if self.hparams["lr_schedule"] == "constant":
            return optimizer
        scheduler = CosineWarmupScheduler(
            optimizer, warmup_epochs=0, max_epochs=int(self.trainer.estimated_stepping_batches)
        )
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

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
