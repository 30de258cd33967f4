"""Benchmark: our O(E) ``EGNNConv`` against the official dense formulation, side by side.

The official energy model (mods333/energy-based-scene-graph) runs its EGNN over an ``N x N`` adjacency of the
whole batch (``N`` = all nodes of all graphs) with ``N x N x F`` edge states; ours passes messages over the
``E`` relation pairs only. Both compute the same function (``integration_tests/pyg_scenegraph`` checks this to
1e-10 in float64); this script measures what the dense form costs.

Workloads (defaults from the issue: 32 graphs x 20 nodes, fully connected within each graph, hidden 256):

* ``egnn-forward``      — EGNNConv, 3 iterations, forward without autograd, at the full size;
* ``egnn-train``        — EGNNConv forward + backward at ``--train-graphs`` graphs (default 8): the dense
  backward at 32 graphs would keep ~30 GB of activations, more than this machine has;
* ``energy-train``      — the whole GraphEnergyModel forward + backward (what each SGLD step does) at
  ``--train-graphs`` graphs.

Devices: ``--device`` (default: cuda when available). On a GPU every workload runs at the full
``--graphs`` (default 32 x 20 nodes: the dense backward fits in GPU memory), timing is by CUDA events around
each call (``examples/device_timing.py``), medians over ``--repeats`` (default 10), and peak memory is
``torch.cuda.max_memory_allocated`` during one run minus the memory allocated before it (inputs, weights); a
cell that runs out of GPU memory is reported as OOM.

Timing on the CPU: medians over ``--repeats`` runs (default 3), ours and dense interleaved in one process,
after one warm-up run each.
Peak memory on the CPU: each (workload, variant) runs once in a fresh subprocess (skipped with ``--quick``
and ``--no-memory``). After imports, model and input
creation and a warm-up run on a tiny graph, the subprocess resets its kernel RSS high-water mark
(``/proc/self/clear_refs``), takes its current RSS as the baseline, runs once and reports ``VmHWM`` minus the
baseline. torch CPU tensors live in process memory, so this is their true peak. (``ru_maxrss`` is not used:
Linux carries it over from the parent across fork+exec, which hides a child's peak below the parent's.)

    flock /tmp/graftkit-bench.lock python examples/bench_egnn.py --device cpu   # the README table (CPU)
    python examples/bench_egnn.py --device cuda --out out/egnn                   # GPU: out/egnn/report.md
    python examples/bench_egnn.py --device cpu --quick --out /tmp/egnn           # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from device_timing import DeviceTimer, add_device_argument, peak_memory_mib, reset_peak_memory  # noqa: E402
from pyg_scenegraph import EGNNConv, GraphEnergyModel, all_pairs, box_code  # noqa: E402

from integration_tests.pyg_scenegraph.dense_reference import dense_egnn, dense_energy  # noqa: E402

WORKLOADS = ("egnn-forward", "egnn-train", "energy-train")


def make_inputs(graphs: int, nodes: int, hidden: int, seed: int = 0, device: str | torch.device = "cpu"):
    g = torch.Generator().manual_seed(seed)
    batch = torch.arange(graphs).repeat_interleave(nodes)
    edge_index = all_pairs(batch)
    n, e = batch.numel(), edge_index.size(1)
    xy = torch.rand(n, 2, generator=g) * 400
    box = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 100 + 1], -1)
    inputs = {
        "batch": batch,
        "edge_index": edge_index,
        "x": torch.randn(n, hidden, generator=g),
        "edge_attr": torch.randn(e, hidden, generator=g),
        "region": torch.randn(n, hidden, generator=g),
        "node_states": torch.rand(n, 151, generator=g),
        "edge_states": torch.rand(e, 51, generator=g),
        "code": box_code(box, torch.tensor([512.0, 512.0])),
        "graphs": graphs,
    }
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def make_models(hidden: int, device: str | torch.device = "cpu"):
    torch.manual_seed(0)
    conv = EGNNConv(hidden, hidden)
    energy = GraphEnergyModel(151, 51, hidden, hidden_channels=hidden, pooling_channels=hidden)
    return conv.to(device), energy.to(device)


def run_once(workload: str, variant: str, conv, energy, inp) -> torch.Tensor:
    """One forward (and backward) pass; returns a tensor to compare between variants."""
    if workload == "egnn-forward":
        with torch.no_grad():
            if variant == "ours":
                x, e = conv(inp["x"], inp["edge_index"], inp["edge_attr"])
            else:
                x, e = dense_egnn(conv, inp["x"], inp["edge_index"], inp["edge_attr"], use_formula_gru=False)
        return torch.cat([x.sum(0), e.sum(0)])
    if workload == "egnn-train":
        x0 = inp["x"].clone().requires_grad_(True)
        if variant == "ours":
            x, e = conv(x0, inp["edge_index"], inp["edge_attr"])
        else:
            x, e = dense_egnn(conv, x0, inp["edge_index"], inp["edge_attr"], use_formula_gru=False)
        (x.square().mean() + e.square().mean()).backward()
        return x0.grad.sum(0)
    states = inp["edge_states"].clone().requires_grad_(True)
    args = (
        inp["region"],
        inp["node_states"],
        inp["edge_index"],
        states,
        inp["code"],
        inp["batch"],
        inp["graphs"],
    )
    out = energy(*args) if variant == "ours" else dense_energy(energy, *args)
    out.sum().backward()
    return states.grad.sum(0)


def sizes_for(workload: str, args) -> tuple[int, int, int]:
    graphs = args.graphs if workload == "egnn-forward" else args.train_graphs
    return graphs, args.nodes, args.hidden


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def child(args) -> None:
    """Fresh process: measure the peak RSS of one (workload, variant) above a warmed-up baseline."""
    torch.set_num_threads(args.threads)
    conv, energy = make_models(args.hidden)
    energy.eval()
    run_once(args.workload, args.variant, conv, energy, make_inputs(2, 3, args.hidden))  # warm-up, tiny
    inp = make_inputs(*sizes_for(args.workload, args))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    run_once(args.workload, args.variant, conv, energy, inp)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - base) / 1024.0}))


def peak_memory(workload: str, variant: str, args) -> float:
    cmd = [sys.executable, __file__, "--child", "--workload", workload, "--variant", variant]
    cmd += [
        "--graphs",
        str(args.graphs),
        "--train-graphs",
        str(args.train_graphs),
        "--nodes",
        str(args.nodes),
    ]
    cmd += ["--hidden", str(args.hidden), "--threads", str(args.threads), "--device", "cpu"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return float(json.loads(out)["peak_mib"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--graphs", type=int, default=32)
    parser.add_argument(
        "--train-graphs",
        type=int,
        default=None,
        help="graphs of the training workloads (cpu: 8, cuda: --graphs)",
    )
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per cell (cpu: 3, cuda: 10)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)"
    )
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: a smoke run")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU fresh-process memory probe")
    parser.add_argument("--out", type=Path, default=None, help="also write report.md and results.json here")
    add_device_argument(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=("ours", "dense"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.train_graphs is None:
        args.train_graphs = args.graphs if on_gpu else 8
    if args.repeats is None:
        args.repeats = 10 if on_gpu else 3
    if args.quick:
        args.graphs, args.train_graphs, args.hidden, args.repeats = 4, 2, 32, 1
    if args.child:
        child(args)
        return
    torch.set_num_threads(args.threads)
    conv, energy = make_models(args.hidden, device)
    energy.eval()  # BatchNorm in eval mode: both variants see identical statistics
    timer = DeviceTimer(device)
    measure_memory = on_gpu or not (args.quick or args.no_memory)
    where = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {args.threads} thread(s)"
    lines = [
        f"# bench_egnn: {where}, torch {torch.__version__}, repeats={args.repeats}",
        f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}",
        "# timing: " + ("CUDA events" if on_gpu else "wall clock") + ", median; memory: "
        + ("torch.cuda.max_memory_allocated above the inputs" if on_gpu else
           "fresh-process VmHWM" if measure_memory else "not measured (--quick / --no-memory)"),
    ]  # fmt: skip
    for line in lines:
        print(line)
    rows = []
    results = []
    for workload in args.workloads:
        graphs, nodes, hidden = sizes_for(workload, args)
        inp = make_inputs(graphs, nodes, hidden, device=device)
        n, e = inp["batch"].numel(), inp["edge_index"].size(1)
        med: dict[str, float | None] = {"ours": None, "dense": None}
        mem: dict[str, float | None] = {"ours": None, "dense": None}
        outputs: dict[str, torch.Tensor] = {}
        for variant in ("ours", "dense"):  # warm-up and agreement check; a GPU cell may run out of memory
            try:
                outputs[variant] = run_once(workload, variant, conv, energy, inp)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
            conv.zero_grad(set_to_none=True)
            energy.zero_grad(set_to_none=True)
        times: dict[str, list[float]] = {v: [] for v in outputs}
        for _ in range(args.repeats):
            for variant in outputs:  # interleaved, as on the CPU before
                step = functools.partial(run_once, workload, variant, conv, energy, inp)
                times[variant].append(timer.time(step))
                conv.zero_grad(set_to_none=True)
                energy.zero_grad(set_to_none=True)
        for variant in outputs:
            med[variant] = statistics.median(times[variant])
            if on_gpu:
                reset_peak_memory(device)
                base = torch.cuda.memory_allocated(device) / 2**20
                run_once(workload, variant, conv, energy, inp)
                mem[variant] = (peak_memory_mib(device) or 0.0) - base
                conv.zero_grad(set_to_none=True)
                energy.zero_grad(set_to_none=True)
            elif measure_memory:
                mem[variant] = peak_memory(workload, variant, args)
        rel_err = None
        if len(outputs) == 2:
            scale = outputs["dense"].abs().max().clamp(min=1e-12)
            rel_err = float((outputs["ours"] - outputs["dense"]).abs().max() / scale)
        rows.append((workload, graphs, nodes, n, e, hidden, med, mem, rel_err))
        results.append(
            {"workload": workload, "graphs": graphs, "nodes": nodes, "N": n, "E": e, "hidden": hidden,
             "seconds": med, "peak_mib": mem, "max_rel_diff": rel_err}
        )  # fmt: skip
        ours, dense = _cell(med["ours"], mem["ours"]), _cell(med["dense"], mem["dense"])
        print(f"# {workload}: ours {ours}, dense {dense}", flush=True)
    table = _table(rows)
    print()
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        anchor = next((r for r in rows if r[0] == "egnn-forward"), None)
        summary = ""
        if anchor is not None and anchor[6]["ours"] and anchor[6]["dense"]:
            summary = (
                f"EGNN vs the dense form at {anchor[1]} x {anchor[2]} nodes (forward): "
                f"**{anchor[6]['dense'] / anchor[6]['ours']:.1f}x** faster on {where}.\n\n"
            )
        text = "\n".join(f"- {line[2:]}" for line in lines) + "\n\n" + summary + table + "\n"
        (args.out / "report.md").write_text(
            "# EGNN benchmark: O(E) EGNNConv vs the official dense form\n\n" + text
        )
        (args.out / "results.json").write_text(json.dumps({"device": where, "rows": results}, indent=1))


def _ms(seconds: float | None) -> str:
    return "OOM" if seconds is None else f"{seconds * 1e3:.1f}"


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None else f"{a / max(b, 1e-9):.1f}x"


def _cell(seconds: float | None, mib: float | None) -> str:
    return f"{_ms(seconds)} ms / {_mib(mib)} MiB"


def _table(rows) -> str:
    header = ["workload", "graphs x nodes", "N", "E (dense pairs N^2)", "hidden", "ours (ms)", "dense (ms)"]
    header += ["speed-up", "ours peak (MiB)", "dense peak (MiB)", "memory ratio", "max rel. diff"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for workload, graphs, nodes, n, e, hidden, med, mem, rel_err in rows:
        diff = "–" if rel_err is None else f"{rel_err:.1e}"
        out.append(
            f"| {workload} | {graphs} x {nodes} | {n} | {e} ({n * n}) | {hidden} | {_ms(med['ours'])} | "
            f"{_ms(med['dense'])} | {_ratio(med['dense'], med['ours'])} | {_mib(mem['ours'])} | "
            f"{_mib(mem['dense'])} | {_ratio(mem['dense'], mem['ours'])} | {diff} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
