"""Epoch time and peak memory of Disentangled-VAE vs CADA-VAE, side by side on the same data.

    flock /tmp/graftkit-bench.lock python examples/gzsl_speed_benchmark.py --out out/gzsl_speed
    python examples/gzsl_speed_benchmark.py --device cuda --out out/gzsl_speed_cuda
    python examples/gzsl_speed_benchmark.py --device cpu --quick --out /tmp/gzsl_quick   # seconds: plumbing

Both models are trained by the same ``gzsl_dvae.train_vae`` loop (batch 50, Adam/AMSGrad) on the same
CUB-sized problem: 7057 training samples of 2048-d features, 312-d attributes, 150 seen classes, with
CADA-VAE's published architecture (2048-1560-64 / 64-1660-2048, 312-1450-64 / 64-665-312). The
benchmark's reduced size (512-d features, hidden layers / 4, as in ``gzsl_benchmark.py``) is timed too.

Timing: one process, both models built first, then ``--repeats`` rounds that each time one full epoch of every
model, alternating which goes first; the ratio is of the medians (interleaving makes background load hit both
alike). Feature values are random: the cost does not depend on them. On ``--device cuda`` the data and models
live on the GPU and an epoch is timed with CUDA events around ``torch.cuda.synchronize``
(``examples/device_timing.py``); ``train_vae``'s per-step finiteness check (its documented host-device
synchronisation) is part of the timed epoch, as users run it.

Peak memory: each model in a fresh subprocess that records its peak resident set size (``VmHWM`` of
``/proc/self/status``; ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` elsewhere) after importing torch and
building the data (the baseline), then builds the model and trains one epoch; the reported number is the
increase of the peak over that baseline (``tracemalloc`` does not see torch's CPU allocations). ``VmHWM`` is
preferred on Linux because ``ru_maxrss`` keeps the parent's high-water mark across ``exec``. On CUDA: the
growth of ``torch.cuda.max_memory_allocated`` over the data alone while one epoch trains, in-process, after
``torch.cuda.reset_peak_memory_stats``.

``--quick`` times a tiny configuration once (seconds on a CPU, no memory probe there): it checks the plumbing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from gzsl_dvae import CADAVAE, DisentangledVAE, train_vae

sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_timing import DeviceTimer, add_device_argument, peak_memory_mib, reset_peak_memory
from peak_rss import peak_rss_kib

CONFIGS = {
    # name: (samples, feature dim, attribute dim, classes, visual hidden, attribute hidden)
    "published (CUB size)": (7057, 2048, 312, 150, (1560, 1660), (1450, 665)),
    "benchmark (reduced)": (3750, 512, 312, 150, (390, 415), (363, 166)),
    "quick (tiny)": (500, 64, 32, 10, (64, 64), (32, 32)),
}
FULL = ["published (CUB size)", "benchmark (reduced)"]


def make_data(
    config: str, seed: int = 0, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random features, labels and attributes, drawn on the CPU (the same values on every device), moved."""
    n, d, a, k, _, _ = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    data = (
        torch.rand(n, d, generator=g),
        torch.randint(0, k, (n,), generator=g),
        torch.rand(k, a, generator=g),
    )
    return data[0].to(device), data[1].to(device), data[2].to(device)


def make_model(method: str, config: str, device: str = "cpu") -> torch.nn.Module:
    _, d, a, k, vh, ah = CONFIGS[config]
    if method == "cada":
        return CADAVAE(d, a, visual_hidden=vh, attribute_hidden=ah).to(device)
    return DisentangledVAE(d, a, k, visual_hidden=vh, attribute_hidden=ah).to(device)


def epoch_seconds(
    model: torch.nn.Module, data: tuple[torch.Tensor, ...], timer: DeviceTimer
) -> tuple[float, float]:
    """Seconds of one training epoch (GPU time on CUDA, wall clock on a CPU) and process CPU seconds."""
    x, y, attrs = data
    timer.time(lambda: train_vae(model, x, y, attrs, epochs=1, batch_size=50, device=timer.device))
    return timer.last_wall, timer.last_cpu


def cuda_peak_memory(method: str, config: str, device: str) -> float:
    """Growth of ``torch.cuda.max_memory_allocated`` (MiB) over the data while one epoch trains."""
    data = make_data(config, device=device)
    torch.manual_seed(0)
    reset_peak_memory(device)
    base = torch.cuda.memory_allocated(device) / 2**20
    model = make_model(method, config, device)
    train_vae(model, *data, epochs=1, batch_size=50, device=device)
    peak = peak_memory_mib(device)
    del model
    assert peak is not None
    return peak - base


def peak_memory_child(method: str, config: str) -> None:
    data = make_data(config)
    torch.manual_seed(0)
    base = peak_rss_kib()
    model = make_model(method, config)
    x, y, attrs = data
    train_vae(model, x, y, attrs, epochs=1, batch_size=50)
    print(json.dumps({"delta_mib": (peak_rss_kib() - base) / 1024}))


def peak_memory(method: str, config: str, threads: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, config, "--threads", str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["delta_mib"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("out/gzsl_speed"))
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed epochs per model and config (default 3)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1, steadier on a shared box)"
    )
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS))
    parser.add_argument(
        "--quick", action="store_true", help="one repeat of the tiny configuration (plumbing)"
    )
    add_device_argument(parser)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        peak_memory_child(*args.child)
        return 0
    device = str(torch.device(args.device))
    cuda = torch.device(device).type == "cuda"
    if args.configs is None:
        args.configs = ["quick (tiny)"] if args.quick else FULL
    if args.quick:
        args.repeats = 1
    args.out.mkdir(parents=True, exist_ok=True)
    memories: dict[str, dict[str, float | None]] = {}
    for c in args.configs:
        if cuda:
            memories[c] = {m: cuda_peak_memory(m, c, device) for m in ("cada", "dvae")}
        elif args.quick:
            memories[c] = {"cada": None, "dvae": None}
        else:
            memories[c] = {m: peak_memory(m, c, args.threads) for m in ("cada", "dvae")}
    timer = DeviceTimer(device)
    rows = []
    for config in args.configs:
        data = make_data(config, device=device)
        torch.manual_seed(0)
        models = {m: make_model(m, config, device) for m in ("cada", "dvae")}
        x, y, attrs = data
        for model in models.values():  # warm-up: a short epoch each
            train_vae(model, x[:500], y[:500], attrs, epochs=1, batch_size=50, device=device)
        times: dict[str, list[float]] = {"cada": [], "dvae": []}
        cpu_times: dict[str, list[float]] = {"cada": [], "dvae": []}
        for r in range(args.repeats):
            order = ("cada", "dvae") if r % 2 == 0 else ("dvae", "cada")
            for method in order:
                wall, cpu = epoch_seconds(models[method], data, timer)
                times[method].append(wall)
                cpu_times[method].append(cpu)
                print(f"{config} repeat {r} {method}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
        medians = {m: statistics.median(t) for m, t in times.items()}
        cpu_medians = {m: statistics.median(t) for m, t in cpu_times.items()}
        rows.append((config, medians, cpu_medians, memories[config], times))
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    if cuda:
        where = (
            f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}; medians of "
            f"{args.repeats} interleaved epochs (GPU time between CUDA events; CPU: the host process's "
            "time); "
            "peak memory = growth of torch.cuda.max_memory_allocated over the data while one epoch trains."
        )
        memory_name = "peak CUDA"
    else:
        where = (
            f"{platform.machine()} CPU, {args.threads} torch thread(s), torch {torch.__version__}; medians "
            f"of {args.repeats} interleaved epochs (wall clock, and process CPU time, which background load "
            "on a shared machine does not inflate); peak memory = increase of the peak RSS (VmHWM) over a "
            "post-import baseline, fresh process per model"
            + (" (not probed with --quick)." if args.quick else ".")
        )
        memory_name = "peak"
    lines = [
        "# Epoch time and peak memory: Disentangled-VAE vs CADA-VAE",
        "",
        f"Command: `python examples/gzsl_speed_benchmark.py {argv_text}`  ",
        f"Device: {device}. {where}",
        "",
        "| configuration | CADA-VAE epoch (s) | DVAE epoch (s) | ratio (wall) | ratio (CPU) | CADA-VAE "
        f"{memory_name} (MiB) | DVAE {memory_name} (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]

    digits = 3 if cuda else 2  # GPU epochs take milliseconds

    def mib(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0f}"

    for config, medians, cpu_medians, memory, _ in rows:
        lines.append(
            f"| {config} | {medians['cada']:.{digits}f} | {medians['dvae']:.{digits}f} | "
            f"{medians['dvae'] / medians['cada']:.2f}x | {cpu_medians['dvae'] / cpu_medians['cada']:.2f}x | "
            f"{mib(memory['cada'])} | {mib(memory['dvae'])} |"
        )
    per_repeat = "; ".join(
        f"{c}: CADA {[round(t, 2) for t in ts['cada']]}, DVAE {[round(t, 2) for t in ts['dvae']]}"
        for c, _, _, _, ts in rows
    )
    lines += ["", f"Per-repeat wall seconds: {per_repeat}", ""]
    (args.out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
