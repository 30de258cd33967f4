"""Two gloo processes under DistributedDataParallel give exactly what one process gives on the whole batch."""

from functools import partial

import pytest
import timm
import torch
from timm_mdn import MetadataKernel, MetadataNorm2d, metadata_norm_layers
from torch.nn.parallel import DistributedDataParallel

from integration_tests.helpers.distributed import run_distributed

SHARDS = ((0, 5), (5, 8))  # uneven on purpose: the scale N/b must use the global batch size


def _model(kernel: MetadataKernel) -> torch.nn.Module:
    # Every norm site of a timm ResNet is MDN (no BatchNorm: DDP does not sync its statistics), with affine
    # (the fused node, its all-reduce in backward), plus the head MDN without one (the plain node).
    torch.manual_seed(0)
    norm = partial(MetadataNorm2d, affine=True)
    model = timm.create_model(
        "mdn_resnet18", num_classes=3, norm_layer=norm, mdn_kernel=kernel, layers=(1, 1, 1, 1)
    )
    return model.double()


def _data() -> tuple[MetadataKernel, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    y = (torch.arange(64) % 2).double()
    cf = torch.rand(64, generator=g, dtype=torch.float64) + y
    kernel = MetadataKernel.from_columns(confounders=cf, labels=y)
    x = torch.randn(2, 8, 3, 32, 32, generator=g, dtype=torch.float64)
    return kernel, x, kernel.design(cf, y)


def _train(model: torch.nn.Module, steps: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    outputs = []
    for x, metadata in steps:
        out = model(x, metadata=metadata)
        out.sum().backward()
        outputs.append(out.detach())
    return outputs


def _ddp_rank(
    rank: int, world_size: int, kernel: MetadataKernel, x: torch.Tensor, design: torch.Tensor
) -> dict:
    model = _model(kernel)
    ddp = DistributedDataParallel(model, broadcast_buffers=True)
    lo, hi = SHARDS[rank]
    steps = [(x[s, lo:hi], design[8 * s + lo : 8 * s + hi]) for s in range(2)]
    outputs = _train(ddp, steps)
    return {
        "outputs": outputs,
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "betas": [layer.running_beta.clone() for layer in metadata_norm_layers(model)],
        "buffers": sorted(n for n, _ in model.named_buffers()),
    }


@pytest.mark.distributed
def test_two_process_ddp_equals_one_process_on_the_whole_batch() -> None:
    kernel, x, design = _data()
    single = _model(kernel)
    expected = _train(single, [(x[s], design[8 * s : 8 * s + 8]) for s in range(2)])
    results = run_distributed(_ddp_rank, kernel, x, design, world_size=2)

    for rank, result in enumerate(results):
        lo, hi = SHARDS[rank]
        for step in range(2):  # each rank used its own metadata, not rank 0's broadcast
            torch.testing.assert_close(result["outputs"][step], expected[step][lo:hi], rtol=1e-9, atol=1e-9)
        # DDP averages the ranks' gradients; each rank's loss is the sum over its shard.
        for name, param in single.named_parameters():
            torch.testing.assert_close(result["grads"][name] * 2, param.grad, rtol=1e-8, atol=1e-8, msg=name)
        for beta, layer in zip(result["betas"], metadata_norm_layers(single), strict=True):
            torch.testing.assert_close(beta, layer.running_beta, rtol=1e-9, atol=1e-9)
        assert not any("metadata" in name.split(".")[-1] for name in result["buffers"])
