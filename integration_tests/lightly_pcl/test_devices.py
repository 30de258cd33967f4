"""lightly_pcl on every device (docs/gpu.md): state follows the inputs, CUDA matches the CPU, AMP, nccl.

The ``device`` tests run on the CPU here and on CUDA where a GPU is present; the ``cuda`` tests (CUDA-vs-CPU
float32 parity of the loss, the clustering and the encoders, values and gradients; fp16 autocast with
``GradScaler``; bf16; no host-device synchronisation in a step with ``validate_args=False``) and the ``nccl``
test are collected everywhere and skipped without GPUs.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightly_pcl import (
    IndexedDataset,
    ProtoNCELoss,
    PrototypeClustering,
    Prototypes,
    faiss_gpu_available,
    kmeans,
)
from torch.utils.data import DataLoader

from integration_tests.helpers.distributed import run_distributed
from integration_tests.lightly_pcl.toy import IMAGE, TwoViewToy, blobs, tiny_module, tiny_pcl

B, D = 6, 8


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Prototypes]:
    g = torch.Generator().manual_seed(seed)
    clusters = (5, 9)
    prototypes = Prototypes(
        labels=torch.stack([torch.randint(0, k, (B,), generator=g) for k in clusters]),
        centroids=[F.normalize(torch.randn(k, D, generator=g), dim=1) for k in clusters],
        concentrations=[0.1 + 0.2 * torch.rand(k, generator=g) for k in clusters],
    )
    return torch.randn(B, D, generator=g), torch.randn(B, D, generator=g), prototypes


def _to(prototypes: Prototypes, device: torch.device) -> Prototypes:
    return Prototypes(
        prototypes.labels.to(device),
        [c.to(device) for c in prototypes.centroids],
        [p.to(device) for p in prototypes.concentrations],
        prototypes.temperature,
    )


def _loss(**kwargs) -> ProtoNCELoss:
    torch.manual_seed(0)
    return ProtoNCELoss(memory_bank_size=(16, D), num_negative_prototypes=4, **kwargs)


def _loss_and_grads(device: torch.device, steps: int = 3, **kwargs):
    """A loss built on the CPU (as PML/Lightly users do) and called with inputs on ``device``."""
    criterion = _loss(**kwargs)
    values, grads = [], []
    for step in range(steps):
        q, k, prototypes = _inputs(step)
        q = q.to(device).requires_grad_()
        values.append(criterion(q, k.to(device), _to(prototypes, device)))
        grads.append(torch.autograd.grad(values[-1], q)[0])
    return criterion, torch.stack(values), torch.stack(grads)


class TestFollowsTheDevice:
    def test_loss_and_memory_bank_follow_the_inputs(self, device):
        criterion, values, grads = _loss_and_grads(device)
        assert values.device.type == device.type and grads.device.type == device.type
        assert criterion.memory_bank.bank.device.type == device.type
        assert criterion.memory_bank.bank_ptr.device.type == device.type
        assert (
            int(criterion.memory_bank.bank_ptr) == 0
        )  # 6 + 6 keys, then 4 of 6 reach the end (Lightly's rule)
        assert torch.isfinite(values).all() and torch.isfinite(grads).all()
        state = criterion.state_dict()  # the extra state (bank, generator) round-trips from the device
        fresh = _loss()
        fresh.load_state_dict(state)
        torch.testing.assert_close(fresh.memory_bank.bank, criterion.memory_bank.bank.cpu())

    def test_clustering_state_lives_on_the_features_device(self, device):
        clustering = PrototypeClustering(
            num_clusters=(3, 6), num_redo=1, min_points_per_centroid=1, backend="torch", progress=False
        )
        clustering.fit(blobs(num_per_blob=10, num_blobs=3, dim=D).to(device), epoch=2)
        for tensor in (
            clustering.labels,
            clustering.epoch,
            *clustering.centroids,
            *clustering.concentrations,
        ):
            assert tensor.device.type == device.type
        prototypes = clustering(torch.tensor([0, 15, 29], device=device))
        assert prototypes.labels.device.type == device.type and prototypes.temperature == 0.2

    def test_e_step_encodes_on_the_requested_device(self, device):
        clustering = PrototypeClustering(
            num_clusters=(4,), num_redo=1, min_points_per_centroid=1, backend="torch", progress=False
        )
        model = tiny_pcl(0).to(device).eval()
        loader = DataLoader(IndexedDataset(TwoViewToy(24, eval_view=True)), batch_size=8)
        clustering.update(model.forward_momentum, loader, epoch=0, device=device)
        assert clustering.labels.device.type == device.type and clustering.num_samples == 24

    @pytest.mark.parametrize("backend", ["torch", "auto"])
    def test_kmeans_returns_on_the_points_device(self, device, backend):
        result = kmeans(blobs(num_per_blob=8, num_blobs=3, dim=D).to(device), 3, num_redo=1, backend=backend)
        for tensor in (result.centroids, result.assignments, result.distances):
            assert tensor.device.type == device.type

    def test_lightning_trains_on_the_device(self, device):
        module = tiny_module(0, warmup_epochs=0)
        train = DataLoader(IndexedDataset(TwoViewToy(32)), batch_size=8)
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        trainer = pl.Trainer(
            max_epochs=1,
            accelerator=accelerator,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_train_batches=2,
        )
        trainer.fit(module, train)
        assert module.estep_count == 1
        assert module.clustering.labels.device.type == device.type
        assert module.criterion.memory_bank.bank.device.type == device.type
        assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.cuda
class TestCudaMatchesCpu:
    def test_proto_nce_values_gradients_and_bank(self, cuda_device):
        cpu_loss, cpu_values, cpu_grads = _loss_and_grads(torch.device("cpu"))
        cuda_loss, cuda_values, cuda_grads = _loss_and_grads(cuda_device)
        torch.testing.assert_close(cuda_values.cpu(), cpu_values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cuda_grads.cpu(), cpu_grads, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            cuda_loss.memory_bank.bank.cpu(), cpu_loss.memory_bank.bank, rtol=0, atol=1e-6
        )
        assert torch.equal(cuda_loss.memory_bank.bank_ptr.cpu(), cpu_loss.memory_bank.bank_ptr)

    def test_official_duplicates_unmasked_too(self, cuda_device):
        _, cpu_values, cpu_grads = _loss_and_grads(torch.device("cpu"), mask_duplicate_positives=False)
        _, cuda_values, cuda_grads = _loss_and_grads(cuda_device, mask_duplicate_positives=False)
        torch.testing.assert_close(cuda_values.cpu(), cpu_values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cuda_grads.cpu(), cpu_grads, rtol=1e-4, atol=1e-5)

    def test_clustering_parity(self, cuda_device):
        features = blobs(num_per_blob=20, num_blobs=4, dim=D, spread=0.1)

        def fit(device):
            clustering = PrototypeClustering(
                num_clusters=(4, 8), num_redo=2, min_points_per_centroid=1, backend="torch", progress=False
            )
            return clustering.fit(features.to(device))

        cpu, cuda = fit("cpu"), fit(cuda_device)
        assert torch.equal(cuda.labels.cpu(), cpu.labels)
        for a, b in zip(
            cuda.centroids + cuda.concentrations, cpu.centroids + cpu.concentrations, strict=True
        ):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)

    @pytest.mark.skipif(not faiss_gpu_available(), reason="the installed faiss has no GPU support")
    def test_auto_kmeans_uses_faiss_on_the_gpu(self, cuda_device):
        x = blobs(num_per_blob=30, num_blobs=4, dim=D, spread=0.1)
        on_gpu = kmeans(x.to(cuda_device), 4, num_redo=2)  # auto: faiss GpuIndexFlatL2
        on_cpu = kmeans(x, 4, num_redo=2, backend="faiss")
        assert on_gpu.assignments.device.type == "cuda"
        assert on_gpu.objective == pytest.approx(on_cpu.objective, rel=1e-3)

    def test_encoders_values_and_gradients(self, cuda_device):
        cpu_model = tiny_pcl(0)
        cuda_model = tiny_pcl(0).to(cuda_device)
        x = torch.randn(5, *IMAGE)
        out_cpu, out_cuda = cpu_model(x), cuda_model(x.to(cuda_device))
        torch.testing.assert_close(out_cuda.cpu(), out_cpu, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            cuda_model.forward_momentum(x.to(cuda_device)).cpu(),
            cpu_model.forward_momentum(x),
            rtol=1e-4,
            atol=1e-5,
        )
        out_cpu.square().sum().backward()
        out_cuda.square().sum().backward()
        for p_cpu, p_cuda in zip(cpu_model.parameters(), cuda_model.parameters(), strict=True):
            if p_cpu.grad is not None:
                torch.testing.assert_close(p_cuda.grad.cpu(), p_cpu.grad, rtol=1e-4, atol=1e-5)

    def test_no_host_sync_in_an_unchecked_step(self, cuda_device):
        criterion = _loss(validate_args=False)
        clustering = PrototypeClustering(
            num_clusters=(4, 8), num_redo=1, min_points_per_centroid=1, backend="torch", progress=False,
            validate_args=False,
        )  # fmt: skip
        clustering.fit(blobs(num_per_blob=10, num_blobs=4, dim=D).to(cuda_device))
        q, k, _ = _inputs()
        q, k = q.to(cuda_device).requires_grad_(), k.to(cuda_device)
        indices = torch.arange(B, device=cuda_device)
        criterion(q, k)  # the bank moves to the GPU once (outside the checked region)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = criterion(q, k, clustering(indices))
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(loss)

    def test_fp16_autocast_with_grad_scaler(self, cuda_device):
        model = tiny_pcl(0).to(cuda_device)
        criterion = _loss().to(cuda_device)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        scaler = torch.amp.GradScaler("cuda")
        _, _, prototypes = _inputs()
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        for _ in range(3):
            x = torch.randn(B, *IMAGE, device=cuda_device)
            with torch.autocast("cuda", dtype=torch.float16):
                loss = criterion(model(x), model.forward_momentum(x + 0.1), _to(prototypes, cuda_device))
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            assert torch.isfinite(loss)
        after = [p for p in model.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        assert (
            criterion.memory_bank.bank.dtype == torch.float32
            and torch.isfinite(criterion.memory_bank.bank).all()
        )

    def test_bf16_autocast_matches_float32_roughly(self, cuda_device):
        q, k, prototypes = _inputs()
        layer = torch.nn.Linear(D, D).to(cuda_device)
        full = _loss()(layer(q.to(cuda_device)), k.to(cuda_device), _to(prototypes, cuda_device))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = _loss()(layer(q.to(cuda_device)), k.to(cuda_device), _to(prototypes, cuda_device))
        half.backward()
        assert torch.isfinite(half) and layer.weight.grad.dtype == torch.float32
        assert abs(half.item() - full.item()) < 0.05 * abs(full.item()) + 0.05

    def test_lightning_16_mixed_keeps_float32_parameters(self, cuda_device):
        module = tiny_module(0, warmup_epochs=0)
        train = DataLoader(IndexedDataset(TwoViewToy(32)), batch_size=8)
        pl.Trainer(
            max_epochs=1,
            accelerator="gpu",
            devices=1,
            precision="16-mixed",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_train_batches=2,
        ).fit(module, train)
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())


def _nccl_banks(rank: int, world_size: int) -> dict:
    device = torch.device("cuda", rank)
    criterion = _loss().to(device)
    q = torch.randn(B, D, device=device, requires_grad=True)
    k = F.normalize(torch.randn(B, D, device=device) + rank, dim=1)
    criterion(q, k)
    clustering = PrototypeClustering(
        num_clusters=(4,), num_redo=1, min_points_per_centroid=1, backend="torch", progress=False
    )
    features = blobs(num_per_blob=10, num_blobs=4, dim=D, seed=rank).to(device)  # rank 0's clustering wins
    clustering.fit(features)
    return {"bank": criterion.memory_bank.bank.cpu(), "key": k.cpu(), "labels": clustering.labels.cpu()}


@pytest.mark.nccl
@pytest.mark.distributed
def test_nccl_banks_hold_every_ranks_keys_and_clusterings_agree():
    ranks = run_distributed(_nccl_banks, world_size=2, backend="nccl")
    both = torch.cat([ranks[0]["key"], ranks[1]["key"]])
    for result in ranks:
        torch.testing.assert_close(result["bank"][: 2 * B], both)
        assert torch.equal(result["labels"], ranks[0]["labels"])
