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

Timing: medians over ``--repeats`` runs, ours and dense interleaved in one process, after one warm-up run
each.
Peak memory: each (workload, variant) runs once in a fresh subprocess. After imports, model and input
creation and a warm-up run on a tiny graph, the subprocess resets its kernel RSS high-water mark
(``/proc/self/clear_refs``), takes its current RSS as the baseline, runs once and reports ``VmHWM`` minus the
baseline. torch CPU tensors live in process memory, so this is their true peak. (``ru_maxrss`` is not used:
Linux carries it over from the parent across fork+exec, which hides a child's peak below the parent's.)

    flock /tmp/graftkit-bench.lock python examples/bench_egnn.py            # the README table
    python examples/bench_egnn.py --quick                                     # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyg_scenegraph import EGNNConv, GraphEnergyModel, all_pairs, box_code  # noqa: E402

from integration_tests.pyg_scenegraph.dense_reference import dense_egnn, dense_energy  # noqa: E402

WORKLOADS = ("egnn-forward", "egnn-train", "energy-train")


def make_inputs(graphs: int, nodes: int, hidden: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch = torch.arange(graphs).repeat_interleave(nodes)
    edge_index = all_pairs(batch)
    n, e = batch.numel(), edge_index.size(1)
    xy = torch.rand(n, 2, generator=g) * 400
    box = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 100 + 1], -1)
    return {
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


def make_models(hidden: int):
    torch.manual_seed(0)
    conv = EGNNConv(hidden, hidden)
    energy = GraphEnergyModel(151, 51, hidden, hidden_channels=hidden, pooling_channels=hidden)
    return conv, energy


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
    cmd += ["--hidden", str(args.hidden), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return float(json.loads(out)["peak_mib"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--graphs", type=int, default=32)
    parser.add_argument("--train-graphs", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)"
    )
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: a smoke run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=("ours", "dense"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.graphs, args.train_graphs, args.hidden, args.repeats = 4, 2, 32, 1
    if args.child:
        child(args)
        return
    torch.set_num_threads(args.threads)
    conv, energy = make_models(args.hidden)
    energy.eval()  # BatchNorm in eval mode: both variants see identical statistics
    print(f"# bench_egnn: torch {torch.__version__}, {args.threads} thread(s), repeats={args.repeats}")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    rows = []
    for workload in args.workloads:
        graphs, nodes, hidden = sizes_for(workload, args)
        inp = make_inputs(graphs, nodes, hidden)
        n, e = inp["batch"].numel(), inp["edge_index"].size(1)
        outputs = {v: run_once(workload, v, conv, energy, inp) for v in ("ours", "dense")}  # warm-up + check
        conv.zero_grad(set_to_none=True)
        energy.zero_grad(set_to_none=True)
        scale = outputs["dense"].abs().max().clamp(min=1e-12)
        rel_err = float((outputs["ours"] - outputs["dense"]).abs().max() / scale)
        times: dict[str, list[float]] = {"ours": [], "dense": []}
        for _ in range(args.repeats):
            for variant in ("ours", "dense"):
                start = time.perf_counter()
                run_once(workload, variant, conv, energy, inp)
                times[variant].append(time.perf_counter() - start)
                conv.zero_grad(set_to_none=True)
                energy.zero_grad(set_to_none=True)
        med = {v: statistics.median(t) for v, t in times.items()}
        mem = {v: peak_memory(workload, v, args) for v in ("ours", "dense")}
        rows.append((workload, graphs, nodes, n, e, hidden, med, mem, rel_err))
        ours, dense = (
            f"{med['ours'] * 1e3:.1f} ms / {mem['ours']:.0f} MiB",
            f"{med['dense'] * 1e3:.1f} ms / {mem['dense']:.0f} MiB",
        )
        print(f"# {workload}: ours {ours}, dense {dense}", flush=True)
    print()
    header = [
        "workload",
        "graphs x nodes",
        "N",
        "E (dense pairs N^2)",
        "hidden",
        "ours (ms)",
        "dense (ms)",
        "speed-up",
    ]
    header += ["ours peak (MiB)", "dense peak (MiB)", "memory ratio", "max rel. diff"]
    print("| " + " | ".join(header) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for workload, graphs, nodes, n, e, hidden, med, mem, rel_err in rows:
        print(
            f"| {workload} | {graphs} x {nodes} | {n} | {e} ({n * n}) | {hidden} | {med['ours'] * 1e3:.1f} | "
            f"{med['dense'] * 1e3:.1f} | {med['dense'] / med['ours']:.1f}x | {mem['ours']:.1f} | "
            f"{mem['dense']:.1f} | "
            f"{mem['dense'] / max(mem['ours'], 1e-3):.1f}x | {rel_err:.1e} |"
        )


if __name__ == "__main__":
    main()
