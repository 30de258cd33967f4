from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from lightly.loss import NTXentLoss
from lightly_pcl import IndexedDataset, PCLLightningModule, ProtoNCELoss, PrototypeClustering
from torch.utils.data import DataLoader

from integration_tests.lightly_pcl.toy import TwoViewToy, tiny_pcl

NUM_SAMPLES, BATCH = 32, 8


class LossRecorder(pl.Callback):
    def __init__(self, save_after_estep_of: int | None = None, path: str | None = None) -> None:
        self.losses: dict[tuple[int, int], float] = {}
        self.save_after_estep_of, self.path = save_after_estep_of, path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.save_after_estep_of and batch_idx == 0 and self.path:
            trainer.save_checkpoint(self.path)  # after this epoch's E-step, before its first step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[(trainer.current_epoch, batch_idx)] = float(outputs["loss"])


class StopAfterEpoch(pl.Callback):
    """Interrupt a run configured for more epochs, as a crash or preemption would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _build(seed: int = 0, pcl: bool = True, num_samples: int = NUM_SAMPLES, knn: bool = False):
    model = tiny_pcl(seed)  # seeds torch, then the loss draws its memory bank
    kwargs = {}
    if pcl:
        criterion = ProtoNCELoss(memory_bank_size=(16, 8), num_negative_prototypes=4, seed=seed)
        kwargs["clustering"] = PrototypeClustering(
            num_clusters=(4, 8), num_redo=1, min_points_per_centroid=1, backend="torch", progress=False
        )
        kwargs["cluster_dataloader"] = DataLoader(
            IndexedDataset(TwoViewToy(num_samples, eval_view=True)), batch_size=16
        )
    else:
        criterion = NTXentLoss(temperature=0.2, memory_bank_size=(16, 8))
    if knn:
        kwargs["knn_dataloader"] = DataLoader(TwoViewToy(num_samples, eval_view=True), batch_size=16)
        kwargs["num_classes"] = 4
    module = PCLLightningModule(model, criterion, warmup_epochs=1, lr=0.05, ema_momentum=0.9, **kwargs)
    train = DataLoader(IndexedDataset(TwoViewToy(num_samples)), batch_size=BATCH)
    return module, train


def _trainer(max_epochs: int, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **kwargs,
    )


@pytest.fixture(scope="module")
def continuous(tmp_path_factory):
    """An uninterrupted 3-epoch PCL run (warm-up 1) that also checkpoints right after epoch 2's E-step."""
    path = str(tmp_path_factory.mktemp("pcl") / "after_estep.ckpt")
    module, train = _build()
    recorder = LossRecorder(save_after_estep_of=2, path=path)
    _trainer(3, [recorder]).fit(module, train)
    return module, recorder.losses, path


class TestPCLLightningModule:
    def test_estep_after_warmup_changes_the_loss_relative_to_moco(self):
        pcl_module, train = _build(knn=True)
        moco_module, moco_train = _build(pcl=False, knn=True)
        pcl_rec, moco_rec = LossRecorder(), LossRecorder()
        val = DataLoader(TwoViewToy(16, seed=1, eval_view=True), batch_size=8)
        _trainer(2, [pcl_rec]).fit(pcl_module, train, val)
        _trainer(2, [moco_rec]).fit(moco_module, moco_train, val)

        assert pcl_module.estep_count == 1 and int(pcl_module.clustering.epoch) == 1
        warmup = [k for k in pcl_rec.losses if k[0] == 0]
        for key in warmup:  # warm-up is MoCo: identical to Lightly's NTXentLoss run
            assert pcl_rec.losses[key] == pytest.approx(moco_rec.losses[key], abs=1e-5)
        # Same weights at the first step after the E-step: the difference is the prototype term (> 0).
        assert pcl_rec.losses[(1, 0)] - moco_rec.losses[(1, 0)] > 0.1
        timings = pcl_module.epoch_timings
        assert timings[0]["estep_seconds"] == 0 and timings[1]["estep_seconds"] > 0
        assert 0 < timings[1]["estep_seconds"] < timings[1]["epoch_seconds"]
        assert len(pcl_module.knn_accuracies) == 2 and all(0 <= a <= 1 for a in pcl_module.knn_accuracies)

    def test_resume_at_epoch_end_reproduces_the_next_losses(self, continuous, tmp_path):
        _, losses, _ = continuous
        module, train = _build()
        trainer = _trainer(3, [StopAfterEpoch(1)])  # the schedule is planned for 3 epochs
        trainer.fit(module, train)
        path = str(tmp_path / "epoch_end.ckpt")
        trainer.save_checkpoint(path)

        resumed, train = _build(seed=99)  # different init: everything must come from the checkpoint
        recorder = LossRecorder()
        _trainer(3, [recorder]).fit(resumed, train, ckpt_path=path)
        assert resumed.estep_count == 1  # epoch 2's E-step ran again, deterministically
        assert recorder.losses[(2, 0)] == pytest.approx(losses[(2, 0)], abs=1e-6)
        for key, value in recorder.losses.items():
            assert value == pytest.approx(losses[key], abs=1e-5)

    def test_resume_after_the_estep_reuses_the_checkpointed_clustering(self, continuous):
        original, losses, path = continuous
        resumed, train = _build(seed=99)
        resumed.clustering.seed = 1234  # a fresh E-step would cluster differently
        recorder = LossRecorder()
        _trainer(3, [recorder]).fit(resumed, train, ckpt_path=path)
        assert resumed.estep_count == 0  # the stored clustering of epoch 2 was used
        assert torch.equal(resumed.clustering.labels, original.clustering.labels)
        assert recorder.losses[(2, 0)] == pytest.approx(losses[(2, 0)], abs=1e-6)
        for key, value in recorder.losses.items():
            assert value == pytest.approx(losses[key], abs=1e-5)

    def test_resume_with_a_grown_dataset_raises(self, continuous):
        _, _, path = continuous
        resumed, train = _build(num_samples=NUM_SAMPLES + 8)
        with pytest.raises(ValueError, match="older than the dataset"):
            _trainer(3).fit(resumed, train, ckpt_path=path)

    def test_bf16_mixed_precision_keeps_parameters_float32(self):
        module, train = _build()
        module.warmup_epochs = 0  # E-step and prototype term from the first step
        recorder = LossRecorder()
        _trainer(1, [recorder], precision="bf16-mixed", limit_train_batches=2).fit(module, train)
        assert module.estep_count == 1
        assert all(torch.isfinite(torch.tensor(v)) for v in recorder.losses.values())
        assert all(p.dtype == torch.float32 for p in module.parameters())
        assert module.clustering.centroids[0].dtype == torch.float32

    def test_batches_without_indices_raise(self):
        module, _ = _build()
        module.warmup_epochs = 0
        plain = DataLoader(TwoViewToy(NUM_SAMPLES), batch_size=BATCH)
        with pytest.raises(ValueError, match="IndexedDataset"):
            _trainer(1, limit_train_batches=1).fit(module, plain)

    def test_constructor_errors(self):
        model = tiny_pcl()
        clustering = PrototypeClustering(num_clusters=(2,))
        loader = DataLoader(IndexedDataset(TwoViewToy(8, eval_view=True)))
        with pytest.raises(ValueError, match="given together"):
            PCLLightningModule(model, ProtoNCELoss(memory_bank_size=(8, 8)), clustering=clustering)
        with pytest.raises(TypeError, match="must be a ProtoNCELoss"):
            PCLLightningModule(model, NTXentLoss(memory_bank_size=(8, 8)), clustering, loader)
        with pytest.raises(ValueError, match="needs num_classes"):
            PCLLightningModule(model, NTXentLoss(), knn_dataloader=loader)
        with pytest.raises(ValueError, match="warmup_epochs"):
            PCLLightningModule(model, NTXentLoss(), warmup_epochs=-1)
        with pytest.raises(ValueError, match="lr_schedule"):
            PCLLightningModule(model, NTXentLoss(), lr_schedule="step")  # type: ignore[arg-type]
