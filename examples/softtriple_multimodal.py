"""Where do several SoftTriple centres pay off? Tuned SoftTriple vs normalised softmax vs PML (issue #19).

Two class-disjoint glyph retrieval tasks (``softtriple_tasks.py``): ``multimodal`` (each class the union of
several unrelated characters, 16 px, strong augmentation) and ``hangul`` (thousands of syllable classes with
five instances each, the Stanford Online Products regime; needs Debian's hangul fonts, ``apt-get install
fonts-nanum fonts-unfonts-core fonts-baekmuk``, and is skipped without them).

For each task and method an Optuna study (TPE sampler, median pruner on the per-epoch validation MAP@R,
saved as a journal file under ``--out``) picks the hyperparameters on validation classes carved from the
training classes, with the same number of trials for every method:

- ``softtriple``: ``pml_softtriple.SoftTripleLoss``, K in {2, 5, 10}, la, gamma, margin and tau searched;
- ``norm_softmax``: the same loss with K = 1 (normalised softmax), la and margin searched;
- ``pml_softtriple``: ``pytorch_metric_learning.losses.SoftTripleLoss`` (no regulariser, as PML ships it),
  K in {2, 5, 10}, la, gamma and margin searched.

Each method is then trained at its chosen setting on all training classes with ``--seeds`` seeds and scored on
the test classes (PML's ``AccuracyCalculator``: P@1, R@1, MAP@R); the report gives mean ± std, paired
differences (same seed, hence same initialisation of the network and same data order) with a 95 %
t-interval, and the centres each training class keeps (cosine >= 0.99 merged). P@1 and R@1 (a hit among the
nearest neighbour) are the same number by definition; both are reported as the issue asks. The network,
augmentation and optimiser are those of ``softtriple_retrieval.py`` (3-conv CNN from scratch, Adam with the
centres at a higher learning rate, cosine schedule) plus random erasing and pixel noise.

    python examples/softtriple_multimodal.py --quick --out out/softtriple_multimodal_quick   # ~30 s
    flock /tmp/graftkit-heavy.lock python examples/softtriple_multimodal.py --jobs 2 \
        --out out/softtriple_multimodal
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import optuna
import torch
from pml_softtriple import RecallAtKAccuracyCalculator, SoftTripleLoss, effective_center_counts, param_groups
from pytorch_metric_learning import losses as pml_losses
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import softtriple_retrieval as base
import softtriple_tasks as tasks

METHODS = ("softtriple", "norm_softmax", "pml_softtriple")
LABELS = {
    "softtriple": "SoftTriple (ours, K/la/gamma/margin/tau tuned)",
    "norm_softmax": "normalised softmax (ours, K=1, la/margin tuned)",
    "pml_softtriple": "PML SoftTripleLoss (K/la/gamma/margin tuned)",
}
METRICS = ("precision_at_1", "recall_at_1", "mean_average_precision_at_r")
METRIC_NAMES = ("P@1", "R@1", "MAP@R")
PAIRS = (("softtriple", "norm_softmax"), ("softtriple", "pml_softtriple"), ("pml_softtriple", "norm_softmax"))


@dataclass(frozen=True)
class Budget:
    """Training length and search budget of one task."""

    epochs: int
    batch_size: int
    trials: int
    embedding_size: int = 64
    lr: float = 2e-3
    centers_lr: float = 0.2


FULL = {
    "multimodal": Budget(epochs=30, batch_size=64, trials=20),
    "hangul": Budget(epochs=12, batch_size=128, trials=20),
}
QUICK = {
    "multimodal": Budget(epochs=2, batch_size=32, trials=2),
    "hangul": Budget(epochs=2, batch_size=32, trials=2),
}


def build_task(name: str, quick: bool) -> tasks.Task:
    if name == "multimodal":
        return tasks.multimodal_task(fonts_per_char=4, max_classes=15) if quick else tasks.multimodal_task()
    if name == "hangul":
        return (
            tasks.hangul_task(num_classes=60, instances_per_class=3, size=16)
            if quick
            else tasks.hangul_task()
        )
    raise ValueError(f"task must be 'multimodal' or 'hangul', got {name!r}")


def suggest(trial: optuna.Trial, method: str) -> dict:
    """The search space: ranges wide enough to hold the paper's defaults and Musgrave et al.'s CUB optimum."""
    params = {"la": trial.suggest_float("la", 2.0, 100.0, log=True)}
    params["margin"] = trial.suggest_float("margin", 0.0, 0.5)
    if method != "norm_softmax":
        params["centers_per_class"] = trial.suggest_categorical("centers_per_class", [2, 5, 10])
        params["gamma"] = trial.suggest_float("gamma", 0.01, 1.0, log=True)
    if method == "softtriple":
        params["tau"] = trial.suggest_float("tau", 0.0, 0.5)
    return params


def make_loss(method: str, params: dict, num_classes: int, dim: int) -> nn.Module:
    if method == "softtriple":
        return SoftTripleLoss(num_classes, dim, **params)
    if method == "norm_softmax":
        return SoftTripleLoss(num_classes, dim, centers_per_class=1, **params)
    if method == "pml_softtriple":
        return pml_losses.SoftTripleLoss(num_classes, dim, **params)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def strong_augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``softtriple_retrieval.augment`` (affine jitter), then one erased box (up to 40 % a side) and noise."""
    out = base.augment(images, gen)
    n, _, h, w = out.shape
    size = (torch.rand(n, 2, generator=gen) * 0.4 * torch.tensor([h, w])).long()
    corner = (torch.rand(n, 2, generator=gen) * torch.tensor([h, w])).long()
    rows, cols = torch.arange(h), torch.arange(w)
    box = ((rows[None, :] >= corner[:, :1]) & (rows[None, :] < corner[:, :1] + size[:, :1]))[:, :, None] & (
        (cols[None, :] >= corner[:, 1:]) & (cols[None, :] < corner[:, 1:] + size[:, 1:])
    )[:, None, :]
    out = out.masked_fill(box[:, None], 0.0)
    return (out + 0.1 * torch.randn(out.shape, generator=gen)).clamp(0.0, 1.0)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    calculator = RecallAtKAccuracyCalculator(
        recall_ks=(1,), include=METRICS, k="max_bin_count", device=torch.device("cpu")
    )
    return calculator.get_accuracy(base.embed(model, x), y)


def train(
    method: str, params: dict, fit: tuple, score: tuple, budget: Budget, seed: int, report=None
) -> dict:
    """Train on ``fit`` (images, labels), score on ``score`` every epoch when ``report`` is given, else once.

    ``report(epoch, map_at_r)`` may raise ``optuna.TrialPruned``.
    """
    x_fit, y_fit = (torch.from_numpy(np.ascontiguousarray(a)) for a in fit[:2])
    x_score, y_score = (torch.from_numpy(np.ascontiguousarray(a)) for a in score[:2])
    num_classes = int(y_fit.max()) + 1
    torch.manual_seed(seed)
    model = base.GlyphEmbedder(budget.embedding_size)
    loss = make_loss(method, params, num_classes, budget.embedding_size)
    optimizer = torch.optim.Adam(param_groups(model, loss, lr=budget.lr, centers_lr=budget.centers_lr))
    steps = len(x_fit) // budget.batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, budget.epochs * steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    for epoch in range(budget.epochs):
        model.train()
        order = torch.randperm(len(x_fit), generator=gen)
        for step in range(steps):
            idx = order[step * budget.batch_size : (step + 1) * budget.batch_size]
            value = loss(model(strong_augment(x_fit[idx], gen)), y_fit[idx])
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            scheduler.step()
        if not torch.isfinite(value):
            raise optuna.TrialPruned(f"non-finite loss at epoch {epoch}")
        if report is not None or epoch == budget.epochs - 1:
            metrics = evaluate(model, x_score, y_score)
            if report is not None:
                report(epoch, metrics["mean_average_precision_at_r"])
    if report is None and len(score) > 2 and len(np.unique(score[2])) > len(np.unique(score[1])):
        # several glyphs per class: also score retrieval of the same glyph (character), the ceiling of
        # class-level retrieval on unseen classes whose glyphs have nothing in common
        glyphs = torch.from_numpy(np.unique(score[2], return_inverse=True)[1])
        metrics["glyph_map_at_r"] = evaluate(model, x_score, glyphs)["mean_average_precision_at_r"]
    kept = effective_center_counts(base.centers_of(loss, num_classes), base.MERGE_THRESHOLD)
    return {
        "method": method,
        "seed": seed,
        "params": params,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "kept": kept.tolist(),
        "seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------------ the search
def _storage(path: Path) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def _study(task: str, method: str, storage_path: Path, seed: int) -> optuna.Study:
    return optuna.create_study(
        study_name=f"{task}-{method}",
        storage=_storage(storage_path),
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=5),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2),
        load_if_exists=True,
    )


def save_task(task: tasks.Task, path: Path) -> None:
    np.savez(path, **{k: v for k, v in asdict(task).items() if isinstance(v, np.ndarray)})
    path.with_suffix(".json").write_text(json.dumps({"name": task.name, "description": task.description}))


def load_task(path: Path) -> tasks.Task:
    with np.load(path) as arrays:
        return tasks.Task(**json.loads(path.with_suffix(".json").read_text()), **dict(arrays))


def search_worker(
    task_path: str, method: str, budget: Budget, storage_path: str, n_trials: int, seed: int
) -> None:
    """Run ``n_trials`` trials of one study (several processes may share a study through the journal file)."""
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task = load_task(Path(task_path))
    fit, score = task.search_split()
    study = _study(task.name, method, Path(storage_path), seed)

    def objective(trial: optuna.Trial) -> float:
        def report(epoch: int, value: float) -> None:
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        result = train(method, suggest(trial, method), fit, score, budget, seed=0, report=report)
        trial.set_user_attr("seconds", result["seconds"])
        trial.set_user_attr("kept", float(np.mean(result["kept"])))
        return result["metrics"]["mean_average_precision_at_r"]

    study.optimize(objective, n_trials=n_trials)


def final_worker(task_path: str, method: str, params: dict, budget: Budget, seed: int) -> dict:
    """Train at the chosen setting on all training classes, score on the test classes."""
    torch.set_num_threads(1)
    task = load_task(Path(task_path))
    fit, score = task.final_split()
    return {"task": task.name, **train(method, params, fit, score, budget, seed)}


def _run(pool, fn, jobs: list[tuple], desc: str) -> list:
    if pool is None:
        return [fn(*job) for job in tqdm(jobs, desc=desc)]
    futures = [pool.submit(fn, *job) for job in jobs]
    return [f.result() for f in tqdm(futures, desc=desc)]


# ------------------------------------------------------------------------------------------ the report
def t_interval(diffs: np.ndarray, scale: float = 100.0) -> str:
    """Mean paired difference with its 95 % Student-t interval, in points."""
    d = np.asarray(diffs, np.float64) * scale
    if len(d) < 2:
        return f"{d.mean():+.1f}"
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return f"{d.mean():+.1f} [{d.mean() - half:+.1f}, {d.mean() + half:+.1f}]"


def regulariser_lines(study: optuna.Study) -> list[str]:
    """The regulariser's effect across the SoftTriple search: fraction of the K centres kept vs tau."""
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(trials) < 3:
        return []
    tau = np.array([t.params["tau"] for t in trials])
    kept = np.array([t.user_attrs["kept"] / t.params["centers_per_class"] for t in trials])
    constant = np.ptp(tau) == 0 or np.ptp(kept) == 0
    rho = float("nan") if constant else stats.spearmanr(tau, kept).statistic
    lines = [
        "",
        f"Regulariser, over the {len(trials)} complete SoftTriple trials (each its own K, la, gamma, "
        f"margin): Spearman correlation of tau with the fraction of the K centres kept {rho:+.2f}.",
        "",
        "| tau | trials | centres kept / K (mean) | val MAP@R (mean) |",
        "|---|---|---|---|",
    ]
    for low, high in ((0.0, 0.05), (0.05, 0.2), (0.2, 0.5 + 1e-9)):
        sel = (tau >= low) & (tau < high)
        if sel.any():
            value = np.mean([t.value for t, s in zip(trials, sel, strict=True) if s])
            lines.append(
                f"| [{low}, {min(high, 0.5):.2g}) | {sel.sum()} | {kept[sel].mean():.2f} | "
                f"{100 * value:.1f} |"
            )
    return lines


def task_section(task: tasks.Task, budget: Budget, studies: dict, results: list[dict]) -> list[str]:
    lines = [
        f"## Task `{task.name}`",
        "",
        f"{task.description}. Classes: {len(task.train)} training ({len(task.val)} of them validation "
        f"classes for the search), {len(task.test)} test. Training: {budget.epochs} epochs, batch "
        f"{budget.batch_size}, embedding {budget.embedding_size}, Adam lr {budget.lr} (centres "
        f"{budget.centers_lr}).",
        "",
        f"### Search ({budget.trials} trials per method, validation MAP@R)",
        "",
        "| method | best val MAP@R | chosen setting | trials pruned | s / complete trial |",
        "|---|---|---|---|---|",
    ]
    for method in METHODS:
        study = studies[method]
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
        setting = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in study.best_params.items()
        )
        seconds = np.mean([t.user_attrs["seconds"] for t in complete])
        lines.append(
            f"| {LABELS[method]} | {100 * study.best_value:.1f} | {setting} | {pruned}/{len(study.trials)} | "
            f"{seconds:.0f} |"
        )
    lines += regulariser_lines(studies["softtriple"])
    seeds = sorted({r["seed"] for r in results})
    keys, names = METRICS, METRIC_NAMES
    several_modes = len(np.unique(task.modes)) > len(np.unique(task.labels))
    if several_modes and all("glyph_map_at_r" in r["metrics"] for r in results):
        keys, names = (*keys, "glyph_map_at_r"), (*names, "glyph MAP@R")
    lines += [
        "",
        f"### Test classes ({len(seeds)} seeds, mean ± std, %)",
        "",
        "| method | " + " | ".join(names) + " | centres kept / class |",
        "|---|" + "---|" * (len(keys) + 1),
    ]
    by = {(r["method"], r["seed"]): r for r in results}
    for method in METHODS:
        rows = [by[method, s] for s in seeds]
        cells = [base.mean_std([r["metrics"][m] for r in rows]) for m in keys]
        kept = np.concatenate([r["kept"] for r in rows]).astype(np.float64)
        lines.append(
            f"| {LABELS[method]} | " + " | ".join(cells) + f" | {kept.mean():.2f} ± {kept.std():.2f} |"
        )
    if "glyph_map_at_r" in keys:
        per_class = np.bincount(task.labels).max()
        per_glyph = np.bincount(task.modes).max()
        lines += [
            "",
            "Glyph MAP@R scores the same test images with the character as the label. A test class is a "
            "union of characters never seen in training with nothing in common, so appearance alone finds "
            f"only the same character: class-level MAP@R is then about ({per_glyph} − 1) / "
            f"({per_class} − 1) = {100 * (per_glyph - 1) / (per_class - 1):.1f} % or less; what the training "
            "classes' several modes change is how well the embedding separates unseen characters (P@1, "
            "glyph MAP@R).",
        ]
    lines += [
        "",
        "Paired differences (same seed), points, mean [95 % t-interval]:",
        "",
        "| difference | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for a, b in PAIRS:
        cells = [
            t_interval(np.array([by[a, s]["metrics"][m] - by[b, s]["metrics"][m] for s in seeds]))
            for m in keys
        ]
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def report_from(runs: list[Path], out: Path) -> list[str]:
    """One report from finished runs (e.g. one task each, run side by side): their studies and results."""
    commands, sections = [], []
    for run in runs:
        commands += [
            line.split(" Optuna ")[0]
            for line in (run / "report.md").read_text().splitlines()
            if line.startswith("Command:")
        ]
        results = json.loads((run / "results.json").read_text())
        for task_path in sorted(run.glob("task_*.npz")):
            task = load_task(task_path)
            studies = {m: _study(task.name, m, run / "optuna_journal.log", 0) for m in METHODS}
            saved = run / f"budget_{task.name}.json"  # runs before it was saved: the full budget
            budget = (
                Budget(**json.loads(saved.read_text()))
                if saved.is_file()
                else replace(FULL[task.name], trials=len(studies["softtriple"].trials))
            )
            sections += task_section(task, budget, studies, [r for r in results if r["task"] == task.name])
    lines = [
        "# SoftTriple vs normalised softmax, tuned on validation classes",
        "",
        f"Merged from {', '.join(f'`{run}`' for run in runs)} (`--report-from`); the runs:",
        "",
        *(f"- {command}" for command in commands),
        "",
        "Metrics: PML's `AccuracyCalculator` (k = max_bin_count), every test image a query against all other "
        "test images; P@1 = R@1 by definition. Centres kept: distinct centres per training class after "
        f"merging those with cosine >= {base.MERGE_THRESHOLD}, mean ± std over classes and seeds.",
        "",
        *sections,
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny tasks, 2 epochs, 2 trials, 2 seeds")
    parser.add_argument("--out", type=Path, default=Path("out/softtriple_multimodal"))
    parser.add_argument(
        "--tasks", nargs="+", default=["multimodal", "hangul"], choices=["multimodal", "hangul"]
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="test seeds (default 0-4; quick 0-1)"
    )
    parser.add_argument("--trials", type=int, default=None, help="override the trials per method")
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs")
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes, 1 thread each"
    )
    parser.add_argument(
        "--report-from", type=Path, nargs="+", help="merge these finished runs into --out (no training)"
    )
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.report_from:
        print("\n".join(report_from(args.report_from, args.out)))
        return 0
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2, 3, 4])
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    storage_path = out / "optuna_journal.log"
    storage_path.unlink(missing_ok=True)  # a fresh search every run
    pool = (
        ProcessPoolExecutor(args.jobs, mp_context=__import__("multiprocessing").get_context("spawn"))
        if args.jobs > 1
        else None
    )
    sections, all_results, skipped = [], [], []
    try:
        for name in args.tasks:
            try:
                task = build_task(name, args.quick)
            except ValueError as error:
                skipped.append(f"`{name}` skipped: {error}")
                continue
            budget = (QUICK if args.quick else FULL)[name]
            budget = replace(
                budget,
                **{k: v for k, v in (("trials", args.trials), ("epochs", args.epochs)) if v is not None},
            )
            task_path = out / f"task_{name}.npz"
            save_task(task, task_path)
            (out / f"budget_{name}.json").write_text(json.dumps(asdict(budget)))
            chunk = max(1, -(-budget.trials // max(1, args.jobs)))
            jobs = []
            for m, method in enumerate(METHODS):
                for c, first in enumerate(range(0, budget.trials, chunk)):
                    n = min(chunk, budget.trials - first)
                    jobs.append((str(task_path), method, budget, str(storage_path), n, 100 * m + c))
            _run(pool, search_worker, jobs, f"{name}: search")
            studies = {m: _study(name, m, storage_path, 0) for m in METHODS}
            chosen = {m: suggest(optuna.trial.FixedTrial(studies[m].best_params), m) for m in METHODS}
            jobs = [(str(task_path), m, chosen[m], budget, s) for s in seeds for m in METHODS]
            results = _run(pool, final_worker, jobs, f"{name}: test")
            all_results += results
            sections += task_section(task, budget, studies, results)
    finally:
        if pool is not None:
            pool.shutdown()
    (out / "results.json").write_text(json.dumps(all_results, indent=1))
    command = "python examples/softtriple_multimodal.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# SoftTriple vs normalised softmax, tuned on validation classes",
        "",
        f"Command: `{command}` ({'quick' if args.quick else 'full'} mode, "
        f"{time.perf_counter() - start:.0f} s wall, {args.jobs} processes of 1 thread). Optuna "
        f"{optuna.__version__} studies (TPE, median pruner): `{storage_path.name}` "
        "(`optuna.storages.JournalStorage`, open with `optuna.load_study`). Metrics: PML's "
        "`AccuracyCalculator` (k = max_bin_count), every test image a query against all other test images; "
        "P@1 = R@1 by definition. Centres kept: distinct centres per training class after merging those with "
        f"cosine >= {base.MERGE_THRESHOLD}, mean ± std over classes and seeds.",
        "",
        *skipped,
        "",
        *sections,
    ]
    (out / "report.md").write_text("\n".join(lines))
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
