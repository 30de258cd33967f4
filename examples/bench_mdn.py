"""Benchmark Metadata Normalization against its anchors, side by side in one process.

Part ``layers``: timm ``resnet18``, batch 64, 64x64 images, one forward + backward, CPU:

- ``batchnorm``   — plain timm resnet18 (the anchor);
- ``mdn_replace`` — every BatchNorm2d replaced by ``MetadataNorm2d`` (``norm_layer=MetadataNorm2d``), the
  target being at most 1.15x the anchor's time;
- ``mdn_after``   — ``mdn_resnet18(mdn_sites="all")``: BatchNorm kept, MDN after all 20 of them and on
  the head;
- ``mdn_head``    — ``mdn_resnet18``: one MDN on the pooled features (the paper's MDN-Linear).

Part ``effnet``: timm ``efficientnet_b0``, same batch and image size, forward + backward:

- ``effnet_batchnorm`` — plain timm efficientnet_b0 (49 ``BatchNormAct2d``; the anchor);
- ``effnet_mdn``       — every one of them replaced: ``norm_layer=partial(MetadataNorm2d, kernel=k)``, which
  timm's ``get_norm_act_layer`` resolves to ``MetadataNormAct2d`` (MDN, then the block's own activation); the
  target being at most 1.15x the anchor's time.

Part ``dcor``: ``timm_mdn.distance_correlation_sqr`` vs ``dcor.u_distance_correlation_sqr`` (float64) at
n = 2000, d = 84 (the paper's 84-d features), and ours alone at n = 10000 (dcor's multi-column path needs
about n^2 d x 8 bytes there, 67 GB).

Devices: ``--device`` (default: ``cuda`` when available). On CUDA each step is timed with CUDA events
(``examples/device_timing.py``) and peak memory is ``torch.cuda.max_memory_allocated`` above the allocation
before the variant was built; the ``dcor`` package is NumPy, so it stays on the CPU and our dcor² runs on the
device. ``--quick``: tiny sizes and 3 repeats, a smoke run of a few seconds on a CPU.

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

    flock /tmp/graftkit-bench.lock python examples/bench_mdn.py --device cpu --threads 1 --out out/bench_mdn
    python examples/bench_mdn.py --part effnet --device cpu --threads 1 --repeats 20
    python examples/bench_mdn.py --device cuda --out out/bench_mdn_cuda
    python examples/bench_mdn.py --device cpu --quick --out /tmp/bench_mdn   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import timm
import timm_mdn
import torch
from timm_mdn import MetadataKernel, MetadataNorm2d, distance_correlation_sqr, enable_metadata_kwarg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_timing import DeviceTimer, add_device_argument, peak_memory_mib, reset_peak_memory
from peak_rss import peak_rss_kib

LAYER_VARIANTS = ("batchnorm", "mdn_replace", "mdn_after", "mdn_head")
EFFNET_VARIANTS = ("effnet_batchnorm", "effnet_mdn")
DCOR_VARIANTS = ("ours_n2000", "dcor_n2000", "ours_n10000")


@dataclass(frozen=True)
class Sizes:
    """Batch and image size of the model parts; n of the two dcor cells."""

    batch: int = 64
    image: int = 64
    dcor_n: int = 2000
    dcor_big: int = 10000


QUICK = Sizes(batch=8, image=32, dcor_n=300, dcor_big=600)


def _kernel(n: int = 2000) -> tuple[MetadataKernel, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = (torch.arange(n) % 2).float()
    cf = torch.rand(n, generator=g) * 3 + 2 * y
    kernel = MetadataKernel.from_columns(confounders=cf, labels=y)
    return kernel, kernel.design(cf, y)


def build_step(variant: str, device: torch.device, sizes: Sizes) -> Callable[[], None]:
    """A closure running one forward + backward of ``variant`` on fixed inputs on ``device``."""
    assert timm_mdn.models is not None  # registers the mdn_* models
    kernel, design = _kernel()
    torch.manual_seed(0)
    if variant == "effnet_batchnorm":
        model = timm.create_model("efficientnet_b0", num_classes=10)
    elif variant == "effnet_mdn":
        model = timm.create_model(
            "efficientnet_b0", num_classes=10, norm_layer=partial(MetadataNorm2d, kernel=kernel)
        )
        enable_metadata_kwarg(model)
    elif variant == "batchnorm":
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
    model.to(device).train()
    x = torch.randn(sizes.batch, 3, sizes.image, sizes.image).to(device)
    metadata = design[: sizes.batch].to(device)
    takes_metadata = variant not in ("batchnorm", "effnet_batchnorm")

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(x, metadata=metadata) if takes_metadata else model(x)
        out.float().logsumexp(1).mean().backward()

    return step


def build_dcor(variant: str, device: torch.device, sizes: Sizes) -> Callable[[], None]:
    n = sizes.dcor_big if variant.endswith("10000") else sizes.dcor_n
    g = torch.Generator().manual_seed(0)
    features = torch.randn(n, 84, generator=g, dtype=torch.float64)
    confounder = features[:, :1].square() + torch.randn(n, 1, generator=g, dtype=torch.float64)
    if variant.startswith("dcor"):  # NumPy: on the CPU whatever --device
        import dcor

        f_np, c_np = features.numpy(), confounder.numpy()
        dcor.u_distance_correlation_sqr(f_np[:50], c_np[:50])  # compile dcor's kernels outside the timing
        return lambda: dcor.u_distance_correlation_sqr(f_np, c_np)
    features, confounder = features.to(device), confounder.to(device)
    return lambda: distance_correlation_sqr(features, confounder)


def build(variant: str, device: torch.device, sizes: Sizes) -> Callable[[], None]:
    if variant in LAYER_VARIANTS or variant in EFFNET_VARIANTS:
        return build_step(variant, device, sizes)
    return build_dcor(variant, device, sizes)


def _timer_device(variant: str, device: torch.device) -> torch.device:
    return torch.device("cpu") if variant.startswith("dcor") else device


def time_interleaved(
    variants: tuple[str, ...], repeats: int, warmup: int, device: torch.device, sizes: Sizes
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds of each step (wall-clock on a CPU, CUDA-event time on a GPU) and process CPU seconds."""
    steps = {v: build(v, device, sizes) for v in variants}
    timers = {v: DeviceTimer(_timer_device(v, device)) for v in variants}
    for _ in range(warmup):
        for variant, step in steps.items():
            timers[variant].time(step)
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for variant, step in steps.items():
            wall[variant].append(timers[variant].time(step))
            cpu[variant].append(timers[variant].last_cpu)
    return wall, cpu


def _runs(variant: str) -> int:
    return 1 if variant in DCOR_VARIANTS else 2


def _child(variant: str, sizes: Sizes) -> None:
    """Fresh process: take the peak-RSS baseline after imports, build, run, print the growth in MiB."""
    torch.ones(64, 64) @ torch.ones(64, 64)  # warm up torch's allocator and thread pool
    baseline = peak_rss_kib()
    step = build(variant, torch.device("cpu"), sizes)
    for _ in range(_runs(variant)):
        step()
    print(json.dumps({"variant": variant, "peak_mib": (peak_rss_kib() - baseline) / 1024}))


def peak_memory(variant: str, threads: int, device: torch.device, quick: bool) -> float:
    """Peak memory of building and running ``variant``: GPU allocations on CUDA, else a fresh process' RSS."""
    if _timer_device(variant, device).type == "cuda":
        reset_peak_memory(device)
        before = torch.cuda.memory_allocated(device)
        step = build(variant, device, QUICK if quick else Sizes())
        for _ in range(_runs(variant)):
            step()
        peak = peak_memory_mib(device)
        del step
        return float("nan") if peak is None else peak - before / 2**20
    cmd = [sys.executable, __file__, "--child", variant, "--threads", str(threads)]
    cmd += ["--quick"] if quick else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return float(json.loads(out)["peak_mib"])


def _memory(variants: tuple[str, ...], threads: int, device: torch.device, quick: bool) -> dict[str, float]:
    """Peak memory per variant; none on a CPU with ``--quick`` (each probe is a fresh process)."""
    if quick and device.type == "cpu":
        return {}
    return {v: peak_memory(v, threads, device, quick) for v in variants}


def table(
    variants: tuple[str, ...],
    wall: dict[str, list[float]],
    cpu: dict[str, list[float]],
    memory: dict[str, float],
    anchor: str,
) -> str:
    base, base_cpu = statistics.median(wall[anchor]), statistics.median(cpu[anchor])
    rows = [
        f"| variant | median time (s) | time ratio to {anchor} | median CPU (s) | CPU ratio | "
        "peak memory above baseline (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for v in variants:
        med, med_cpu = statistics.median(wall[v]), statistics.median(cpu[v])
        rows.append(
            f"| {v} | {med:.4f} | {med / base:.3f} | {med_cpu:.4f} | {med_cpu / base_cpu:.3f} | "
            + (f"{memory[v]:.0f} |" if v in memory else "n/a |")
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("layers", "effnet", "dcor", "all"), default="all")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed steps per variant (20; 3 with --quick)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 3 repeats: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="also write report.md and results.json here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    add_device_argument(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else Sizes()
    if args.child:
        _child(args.child, sizes)
        return 0
    device = torch.device(args.device)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 20)

    command = "python examples/bench_mdn.py " + " ".join(argv if argv is not None else sys.argv[1:])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    timing = "CUDA-event time" if device.type == "cuda" else "wall-clock"
    lines = [
        f"Command: `{command.strip()}`",
        "",
        f"torch {torch.__version__}, {where}; times are {timing}"
        + (" (--quick sizes)" if args.quick else ""),
        "",
    ]
    results: dict[str, object] = {"device": str(device), "sizes": sizes.__dict__}
    model_parts = [
        ("layers", LAYER_VARIANTS, "batchnorm", "resnet18"),
        ("effnet", EFFNET_VARIANTS, "effnet_batchnorm", "efficientnet_b0"),
    ]
    for part, variants, anchor, arch in model_parts:
        if args.part not in (part, "all"):
            continue
        times, cpu = time_interleaved(variants, repeats, 3, device, sizes)
        memory = _memory(variants, args.threads, device, args.quick)
        lines += [
            f"{arch}, batch {sizes.batch}, {sizes.image}x{sizes.image}, forward + backward, {repeats} "
            "interleaved repeats:",
            "",
            table(variants, times, cpu, memory, anchor),
            "",
        ]
        results[part] = {"wall": times, "cpu": cpu, "peak_mib": memory}
    if args.part in ("dcor", "all"):
        dcor_repeats = min(repeats, 3)
        times, cpu = time_interleaved(DCOR_VARIANTS[:2], dcor_repeats, 1, device, sizes)
        more, more_cpu = time_interleaved(DCOR_VARIANTS[2:], dcor_repeats, 0, device, sizes)
        times.update(more)
        cpu.update(more_cpu)
        memory = _memory(DCOR_VARIANTS, args.threads, device, args.quick)
        ours, theirs = statistics.median(times["ours_n2000"]), statistics.median(times["dcor_n2000"])
        lines += [
            f"dcor² (float64), d = 84, {dcor_repeats} interleaved repeats (ours on {device}, the dcor "
            f"package on the CPU); n = {sizes.dcor_n} for the *_n2000 rows and {sizes.dcor_big} for "
            f"ours_n10000; the dcor package is {theirs / ours:.1f}x slower than ours at n = {sizes.dcor_n}:",
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
