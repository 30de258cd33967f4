"""Shared pytest configuration: deterministic, single-threaded-friendly tests, CPU and (when present) CUDA.

Device convention (docs/gpu.md): a test that should run on every available device takes the ``device``
fixture, parametrized over ``cpu`` and ``cuda``; the ``cuda`` case carries the ``cuda`` marker and is
collected everywhere but skipped when ``torch.cuda.is_available()`` is false. A test that only makes sense on
a GPU (CUDA-vs-CPU parity, fp16 + ``GradScaler``) is marked ``@pytest.mark.cuda`` itself. Run the GPU share
alone with ``pytest -m cuda``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(
    os.environ.get("GRAFTKIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)

DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.cuda))
"""Parametrize values for device-generic tests: ``@pytest.mark.parametrize("device", DEVICES)``."""


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip ``cuda`` tests without a GPU, and ``nccl`` tests without two."""
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    if item.get_closest_marker("nccl") is not None and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices for nccl")


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each available device in turn: ``cpu``, then ``cuda`` (skipped without a GPU)."""
    return torch.device(request.param)


@pytest.fixture
def cuda_device() -> torch.device:
    """The current CUDA device, for tests marked ``cuda`` (CUDA-vs-CPU parity, fp16 with ``GradScaler``)."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture
def shared_data() -> Path:
    """The optional ``../shared/data`` folder; tests that use it are skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA
