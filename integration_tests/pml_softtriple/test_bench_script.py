"""examples/bench_softtriple.py: its floor does the three products, its target checks read the right cells."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from integration_tests.helpers.examples import load_example


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_example("bench_softtriple.py")


def test_floor_runs_the_three_products_in_the_stated_layouts(bench: ModuleType, monkeypatch) -> None:
    shapes = []
    real_mm = torch.mm

    def recording_mm(a, b, *args, **kwargs):
        shapes.append((tuple(a.shape), a.is_contiguous(), tuple(b.shape), b.is_contiguous()))
        return real_mm(a, b, *args, **kwargs)

    floor, _ = bench.make_call("floor", bench.Size(4, 6, 3, 2), reg=False)
    monkeypatch.setattr(torch, "mm", recording_mm)
    floor()
    # similarities w^T x_hat^T, embedding gradient G w^T, centre gradient x_hat^T G (x_hat^T contiguous)
    assert shapes == [
        ((6, 6), False, (6, 4), True),
        ((4, 6), True, (6, 6), False),
        ((6, 4), True, (4, 6), True),
    ]


def test_timing_cells_and_target_checks(bench: ModuleType) -> None:
    size = bench.Size(8, 6, 5, 2)
    times = bench.time_size(size, reg=False, repeats=1, warmup=1, large_repeats=1)
    assert {"ours_ms", "pml_ms", "floor_ms", "ours_wall_ms"} <= set(times)
    assert all(value > 0 for key, value in times.items() if key.endswith("_ms"))
    rows = [
        {"size": {"batch": 256, "classes": 100}, "reg": False, "ours_ms": 1.2, "pml_ms": 3, "floor_ms": 1},
        {"size": {"batch": 32, "classes": 100}, "reg": False, "ours_ms": 1.0, "pml_ms": 1.4, "floor_ms": 0.2},
    ]
    checks = {name: ok for name, _, ok in bench.check_targets(rows)}
    assert checks["reg off, B=256, C=100: <= 1.3x the matmul floor"] is True  # 1.2x
    assert checks["reg off, B=32: >= 1.5x faster than PML"] is False  # 1.4x


def test_traffic_bound_stand_in_runs(bench: ModuleType) -> None:
    times = bench.time_traffic_bound(bench.Size(8, 6, 5, 3), repeats=2)
    assert set(times) == {"ours", "floor", "bound"} and all(t > 0 for t in times.values())
