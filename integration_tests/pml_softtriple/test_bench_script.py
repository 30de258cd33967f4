"""examples/bench_softtriple.py: its floor does the three products, its target checks read the right cells."""

from __future__ import annotations

import json
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


def test_quick_cpu_run_writes_the_report(bench: ModuleType, tmp_path, monkeypatch) -> None:
    # What the GPU check's dry run calls: --device cpu --quick --out DIR (here one round at tiny sizes).
    monkeypatch.setattr(bench, "SIZES", (bench.Size(8, 6, 5, 2), bench.Size(16, 8, 7, 3), bench.SIZES[2]))
    assert (
        bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--repeats", "1", "--warmup", "0"])
        == 0
    )
    report = (tmp_path / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| B=")]
    assert len(rows) == 4 and sum("C=5" in row for row in rows) == 2  # 2 sizes x regulariser off / on
    assert "| target | CPU time | met |" in report and "process's CPU time" in report
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(row["ours_ms"] > 0 and row["pml_ms"] > 0 and row["floor_ms"] > 0 for row in results)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_device_cuda_without_a_gpu_is_refused(bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda", "--quick"])


@pytest.mark.cuda
def test_cuda_cells_time_on_the_device_and_measure_peak_memory(bench: ModuleType, cuda_device) -> None:
    times = bench.time_size(
        bench.Size(8, 6, 5, 2), reg=True, repeats=1, warmup=1, large_repeats=1, device="cuda"
    )
    assert all(times[f"{v}_ms"] > 0 for v in ("ours", "pml", "floor"))
    assert all(times[f"{v}_mib"] >= 0 for v in ("ours", "pml", "floor"))
