"""Device-aware timing and peak memory for the benchmark scripts (CPU and CUDA alike).

Every benchmark takes ``--device`` (default: ``cuda`` when available, else ``cpu``) through
:func:`add_device_argument`, times its cells with :class:`DeviceTimer` and reads GPU peak memory with
:func:`reset_peak_memory` / :func:`peak_memory_mib`:

- on CUDA a timed call is bracketed by CUDA events and ``torch.cuda.synchronize``, so the figure is the GPU
  time of the queued kernels, not the Python time of launching them; peak memory is
  ``torch.cuda.max_memory_allocated`` (the caching allocator's high-water mark of live tensors);
- on a CPU the timer reports wall-clock (``time.perf_counter``) and process CPU time (``time.process_time``);
  CPU peak memory stays with each script's fresh-process ``VmHWM`` probe (``peak_rss.py``).

    timer = DeviceTimer(device)
    seconds = timer.time(lambda: step())      # one call, synchronised
    wall, cpu = timer.last_wall, timer.last_cpu
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

__all__ = [
    "DeviceTimer",
    "add_device_argument",
    "default_device",
    "peak_memory_mib",
    "reset_peak_memory",
    "synchronize",
]


def default_device() -> str:
    """``"cuda"`` when a GPU is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """Add the shared ``--device`` option (default: cuda if available)."""
    parser.add_argument(
        "--device",
        default=default_device(),
        help="device to benchmark on (default: cuda if available, else cpu)",
    )


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a fresh GPU peak-memory window (a no-op on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device | str) -> float | None:
    """``torch.cuda.max_memory_allocated`` in MiB since the last reset; ``None`` on a CPU."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


class DeviceTimer:
    """Time one call on ``device``: CUDA events on a GPU, wall and process CPU time on a CPU.

    Args:
        device: where the timed work runs.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.last_wall = float("nan")
        self.last_cpu = float("nan")

    def time(self, fn: Callable[[], object]) -> float:
        """Run ``fn()`` once and return its seconds (GPU time on CUDA, wall time on a CPU)."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            cpu0 = time.process_time()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.device)
            self.last_cpu = time.process_time() - cpu0
            self.last_wall = start.elapsed_time(end) / 1e3
            return self.last_wall
        wall0, cpu0 = time.perf_counter(), time.process_time()
        fn()
        self.last_wall = time.perf_counter() - wall0
        self.last_cpu = time.process_time() - cpu0
        return self.last_wall
