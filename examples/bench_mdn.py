"""Benchmark Metadata Normalization against its anchors, side by side in one process.

Part ``layers``: timm ``resnet18``, batch 64, 64x64 images, one forward + backward, CPU:

- ``batchnorm``   — plain timm resnet18 (the anchor);
- ``mdn_replace`` — every BatchNorm2d replaced by ``MetadataNorm2d`` (``norm_layer=MetadataNorm2d``), the
  target being at most 1.15x the anchor's time;
- ``mdn_after``   — ``mdn_resnet18(mdn_sites="all")``: BatchNorm kept, MDN after all 20 of them and on
  the head;
- ``mdn_head``    — ``mdn_resnet18``: one MDN on the pooled features (the paper's MDN-Linear).

Part ``dcor``: ``timm_mdn.distance_correlation_sqr`` vs ``dcor.u_distance_correlation_sqr`` (float64) at
n = 2000, d = 84 (the paper's 84-d features), and ours alone at n = 10000 (dcor's multi-column path needs
about n^2 d x 8 bytes there, 67 GB).

Timing: all variants of a part live in one process and are interleaved step by step (so background load hits
them alike); the table gives medians over ``--repeats`` of wall-clock and of process CPU time, and their
ratios to the anchor. With ``--threads 1`` the CPU time is the most load-robust figure on a shared machine
(a descheduled process accrues none); with more threads it also counts spin-waiting. Wrap the run in
``flock /tmp/graftkit-bench.lock`` on a shared machine.

Peak memory: each variant runs again in a fresh subprocess that imports everything, runs one tiny warm-up op,
records its resident high-water mark as the baseline, then builds its model and inputs, runs the measured work
(two steps, or one dcor²) and reports the growth of the high-water mark above that baseline: parameters,
activations, gradients and buffers. The mark is ``VmHWM`` from ``/proc/self/status`` (Linux), not
``ru_maxrss``: Linux carries ``ru_maxrss`` over ``fork``/``exec``, so a large parent would hide the child's
peak. ``tracemalloc`` does not see torch's CPU allocations at all.

    flock /tmp/graftkit-bench.lock python examples/bench_mdn.py --out out/bench_mdn
    python examples/bench_mdn.py --part layers --repeats 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import timm
import timm_mdn
import torch
from timm_mdn import MetadataKernel, MetadataNorm2d, distance_correlation_sqr, enable_metadata_kwarg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak_rss import peak_rss_kib

LAYER_VARIANTS = ("batchnorm", "mdn_replace", "mdn_after", "mdn_head")
DCOR_VARIANTS = ("ours_n2000", "dcor_n2000", "ours_n10000")
BATCH, SIZE = 64, 64


def _kernel(n: int = 2000) -> tuple[MetadataKernel, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = (torch.arange(n) % 2).float()
    cf = torch.rand(n, generator=g) * 3 + 2 * y
    kernel = MetadataKernel.from_columns(confounders=cf, labels=y)
    return kernel, kernel.design(cf, y)


def build_step(variant: str) -> Callable[[], None]:
    """A closure running one forward + backward of ``variant`` on fixed inputs."""
    assert timm_mdn.models is not None  # registers the mdn_* models
    kernel, design = _kernel()
    torch.manual_seed(0)
    if variant == "batchnorm":
        model = timm.create_model("resnet18", num_classes=10)
    elif variant == "mdn_replace":
        model = timm.create_model(
            "resnet18", num_classes=10, norm_layer=partial(MetadataNorm2d, kernel=kernel)
        )
        enable_metadata_kwarg(model)
    elif variant == "mdn_after":
        model = timm.create_model("mdn_resnet18", num_classes=10, mdn_kernel=kernel, mdn_sites="all")
    elif variant == "mdn_head":
        model = timm.create_model("mdn_resnet18", num_classes=10, mdn_kernel=kernel)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    model.train()
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    metadata = design[:BATCH]
    takes_metadata = variant != "batchnorm"

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(x, metadata=metadata) if takes_metadata else model(x)
        out.float().logsumexp(1).mean().backward()

    return step


def build_dcor(variant: str) -> Callable[[], None]:
    n = 10000 if variant.endswith("10000") else 2000
    g = torch.Generator().manual_seed(0)
    features = torch.randn(n, 84, generator=g, dtype=torch.float64)
    confounder = features[:, :1].square() + torch.randn(n, 1, generator=g, dtype=torch.float64)
    if variant.startswith("dcor"):
        import dcor

        f_np, c_np = features.numpy(), confounder.numpy()
        dcor.u_distance_correlation_sqr(f_np[:50], c_np[:50])  # compile dcor's kernels outside the timing
        return lambda: dcor.u_distance_correlation_sqr(f_np, c_np)
    return lambda: distance_correlation_sqr(features, confounder)


def build(variant: str) -> Callable[[], None]:
    return build_step(variant) if variant in LAYER_VARIANTS else build_dcor(variant)


def time_interleaved(
    variants: tuple[str, ...], repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU seconds of each step, variants interleaved."""
    steps = {v: build(v) for v in variants}
    for _ in range(warmup):
        for step in steps.values():
            step()
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for variant, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            wall[variant].append(time.perf_counter() - start)
            cpu[variant].append(time.process_time() - start_cpu)
    return wall, cpu


def _child(variant: str) -> None:
    """Fresh process: take the peak-RSS baseline after imports, build, run, print the growth in MiB."""
    torch.ones(64, 64) @ torch.ones(64, 64)  # warm up torch's allocator and thread pool
    baseline = peak_rss_kib()
    step = build(variant)
    for _ in range(2 if variant in LAYER_VARIANTS else 1):
        step()
    print(json.dumps({"variant": variant, "peak_mib": (peak_rss_kib() - baseline) / 1024}))


def peak_memory(variant: str, threads: int) -> float:
    cmd = [sys.executable, __file__, "--child", variant, "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return float(json.loads(out)["peak_mib"])


def table(
    variants: tuple[str, ...],
    wall: dict[str, list[float]],
    cpu: dict[str, list[float]],
    memory: dict[str, float],
    anchor: str,
) -> str:
    base, base_cpu = statistics.median(wall[anchor]), statistics.median(cpu[anchor])
    rows = [
        f"| variant | median wall (s) | wall ratio to {anchor} | median CPU (s) | CPU ratio | "
        "peak memory above baseline (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for v in variants:
        med, med_cpu = statistics.median(wall[v]), statistics.median(cpu[v])
        rows.append(
            f"| {v} | {med:.4f} | {med / base:.3f} | {med_cpu:.4f} | {med_cpu / base_cpu:.3f} | "
            f"{memory.get(v, float('nan')):.0f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("layers", "dcor", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per variant (dcor part: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--out", type=Path, default=None, help="also write report.md and results.json here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        _child(args.child)
        return 0

    command = "python examples/bench_mdn.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"Command: `{command.strip()}`", "", f"torch {torch.__version__}, {args.threads} threads", ""]
    results: dict[str, object] = {}
    if args.part in ("layers", "all"):
        times, cpu = time_interleaved(LAYER_VARIANTS, args.repeats, warmup=3)
        memory = {v: peak_memory(v, args.threads) for v in LAYER_VARIANTS}
        lines += [
            f"resnet18, batch {BATCH}, {SIZE}x{SIZE}, forward + backward, {args.repeats} interleaved "
            "repeats:",
            "",
            table(LAYER_VARIANTS, times, cpu, memory, "batchnorm"),
            "",
        ]
        results["layers"] = {"wall": times, "cpu": cpu, "peak_mib": memory}
    if args.part in ("dcor", "all"):
        repeats = min(args.repeats, 3)
        times, cpu = time_interleaved(DCOR_VARIANTS[:2], repeats, warmup=1)
        more, more_cpu = time_interleaved(DCOR_VARIANTS[2:], repeats, warmup=0)
        times.update(more)
        cpu.update(more_cpu)
        memory = {v: peak_memory(v, args.threads) for v in DCOR_VARIANTS}
        ours, theirs = statistics.median(times["ours_n2000"]), statistics.median(times["dcor_n2000"])
        lines += [
            f"dcor² (float64), d = 84, {repeats} interleaved repeats; the dcor package is "
            f"{theirs / ours:.1f}x slower than ours at n = 2000:",
            "",
            table(DCOR_VARIANTS, times, cpu, memory, "ours_n2000"),
            "",
        ]
        results["dcor"] = {"wall": times, "cpu": cpu, "peak_mib": memory}
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text("# Metadata Normalization benchmark\n\n" + report)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
