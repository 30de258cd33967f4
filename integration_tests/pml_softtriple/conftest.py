"""Fixtures shared by the SoftTriple tests."""

from __future__ import annotations

import pytest
from pml_softtriple import _cpu_kernels


@pytest.fixture(params=["cpu_kernels", "pytorch"])
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once through the fused CPU kernels and once through the PyTorch implementation."""
    if request.param == "pytorch":
        monkeypatch.setattr(_cpu_kernels, "use_for", lambda tensor: False)
    elif not _cpu_kernels.available():
        pytest.skip("the fused CPU kernels could not be built on this machine")
    return request.param
