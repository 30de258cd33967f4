"""The resident-memory high-water mark of the running process, for the benchmark scripts' peak-memory probes.

Used by ``examples/bench_mdn.py`` and ``examples/gzsl_speed_benchmark.py``.
"""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["peak_rss_kib"]


def peak_rss_kib() -> int:
    """This process's resident high-water mark in KiB: ``VmHWM`` of ``/proc/self/status``, else ``ru_maxrss``.

    ``VmHWM`` first: Linux carries ``ru_maxrss`` over ``fork``/``exec``, so a large parent would hide a
    child's peak; ``ru_maxrss`` (KiB on Linux) where ``/proc`` is absent.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
