"""SoftTripleLoss inside PML's own training and evaluation machinery."""

import logging

import pytest
import torch
from pml_softtriple import RecallAtKAccuracyCalculator, SoftTripleLoss, param_groups
from pytorch_metric_learning import losses, miners, testers, trainers

CPU = torch.device("cpu")


def _bimodal_classes(classes, per_mode=12, signal=4, nuisance=12, seed=0):
    """Each class is two blobs in the first ``signal`` dims; the other dims are large class-free noise.

    An untrained network retrieves by the noise; a trained one must learn to ignore those dimensions,
    which carries over to unseen classes built the same way.
    """
    gen = torch.Generator().manual_seed(seed)
    modes = torch.randn(len(classes), 2, signal, generator=gen) * 2.0
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for m in range(2):
            blob = modes[label, m] + 0.3 * torch.randn(per_mode, signal, generator=gen)
            xs.append(torch.cat([blob, 3.0 * torch.randn(per_mode, nuisance, generator=gen)], dim=1))
            ys += [cls] * per_mode
    return torch.utils.data.TensorDataset(torch.cat(xs), torch.tensor(ys))


def _models(dim=16, emb=16):
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(dim, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
    embedder = torch.nn.Linear(32, emb)
    return trunk, embedder


@pytest.mark.filterwarnings(
    "ignore:Converting a tensor with requires_grad=True to a scalar"
)  # PML's progress bar
def test_trainer_with_separate_loss_optimizer_hooks_miner_and_tester(caplog):
    caplog.set_level(logging.WARNING)
    train_set = _bimodal_classes(range(8), seed=1)  # classes 0..7 train
    test_set = _bimodal_classes(range(8, 16), seed=2)  # classes 8..15 test: class-disjoint
    trunk, embedder = _models()
    loss_func = SoftTripleLoss(num_classes=16, embedding_size=16, centers_per_class=2, la=10.0)
    model_groups = param_groups(torch.nn.ModuleList([trunk, embedder]), loss_func, lr=3e-3)
    optimizers = {
        "trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=3e-3),
        "embedder_optimizer": torch.optim.Adam(embedder.parameters(), lr=3e-3),
        "metric_loss_optimizer": torch.optim.Adam([model_groups[1]], lr=3e-1),
    }
    calc = RecallAtKAccuracyCalculator(recall_ks=(1, 2, 4), k="max_bin_count", device=CPU)
    tester = testers.GlobalEmbeddingSpaceTester(
        accuracy_calculator=calc, dataloader_num_workers=0, data_device=CPU, batch_size=64
    )

    def evaluate():
        return tester.test({"val": test_set}, 0, trunk, embedder)["val"]

    before = evaluate()
    seen = {"iterations": 0, "epochs": 0, "losses": []}

    def end_of_iteration(trainer):
        seen["iterations"] += 1
        seen["losses"].append(float(trainer.losses["total_loss"].detach()))

    def end_of_epoch(trainer):
        seen["epochs"] += 1
        return True

    fc_before = loss_func.fc.detach().clone()
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers=optimizers,
        batch_size=32,
        loss_funcs={"metric_loss": loss_func},
        mining_funcs={"tuple_miner": miners.MultiSimilarityMiner(epsilon=0.5)},
        dataset=train_set,
        data_device=CPU,
        dataloader_num_workers=0,
        end_of_iteration_hook=end_of_iteration,
        end_of_epoch_hook=end_of_epoch,
    )
    trainer.train(num_epochs=8)
    after = evaluate()

    assert seen["epochs"] == 8 and seen["iterations"] == 8 * (len(train_set) // 32)
    assert sum(seen["losses"][-3:]) < sum(seen["losses"][:3])
    assert not torch.equal(loss_func.fc.detach(), fc_before)  # the loss optimizer moved the centres
    assert loss_func.fc.dtype == torch.float32
    for key in (
        "precision_at_1_level0",
        "recall_at_1_level0",
        "recall_at_4_level0",
        "mean_average_precision_at_r_level0",
    ):
        assert key in after
    assert after["recall_at_1_level0"] == pytest.approx(after["precision_at_1_level0"])
    assert after["recall_at_1_level0"] > before["recall_at_1_level0"] + 0.1
    assert after["mean_average_precision_at_r_level0"] > 2 * before["mean_average_precision_at_r_level0"]


def test_multiple_losses_combines_softtriple_with_a_pair_loss():
    torch.manual_seed(0)
    x = torch.randn(12, 6, requires_grad=True)
    y = torch.tensor([0, 1, 2] * 4)
    soft = SoftTripleLoss(3, 6, centers_per_class=2)
    triplet = losses.TripletMarginLoss()
    combined = losses.MultipleLosses([soft, triplet], weights=[1.0, 0.5])
    value = combined(x, y)
    torch.testing.assert_close(value, soft(x, y) + 0.5 * triplet(x, y))
    value.backward()
    assert soft.fc.grad is not None and x.grad is not None


def test_cross_batch_memory_is_refused_for_a_proxy_loss():
    # SoftTriple compares embeddings with centres, never with other embeddings: a memory bank adds nothing,
    # and PML refuses the combination by class name, as it does for its own SoftTripleLoss.
    with pytest.raises(Exception, match="CrossBatchMemory not supported for SoftTripleLoss"):
        losses.CrossBatchMemory(SoftTripleLoss(3, 6), embedding_size=6)
