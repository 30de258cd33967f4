"""Cross-entropy vs cross-entropy + energy-based loss (Suhail et al., CVPR 2021) for PredCls in PyG.

The same base model (``pyg_scenegraph.RelationPredictor``: transformer context + frequency bias, a compact
Motifs) is trained twice per seed — with CE only and with CE + ``EBMLoss`` on a ``GraphEnergyModel`` whose
negatives are refined by ``SGLDSampler`` — and evaluated with ``SceneGraphEvaluator`` (Scene-Graph-Benchmark's
definitions: objects matched by label and IoU >= 0.5 with the +1-pixel convention; graph-constrained R@K, mean
recall mR@K, per-predicate recall; the same models are also scored with index matching, the evaluator's
pre-#14 default, for comparison). Training pairs follow the official EBM configuration: every ordered pair,
up to 1024 per image (``--pairs-per-image``). The paper's claim under test: mR@K rises with EBM while R@K
holds.

Data: ``SyntheticSceneGraphs`` (relations exactly from geometry, long-tailed predicates; always), and — when
the real annotation samples are present (``--shared-data``, default ``../shared/data``) and not in
``--quick`` —
PredCls on the 100-image GQA and Visual Genome samples. There are no images, so the "visual" feature is a
constant by default (the README table of issue #14); ``--node-features object`` gives the datasets'
documented default instead, ``ObjectFeatures`` (class one-hot + box code). ``--datasets`` picks the data.

    python examples/ebm_scene_graphs.py --quick --out out/demo/pyg     # the demo (~1 min)
    OMP_NUM_THREADS=1 python examples/ebm_scene_graphs.py --out out/pyg/full   # the README table
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from pyg_scenegraph import (
    EBMLoss,
    GQASceneGraphs,
    GraphEnergyModel,
    RelationPredictor,
    SceneGraphEvaluator,
    SGLDSampler,
    SyntheticSceneGraphs,
    VisualGenomeSceneGraphs,
    Vocabulary,
    all_pairs,
    box_code,
    sample_relation_pairs,
    scene_graph_losses,
)
from torch_geometric.loader import DataLoader
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ebm_claim import BaseLowersNegativeEnergy, t_interval

KS = (20, 50, 100)


def frequency_counts(dataset, num_classes: int, num_predicates: int) -> torch.Tensor:
    counts = torch.zeros(num_classes, num_classes, num_predicates)
    for data in dataset:
        triplets = data.triplets()  # (subject, object, predicate) rows
        s, o = data.y[triplets[:, 0]], data.y[triplets[:, 1]]
        counts.index_put_((s, o, triplets[:, 2]), torch.ones(s.numel()), accumulate=True)
    return counts


def with_constant_feature(data):
    data.x = torch.ones(data.num_nodes, 1)
    return data


def train_and_evaluate(train_set, test_set, meta: dict, use_ebm: bool, seed: int, args, desc: str) -> dict:
    torch.manual_seed(seed)
    num_classes, num_predicates, in_channels = meta["classes"], meta["predicates"], meta["in_channels"]
    base = RelationPredictor(in_channels, num_classes, num_predicates, hidden_channels=args.hidden, heads=4,
                             frequency_bias=meta["frequency"])  # fmt: skip
    groups = [{"params": list(base.parameters()), "lr": args.lr}]
    energy = None
    if use_ebm:
        energy = GraphEnergyModel(num_classes, num_predicates, in_channels, hidden_channels=args.hidden,
                                  pooling_channels=args.hidden)  # fmt: skip
        groups.append({"params": list(energy.parameters()), "lr": args.energy_lr})
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    sampler = SGLDSampler(step_size=args.sgld_step, num_steps=args.sgld_steps, noise_std=1e-3, grad_clip=0.01,
                          generator=torch.Generator().manual_seed(seed))  # fmt: skip
    loss_fn = EBMLoss()
    reverse = energy is not None and args.reverse_ebm_gradient
    energy_fn = BaseLowersNegativeEnergy(energy) if reverse else energy
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    pair_gen = torch.Generator().manual_seed(seed)
    total_steps = args.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=total_steps, pct_start=0.1
    )
    sgld_seconds, start, energies = 0.0, time.perf_counter(), []
    for _ in tqdm(range(args.epochs), desc=desc, leave=False, disable=args.no_progress):
        base.train()
        for data in loader:
            triplets = data.triplets()
            pairs, labels = sample_relation_pairs(
                triplets[:, :2].t(), triplets[:, 2], data.batch, args.pairs_per_image, generator=pair_gen
            )
            out = scene_graph_losses(base, data, pairs, labels, energy_fn, sampler, loss_fn)
            optimizer.zero_grad()
            out["loss"].backward()
            # the official code clips the base model and the energy model separately (max norm 5 each)
            torch.nn.utils.clip_grad_norm_(base.parameters(), 5.0)
            if energy is not None:
                torch.nn.utils.clip_grad_norm_(energy.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
            sgld_seconds += out["sgld_seconds"]
            if out["positive_energy"] is not None:
                pos, neg = out["positive_energy"].detach(), out["negative_energy"].detach()
                energies.append((float(pos.mean()), float(neg.mean())))
    train_seconds = time.perf_counter() - start

    base.eval()
    evaluator = SceneGraphEvaluator(num_predicates, ks=KS)  # Scene-Graph-Benchmark: label + IoU >= 0.5
    by_index = SceneGraphEvaluator(num_predicates, ks=KS, matching="index")  # the pre-#14 definition
    with torch.no_grad():
        for data in DataLoader(test_set, batch_size=64):
            pairs = all_pairs(data.batch)
            logits, _ = base(
                data.x, box_code(data.box, data.image_size[data.batch]), pairs, data.y, data.batch
            )
            evaluator.update_batch(data, pairs, logits.softmax(-1))
            by_index.update_batch(data, pairs, logits.softmax(-1))
    result = {k: 100 * float(v) for k, v in evaluator.compute().items()}
    result["index_matching"] = {k: 100 * float(v) for k, v in by_index.compute().items()}
    result["per_predicate@50"] = (100 * evaluator.per_predicate_recall(50)).tolist()
    result["train_seconds"] = train_seconds
    result["sgld_seconds"] = sgld_seconds
    if energies:
        tail = energies[-max(1, len(energies) // 10) :]
        result["E+"] = statistics.mean(e for e, _ in tail)
        result["E-"] = statistics.mean(e for _, e in tail)
    return result


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def results_table(results: dict[str, list[dict]]) -> list[str]:
    cols = [f"R@{k}" for k in KS] + [f"mR@{k}" for k in KS]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, runs in results.items():
        lines.append(f"| {method} | " + " | ".join(mean_std([r[c] for r in runs]) for c in cols) + " |")
    return lines


def plot_per_predicate(results, names, counts, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted((p for p in range(1, len(names)) if counts.get(p, 0) > 0), key=lambda p: -counts[p])[:25]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(order) + 2), 4))
    width = 0.4
    for i, (method, runs) in enumerate(results.items()):
        values = torch.tensor([r["per_predicate@50"] for r in runs]).nan_to_num(0.0)[:, order]
        ax.bar([j + (i - 0.5) * width for j in range(len(order))], values.mean(0), width,
               yerr=values.std(0) if len(runs) > 1 else None, label=method, capsize=2)  # fmt: skip
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(
        [f"{names[p]} ({counts.get(p, 0)})" for p in order], rotation=60, ha="right", fontsize=8
    )
    ax.set_ylabel("PredCls recall@50 (%)")
    ax.set_title(title if len(order) == len(names) - 1 else f"{title}, {len(order)} most frequent")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_experiment(name, train_set, test_set, names, args, out: Path, lines: list[str], seeds) -> dict:
    num_classes = int(max(int(train_set._data.y.max()), int(test_set._data.y.max()))) + 1
    meta = {
        "classes": max(num_classes, getattr(train_set, "num_object_classes", num_classes)),
        "predicates": len(names),
        "in_channels": train_set[0].x.size(-1),
    }
    meta["frequency"] = frequency_counts(train_set, meta["classes"], meta["predicates"])
    counts = Counter(p for data in train_set for p in data.triplets()[:, 2].tolist())  # a slice shares _data
    results: dict[str, list[dict]] = {"CE": [], "CE + EBM": []}
    for seed in seeds:
        for method in results:
            results[method].append(
                train_and_evaluate(
                    train_set, test_set, meta, method != "CE", seed, args, f"{name} {method} seed {seed}"
                )
            )
            r = results[method][-1]
            print(f"[{name}] seed {seed} {method}: R@50 {r['R@50']:.2f} mR@50 {r['mR@50']:.2f} "
                  f"({r['train_seconds']:.0f} s)", flush=True)  # fmt: skip
    ebm_runs = results["CE + EBM"]

    def deltas(key: str) -> str:
        return ", ".join(f"{e[key] - c[key]:+.2f}" for e, c in zip(ebm_runs, results["CE"], strict=True))

    share = [r["sgld_seconds"] / r["train_seconds"] for r in ebm_runs]
    slow = [e["train_seconds"] / c["train_seconds"] for e, c in zip(ebm_runs, results["CE"], strict=True)]
    plot = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + "_per_predicate.png"
    plot_per_predicate(
        results, names, counts, out / plot, f"{name}: per-predicate recall@50 (mean over seeds)"
    )
    sizes = f"{len(train_set)} training / {len(test_set)} test images, {len(names) - 1} predicates"
    lines += [f"### {name}", "", f"{sizes}, seeds {list(seeds)}; PredCls, graph-constrained recall (%), "
              "mean ± std over seeds; Scene-Graph-Benchmark matching (label + IoU >= 0.5).", ""]  # fmt: skip
    lines += results_table(results)
    index_results = {m: [r["index_matching"] for r in runs] for m, runs in results.items()}

    def moved(key: str) -> str:
        def mean(runs: list[dict]) -> float:
            return statistics.mean(r[key] for r in runs)

        return ", ".join(f"{m} {mean(results[m]) - mean(index_results[m]):+.2f}" for m in results)

    lines += [
        "",
        f"- Same models scored with index matching (pre-#14): IoU matching minus index matching, mean over "
        f"seeds: R@50 {moved('R@50')}; mR@50 {moved('mR@50')}; R@20 {moved('R@20')}.",
        f"- SGLD share of CE + EBM training time: {mean_std([100 * s for s in share])} % "
        f"({args.sgld_steps} Langevin steps per batch); CE + EBM takes {mean_std(slow)}x the CE time.",
        f"- Energies over the last 10 % of CE + EBM steps: E(G+) = {mean_std([r['E+'] for r in ebm_runs])}, "
        f"E(G-) = {mean_std([r['E-'] for r in ebm_runs])} (the energy model separates them when E+ < E-).",
        f"- Δ mR@50 (EBM − CE) per seed: {deltas('mR@50')}; Δ R@50: {deltas('R@50')}.",
        "",
        f"![{name}: per-predicate recall@50, CE vs CE + EBM (training counts in brackets)]({plot})",
        "",
    ]  # fmt: skip
    return results


def merged_report(runs: list[Path], out: Path) -> list[str]:
    """One table per dataset from the ``results.json`` of several runs (e.g. one seed each, run in parallel).

    The runs' seeds are concatenated, so each row is mean ± std over all of them and the paired deltas
    (EBM − CE, same seed) are listed per seed; the per-predicate plots stay in each run's own folder.
    """
    merged: dict[str, dict[str, list[dict]]] = {}
    for run in runs:
        for dataset, methods in json.loads((run / "results.json").read_text()).items():
            for method, seed_runs in methods.items():
                merged.setdefault(dataset, {}).setdefault(method, []).extend(seed_runs)
    sources = ", ".join(f"`{run}`" for run in runs)
    lines = [
        "# Energy-based scene-graph learning (PyG): CE vs CE + EBM, merged runs",
        "",
        f"Merged from {sources} (their report.md files hold the settings and the plots).",
        "",
    ]
    for dataset, results in merged.items():
        ce, ebm = results["CE"], results["CE + EBM"]
        protocol = "PredCls, graph-constrained recall (%), mean ± std; Scene-Graph-Benchmark matching"
        lines += [f"### {dataset}", "", f"{len(ce)} seeds; {protocol} (label + IoU >= 0.5).", ""]
        lines += results_table(results)
        lines += [""]
        for key in ("R@50", "mR@50", "mR@100"):
            paired = [e[key] - c[key] for e, c in zip(ebm, ce, strict=True)]
            mean, half = t_interval(paired)
            interval = f"{mean:+.2f} ± {half:.2f} (95 % t)" if len(paired) > 1 else f"{mean:+.2f}"
            lines.append(f"- Δ {key} (EBM − CE) per seed: {', '.join(f'{d:+.2f}' for d in paired)}; "
                         f"mean {mean_std(paired)}; {interval}.")  # fmt: skip
        share = [100 * r["sgld_seconds"] / r["train_seconds"] for r in ebm]
        lines += [f"- SGLD share of CE + EBM training time: {mean_std(share)} %.", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines))
    return lines


def real_datasets(
    shared: Path, tmp: Path, which: tuple[str, ...] = ("gqa", "vg"), features: str = "constant"
):
    """The GQA and Visual Genome 100-image samples, as (name, train, test, predicate names).

    ``features="constant"`` replaces every node feature by 1; ``"object"`` keeps the datasets' default
    ``ObjectFeatures`` (class one-hot + 9-d box code), added when a graph has no ``x``.
    """
    out = []
    with_constant_feature_or_none = with_constant_feature if features == "constant" else None
    gqa = shared / "scenegraphs" / "gqa"
    if gqa.is_dir() and "gqa" in which:
        (tmp / "gqa" / "raw").mkdir(parents=True)
        for split in ("train", "val"):
            shutil.copy(
                gqa / f"{split}_sceneGraphs_sample100.json", tmp / "gqa" / "raw" / f"{split}_sceneGraphs.json"
            )
        train = GQASceneGraphs(str(tmp / "gqa"), "train", transform=with_constant_feature_or_none)
        vocab = {"objects": train.objects.names[1:], "predicates": train.predicates.names[1:]}
        test = GQASceneGraphs(str(tmp / "gqa"), "val", **vocab, transform=with_constant_feature_or_none)
        out.append(("GQA sample", train, test, train.predicates.names))
    vg = shared / "scenegraphs" / "visual_genome"
    dicts = shared / "scenegraphs" / "vg150" / "VG-SGG-dicts-with-attri.json"
    if vg.is_dir() and dicts.is_file() and "vg" in which:
        (tmp / "vg" / "raw").mkdir(parents=True)
        shutil.copy(vg / "scene_graphs_sample100.json", tmp / "vg" / "raw" / "scene_graphs.json")
        shutil.copy(vg / "image_data_sample100.json", tmp / "vg" / "raw" / "image_data.json")
        objects, predicates = Vocabulary.from_vg150_dicts(dicts)
        full = VisualGenomeSceneGraphs(
            str(tmp / "vg"), objects=objects, predicates=predicates, transform=with_constant_feature_or_none
        )
        cut = int(0.7 * len(full))
        out.append(("Visual Genome sample (VG150 vocabulary)", full[:cut], full[cut:], predicates.names))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("out/pyg"))
    parser.add_argument("--quick", action="store_true", help="small run for the demo (~1 min)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2")
    parser.add_argument("--train-graphs", type=int, default=1000)
    parser.add_argument("--test-graphs", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05, help="base model (SGD, momentum 0.9, one-cycle)")
    parser.add_argument(
        "--energy-lr",
        type=float,
        default=0.01,
        help="energy model; the summed regulariser has curvature 4 x batch size, so lr x 4B must stay small",
    )
    parser.add_argument("--sgld-steps", type=int, default=10, help="official config 10, paper 20")
    parser.add_argument(
        "--pairs-per-image",
        type=int,
        default=1024,
        help="training pairs per image (official EBM config: every ordered pair, up to 1024)",
    )
    parser.add_argument("--sgld-step", type=float, default=1.0, help="paper default 1.0")
    parser.add_argument("--real-epochs", type=int, default=20)
    parser.add_argument(
        "--datasets", nargs="+", choices=("synthetic", "gqa", "vg"), default=["synthetic", "gqa", "vg"]
    )
    parser.add_argument(
        "--node-features",
        choices=("constant", "object"),
        default="constant",
        help="real samples: a constant (the #14 table) or the documented default ObjectFeatures",
    )
    parser.add_argument(
        "--shared-data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument(
        "--reverse-ebm-gradient",
        action="store_true",
        help="ablation (#18): the base model lowers E(G-) instead of raising it (BaseLowersNegativeEnergy)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small graphs: 1 is fastest)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--report-from", type=Path, nargs="+", help="merge these runs' results.json into --out (no training)"
    )
    args = parser.parse_args()
    if args.report_from:
        print("\n".join(merged_report(args.report_from, args.out)))
        return 0
    if args.quick:
        args.train_graphs, args.test_graphs, args.epochs, args.sgld_steps = 240, 120, 3, 5
        args.batch_size, args.hidden = 16, 32
    seeds = args.seeds if args.seeds is not None else [0, 1, 2]
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    command = "python examples/ebm_scene_graphs.py " + " ".join(sys.argv[1:])
    mode = "quick (demo sizes; not the measured result)" if args.quick else "full"
    settings = json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    lines = ["# Energy-based scene-graph learning (PyG): CE vs CE + EBM", "",
             f"Command: `{command}`  ", f"Mode: {mode}; settings: `{settings}`", ""]  # fmt: skip

    def save(results: dict) -> None:  # after every dataset, so that a cut-short run keeps what it finished
        (out / "report.md").write_text("\n".join(lines))
        (out / "results.json").write_text(json.dumps(results, indent=1))

    all_results = {}
    if "synthetic" in args.datasets:
        train_set = SyntheticSceneGraphs(args.train_graphs, seed=1000)
        test_set = SyntheticSceneGraphs(args.test_graphs, seed=2000)
        all_results["synthetic"] = run_experiment(
            "Synthetic scenes", train_set, test_set, list(train_set.predicates), args, out, lines, seeds
        )
        save(all_results)

    real = tuple(d for d in args.datasets if d != "synthetic")
    if not args.quick and real and args.shared_data.is_dir():
        epochs = args.epochs
        args.epochs = args.real_epochs
        with tempfile.TemporaryDirectory() as tmp:
            samples = real_datasets(args.shared_data, Path(tmp), real, args.node_features)
            for name, train, test, names in samples:
                all_results[name] = run_experiment(name, train, test, names, args, out, lines, seeds)
                save(all_results)
        args.epochs = epochs
    elif not args.quick and real:
        lines += [f"_Real GQA/VG samples skipped: {args.shared_data} not found._", ""]

    lines += [f"Wall time: {time.perf_counter() - started:.0f} s.", ""]
    save(all_results)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
