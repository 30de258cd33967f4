"""The GPU entry point (examples/gpu_check.py): its parsing, and its CPU dry run end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from integration_tests.helpers.examples import load_example

gpu_check = load_example("gpu_check.py")


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("....\n12 passed, 3 skipped in 4.1s\n", {"passed": 12, "skipped": 3}),
        ("x\n1 failed, 2 passed, 1 error in 9s\n", {"failed": 1, "passed": 2, "error": 1}),
        ("a::b\n\n41/700 tests collected (659 deselected) in 3.2s\n", {"collected": 41, "deselected": 659}),
        ("no tests ran in 0.1s\n", {}),
    ],
)
def test_pytest_counts(output: str, expected: dict[str, int]) -> None:
    assert gpu_check.pytest_counts(output) == expected


def test_refuses_a_gpu_run_without_a_gpu(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path)])


def test_every_benchmark_script_exists_and_takes_device_quick_out() -> None:
    for bench in gpu_check.BENCHMARKS:
        source = (gpu_check.EXAMPLES / bench.script).read_text()
        assert "add_device_argument" in source, bench.script
        assert '"--quick"' in source and '"--out"' in source, bench.script


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path: Path) -> None:
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    assert rc == 0, report
    assert "CUDA tests (collected only) | ok" in report
    for bench in gpu_check.BENCHMARKS:
        assert f"| {bench.title} | ok |" in report
