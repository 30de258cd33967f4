"""Run a function in 2 ``torch.distributed`` gloo processes on CPU and collect each rank's result.

Usage in a test::

    def _step(rank: int, world_size: int, batch: torch.Tensor) -> torch.Tensor:
        ...  # runs inside an initialised gloo process group
        return grad

    grads = run_distributed(_step, batch, world_size=2)  # [grad_rank0, grad_rank1]

The function must be importable (defined at module level) because processes are spawned. With
``backend="nccl"`` (tests marked ``nccl``: 2 GPUs) rank ``r`` runs with ``torch.cuda.set_device(r)``.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_distributed"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
    backend: str,
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        buffer = io.BytesIO()
        torch.save(out, buffer)  # bytes, not shared memory: safe after this process exits
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    *args: Any,
    world_size: int = 2,
    timeout: float = 300.0,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes and return results by rank.

    Raises:
        RuntimeError: if any rank raised (its traceback is included) or did not report in ``timeout`` s.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, results, backend), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outputs: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = results.get(timeout=timeout)
            if status == "ok":
                outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    except queue.Empty:
        pass
    finally:
        for proc in procs:
            proc.join(5.0)
            if proc.is_alive():
                proc.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    if len(outputs) != world_size:
        raise RuntimeError(f"only ranks {sorted(outputs)} of {world_size} reported within {timeout} s")
    return [outputs[rank] for rank in range(world_size)]
