import pytest
import torch
import torch.distributed as dist

from integration_tests.helpers.distributed import run_distributed


def _all_reduce_rank(rank: int, world_size: int, scale: float) -> torch.Tensor:
    value = torch.tensor([float(rank + 1)]) * scale
    dist.all_reduce(value)
    return value


def _fail_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    return rank


@pytest.mark.distributed
def test_run_distributed_returns_each_ranks_result() -> None:
    results = run_distributed(_all_reduce_rank, 2.0, world_size=2)
    assert [r.item() for r in results] == [6.0, 6.0]


@pytest.mark.distributed
def test_run_distributed_reports_a_failing_rank() -> None:
    with pytest.raises(RuntimeError, match="rank one fails on purpose"):
        run_distributed(_fail_on_rank_one, world_size=2, timeout=60)
