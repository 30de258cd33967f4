"""The GPU check: every CUDA test and every benchmark on one GPU, in one command, with one Markdown report.

    python3 -m tox -e gpu                  # on a machine with a CUDA GPU: about 10 minutes
    python3 -m tox -e gpu -- --dry-run     # anywhere: the same plumbing on the CPU, tiny sizes

Steps, each in a fresh process with its own time limit, so one failure never hides the others:

1. ``pytest -m cuda``: CUDA-vs-CPU float32 parity of every loss and layer (values and gradients), fp16
   autocast with ``GradScaler``, bf16, device-parametrized tests on ``cuda``, and nccl DDP with 2 GPUs. In the
   dry run the CUDA tests are only collected (``--collect-only``), which checks that they exist and import.
2. Each benchmark with ``--device cuda`` (CUDA-event timing, ``torch.cuda.max_memory_allocated``), each
   side by side with its anchor: SoftTriple vs PML's loss and the matmul floor; EGNN vs the dense form at
   32 x 20 nodes; MDN vs BatchNorm (resnet18, efficientnet_b0) and dcor² vs the ``dcor`` package; the
   Disentangled-VAE vs CADA-VAE epoch. In the dry run: ``--device cpu --quick``.

The report, ``<out>/report.md``, names the card, the driver's CUDA and torch versions, the pass/fail/skip
counts of the tests and each benchmark's own table; the exit status is non-zero if any step failed.
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark script and the arguments of its GPU run (the dry run adds ``--device cpu --quick``)."""

    key: str
    title: str
    script: str
    gpu_args: tuple[str, ...] = ()
    timeout_s: float = 150.0


BENCHMARKS = (
    Benchmark(
        "softtriple", "SoftTriple vs PML and the matmul floor", "bench_softtriple.py", ("--no-memory",)
    ),
    Benchmark("egnn", "EGNN vs the dense form, 32 x 20 nodes", "bench_egnn.py"),
    Benchmark("mdn", "MDN vs BatchNorm; dcor² vs dcor", "bench_mdn.py"),
    Benchmark("gzsl", "Disentangled-VAE vs CADA-VAE epoch", "gzsl_speed_benchmark.py"),
)


@dataclass
class StepResult:
    """What one step left: its status, seconds, a summary line and the Markdown it wrote."""

    name: str
    ok: bool
    seconds: float
    summary: str
    report: str


def _run(cmd: list[str], timeout_s: float, log: Path) -> tuple[int, float, str]:
    """Run ``cmd`` from the repository root, keep its output in ``log``; return (rc, seconds, output)."""
    tqdm.write(f"$ {' '.join(cmd)}")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc = 124
        output = f"{err.stdout or ''}{err.stderr or ''}\n[timed out after {timeout_s:.0f} s]"
        output = output if isinstance(output, str) else output.decode(errors="replace")
    seconds = time.perf_counter() - start
    log.write_text(output)
    return rc, seconds, output


_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")
_COLLECTED = re.compile(r"(\d+)(?:/\d+)? tests? collected")


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's closing line (``3 passed, 1 skipped``) or of ``--collect-only -q``."""
    lines = [line for line in output.splitlines() if line.strip()]
    counts: dict[str, int] = {}
    for line in reversed(lines[-5:]):
        found = _PYTEST_COUNT.findall(line)
        collected = _COLLECTED.search(line)
        if found or collected:
            counts.update(
                {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in found}
            )
            if collected:
                counts["collected"] = int(collected.group(1))
            break
    return counts


def run_tests(out: Path, dry_run: bool, timeout_s: float) -> StepResult:
    """``pytest -m cuda`` (collect-only in the dry run)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
    if dry_run:
        cmd.append("--collect-only")
    rc, seconds, output = _run(cmd, timeout_s, out / "pytest_cuda.log")
    counts = pytest_counts(output)
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no pytest summary line"
    # pytest exits 5 when everything is deselected: there must be CUDA tests to collect.
    ok = rc == 0 and (counts.get("collected", 0) > 0 or counts.get("passed", 0) > 0)
    tail = "\n".join(output.strip().splitlines()[-15:])
    report = f"```\n$ {' '.join(cmd[2:])}\n{tail}\n```\n"
    return StepResult("CUDA tests" + (" (collected only)" if dry_run else ""), ok, seconds, summary, report)


def run_benchmark(bench: Benchmark, out: Path, device: str, dry_run: bool) -> StepResult:
    """One benchmark script in a fresh process; its ``report.md`` goes into the combined report."""
    bench_out = out / bench.key
    bench_out.mkdir(parents=True, exist_ok=True)
    extra = ("--quick",) if dry_run else bench.gpu_args
    cmd = [sys.executable, str(EXAMPLES / bench.script), "--device", device, "--out", str(bench_out), *extra]
    timeout_s = 120.0 if dry_run else bench.timeout_s
    rc, seconds, output = _run(cmd, timeout_s, bench_out / "run.log")
    report_file = bench_out / "report.md"
    report = report_file.read_text() if report_file.is_file() else ""
    ok = rc == 0 and bool(report.strip())
    if ok:
        summary = "report written"
    else:
        summary = f"exit {rc}" + ("" if report.strip() else ", no report.md")
        report += "\n```\n" + "\n".join(output.strip().splitlines()[-20:]) + "\n```\n"
    body = f"`python examples/{bench.script} {' '.join(cmd[3:])}`\n\n" + report.strip() + "\n"
    return StepResult(bench.title, ok, seconds, summary, body)


def environment(device: str) -> list[str]:
    """Lines naming the machine: card, driver's CUDA, torch, Python."""
    lines = [f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}"]
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(
            f"- GPU: **{props.name}**, {props.total_memory / 2**30:.0f} GiB, compute capability "
            f"{props.major}.{props.minor}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)"
        )
    else:
        lines.append("- no GPU: dry run on the CPU (plumbing only; no timing here means anything)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("out/gpu_check"), help="report folder")
    parser.add_argument(
        "--dry-run", action="store_true", help="on the CPU: collect the CUDA tests, run quick benchmarks"
    )
    parser.add_argument("--only", nargs="+", choices=[b.key for b in BENCHMARKS], help="these benchmarks")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    parser.add_argument("--test-timeout", type=float, default=240.0, help="seconds for pytest -m cuda")
    args = parser.parse_args(argv)

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run to check the plumbing")
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    steps: list[StepResult] = []
    benches = [b for b in BENCHMARKS if args.only is None or b.key in args.only]
    todo = (0 if args.skip_tests else 1) + len(benches)
    with tqdm(total=todo, desc="gpu check", unit="step") as bar:
        if not args.skip_tests:
            steps.append(run_tests(out, args.dry_run, args.test_timeout))
            bar.update()
        for bench in benches:
            steps.append(run_benchmark(bench, out, device, args.dry_run))
            bar.update()

    mode = "dry run on the CPU" if args.dry_run else "GPU run"
    lines = [f"# graftkit GPU check ({mode})", "", *environment(device), ""]
    lines += ["| step | status | seconds | summary |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {'ok' if s.ok else 'FAILED'} | {s.seconds:.1f} | {s.summary} |" for s in steps]
    total = sum(s.seconds for s in steps)
    lines += ["", f"Total: {total:.0f} s.", ""]
    for step in steps:
        lines += [f"## {step.name}", "", step.report.strip(), ""]
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines[: 8 + len(steps)]))
    print(f"\nReport: {out / 'report.md'}")
    return 0 if all(s.ok for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
