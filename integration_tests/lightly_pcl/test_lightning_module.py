from __future__ import annotations

import inspect
import math

import pytest
import pytorch_lightning as pl
import torch
from lightly.utils.scheduler import cosine_schedule
from lightly_pcl import IndexedDataset, PCLLightningModule, ProtoNCELoss
from torch.utils.data import DataLoader

from integration_tests.lightly_pcl.toy import IMAGE, TwoViewToy, tiny_backbone, tiny_module

NUM_SAMPLES, BATCH = 32, 8


class LrRecorder(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


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


def _build(seed: int = 0, pcl: bool = True, num_samples: int = NUM_SAMPLES, knn: bool = False, **overrides):
    kwargs = {}
    if knn:
        kwargs["knn_dataloader"] = DataLoader(TwoViewToy(num_samples, eval_view=True), batch_size=16)
        kwargs["num_classes"] = 4
    module = tiny_module(seed, pcl=pcl, num_samples=num_samples, **kwargs, **overrides)
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
        assert moco_module.clustering is None and moco_module.estep_count == 0
        warmup = [k for k in pcl_rec.losses if k[0] == 0]
        for key in warmup:  # warm-up is MoCo (the instance term is Lightly's NTXentLoss, test_proto_nce_loss)
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
        with pytest.raises(ValueError, match="needs num_classes"):
            tiny_module(knn_dataloader=DataLoader(TwoViewToy(8, eval_view=True)))
        with pytest.raises(ValueError, match="warmup_epochs"):
            tiny_module(warmup_epochs=-1)
        with pytest.raises(ValueError, match="lr_schedule"):
            tiny_module(lr_schedule="poly")
        with pytest.raises(ValueError, match="ema_schedule"):
            tiny_module(ema_schedule="linear")
        with pytest.raises(ValueError, match=r"optimizer must name a torch\.optim optimizer"):
            tiny_module(optimizer="Adamm")
        with pytest.raises(ValueError, match="projection_head must be"):
            tiny_module(projection_head="transformer")
        with pytest.raises(ValueError, match="one source of truth"):
            tiny_module(loss_kwargs={"temperature": 0.1})
        with pytest.raises(ValueError, match="one source of truth"):
            tiny_module(clustering_kwargs={"temperature": 0.1})
        with pytest.raises(ValueError, match="not a torchvision model name"):
            tiny_module(backbone="resnet51")
        with pytest.raises(ValueError, match="input_dim=16 but resnet18 returns 512 features"):
            tiny_module(backbone="resnet18")

    def test_estep_without_cluster_dataloader_says_what_to_pass(self):
        module, train = _build(cluster_dataloader=None, warmup_epochs=0)
        with pytest.raises(ValueError, match=r"cluster_dataloader=\.\.\."):
            _trainer(1, limit_train_batches=1).fit(module, train)


class TestHostConventions:
    """Issue #15: one temperature, checkpoints, head, EMA schedule, optimizer and lr schedule."""

    def test_one_temperature_for_the_loss_and_the_clustering(self):
        module = tiny_module(temperature=0.35)
        assert module.criterion.temperature == module.clustering.temperature == 0.35
        module.clustering.fit(torch.nn.functional.normalize(torch.randn(40, 8), dim=1))
        prototypes = module.clustering(torch.arange(4))
        assert prototypes.temperature == 0.35
        assert module.clustering.concentrations[0].mean().item() == pytest.approx(0.35, rel=1e-5)
        other = ProtoNCELoss(temperature=0.2, memory_bank_size=(16, 8))  # composed by hand, wrongly
        with pytest.raises(ValueError, match="PCL has one temperature"):
            other(torch.randn(4, 8), torch.randn(4, 8), prototypes)

    def test_load_from_checkpoint_alone_with_a_torchvision_backbone(self, tmp_path):
        torch.manual_seed(0)
        module = PCLLightningModule(
            "resnet18", hidden_dim=32, output_dim=8, memory_bank_size=16, num_clusters=(2,), lr=0.01
        )
        images = torch.randn(8, 3, 16, 16)
        pairs = [((image, image + 0.1), 0) for image in images]
        train = DataLoader(IndexedDataset(pairs), batch_size=4)
        trainer = _trainer(1, limit_train_batches=1)
        trainer.fit(module, train)  # warm-up epoch: no E-step, no cluster_dataloader needed
        path = str(tmp_path / "resnet.ckpt")
        trainer.save_checkpoint(path)

        loaded = PCLLightningModule.load_from_checkpoint(
            path, weights_only=True
        )  # nothing else; plain values
        assert loaded.hparams["backbone"] == "resnet18" and loaded.hparams["input_dim"] == 512
        assert module.hparams_initial["backbone"] == "resnet18"  # what loggers record
        assert loaded.hparams["num_clusters"] == (2,) and loaded.hparams["temperature"] == 0.2
        state, expected = loaded.state_dict(), module.state_dict()
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(state[name], value), name
        torch.testing.assert_close(loaded.criterion.memory_bank.bank, module.criterion.memory_bank.bank)
        loaded.eval()
        module.eval()
        torch.testing.assert_close(loaded(images[:2]), module(images[:2]))

    def test_a_custom_backbone_is_passed_again_when_loading(self, continuous):
        _, _, path = continuous
        with pytest.raises(ValueError, match=r"load_from_checkpoint\(path, backbone=Sequential"):
            PCLLightningModule.load_from_checkpoint(path)
        loaded = PCLLightningModule.load_from_checkpoint(path, backbone=tiny_backbone())
        assert loaded.clustering.is_fitted and loaded.clustering.num_samples == NUM_SAMPLES
        assert loaded.hparams["backbone"] == "custom:Sequential"
        assert loaded.hparams_initial["projection_head"] == "mlp"

    @pytest.mark.parametrize("head", ["linear", "module"])
    def test_a_custom_projection_head(self, head):
        custom = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh())
        module, train = _build(projection_head=custom if head == "module" else head)
        expected = torch.nn.Linear if head == "linear" else torch.nn.Sequential
        assert type(module.model.projection_head) is expected
        assert type(module.model.projection_head_momentum) is expected
        if head == "module":
            assert module.model.projection_head is custom
        _trainer(1, limit_train_batches=2).fit(module, train)
        x = torch.randn(3, *IMAGE)
        assert module.model(x).shape == (3, 8)

    def test_cosine_ema_schedule_follows_lightly(self):
        module, train = _build(ema_schedule="cosine", ema_momentum=0.996)
        momenta = []
        update = module.model.update_momentum
        module.model.update_momentum = lambda m: (momenta.append(m), update(m))[1]
        _trainer(2).fit(module, train)
        total = 2 * (NUM_SAMPLES // BATCH)
        assert momenta == [pytest.approx(cosine_schedule(t, total, 0.996, 1.0)) for t in range(total)]
        assert momenta[0] == pytest.approx(0.996) and momenta[-1] == pytest.approx(1.0)

    def test_constant_ema_is_the_official_default(self):
        defaults = inspect.signature(PCLLightningModule).parameters
        assert defaults["ema_momentum"].default == 0.999 and defaults["ema_schedule"].default == "constant"
        module, train = _build(ema_momentum=0.999)
        momenta = []
        update = module.model.update_momentum
        module.model.update_momentum = lambda m: (momenta.append(m), update(m))[1]
        _trainer(1, limit_train_batches=3).fit(module, train)
        assert momenta == [0.999] * 3

    def test_official_cosine_lr_ends_near_zero(self):
        module, train = _build(lr=0.1)
        recorder = LrRecorder()
        _trainer(3, [recorder]).fit(module, train)
        total = 3 * (NUM_SAMPLES // BATCH)
        expected = [0.1 * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
        assert recorder.lrs == pytest.approx(expected)
        assert 0 < recorder.lrs[-1] < 0.02 * 0.1  # (pi / 2T)^2 of lr: near 0 after T = 12 steps
        assert all(a > b for a, b in zip(recorder.lrs, recorder.lrs[1:], strict=False))

    def test_configurable_optimizer_and_step_schedule(self):
        module, train = _build(
            optimizer="AdamW",
            lr=1e-3,
            weight_decay=0.05,
            optimizer_kwargs={"betas": (0.9, 0.95)},
            lr_schedule="step",
            lr_milestones=(1,),
        )
        recorder = LrRecorder()
        trainer = _trainer(2, [recorder])
        trainer.fit(module, train)
        optimizer = trainer.optimizers[0]
        assert isinstance(optimizer, torch.optim.AdamW)
        assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["weight_decay"] == 0.05
        per_epoch = NUM_SAMPLES // BATCH
        assert recorder.lrs == pytest.approx([1e-3] * per_epoch + [1e-4] * per_epoch)

    def test_lars_and_a_constant_schedule(self):
        module, train = _build(optimizer="LARS", lr_schedule="constant")
        trainer = _trainer(1, limit_train_batches=2)
        trainer.fit(module, train)
        assert type(trainer.optimizers[0]).__name__ == "LARS"
        assert trainer.lr_scheduler_configs == []
