"""Metadata Normalization in timm's standard training loop, metadata coming from the data.

The colour-confounded Fashion-MNIST of ``examples/mdn_synthetic.py`` (T-shirt/top vs Shirt, each image tinted
red by c in [0, 1]; c ~ U(0, 0.6) for T-shirts and U(0.4, 1) for shirts in train/val), trained the way timm's
``train.py`` trains:

- ``timm.create_model``: ``resnet18`` (baseline) or ``mdn_resnet18``, the same network with MetadataNorm on
  the pre-logits (``mdn``, the paper's "MDN-Linear") or also after every BatchNorm (``mdn_all``, "MDN-Conv"),
  all slimmed for 28x28 images (``--layers``, ``--channels``);
- ``timm.optim.create_optimizer_v2`` (AdamW), ``timm.scheduler.create_scheduler_v2`` (cosine, per-step
  updates, warm-up);
- ``timm.utils.ModelEmaV3`` created right after the model, before the first step;
- AMP: fp16 autocast + ``timm.utils.NativeScaler`` (GradScaler) on CUDA, bf16 autocast on CPU with ``--amp``
  (off by default on CPU: CPUs without AVX512-BF16/AMX run bf16 convolutions far slower than float32);
- ``timm.utils.CheckpointSaver`` (best validation balanced accuracy, model and EMA weights);
- the metadata as data: ``timm_mdn.data.MetadataDataset`` gives each image its colour c,
  ``create_metadata_loader`` (timm's ``create_loader``; its CUDA prefetcher on CUDA) turns a batch's rows into
  X_b = [label, c, 1] with ``MetadataKernel.design``, and the step calls ``model(x, metadata=X_b)``.

Reported for the baseline, both MDN models, and the EMA of each, mean ± std over seeds: balanced accuracy on
the test set with the same colour correlation, with colour independent of the class, and with the correlation
reversed (a model that learned the colour shortcut drops there), and dcor² (bias-corrected squared distance
correlation) between the pre-logit features and c, per class on the validation set (0 = independent).

    python examples/mdn_timm_train.py --quick --out out/demo/mdn_timm       # about a minute of CPU
    python examples/mdn_timm_train.py --threads 1 --out out/mdn_timm_train  # 3 seeds (see README for time)

A non-finite loss stops training with ``FloatingPointError`` naming the epoch and step (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from argparse import Namespace
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler
from timm_mdn import MetadataKernel, distance_correlation_sqr, metadata_context
from timm_mdn.data import MetadataDataset, create_metadata_loader
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_timing import add_device_argument
from mdn_synthetic import fashion_mnist_confounded

METHODS = ("baseline", "mdn", "mdn_all")
TESTS = ("test", "test_independent", "test_reversed")
MEAN = STD = (0.5, 0.5, 0.5)


class TintedImages(Dataset[tuple[Any, int]]):
    """Tinted images as PIL images with integer targets, so timm's transforms and loaders apply unchanged."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        self.targets = labels.long()
        self.transform: Any = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform is not None else image), int(self.targets[index])


def build_data(
    root: Path, seed: int, train_size: int | None
) -> tuple[dict[str, MetadataDataset], MetadataKernel]:
    """Every split as a MetadataDataset (metadata row: colour c) and the training kernel, X = [y, c, 1]."""
    splits = fashion_mnist_confounded(root, seed=seed)
    if train_size is not None:
        for name in splits:  # a seeded random subset of train; val and tests keep at most train_size
            keep = torch.randperm(len(splits[name]["y"]), generator=torch.Generator().manual_seed(seed))
            splits[name] = {k: v[keep[:train_size]] for k, v in splits[name].items()}
    data = {name: MetadataDataset(TintedImages(s["x"], s["y"]), s["cf"]) for name, s in splits.items()}
    return data, data["train"].kernel()


def create(method: str, kernel: MetadataKernel, args: Namespace) -> nn.Module:
    """``resnet18`` or ``mdn_resnet18`` from ``timm.create_model``, sized by ``--layers``/``--channels``."""
    kwargs: dict[str, Any] = dict(num_classes=2, layers=tuple(args.layers), channels=tuple(args.channels))
    if method != "baseline":  # "mdn": on the pre-logits; "mdn_all": also after every BatchNorm
        sites = "all" if method == "mdn_all" else "head"
        return timm.create_model("mdn_resnet18", mdn_kernel=kernel, mdn_sites=sites, **kwargs)
    return timm.create_model("resnet18", **kwargs)


def _call(model: nn.Module, x: Tensor, metadata: Tensor, method: str) -> Tensor:
    return model(x) if method == "baseline" else model(x, metadata=metadata)


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ema: ModelEmaV3,
    epoch: int,
    num_updates: int,
    method: str,
    autocast: Any = nullcontext,
    scaler: NativeScaler | None = None,
    name: str = "mdn_timm_train",
) -> tuple[float, int]:
    """One epoch of timm's loop; returns (mean loss, updates so far).

    Raises:
        FloatingPointError: on a non-finite loss, before the optimizer step (parameters and EMA untouched).
    """
    model.train()
    total, count = 0.0, 0
    for step, (x, y, metadata) in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None)):
        with autocast():
            loss = F.cross_entropy(_call(model, x, metadata, method), y)
        value = float(loss.detach())  # logged anyway; the check below needs it on the host
        if not np.isfinite(value):
            raise FloatingPointError(
                f"{name}: the loss is {value} at epoch {epoch}, step {step}; the parameters are those of the "
                "last finite step"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler(loss, optimizer, parameters=model.parameters())
        else:
            loss.backward()
            optimizer.step()
        num_updates += 1
        ema.update(model, step=num_updates)
        scheduler.step_update(num_updates=num_updates)
        total += value * len(y)
        count += len(y)
    return total / max(count, 1), num_updates


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, method: str, autocast: Any = nullcontext) -> dict[str, float]:
    """Balanced accuracy, loss, and per-class dcor²(pre-logit features, colour c) over one split."""
    model.eval()
    logits, features, targets, colour = [], [], [], []
    for x, y, metadata in loader:
        context = nullcontext() if method == "baseline" else metadata_context(model, metadata)
        with context, autocast():
            f = model.forward_head(model.forward_features(x), pre_logits=True)
            logits.append(model.get_classifier()(f).float())
        features.append(f.float())
        targets.append(y)
        colour.append(metadata[:, 1])  # X_b = [y, c, 1]
    logit, feat, y, c = (torch.cat(t).cpu() for t in (logits, features, targets, colour))
    pred = logit.argmax(1)
    result = {
        "bacc": float(np.mean([float((pred[y == k] == k).float().mean()) for k in (0, 1)])),
        "loss": float(F.cross_entropy(logit, y)),
    }
    for k in (0, 1):
        result[f"dcor{k}"] = float(distance_correlation_sqr(feat[y == k].double(), c[y == k].double()))
    return result


def run(method: str, seed: int, args: Namespace, device: torch.device, out: Path) -> dict[str, Any]:
    """Train one (method, seed); history per epoch and the final metrics of the model and of its EMA."""
    data, kernel = build_data(args.fmnist_dir, seed, args.train_size)
    torch.manual_seed(seed)
    model = create(method, kernel, args).to(device)
    ema = ModelEmaV3(model, decay=args.ema_decay, use_warmup=True)  # before the first step
    cuda = device.type == "cuda"
    amp = args.amp if args.amp is not None else cuda
    amp_dtype = torch.float16 if cuda else torch.bfloat16

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=amp_dtype) if amp else nullcontext()

    common = dict(
        kernel=kernel, device=device, num_workers=args.workers, use_prefetcher=cuda, mean=MEAN, std=STD,
        crop_pct=1.0, pin_memory=cuda,
    )  # fmt: skip
    train_loader = create_metadata_loader(
        data["train"], (3, 28, 28), args.batch_size, is_training=True, no_aug=True, **common
    )
    eval_loaders = {
        name: create_metadata_loader(data[name], (3, 28, 28), 500, **common) for name in ("val", *TESTS)
    }
    if not cuda:  # timm's prefetcher moves batches to the device; without it, the step does
        train_loader, eval_loaders = (
            _ToDevice(train_loader, device),
            {k: _ToDevice(v, device) for k, v in eval_loaders.items()},
        )
    optimizer = create_optimizer_v2(model, opt="adamw", lr=args.lr, weight_decay=args.weight_decay)
    scheduler, epochs = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=args.epochs, warmup_epochs=1, warmup_lr=args.lr / 10,
        step_on_epochs=False, updates_per_epoch=len(train_loader),
    )  # fmt: skip
    scaler = NativeScaler(device=device.type) if amp and cuda else None
    run_args = Namespace(**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    run_args.model = "resnet18" if method == "baseline" else "mdn_resnet18"
    run_dir = out / "checkpoints" / f"{method}_s{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    saver = CheckpointSaver(
        model, optimizer, args=run_args, model_ema=ema, amp_scaler=scaler, checkpoint_dir=str(run_dir),
        recovery_dir=str(run_dir), decreasing=False, max_history=1,
    )  # fmt: skip
    history: list[dict[str, float]] = []
    num_updates = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        train_loss, num_updates = train_one_epoch(
            model, train_loader, optimizer, scheduler, ema, epoch, num_updates, method, autocast, scaler
        )
        scheduler.step(epoch + 1)
        val = evaluate(model, eval_loaders["val"], method, autocast)
        val_ema = evaluate(ema.module, eval_loaders["val"], method, autocast)
        saver.save_checkpoint(epoch, metric=val["bacc"])
        history.append(
            {"train_loss": train_loss, **{f"val_{k}": v for k, v in val.items()}}
            | {f"ema_val_{k}": v for k, v in val_ema.items()}
        )
    final: dict[str, float] = {}
    for prefix, net in (("", model), ("ema_", ema.module)):
        for name in ("val", *TESTS):
            for key, value in evaluate(net, eval_loaders[name], method, autocast).items():
                final[f"{prefix}{name}_{key}"] = value
    return {
        "method": method,
        "seed": seed,
        "history": history,
        "final": final,
        "seconds": time.perf_counter() - start,
        "best_checkpoint": str(run_dir / "model_best.pth.tar"),
    }


class _ToDevice:
    """Move each ``(x, y, X_b)`` batch to ``device`` (timm's prefetcher does this on CUDA)."""

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        for batch in self.loader:
            yield tuple(t.to(self.device, non_blocking=True) for t in batch)


ROWS = (("baseline", "", "baseline"), ("baseline", "ema_", "baseline, EMA"), ("mdn", "", "MDN"),
        ("mdn", "ema_", "MDN, EMA"), ("mdn_all", "", "MDN at every BN"),
        ("mdn_all", "ema_", "MDN at every BN, EMA"))  # fmt: skip


def _pm(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    arr = np.asarray(values, dtype=float) * scale
    std = arr.std(ddof=1) if len(arr) > 1 else 0.0
    return f"{arr.mean():.{digits}f} ± {std:.{digits}f}"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table: one row per (method, EMA or not), mean ± std over seeds."""
    lines = [
        "| model | bal. acc. reversed colour (%) | bal. acc. colour independent (%) | bal. acc. same "
        "correlation (%) | dcor² T-shirt (val) ↓ | dcor² Shirt (val) ↓ |",
        "|---|---|---|---|---|---|",
    ]
    for method, prefix, label in ROWS:
        finals = [r["final"] for r in results if r["method"] == method]
        if not finals:
            continue
        acc = [_pm([f[f"{prefix}{key}_bacc"] for f in finals], 100, 1) for key in TESTS[::-1]]
        dcor = [_pm([f[f"{prefix}val_dcor{k}"] for f in finals]) for k in (0, 1)]
        lines.append(f"| {label} | {' | '.join(acc + dcor)} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Validation balanced accuracy and dcor² (mean of the two classes) over epochs, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    colours = {"baseline": "tab:red", "mdn": "tab:blue", "mdn_all": "tab:green"}
    for method, prefix, label in ROWS:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        for ax, key in zip(axes, ("bacc", "dcor"), strict=True):
            if key == "bacc":
                curves = np.array([[h[f"{prefix}val_bacc"] for h in r["history"]] for r in runs])
            else:
                curves = np.array(
                    [
                        [(h[f"{prefix}val_dcor0"] + h[f"{prefix}val_dcor1"]) / 2 for h in r["history"]]
                        for r in runs
                    ]
                )
            mean, std = curves.mean(0), curves.std(0)
            epochs = np.arange(1, len(mean) + 1)
            style = "--" if prefix else "-"
            ax.plot(epochs, mean, style, color=colours[method], label=label)
            ax.fill_between(epochs, mean - std, mean + std, color=colours[method], alpha=0.12)
    axes[0].set_ylabel("validation balanced accuracy")
    axes[1].set_ylabel("validation dcor²(features, colour)")
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 600 training images, 2 epochs")
    parser.add_argument("--out", type=Path, default=Path("out/mdn_timm_train"), help="output folder")
    add_device_argument(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (quick: 0)")
    parser.add_argument("--epochs", type=int, default=None, help="default: 8 (quick: 2)")
    parser.add_argument(
        "--train-size", type=int, default=None, help="subset per split (default: all; quick: 600)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--layers", type=int, nargs=4, default=[1, 1, 1, 1], help="ResNet blocks per stage")
    parser.add_argument("--channels", type=int, nargs=4, default=[32, 64, 128, 256], help="ResNet widths")
    amp_help = "autocast (fp16 + GradScaler on CUDA, bf16 on CPU); default: on for CUDA only"
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help=amp_help)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--fmnist-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    args = parser.parse_args(argv)

    if not (args.fmnist_dir / "train-images-idx3-ubyte.gz").is_file():
        print(
            f"error: Fashion-MNIST not found in {args.fmnist_dir}; install the Debian package "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --fmnist-dir",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.epochs = args.epochs or (2 if args.quick else 8)
    args.train_size = args.train_size or (600 if args.quick else None)
    device = torch.device(args.device)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = "python examples/mdn_timm_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    results = []
    for seed in tqdm(args.seeds, desc="seeds", disable=None):
        for method in args.methods:
            results.append(run(method, seed, args, device, out))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "curves.png")
    amp = args.amp if args.amp is not None else device.type == "cuda"
    size = f"{args.train_size} images per split" if args.train_size else "all images"
    lines = [
        "# Metadata Normalization in timm's training loop: colour-confounded Fashion-MNIST"
        + (" (quick mode)" if args.quick else ""),
        "",
        f"Command: `{command.strip()}`",
        "",
        f"T-shirt/top vs Shirt tinted red by c (train/val: U(0, 0.6) vs U(0.4, 1)); {size}; timm ResNet "
        f"(layers {args.layers}, channels {args.channels}), AdamW lr {args.lr:g}, cosine schedule, "
        f"{args.epochs} epochs, batch {args.batch_size}, ModelEmaV3 decay {args.ema_decay} (warm-up), "
        f"AMP {'on' if amp else 'off'}, device {device.type}, seeds {args.seeds}. MDN: `mdn_resnet18` with "
        "`mdn_sites='head'` (pre-logits) or `'all'` (also after every BatchNorm), X = [label, c, 1], c and "
        "the intercept removed, metadata from `timm_mdn.data.MetadataDataset`. "
        "Last-epoch weights; mean ± std over seeds.",
        "",
        table(results),
        "",
        "![validation balanced accuracy and dcor² over epochs](curves.png)",
        "",
        f"Wall time: {time.perf_counter() - started:.0f} s.",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
