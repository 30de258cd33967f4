"""Class-disjoint character retrieval on font glyphs: SoftTriple vs normalised softmax vs PML's SoftTriple.

Classes are characters and instances are fonts: each character is rendered once in every font, at the
font's own scale and baseline (so "o" and "O", "p" and "P" stay different). A small CNN is trained from
scratch on half of the characters and evaluated on the other half (no test character is ever seen in
training), the protocol of the SoftTriple paper's CUB-200 /
Cars196 experiments (Qian et al., ICCV 2019, https://arxiv.org/abs/1909.05235) at toy scale. A character
drawn in serif, sans, monospace, italic and bold faces is a multi-modal class (single- vs double-storey
"a" and "g", slab vs plain serifs), which is what several centres per class are meant to capture.

Methods (same network, data order, optimiser and schedule; only the loss differs):

- ``softtriple``: ``pml_softtriple.SoftTripleLoss`` with K = 10 centres and the centre regulariser
  (tau = 0.2), the paper's defaults (lambda = 20, gamma = 0.1, delta = 0.01);
- ``norm_softmax``: the same loss with K = 1, i.e. the normalised softmax loss;
- ``pml_softtriple``: ``pytorch_metric_learning.losses.SoftTripleLoss`` with K = 10 as PML ships it (no
  regulariser).

Metrics (PML's ``AccuracyCalculator`` with this plugin's Recall@K subclass, test characters only, every test
glyph a query against all others): Precision@1, Recall@1/2/4/8, MAP@R, as mean +- std over seeds; and the
number of distinct centres each training class keeps (cosine >= 0.99 merged), mean +- std over classes
and seeds.

Quick mode (the demo) uses the ~20 text fonts matplotlib ships (DejaVu, STIX, Computer Modern) and the 62
Latin letters and digits; the full mode adds every font under /usr/share/fonts that covers Latin letters,
digits and Greek (Debian packages fonts-noto-core, fonts-urw-base35, fonts-texgyre, fonts-liberation, ...;
the report lists what was found) and uses 95 characters: Latin letters, digits and the 33 Greek letters that
are not drawn exactly like a Latin one (no Alpha/A, Omicron/O, ... pairs of indistinguishable classes).

    python examples/softtriple_retrieval.py --quick --out out/demo/pml    # ~1 min
    python examples/softtriple_retrieval.py --out out/softtriple_full     # full: minutes to an hour on a CPU
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import multiprocessing
import os
import string
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pml_softtriple import RecallAtKAccuracyCalculator, SoftTripleLoss, effective_center_counts, param_groups
from pytorch_metric_learning import losses as pml_losses
from torch import nn
from tqdm.auto import tqdm

METHODS = ("softtriple", "norm_softmax", "pml_softtriple")
LABELS = {
    "softtriple": "SoftTriple (ours, K=10, tau=0.2)",
    "norm_softmax": "normalised softmax (ours, K=1)",
    "pml_softtriple": "PML SoftTripleLoss (K=10, no regulariser)",
}
METRICS = (
    "precision_at_1",
    "recall_at_1",
    "recall_at_2",
    "recall_at_4",
    "recall_at_8",
    "mean_average_precision_at_r",
)
METRIC_NAMES = ("P@1", "R@1", "R@2", "R@4", "R@8", "MAP@R")
LATIN = string.ascii_letters + string.digits
# Greek letters that do not look exactly like a Latin letter or digit (no A/Alpha, O/Omicron, ... pairs).
GREEK = "ΓΔΘΛΞΠΣΦΨΩαβγδεζηθικλμνξπρστυφχψω"
# Fonts whose cmap claims Latin letters but draws symbols or placeholders.
EXCLUDED_FONTS = ("LastResort", "cmex10", "cmsy10", "Symbol", "Dingbat", "D050000L")
MERGE_THRESHOLD = 0.99


@dataclass(frozen=True)
class Settings:
    size: int
    epochs: int
    batch_size: int
    embedding_size: int
    lr: float
    centers_lr: float
    chars: str
    debian_fonts: bool


QUICK = Settings(
    size=24,
    epochs=20,
    batch_size=64,
    embedding_size=64,
    lr=2e-3,
    centers_lr=0.2,
    chars=LATIN,
    debian_fonts=False,
)
FULL = Settings(
    size=28,
    epochs=20,
    batch_size=64,
    embedding_size=64,
    lr=2e-3,
    centers_lr=0.2,
    chars=LATIN + GREEK,
    debian_fonts=True,
)


# ----------------------------------------------------------------------------------------------- data
def discover_fonts(chars: str, debian: bool) -> list[tuple[str, str]]:
    """(name, path) of the distinct fonts that map every character of ``chars``."""
    import matplotlib
    from matplotlib.ft2font import FT2Font

    paths = sorted(glob.glob(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "*.ttf")))
    if debian:
        paths += sorted(glob.glob("/usr/share/fonts/**/*.[ot]tf", recursive=True))
    fonts: dict[str, str] = {}
    for path in paths:
        try:
            face = FT2Font(path)
        except (OSError, RuntimeError):
            continue
        name = f"{face.family_name} {face.style_name}".strip()
        if any(bad.lower() in (name + os.path.basename(path)).lower() for bad in EXCLUDED_FONTS):
            continue
        if all(face.get_char_index(ord(c)) != 0 for c in chars):
            fonts.setdefault(name, path)
    return sorted(fonts.items())


def render_font(path: str, chars: str, size: int) -> np.ndarray:
    """All ``chars`` in one font, ``(len(chars), size, size)`` in [0, 1], at one scale and one baseline.

    The font's ascender-to-descender band (from "H", "b", "d", "l" and "g", "p", "y") is scaled to the image
    height, so case and position survive ("o" stays a small letter at the x-height, "p" keeps its
    descender); each glyph is centred horizontally. Characters wider than the image are shrunk to fit.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(path, 96)
    top = min(font.getbbox(c, anchor="ls")[1] for c in "Hbdl")
    bottom = max(font.getbbox(c, anchor="ls")[3] for c in "gpy")
    inner = size - 4
    out = np.zeros((len(chars), size, size), np.float32)
    for i, char in enumerate(chars):
        left, _, right, _ = font.getbbox(char, anchor="ls")
        canvas = Image.new("L", (right - left + 8, bottom - top + 8), 0)
        ImageDraw.Draw(canvas).text((4 - left, 4 - top), char, fill=255, font=font, anchor="ls")
        glyph = canvas.crop((4, 4, canvas.width - 4, canvas.height - 4))
        scale = inner / max(glyph.height, glyph.width)
        width, height = max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))
        glyph = glyph.resize((width, height), Image.BILINEAR)
        tile = Image.new("L", (size, size), 0)
        tile.paste(glyph, ((size - width) // 2, (size - height) // 2))
        out[i] = np.asarray(tile, np.float32) / 255.0
    return out


def build_glyphs(fonts: list[tuple[str, str]], chars: str, size: int) -> torch.Tensor:
    """Tensor (num_fonts, num_chars, 1, size, size)."""
    return torch.from_numpy(np.stack([render_font(path, chars, size) for _, path in fonts]))[:, :, None]


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rotation (+-10 deg), scale (0.85-1.1), shear and shift (+-8 %), one affine map per image."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
    scale = 0.85 + 0.25 * torch.rand(n, generator=gen)
    shear = (torch.rand(n, generator=gen) * 2 - 1) * 0.15
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.08
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin + shear, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


# ---------------------------------------------------------------------------------------------- model
class GlyphEmbedder(nn.Module):
    """Three conv blocks (16-32-64 channels, two 2x2 max-pools), global average pooling, a linear map."""

    def __init__(self, embedding_size: int) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.features = nn.Sequential(
            block(1, 16), nn.MaxPool2d(2), block(16, 32), nn.MaxPool2d(2), block(32, 64)
        )
        self.embed = nn.Linear(64, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(x).mean((2, 3)))


def make_loss(method: str, num_classes: int, dim: int) -> nn.Module:
    if method == "softtriple":
        return SoftTripleLoss(num_classes, dim, centers_per_class=10, tau=0.2)
    if method == "norm_softmax":
        return SoftTripleLoss(num_classes, dim, centers_per_class=1)
    if method == "pml_softtriple":
        return pml_losses.SoftTripleLoss(num_classes, dim, centers_per_class=10)
    raise ValueError(f"unknown method {method!r}")


def centers_of(loss: nn.Module, num_classes: int) -> torch.Tensor:
    k = loss.centers_per_class
    return F.normalize(loss.fc.detach().float(), dim=0).t().reshape(num_classes, k, -1)


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(chunk) for chunk in images.split(512)])


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core: OpenMP threads collapse on a shared machine


def run(method: str, seed: int, train: tuple, test: tuple, settings: Settings) -> dict:
    """Train one model with one loss and evaluate it on the test characters."""
    # The arrays arrive as NumPy arrays: pickled by value. Tensors would go through torch's shared-memory file
    # descriptors, whose hand-over to a spawned worker intermittently fails ("Connection refused").
    (x_train, y_train, num_train_classes), (x_test, y_test) = train, test
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in (x_train, y_train, x_test, y_test))
    torch.manual_seed(seed)
    model = GlyphEmbedder(settings.embedding_size)
    loss = make_loss(method, num_train_classes, settings.embedding_size)
    optimizer = torch.optim.Adam(param_groups(model, loss, lr=settings.lr, centers_lr=settings.centers_lr))
    steps_per_epoch = len(x_train) // settings.batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    history = []
    start = time.perf_counter()
    for _ in range(settings.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            value = loss(model(augment(x_train[idx], gen)), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            scheduler.step()
            total += float(value.detach())
        history.append(total / steps_per_epoch)
    seconds = time.perf_counter() - start
    calculator = RecallAtKAccuracyCalculator(
        recall_ks=(1, 2, 4, 8), include=METRICS, k="max_bin_count", device=torch.device("cpu")
    )
    metrics = calculator.get_accuracy(embed(model, x_test), y_test)
    kept = effective_center_counts(centers_of(loss, num_train_classes), MERGE_THRESHOLD)
    return {
        "method": method,
        "seed": seed,
        "metrics": metrics,
        "kept": kept.tolist(),
        "loss": history,
        "train_seconds": seconds,
    }


# --------------------------------------------------------------------------------------------- report
def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    arr = np.asarray(values, dtype=np.float64) * scale
    return f"{arr.mean():.{digits}f} ± {arr.std(ddof=1) if len(arr) > 1 else 0.0:.{digits}f}"


def plot(results: list[dict], glyphs: torch.Tensor, fonts: list, chars: str, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        rows = [r for r in results if r["method"] == method]
        values = np.array([[r["metrics"][m] for m in METRICS] for r in rows]) * 100
        ax.bar(
            np.arange(len(METRICS)) + i * width,
            values.mean(0),
            width,
            yerr=values.std(0, ddof=1) if len(rows) > 1 else None,
            capsize=2,
            label=LABELS[method],
        )
    ax.set_xticks(np.arange(len(METRICS)) + width * (len(METHODS) - 1) / 2, METRIC_NAMES)
    ax.set_ylabel("% (test characters)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "retrieval.png", dpi=120)
    files.append("retrieval.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for method in ("softtriple", "pml_softtriple"):
        kept = np.concatenate([r["kept"] for r in results if r["method"] == method])
        axes[0].hist(kept, bins=np.arange(0.5, 11.5, 1), alpha=0.6, label=LABELS[method])
    axes[0].set_xlabel(f"centres kept per training class (cos >= {MERGE_THRESHOLD})")
    axes[0].legend(fontsize=6)
    for method in METHODS:
        curves = np.array([r["loss"] for r in results if r["method"] == method])
        axes[1].plot(curves.mean(0), label=LABELS[method])
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("training loss")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "centres_and_loss.png", dpi=120)
    files.append("centres_and_loss.png")
    plt.close(fig)

    show_fonts = np.linspace(0, len(fonts) - 1, min(8, len(fonts))).round().astype(int)
    show_chars = [chars.index(c) for c in "aAgG7eRQ" if c in chars]
    fig, axes = plt.subplots(
        len(show_fonts), len(show_chars), figsize=(len(show_chars) * 0.7, len(show_fonts) * 0.7)
    )
    for r, f in enumerate(show_fonts):
        for c, ci in enumerate(show_chars):
            axes[r, c].imshow(glyphs[f, ci, 0], cmap="gray_r")
            axes[r, c].axis("off")
    fig.tight_layout()
    fig.savefig(out / "glyphs.png", dpi=100)
    files.append("glyphs.png")
    plt.close(fig)
    return files


def write_report(args, settings, fonts, train_chars, test_chars, results, files, seconds, out: Path) -> None:
    command = "python examples/softtriple_retrieval.py " + " ".join(sys.argv[1:])
    lines = [
        "# SoftTriple: class-disjoint character retrieval on font glyphs",
        "",
        f"Command: `{command}` ({'quick' if args.quick else 'full'} mode, {seconds:.0f} s wall, "
        f"{args.jobs} parallel runs of 1 thread).",
        "",
        f"Data: {len(fonts)} fonts (instances) x {len(settings.chars)} characters (classes), "
        f"{settings.size}x{settings.size} px. Train characters ({len(train_chars)}): `{train_chars}`; "
        f"test characters ({len(test_chars)}, never seen in training): `{test_chars}`.",
        f"Model: 3-conv CNN from scratch, embedding {settings.embedding_size}; Adam, lr {settings.lr} "
        f"(centres {settings.centers_lr}, `pml_softtriple.param_groups`), cosine schedule, {settings.epochs} "
        f"epochs, batch {settings.batch_size}, random affine augmentation. "
        f"Seeds: {', '.join(map(str, args.seeds))}.",
        "",
        "| method | " + " | ".join(METRIC_NAMES) + " | centres kept / class |",
        "|---|" + "---|" * (len(METRICS) + 1),
    ]
    for method in METHODS:
        rows = [r for r in results if r["method"] == method]
        cells = [mean_std([r["metrics"][m] for r in rows]) for m in METRICS]
        kept = np.concatenate([r["kept"] for r in rows]).astype(np.float64)
        lines.append(
            f"| {LABELS[method]} | " + " | ".join(cells) + f" | {kept.mean():.2f} ± {kept.std():.2f} |"
        )
    lines += [
        "",
        f"Mean ± std over {len(args.seeds)} seeds (metrics in %, PML's `AccuracyCalculator` with "
        "`RecallAtKAccuracyCalculator`, k = max_bin_count, every test glyph queried against all other test "
        f"glyphs). Centres kept: distinct centres per training class after merging those with cosine >= "
        f"{MERGE_THRESHOLD} (`effective_center_counts`), mean ± std over classes and seeds.",
        "",
    ]
    lines += [f"![{name.removesuffix('.png').replace('_', ' ')}]({name})" for name in files]
    lines += [
        "",
        "<details><summary>fonts</summary>",
        "",
        ", ".join(name for name, _ in fonts),
        "",
        "</details>",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="matplotlib's fonts, Latin only, short training")
    parser.add_argument("--out", type=Path, default=Path("out/softtriple_retrieval"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="override the mode's number of epochs")
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs, 1 thread each"
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.epochs is not None:
        settings = Settings(**{**asdict(settings), "epochs": args.epochs})
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    fonts = discover_fonts(settings.chars, settings.debian_fonts)
    if settings.debian_fonts and len(fonts) < 40:
        print(
            f"warning: only {len(fonts)} fonts cover the characters; are the Debian font packages installed?"
        )
    if len(fonts) < 4:
        raise SystemExit(f"need at least 4 fonts covering the characters, found {len(fonts)}")
    glyphs = build_glyphs(fonts, settings.chars, settings.size)
    perm = torch.randperm(len(settings.chars), generator=torch.Generator().manual_seed(0)).tolist()
    train_idx, test_idx = sorted(perm[: len(perm) // 2]), sorted(perm[len(perm) // 2 :])
    train_chars = "".join(settings.chars[i] for i in train_idx)
    test_chars = "".join(settings.chars[i] for i in test_idx)
    n_fonts = len(fonts)
    x_train = glyphs[:, train_idx].reshape(-1, 1, settings.size, settings.size)
    y_train = torch.arange(len(train_idx)).repeat(n_fonts)
    x_test = glyphs[:, test_idx].reshape(-1, 1, settings.size, settings.size)
    y_test = torch.arange(len(test_idx)).repeat(n_fonts)

    results = []
    jobs = [(m, s) for s in args.seeds for m in METHODS]
    train = (x_train.numpy(), y_train.numpy(), len(train_idx))
    test = (x_test.numpy(), y_test.numpy())
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_init_worker) as pool:
        futures = [pool.submit(run, m, s, train, test, settings) for m, s in jobs]
        for future in tqdm(
            as_completed(futures), total=len(futures), desc="softtriple retrieval", unit="run"
        ):
            r = future.result()
            results.append(r)
            tqdm.write(
                f"{r['method']:15s} seed {r['seed']}: R@1 {r['metrics']['recall_at_1']:.3f} "
                f"MAP@R {r['metrics']['mean_average_precision_at_r']:.3f} "
                f"kept {np.mean(r['kept']):.2f} ({r['train_seconds']:.1f} s)"
            )
    results.sort(key=lambda r: (METHODS.index(r["method"]), r["seed"]))
    files = plot(results, glyphs, fonts, settings.chars, out)
    (out / "results.json").write_text(
        json.dumps({"settings": asdict(settings), "results": results}, indent=1)
    )
    write_report(
        args, settings, fonts, train_chars, test_chars, results, files, time.perf_counter() - start, out
    )
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
