"""Does energy-based learning raise mR@K while R@K holds, where its mechanism should matter? (issue #18).

Data: ``BiasedSceneGraphs`` (``pyg_scenegraph.datasets.biased``): VG's predicate bias with a known truth —
generic head predicates (on, has, near) that annotators write with probability ``--generic-rate`` in place
of their specific children, in training and test annotations alike, and a specific child fixed by the scene
context (the other objects' classes and relations), not by the pair. A CE model has VG's profile there
(R@50 / mR@50 between 2.5 and 6; Motifs on VG150 PredCls: 4.4).

Protocol (official EBM recipe): the same ``RelationPredictor`` is trained per seed with CE and with CE +
``EBMLoss`` on a ``GraphEnergyModel`` (all pairs up to 1024 per image; SGLD 20 steps, step 1.0, noise
0.001, gradient clip 0.01; energy and base model trained together, clipped separately at norm 5), and
evaluated with ``SceneGraphEvaluator`` (Scene-Graph-Benchmark's label + IoU >= 0.5 matching). Paired
differences (EBM - CE, same seed, same data order) with a 95 % t-interval for R@K, mR@K, zR@K (zero-shot
triplets: test triplets absent from the training annotations). Ablations, paired with the same CE runs:
SGLD steps 0 / 10, energy-model learning rate, no image-graph branch (the energy model's region features
replaced by zeros), the sign of the EBM gradient reaching the base model (``BaseLowersNegativeEnergy``: the
base model pushed to lower, not raise, the energy of its own predictions) and the regulariser's weight λ;
the energy gap E(G-) - E(G+) over training is plotted for every EBM variant.

    python examples/ebm_claim.py --quick --out out/demo/ebm_claim           # a few seconds
    OMP_NUM_THREADS=1 flock /tmp/graftkit-heavy.lock python examples/ebm_claim.py --out out/ebm_claim
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_timing import add_device_argument
from pyg_scenegraph import (
    EBMLoss,
    GraphEnergyModel,
    RelationPredictor,
    SceneGraphEvaluator,
    SGLDSampler,
    all_pairs,
    box_code,
    sample_relation_pairs,
    scene_graph_losses,
)
from pyg_scenegraph.datasets.biased import BiasedSceneGraphs
from torch_geometric.loader import DataLoader
from tqdm.auto import tqdm

KS = (20, 50, 100)
METRICS = [f"{m}@{k}" for m in ("R", "mR", "zR") for k in KS]


class WithoutImageGraph(torch.nn.Module):
    """Ablation: the energy model's image branch sees zeros instead of region features (no image evidence)."""

    def __init__(self, energy_model: GraphEnergyModel) -> None:
        super().__init__()
        self.energy_model = energy_model

    def forward(self, x: torch.Tensor, *args: object) -> torch.Tensor:
        return self.energy_model(torch.zeros_like(x), *args)


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return -grad


class BaseLowersNegativeEnergy(torch.nn.Module):
    """Ablation (the sign question): the base model receives the gradient of ``+E(G-)`` instead of ``-E(G-)``.

    The official joint training backpropagates ``L_e = mean E(G+) - mean E(G-) + sum E^2`` into the base model
    through the renormalised negatives, which pushes the base model to *raise* the energy of its own
    predictions. Here the gradient reaching the negative states is reversed, so the base model is pushed
    towards graphs the energy model scores as data-like (a generator's direction), while the energy model's
    own parameter gradients are unchanged. SGLD samples through the bare ``module`` (as ``scene_graph_losses``
    does for a DDP wrapper), so its moves are unchanged too.
    """

    def __init__(self, energy_model: GraphEnergyModel) -> None:
        super().__init__()
        self.module = energy_model

    def forward(self, x, nodes, pair_index, edges, *args: object) -> torch.Tensor:
        reverse = _ReverseGradient.apply
        return self.module(x, reverse(nodes), pair_index, reverse(edges), *args)


def base_model_signal(negative_energy: torch.Tensor, loss: EBMLoss) -> float:
    r"""How much EBM gradient the base model still receives, 1 at zero energy, 0 at the loss's equilibrium.

    The base model sees :math:`\mathcal{L}_e` only through the negatives, with
    :math:`\partial \mathcal{L}_e / \partial E(G^-_i) = -T/B + 2\lambda E(G^-_i)`. Divided by :math:`T/B`
    this is :math:`|2\lambda B E(G^-_i)/T - 1|` (mean over the batch): it vanishes when
    :math:`E(G^-_i) = T / (2\lambda B)`, where the summed regulariser balances the contrastive term, whatever
    the base model predicts. (The same holds for the positives at :math:`-T/(2\lambda B)`, so the gap
    :math:`E(G^-) - E(G^+)` of a fully separating energy model settles at :math:`T/(\lambda B)`.)
    """
    b = negative_energy.numel()
    return float((2 * loss.regularization * b * negative_energy / loss.temperature - 1).abs().mean())


def ebm_to_ce_gradient_ratio(base: torch.nn.Module, out: dict) -> float:
    """``‖∂L_e/∂θ‖ / ‖∂L_CE/∂θ‖`` over the base model's parameters θ (two extra backward passes)."""
    params = [q for q in base.parameters() if q.requires_grad]

    def norm(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return float(torch.stack([g.norm() for g in grads if g is not None]).norm())

    return norm(out["ebm"]) / max(norm(out["ce"]), 1e-30)


def frequency_counts(dataset: BiasedSceneGraphs) -> torch.Tensor:
    """``[C, C, P]`` annotated predicate counts per (subject class, object class): Motifs' frequency bias."""
    c, p = dataset.num_object_classes, dataset.num_predicate_classes
    counts = torch.zeros(c, c, p)
    for data in dataset:
        s, o = data.y[data.edge_index[0]], data.y[data.edge_index[1]]
        counts.index_put_((s, o, data.edge_predicate), torch.ones(s.numel()), accumulate=True)
    return counts


def zero_shot_triplets(train: BiasedSceneGraphs, test: BiasedSceneGraphs) -> torch.Tensor:
    """``[Z, 3]`` (subject class, object class, predicate) of the test annotations never seen in training."""

    def triplets(ds: BiasedSceneGraphs) -> set[tuple[int, int, int]]:
        return {(int(data.y[s]), int(data.y[o]), int(q)) for data in ds
                for (s, o), q in zip(data.edge_index.t(), data.edge_predicate, strict=True)}  # fmt: skip

    return torch.tensor(sorted(triplets(test) - triplets(train)), dtype=torch.long).view(-1, 3)


def train_and_evaluate(train_set, test_set, meta: dict, variant: dict, seed: int, args) -> dict:
    """Train one model (``variant``: ``ebm``, ``sgld_steps``, ``energy_lr``, ``image_graph``) and score it."""
    device = torch.device(args.device)
    torch.manual_seed(seed)
    c, p = train_set.num_object_classes, train_set.num_predicate_classes
    base = RelationPredictor(meta["in_channels"], c, p, hidden_channels=args.hidden, heads=4, task=args.task,
                             frequency_bias=meta["frequency"]).to(device)  # fmt: skip
    groups = [{"params": list(base.parameters()), "lr": args.lr}]
    energy = None
    if variant["ebm"]:
        energy = GraphEnergyModel(c, p, meta["in_channels"], hidden_channels=args.hidden,
                                  pooling_channels=args.hidden).to(device)  # fmt: skip
        groups.append({"params": list(energy.parameters()), "lr": variant["energy_lr"]})
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    sampler = SGLDSampler(step_size=1.0, num_steps=variant["sgld_steps"], noise_std=1e-3, grad_clip=0.01,
                          generator=torch.Generator(device).manual_seed(seed))  # fmt: skip
    energy_fn: torch.nn.Module | None = energy
    if energy is not None and not variant["image_graph"]:
        energy_fn = WithoutImageGraph(energy)
    elif energy is not None and variant["base_lowers_negative_energy"]:
        energy_fn = BaseLowersNegativeEnergy(energy)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    pair_gen = torch.Generator(device).manual_seed(seed)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=args.epochs * len(loader), pct_start=0.1
    )
    ebm_loss = EBMLoss(regularization=variant["regularization"])
    sgld_seconds, gaps, signals, separated, start = 0.0, [], [], [], time.perf_counter()
    grad_ratios: list[float] = []
    for _ in range(args.epochs):
        base.train()
        for data in loader:
            data = data.to(device)
            pairs, labels = sample_relation_pairs(
                data.edge_index, data.edge_predicate, data.batch, 1024, generator=pair_gen
            )
            out = scene_graph_losses(base, data, pairs, labels, energy_fn, sampler, ebm_loss, task=args.task)
            optimizer.zero_grad()
            if args.grad_ratio and out["ebm"] is not None:
                grad_ratios.append(ebm_to_ce_gradient_ratio(base, out))
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(base.parameters(), 5.0)
            if energy is not None:
                torch.nn.utils.clip_grad_norm_(energy.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
            sgld_seconds += out["sgld_seconds"]
            if out["positive_energy"] is not None:
                e_pos, e_neg = out["positive_energy"].detach(), out["negative_energy"].detach()
                gaps.append(float(e_neg.mean() - e_pos.mean()))
                separated.append(float((e_neg > e_pos).float().mean()))
                signals.append(base_model_signal(e_neg, ebm_loss))
    train_seconds = time.perf_counter() - start

    base.eval()
    evaluator = SceneGraphEvaluator(p, mode=args.task, ks=KS, zero_shot_triplets=meta["zero_shot"]).to(device)
    truth = SceneGraphEvaluator(p, mode=args.task, ks=(50,)).to(device)  # against the unbiased predicates
    with torch.no_grad():
        for data in DataLoader(test_set, batch_size=64):
            data = data.to(device)
            pairs = all_pairs(data.batch)
            logits, obj_logits = base(data.x, box_code(data.box, data.image_size[data.batch]), pairs,
                                      data.y, data.batch)  # fmt: skip
            obj_scores = obj_logits.softmax(-1) if args.task == "sgcls" else None
            evaluator.update_batch(data, pairs, logits.softmax(-1), obj_scores)
            data.edge_predicate = data.edge_true_predicate
            truth.update_batch(data, pairs, logits.softmax(-1), obj_scores)
    result = {k: 100 * float(v) for k, v in evaluator.compute().items()}
    result["true mR@50"] = 100 * float(truth.compute()["mR@50"])
    per_pred = 100 * evaluator.per_predicate_recall(50).nan_to_num(0.0)
    for group in ("head", "tail", "standalone"):
        ids = list(getattr(BiasedSceneGraphs, f"{group}_predicates"))
        result[f"{group} R@50"] = float(per_pred[ids].mean())
    result.update(train_seconds=train_seconds, sgld_seconds=sgld_seconds, gaps=gaps, signals=signals,
                  separated=separated, grad_ratios=grad_ratios, regularization=ebm_loss.regularization,
                  batch_size=args.batch_size)  # fmt: skip
    return result


def t_interval(diffs: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95 % Student-t interval of paired differences (NaN with one seed)."""
    from scipy.stats import t

    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, float("nan")
    return mean, float(t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))


def variants(args) -> dict[str, dict]:
    full = {"ebm": True, "sgld_steps": 20, "energy_lr": args.energy_lr, "image_graph": True,
            "base_lowers_negative_energy": False, "regularization": 1.0}  # fmt: skip
    out = {"CE": {**full, "ebm": False}, "CE + EBM": full}
    if not args.no_ablations:
        out.update({
            "EBM, SGLD 0 steps": {**full, "sgld_steps": 0},
            "EBM, SGLD 10 steps": {**full, "sgld_steps": 10},
            f"EBM, energy lr {args.energy_lr * 5:g}": {**full, "energy_lr": args.energy_lr * 5},
            "EBM, no image graph": {**full, "image_graph": False},
            "EBM, base lowers E(G-)": {**full, "base_lowers_negative_energy": True},
            "EBM, regulariser λ 0.01": {**full, "regularization": 0.01},
        })  # fmt: skip
    return out


def report(results: dict[str, list[dict]], out: Path, wall: float) -> list[str]:
    ce = results["CE"]
    lines = [
        "| method | " + " | ".join(METRICS[:6]) + " | zR@50 | tail R@50 | true mR@50 |",
        "|---" * 10 + "|",
    ]
    for name, runs in results.items():
        cells = [
            f"{statistics.mean(r[m] for r in runs):.2f}"
            for m in [*METRICS[:6], "zR@50", "tail R@50", "true mR@50"]
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Paired differences vs CE (same seed), mean ± 95 % t half-width over {len(ce)} seeds:",
        "",
        "| variant | " + " | ".join(f"Δ {m}" for m in METRICS) + " |",
        "|---" * (len(METRICS) + 1) + "|",
    ]
    for name, runs in results.items():
        if name == "CE":
            continue
        cells = []
        for m in METRICS:
            mean, half = t_interval([r[m] - c[m] for r, c in zip(runs, ce, strict=True)])
            cells.append(f"{mean:+.2f} ± {half:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Energy model over the last 10 % of training steps (mean over seeds): the gap E(G-) - E(G+), the "
        "share of images whose negative graph has the higher energy, and the EBM gradient the base model "
        "still receives (|2λB·E(G-)/T - 1|: 1 at zero energy, 0 at the loss's equilibrium E(G-) = T/(2λB)):",
        "",
        "| variant | gap | equilibrium gap T/(λB) | images separated | base signal, first → last 10 % |",
        "|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        if not runs[0]["gaps"]:
            continue
        lam = runs[0].get("regularization", 1.0)
        lines.append(
            f"| {name} | {tenth(runs, 'gaps'):.4f} | {1 / (lam * args_batch(runs)):.4f} | "
            f"{100 * tenth(runs, 'separated'):.1f} % | {tenth(runs, 'signals', first=True):.3f} → "
            f"{tenth(runs, 'signals'):.3f} |"
        )
    measured = {name: runs for name, runs in results.items() if runs[0].get("grad_ratios")}
    if measured:
        lines += ["", "EBM gradient on the base model relative to the CE gradient, ‖∂L_e/∂θ‖ / ‖∂L_CE/∂θ‖ "
                  "(median over the first and the last 10 % of steps):", ""]  # fmt: skip
        for name, runs in measured.items():
            first = tenth(runs, "grad_ratios", first=True, reduce=statistics.median)
            last = tenth(runs, "grad_ratios", reduce=statistics.median)
            lines.append(f"- {name}: {first:.2e} → {last:.2e}")
    ratio = [c["R@50"] / max(c["mR@50"], 1e-9) for c in ce]
    train = sum(r["train_seconds"] for runs in results.values() for r in runs)
    sgld = sum(r["sgld_seconds"] for runs in results.values() for r in runs)
    per_seed = wall / len(ce)  # data generation included
    per_variant = {name: statistics.mean(r["train_seconds"] for r in runs) for name, runs in results.items()}
    lines += [
        "",
        f"- CE profile: R@50 / mR@50 = {statistics.mean(ratio):.2f} (VG150 Motifs: PredCls 65.2 / 14.8 "
        "= 4.4, SGCls 35.8 / 8.3 = 4.3).",
        f"- Wall time {wall:.0f} s ({per_seed:.0f} s per seed for all {len(results)} variants; 5 seeds: "
        f"~{5 * per_seed / 60:.0f} min); training {train:.0f} s, of which SGLD {sgld:.0f} s "
        f"({100 * sgld / max(train, 1e-9):.0f} %).",
        "- Training seconds per run: " + ", ".join(f"{n} {t:.0f}" for n, t in per_variant.items()) + ".",
        "",
        "![energy gap](energy_gap.png)",
        "",
    ]
    plot_gaps(results, out / "energy_gap.png")
    return lines


def tenth(
    runs: list[dict], key: str, first: bool = False, reduce: Callable[[list[float]], float] = statistics.mean
) -> float:
    """Mean (or ``reduce``) of a per-step series over the first or the last 10 % of the steps of every run."""
    values: list[float] = []
    for r in runs:
        n = max(1, len(r[key]) // 10)
        values += r[key][:n] if first else r[key][-n:]
    return reduce(values)


def args_batch(runs: list[dict]) -> int:
    return int(runs[0].get("batch_size", 32))


def plot_gaps(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    panels = (("gaps", "E(G-) - E(G+) (batch means, mean over seeds)"),
              ("signals", "EBM gradient into the base model |2λB·E(G-)/T - 1|"))  # fmt: skip
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name, runs in results.items():
            if runs and runs[0][key]:
                curve = torch.tensor([r[key] for r in runs]).mean(0)
                window = max(1, curve.numel() // 50)
                smooth = curve.unfold(0, window, window).mean(-1) if curve.numel() >= window else curve
                ax.plot(torch.arange(smooth.numel()) * window, smooth, label=name)
        if key == "gaps":
            ax.set_yscale("symlog", linthresh=0.01)
            ax.axhline(0, color="grey", lw=0.5)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("out/ebm_claim"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (a test runs it)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--task", choices=("predcls", "sgcls"), default="predcls")
    parser.add_argument("--train-graphs", type=int, default=600)
    parser.add_argument("--test-graphs", type=int, default=300)
    parser.add_argument("--generic-rate", type=float, default=0.75)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05, help="base model: SGD momentum 0.9, one-cycle")
    parser.add_argument(
        "--energy-lr", type=float, default=0.01, help="energy model (lr x 4B must stay small)"
    )
    parser.add_argument("--no-ablations", action="store_true", help="CE vs CE + EBM only")
    parser.add_argument("--variants", nargs="+", help="run only these variants (by name; CE must be one)")
    parser.add_argument(
        "--grad-ratio",
        action="store_true",
        help="log ‖∂L_e/∂θ‖ / ‖∂L_CE/∂θ‖ on the base model every step (diagnostic; two extra backwards)",
    )
    parser.add_argument("--ce-only", action="store_true", help="the CE baseline only (calibration)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_graphs, args.test_graphs, args.epochs, args.seeds, args.hidden = 16, 16, 1, 2, 16
        args.batch_size = 16
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train = BiasedSceneGraphs(num_graphs=args.train_graphs, seed=1000, generic_rate=args.generic_rate)
    test = BiasedSceneGraphs(num_graphs=args.test_graphs, seed=2000, generic_rate=args.generic_rate)
    meta = {"in_channels": train[0].x.size(-1), "frequency": frequency_counts(train),
            "zero_shot": zero_shot_triplets(train, test)}  # fmt: skip
    todo = variants(args)
    if args.ce_only:
        todo = {"CE": todo["CE"]}
    if args.variants:
        unknown = sorted(set(args.variants) - set(todo))
        if unknown:
            parser.error(f"--variants: unknown {unknown}; choose from {sorted(todo)}")
        if "CE" not in args.variants:
            parser.error("--variants must include CE, the paired baseline")
        todo = {name: variant for name, variant in todo.items() if name in args.variants}
    results: dict[str, list[dict]] = {name: [] for name in todo}
    command = "python examples/ebm_claim.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = [
        "# EBM claim under VG's predicate bias (BiasedSceneGraphs)",
        "",
        f"Command: `{command}`  ",
        f"Mode: {'quick (not a result)' if args.quick else 'full'}; {args.task}; {len(train)} training / "
        f"{len(test)} test images; generic rate {args.generic_rate}; {len(meta['zero_shot'])} zero-shot "
        f"triplets; device {args.device}",
        "",
    ]
    progress = tqdm(total=args.seeds * len(todo), desc="runs", disable=args.no_progress)
    for seed in range(args.seeds):
        for name, variant in todo.items():
            r = train_and_evaluate(train, test, meta, variant, seed, args)
            results[name].append(r)
            progress.update()
            tqdm.write(
                f"seed {seed} {name}: R@50 {r['R@50']:.2f} mR@50 {r['mR@50']:.2f} tail R@50 "
                f"{r['tail R@50']:.2f} true mR@50 {r['true mR@50']:.2f} ({r['train_seconds']:.1f} s, "
                f"SGLD {r['sgld_seconds']:.1f} s)"
            )
        # after every seed, so that a run cut short keeps the seeds it finished
        lines = header + report(results, args.out, time.perf_counter() - started)
        (args.out / "report.md").write_text("\n".join(lines))
        (args.out / "results.json").write_text(json.dumps(results))
    progress.close()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
