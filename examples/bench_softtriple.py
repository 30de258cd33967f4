"""Benchmark: ``pml_softtriple.SoftTripleLoss`` vs PML's ``SoftTripleLoss``, forward + backward, CPU or GPU.

Sizes (batch B, embedding d, classes C, centres K): (32, 64, 100, 10), (256, 512, 100, 10) and
(256, 512, 11318, 2) (Stanford Online Products: 11,318 training classes, K = 2), each with the centre
regulariser off and on. "On" is the paper's loss: ours with its default ``tau=0.2``; PML with
``weight_regularizer=SparseCentersRegularizer(C, K), weight_reg_weight=0.2`` (the same value, see the tests).

Time: one process, one thread by default (``--threads``). For each size the variants run interleaved,
round-robin, ``--repeats`` times after ``--warmup`` untimed calls, and the median is reported. A call is
``loss(x, y).backward()`` with ``x`` requiring grad; gradients are reset outside the timed region. As in
``timeit``, Python's garbage collector is off while the rounds run (one collection before them); an earlier
version collected before every call, which evicts the caches and inflated the millisecond calls (the B = 32
floor read 0.36 ms that way, 0.13 ms without). The
"matmul floor" is the three ``B x d x (C K)`` products that any implementation has to do (similarities,
embedding gradient, centre gradient) on tensors of the same shapes, timed in the same round-robin, each in the
operand layout that ran fastest among the transposition choices on this machine (``--analysis`` prints them;
with ``x^T`` contiguous the similarity product at C = 11318 takes about a fifth less than ``x @ w``). The loss
uses the same layouts, so the ratio is not flattered by a slow floor.
PML with the regulariser at C = 11318 builds two (C K)^2 boolean masks at construction (outside the timed
region) and a (C K)^2 similarity matrix per call; one call takes minutes, so it is timed
``--large-repeats`` times (default 1) without warm-up: a single measurement, said so in the report.

Peak memory: every (size, regulariser, variant) runs once more in a fresh subprocess of this script. After
the imports, the inputs and a warm-up call at a tiny size, the process resets its peak-RSS counter
(``/proc/self/clear_refs``) and records its resident set; it then constructs the loss (PML's masks
included) and runs one forward + backward. Reported: peak RSS (``VmHWM``) minus that baseline, in MiB.
Unlike ``tracemalloc`` this sees torch's CPU tensors. Where ``clear_refs`` is unavailable,
``getrusage(RUSAGE_SELF).ru_maxrss`` minus the baseline RSS is used.

GPU (``--device cuda``, the default when one is available): the same cells, variants and round-robin, all on
the device. Each call is timed with CUDA events after a ``torch.cuda.synchronize`` (the GPU time of the queued
kernels; the wall-clock columns are the host's time for the synchronised call), and the peak memory of each
variant is ``torch.cuda.max_memory_allocated`` during one more forward + backward, minus what was allocated
before it (the inputs and parameters), in MiB: in process, so ``--no-memory`` does not apply. PML's
regulariser keeps its ``(C K)^2`` masks on the CPU (they are plain attributes, not buffers), as in any PML
run on a GPU.

    flock /tmp/graftkit-bench.lock python examples/bench_softtriple.py --device cpu --out out/bench_softtriple
    python examples/bench_softtriple.py --device cuda --out out/bench_softtriple_cuda
    python examples/bench_softtriple.py --quick      # the 100-class sizes, 2 rounds, no memory probes
    python examples/bench_softtriple.py --size 2 --reg off --no-memory   # one cell
    python examples/bench_softtriple.py --analysis   # operand layouts of the products; traffic bound
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_timing import DeviceTimer, add_device_argument, peak_memory_mib, reset_peak_memory, synchronize
from pml_softtriple import SoftTripleLoss
from pml_softtriple.functional import _column_sq_norms
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.regularizers import SparseCentersRegularizer as PMLSparseCentersRegularizer
from tqdm.auto import tqdm

TAU = 0.2
SMALL_SIZE_FACTOR = 10  # repeats multiplier for the sizes whose calls take milliseconds


@dataclass(frozen=True)
class Size:
    batch: int
    dim: int
    classes: int
    k: int

    @property
    def label(self) -> str:
        return f"B={self.batch}, d={self.dim}, C={self.classes}, K={self.k}"

    @property
    def large(self) -> bool:
        return self.classes * self.k > 10_000


SIZES = (Size(32, 64, 100, 10), Size(256, 512, 100, 10), Size(256, 512, 11318, 2))


def make_loss(variant: str, size: Size, reg: bool) -> torch.nn.Module:
    if variant == "ours":
        return SoftTripleLoss(size.classes, size.dim, centers_per_class=size.k, tau=TAU if reg else 0.0)
    regularizer = PMLSparseCentersRegularizer(size.classes, size.k) if reg else None
    return pml_losses.SoftTripleLoss(
        size.classes,
        size.dim,
        centers_per_class=size.k,
        weight_regularizer=regularizer,
        weight_reg_weight=TAU,
    )


def inputs(size: Size, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same numbers on every device
    x = torch.randn(size.batch, size.dim, generator=gen).to(device).requires_grad_(True)
    y = torch.randint(0, size.classes, (size.batch,), generator=gen).to(device)
    return x, y


def make_call(
    variant: str, size: Size, reg: bool, device: str = "cpu"
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(timed call, untimed reset) for one variant, on ``device``."""
    x, y = inputs(size, device=device)
    if variant == "floor":
        gen = torch.Generator().manual_seed(1)
        xt = torch.randn(size.dim, size.batch, generator=gen).to(device)  # embeddings, transposed, contiguous
        w = torch.randn(size.dim, size.classes * size.k, generator=gen).to(device)
        g = torch.randn(size.batch, size.classes * size.k, generator=gen).to(device)

        def floor() -> None:
            # Each product in the operand layout that BLAS runs fastest here (see the module docstring).
            torch.mm(w.t(), xt)  # similarities, (C K, B)
            torch.mm(g, w.t())  # embedding gradient, (B, d)
            torch.mm(xt, g)  # centre gradient, (d, C K)

        return floor, lambda: None
    loss = make_loss(variant, size, reg).to(device)

    def call() -> None:
        loss(x, y).backward()

    def reset() -> None:
        x.grad = None
        loss.zero_grad(set_to_none=True)

    return call, reset


Call = tuple[Callable[[], object], Callable[[], None]]  # (timed call, untimed reset)


def round_robin(
    calls: dict[str, Call],
    repeats: int,
    skip: Callable[[str, int], bool] = lambda name, r: False,
    device: str = "cpu",
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Process-CPU (on a GPU: CUDA-event) and wall seconds of each call, interleaved ``repeats`` times.

    As ``timeit`` does, Python's collector is off while the rounds run (one collection before them). Each
    reset runs after its call, outside the timed region; ``skip(name, round)`` leaves a call out of a round.
    """
    if torch.device(device).type != "cpu":
        return _round_robin_device(calls, repeats, skip, device)
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    wall: dict[str, list[float]] = {name: [] for name in calls}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for name, (call, reset) in calls.items():
                if skip(name, r):
                    continue
                start_cpu, start_wall = time.process_time(), time.perf_counter()
                call()
                wall[name].append(time.perf_counter() - start_wall)
                cpu[name].append(time.process_time() - start_cpu)
                reset()
    finally:
        gc.enable()
    return cpu, wall


def _round_robin_device(
    calls: dict[str, Call], repeats: int, skip: Callable[[str, int], bool], device: str
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """:func:`round_robin` on a GPU: CUDA-event seconds of each synchronised call, and its host wall time."""
    timer = DeviceTimer(device)
    gpu: dict[str, list[float]] = {name: [] for name in calls}
    wall: dict[str, list[float]] = {name: [] for name in calls}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for name, (call, reset) in calls.items():
                if skip(name, r):
                    continue
                start_wall = time.perf_counter()
                gpu[name].append(timer.time(call))
                wall[name].append(time.perf_counter() - start_wall)
                reset()
    finally:
        gc.enable()
    return gpu, wall


def device_peak_mib(calls: dict[str, Call], device: str) -> dict[str, float]:
    """Per variant: ``torch.cuda.max_memory_allocated`` during one call, above what was allocated before."""
    out = {}
    for name, (call, reset) in calls.items():
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        reset_peak_memory(device)
        call()
        peak = peak_memory_mib(device)
        reset()
        out[f"{name}_mib"] = (peak or 0.0) - base / 2**20
    return out


def median_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def time_size(
    size: Size, reg: bool, repeats: int, warmup: int, large_repeats: int, device: str = "cpu"
) -> dict[str, float]:
    """Medians (ms) of process CPU time (GPU: CUDA-event time) and of wall time per call, interleaved.

    On a GPU the result also holds each variant's peak memory (``<variant>_mib``, see the module docstring).
    """
    variants = ("ours", "pml", "floor")
    calls = {v: make_call(v, size, reg, device) for v in variants}
    slow = {"pml"} if (size.large and reg) else set()
    repeats = repeats if size.large else SMALL_SIZE_FACTOR * repeats  # millisecond calls: more samples
    for v in variants:
        for _ in range(0 if v in slow else warmup):
            calls[v][0]()
            calls[v][1]()
    cpu, wall = round_robin(calls, repeats, skip=lambda v, r: v in slow and r >= large_repeats, device=device)
    out = {f"{v}_ms": ms for v, ms in median_ms(cpu).items()}
    if torch.device(device).type == "cuda":
        out |= device_peak_mib(calls, device)
    out |= {f"{v}_wall_ms": ms for v, ms in median_ms(wall).items()}
    return out | {f"n_{v}": len(t) for v, t in cpu.items()}


def time_layouts(size: Size, repeats: int) -> dict[str, float]:
    """Median milliseconds of each product under each operand layout, interleaved round-robin.

    ``x``: (B, d), ``xt``: (d, B), ``g``: (B, C K), ``gt``: (C K, B), all contiguous; ``.t()`` is a view.
    """
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(size.batch, size.dim, generator=gen)
    xt = x.t().contiguous()
    w = torch.randn(size.dim, size.classes * size.k, generator=gen)
    g = torch.randn(size.batch, size.classes * size.k, generator=gen)
    gt = g.t().contiguous()
    products: dict[str, Callable[[], torch.Tensor]] = {
        "similarities x @ w": lambda: torch.mm(x, w),
        "similarities w.t() @ x.t()": lambda: torch.mm(w.t(), x.t()),
        "similarities w.t() @ xt": lambda: torch.mm(w.t(), xt),
        "embedding grad g @ w.t()": lambda: torch.mm(g, w.t()),
        "embedding grad gt.t() @ w.t()": lambda: torch.mm(gt.t(), w.t()),
        "centre grad x.t() @ g": lambda: torch.mm(x.t(), g),
        "centre grad x.t() @ gt.t()": lambda: torch.mm(x.t(), gt.t()),
        "centre grad xt @ g": lambda: torch.mm(xt, g),
        "centre grad xt @ gt.t()": lambda: torch.mm(xt, gt.t()),
    }
    cpu, _ = round_robin({name: (product, lambda: None) for name, product in products.items()}, repeats)
    return median_ms(cpu)


def time_traffic_bound(size: Size, repeats: int) -> dict[str, float]:
    """Medians (ms) of ours (regulariser off), the matmul floor and a minimal-traffic stand-in, interleaved.

    The stand-in is what any implementation that keeps BLAS for the three products still has to move through
    memory, each as one PyTorch pass: the centre norms (one read of ``w``), one exp over the similarities
    (read and write ``B x C K``), one three-operand pass for their gradient, and the radial correction of the
    centre gradient (the GEMM accumulating onto ``w`` times a per-column factor). It computes nothing useful;
    it bounds from below what fusing the element-wise work into hand-written kernels could reach.
    """
    gen = torch.Generator().manual_seed(3)
    xt = torch.randn(size.dim, size.batch, generator=gen)
    w = torch.randn(size.dim, size.classes * size.k, generator=gen)
    scratch = torch.empty(size.classes * size.k, size.batch)

    def bound() -> None:
        factor = _column_sq_norms(w)  # centre norms
        sim = torch.mm(w.t(), xt)  # product 1
        expo = torch.exp(sim)  # forward element-wise work, fused: one read, one write
        grad = torch.addcmul(sim, expo, sim, out=scratch)  # backward element-wise work, fused
        torch.mm(grad.t(), w.t())  # product 2
        torch.mul(w, factor).addmm_(xt, grad.t())  # product 3 onto the radial correction

    calls = {"ours": make_call("ours", size, reg=False), "floor": make_call("floor", size, reg=False)}
    calls["bound"] = (bound, lambda: None)
    for call, reset in calls.values():
        call()
        reset()
    cpu, _ = round_robin(calls, repeats)
    return median_ms(cpu)


# ---------------------------------------------------------------------------------------- peak memory
def _rss_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _hwm_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_probe(variant: str, size: Size, reg: bool) -> dict[str, float | str]:
    """Run in a fresh process: peak RSS of constructing the loss and one forward + backward, in MiB."""
    tiny = Size(4, size.dim, 3, size.k)
    call, reset = make_call(variant, tiny, reg)  # warm-up: load kernels, allocator arenas
    call()
    reset()
    del call, reset
    x, y = inputs(size)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the peak-RSS counter (Linux >= 4.0)
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss"
    base = _rss_kib()
    if variant == "floor":
        call, _ = make_call("floor", size, reg)
    else:
        loss = make_loss(variant, size, reg)

        def call() -> None:
            loss(x, y).backward()

    call()
    peak = _hwm_kib() if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (peak - base) / 1024.0, "method": method}


def measure_memory(variant: str, size: Size, reg: bool, threads: int) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--_probe",
        variant,
        *map(str, (size.batch, size.dim, size.classes, size.k)),
    ]
    cmd += ["--threads", str(threads)] + (["--_reg"] if reg else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_mib"])


# ------------------------------------------------------------------------------------------- report
def check_targets(rows: list[dict], clock: str = "") -> list[tuple[str, str, bool]]:
    """The issue's targets, on CPU-time medians (``clock=""``) or wall-clock medians (``clock="_wall"``)."""
    checks = []
    for row in rows:
        size, reg = row["size"], row["reg"]
        ours, pml, floor = (row[f"{v}{clock}_ms"] for v in ("ours", "pml", "floor"))
        if reg and size["classes"] == 11318:
            checks.append(("reg on, C=11318: >= 20x faster than PML", f"{pml / ours:.1f}x", pml / ours >= 20))
            if "pml_mib" in row and not clock:
                mem = row["pml_mib"] / row["ours_mib"]
                checks.append(("reg on, C=11318: >= 10x less peak memory than PML", f"{mem:.1f}x", mem >= 10))
        if not reg and size["batch"] == 256:
            label = f"reg off, B=256, C={size['classes']}: <= 1.3x the matmul floor"
            checks.append((label, f"{ours / floor:.2f}x", ours / floor <= 1.3))
        if not reg and size["batch"] == 32:
            checks.append(("reg off, B=32: >= 1.5x faster than PML", f"{pml / ours:.2f}x", pml / ours >= 1.5))
    return checks


def report(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    lines = [
        "| size | regulariser | ours (ms) | PML (ms) | matmul floor (ms) | PML / ours | ours / floor "
        "| wall: PML / ours | wall: ours / floor | ours peak (MiB) | PML peak (MiB) | PML / ours memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row["size"]
        label = f"B={s['batch']}, d={s['dim']}, C={s['classes']}, K={s['k']}"
        pml_note = f" (n={row['n_pml']})" if row["n_pml"] < row["n_ours"] else ""
        mem = (
            [f"{row['ours_mib']:.1f}", f"{row['pml_mib']:.1f}", f"{row['pml_mib'] / row['ours_mib']:.1f}x"]
            if "ours_mib" in row
            else ["-", "-", "-"]
        )
        cells = [
            label,
            "on" if row["reg"] else "off",
            f"{row['ours_ms']:.2f}",
            f"{row['pml_ms']:.2f}{pml_note}",
            f"{row['floor_ms']:.2f}",
            f"{row['pml_ms'] / row['ours_ms']:.2f}x",
            f"{row['ours_ms'] / row['floor_ms']:.2f}x",
            f"{row['pml_wall_ms'] / row['ours_wall_ms']:.2f}x",
            f"{row['ours_wall_ms'] / row['floor_wall_ms']:.2f}x",
            *mem,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    on_gpu = torch.device(args.device).type == "cuda"
    clock = "GPU time" if on_gpu else "CPU time"
    lines += ["", f"| target | {clock} | met | wall clock | met |", "|---|---|---|---|---|"]
    wall = {name: (value, ok) for name, value, ok in check_targets(rows, "_wall")}
    for name, value, ok in check_targets(rows):
        wall_value, wall_ok = wall.get(name, ("-", None))
        wall_met = "-" if wall_ok is None else ("yes" if wall_ok else "**no**")
        lines.append(f"| {name} | {value} | {'yes' if ok else '**no**'} | {wall_value} | {wall_met} |")
    counts = (
        f"Command: `{command}`. Times are medians over interleaved forward + backward calls ({args.repeats} "
        f"per variant at C=11318, {SMALL_SIZE_FACTOR * args.repeats} at C=100) after {args.warmup} warm-up "
        "calls, "
    )
    if on_gpu:
        lines += [
            "",
            counts + "measured on the GPU with CUDA events after a synchronisation (ms columns) and as the "
            "host's wall-clock time of the synchronised call (wall columns). "
            f"{torch.cuda.get_device_name(args.device)}, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}). "
            "Peak memory: torch.cuda.max_memory_allocated during one forward + backward above what was "
            "allocated before it (inputs, parameters).",
        ]
        return "\n".join(lines) + "\n"
    lines += [
        "",
        counts + "measured as the process's CPU time (one thread, so this is the work done, robust to "
        "preemption by other jobs on a shared machine) and as wall-clock time. "
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} logical CPUs, 1-min load average {args.load_before:.1f} before / "
        f"{os.getloadavg()[0]:.1f} after. Peak memory: fresh subprocess per cell, peak RSS above the "
        "baseline after imports, inputs and a tiny warm-up (see the docstring).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="write report.md and results.json here")
    add_device_argument(parser)
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default: 20; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--large-repeats", type=int, default=1, help="timed PML calls at C=11318 with regulariser"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--quick", action="store_true", help="only the two 100-class sizes, 2 rounds, no memory probes"
    )
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the CPU's peak-memory subprocesses (a GPU measures in process)",
    )
    parser.add_argument(
        "--size", type=int, choices=range(len(SIZES)), default=None, help="only this size (index into SIZES)"
    )
    parser.add_argument("--reg", choices=("both", "off", "on"), default="both", help="regulariser cells")
    parser.add_argument(
        "--analysis",
        action="store_true",
        help="only time the three products under each operand layout, and the minimal-traffic stand-in",
    )
    parser.add_argument("--_probe", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--_reg", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 20
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.analysis and device.type != "cpu":
        parser.error("--analysis times CPU operand layouts and memory traffic; use --device cpu")
    torch.set_num_threads(args.threads)

    if args._probe:
        variant, *dims = args._probe
        print(json.dumps(memory_probe(variant, Size(*map(int, dims)), args._reg)))
        return 0

    if args.analysis:
        for size in SIZES[1:]:
            print(f"{size.label}: median ms over {args.repeats} interleaved calls, {args.threads} thread(s)")
            for name, ms in time_layouts(size, args.repeats).items():
                print(f"  {name:32s} {ms:8.2f}")
            times = time_traffic_bound(size, args.repeats)
            print(
                f"  ours {times['ours']:.2f}, minimal-traffic stand-in {times['bound']:.2f}, floor "
                f"{times['floor']:.2f}: ours / floor {times['ours'] / times['floor']:.2f}x, stand-in / floor "
                f"{times['bound'] / times['floor']:.2f}x"
            )
        return 0

    command = "python examples/bench_softtriple.py " + " ".join(a for a in (argv or sys.argv[1:]))
    args.load_before = os.getloadavg()[0]
    sizes = SIZES[:2] if args.quick else SIZES
    if args.size is not None:
        sizes = (SIZES[args.size],)
    regs = {"both": (False, True), "off": (False,), "on": (True,)}[args.reg]
    cells = [(size, reg) for size in sizes for reg in regs]
    rows = []
    for size, reg in tqdm(cells, desc="softtriple bench", unit="size"):
        row: dict = {"size": size.__dict__, "reg": reg}
        row |= time_size(size, reg, args.repeats, args.warmup, args.large_repeats, args.device)
        if device.type == "cpu" and not (args.quick or args.no_memory):
            for variant in ("ours", "pml"):
                row[f"{variant}_mib"] = measure_memory(variant, size, reg, args.threads)
        rows.append(row)
        tqdm.write(
            f"{size.label}, reg {'on' if reg else 'off'}: ours {row['ours_ms']:.2f} ms, "
            f"PML {row['pml_ms']:.2f} ms, floor {row['floor_ms']:.2f} ms"
        )
    text = report(rows, args, command)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text("# SoftTriple benchmark\n\n" + text)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
