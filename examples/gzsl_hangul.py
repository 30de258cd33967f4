"""A real-image compositional GZSL benchmark: hangul syllables rendered from fonts, jamo as attributes.

Each class is a syllable block (initial consonant + medial vowel + optional final consonant); its
attributes are the one-hot jamo it is composed of plus the medial's shape (vertical / horizontal / mixed),
which decides the block layout. Instances are the same syllable rendered in different fonts with small random
affine jitter. Unseen syllables are held out entirely; every jamo of an unseen syllable occurs in some seen
syllable, so the task is compositional zero-shot recognition. A small timm backbone is trained from scratch on
the seen classes' training images only (no pretrained weights exist here) and its pooled features (the
``num_classes=0`` path, via ``gzsl_dvae.extract_features`` on the rendered image folder) feed the GZSL models.

Needs hangul fonts (Debian fonts-nanum, fonts-unfonts-core, fonts-baekmuk); ``find_hangul_fonts`` says which
are present.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gzsl_dvae import GZSLData, extract_features, image_folder
from PIL import Image, ImageDraw, ImageFont
from torchvision import transforms
from tqdm.auto import tqdm

__all__ = ["GlyphBenchmark", "build_glyph_benchmark", "find_hangul_fonts"]

# jamo indices in the Unicode composition 0xAC00 + (L * 21 + V) * 28 + T
INITIALS = {"ㄱ": 0, "ㄴ": 2, "ㄷ": 3, "ㄹ": 5, "ㅁ": 6, "ㅂ": 7, "ㅅ": 9, "ㅇ": 11, "ㅈ": 12, "ㅎ": 18}
MEDIALS = {"ㅏ": 0, "ㅐ": 1, "ㅓ": 4, "ㅗ": 8, "ㅘ": 9, "ㅜ": 13, "ㅡ": 18, "ㅣ": 20}
MEDIAL_SHAPE = {
    "ㅏ": "vertical",
    "ㅐ": "vertical",
    "ㅓ": "vertical",
    "ㅣ": "vertical",
    "ㅗ": "horizontal",
    "ㅜ": "horizontal",
    "ㅡ": "horizontal",
    "ㅘ": "mixed",
}
FINALS = {"": 0, "ㄱ": 1, "ㄴ": 4, "ㄹ": 8, "ㅁ": 16, "ㅇ": 21}
SHAPES = ("vertical", "horizontal", "mixed")
FONT_DIRS = (
    "/usr/share/fonts/truetype/nanum",
    "/usr/share/fonts/truetype/unfonts-core",
    "/usr/share/fonts/truetype/baekmuk",
)


def syllable(initial: str, medial: str, final: str) -> str:
    """Compose a hangul syllable block from its jamo."""
    return chr(0xAC00 + (INITIALS[initial] * 21 + MEDIALS[medial]) * 28 + FINALS[final])


def find_hangul_fonts() -> list[Path]:
    """Font files that cover hangul (``fc-list :lang=ko``, falling back to the Debian font folders)."""
    found: set[Path] = set()
    try:
        out = subprocess.run(
            ["fc-list", ":lang=ko", "file"], capture_output=True, text=True, check=False
        ).stdout
        found = {Path(line.split(":")[0].strip()) for line in out.splitlines() if line.strip()}
    except FileNotFoundError:
        pass
    for folder in FONT_DIRS:
        found |= set(Path(folder).glob("*.tt[fc]")) if Path(folder).is_dir() else set()
    return sorted(p for p in found if p.suffix.lower() in (".ttf", ".otf", ".ttc") and p.is_file())


def _render(char: str, font: ImageFont.FreeTypeFont, size: int, rng: np.random.Generator) -> Image.Image:
    canvas = Image.new("L", (2 * size, 2 * size), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
    draw.text(
        ((2 * size - (right - left)) / 2 - left, (2 * size - (bottom - top)) / 2 - top),
        char,
        fill=255,
        font=font,
    )
    canvas = canvas.rotate(
        float(rng.uniform(-8, 8)), resample=Image.BILINEAR, translate=tuple(rng.uniform(-2, 2, 2).tolist())
    )
    crop = size // 2 + int(rng.integers(-1, 2))
    return canvas.crop((crop, crop, 2 * size - crop, 2 * size - crop)).resize((size, size), Image.BILINEAR)


def _covers_hangul(path: Path, chars: list[str]) -> bool:
    font = ImageFont.truetype(str(path), 24)
    missing = np.asarray(_render("\ue000", font, 32, np.random.default_rng(0)))  # private use: .notdef box
    rng = np.random.default_rng(0)
    for char in chars[:: max(len(chars) // 12, 1)]:
        img = np.asarray(_render(char, font, 32, rng))
        if img.max() == 0 or np.array_equal(img, missing):
            return False
    return True


@dataclass
class GlyphBenchmark:
    data: GZSLData
    fonts: list[str]
    backbone_seen_accuracy: float
    seconds: float


def build_glyph_benchmark(
    out_dir: Path,
    num_classes: int = 100,
    num_unseen: int = 25,
    renders_per_font: int = 2,
    image_size: int = 32,
    backbone: str = "resnet10t",
    backbone_epochs: int = 12,
    seed: int = 0,
) -> GlyphBenchmark:
    """Render glyphs, train the backbone on seen-class training images, extract features, return the split."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    grid = [(i, m, f) for i in INITIALS for m in MEDIALS for f in FINALS]
    picked = [grid[k] for k in rng.choice(len(grid), size=num_classes, replace=False)]
    chars = [syllable(*jamo) for jamo in picked]
    fonts = [p for p in find_hangul_fonts() if _covers_hangul(p, chars)]
    if len(fonts) < 4:
        raise RuntimeError(
            f"need at least 4 hangul fonts, found {len(fonts)} (install fonts-nanum / fonts-unfonts-core)"
        )
    # attributes: one-hot initial, medial, final (only the jamo in use) + medial shape
    names = [
        *(f"initial {k}" for k in INITIALS),
        *(f"medial {k}" for k in MEDIALS),
        *(f"final {k or '-'}" for k in FINALS),
        *(f"shape {s}" for s in SHAPES),
    ]
    attrs = np.zeros((num_classes, len(names)))
    for row, (i, m, f) in enumerate(picked):
        for key in (f"initial {i}", f"medial {m}", f"final {f or '-'}", f"shape {MEDIAL_SHAPE[m]}"):
            attrs[row, names.index(key)] = 1.0
    attrs /= np.linalg.norm(attrs, axis=1, keepdims=True)
    # unseen syllables: every jamo must also occur in a seen syllable (compositional generalisation)
    for _ in range(1000):
        unseen = np.sort(rng.choice(num_classes, size=num_unseen, replace=False))
        seen = np.setdiff1d(np.arange(num_classes), unseen)
        if (attrs[seen] > 0).any(axis=0).all():
            break
    else:  # pragma: no cover - practically unreachable with the defaults
        raise RuntimeError("could not hold out unseen syllables whose jamo are all seen")
    # render: class folders of PNGs, one instance per (font, jitter)
    root = out_dir / "glyphs"
    instances = [(font, k) for font in range(len(fonts)) for k in range(renders_per_font)]
    for c, char in enumerate(tqdm(chars, desc="render glyphs", unit="class", leave=False)):
        folder = root / f"{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for font_index, k in instances:
            font = ImageFont.truetype(
                str(fonts[font_index]), int(rng.integers(image_size - 8, image_size - 2))
            )
            _render(char, font, image_size, rng).save(folder / f"f{font_index:02d}_{k}.png")
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    dataset = image_folder(root, transform=transform, in_chans=1)
    labels = np.array([int(dataset.classes[t]) for _, t in dataset.samples])  # type: ignore[attr-defined]
    # seen classes: 80 % of instances train, 20 % test-seen; unseen classes: all test-unseen
    is_train = np.zeros(labels.size, dtype=bool)
    for c in seen:
        rows = rng.permutation(np.flatnonzero(labels == c))
        is_train[rows[: round(0.8 * rows.size)]] = True
    is_test_seen = np.isin(labels, seen) & ~is_train

    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        backbone, pretrained=False, num_classes=len(seen), in_chans=1, channels=(32, 64, 128, 256)
    )
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    seen_index = {int(c): j for j, c in enumerate(seen)}
    x_train = images[torch.as_tensor(np.flatnonzero(is_train))]
    y_train = torch.as_tensor([seen_index[int(c)] for c in labels[is_train]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = backbone_epochs * (len(x_train) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    for epoch in tqdm(
        range(backbone_epochs), desc=f"train {backbone} (seen classes)", unit="epoch", leave=False
    ):
        order = torch.randperm(len(x_train))
        for b in range(len(x_train) // 64):
            index = order[b * 64 : (b + 1) * 64]
            loss = F.cross_entropy(model(x_train[index]), y_train[index], label_smoothing=0.1)
            if not torch.isfinite(loss):  # docs/reliability.md rule 5: stop before the step
                raise FloatingPointError(
                    f"gzsl_hangul: the loss is {float(loss.detach())} at epoch {epoch}, step {b}; the "
                    "parameters are those of the last finite step"
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        test_rows = torch.as_tensor(np.flatnonzero(is_test_seen))
        pred = model(images[test_rows]).argmax(1).numpy()
    truth = np.array([seen_index[int(c)] for c in labels[is_test_seen]])
    seen_acc = float(np.mean(pred == truth))
    feats, feat_labels, _ = extract_features(model, root, in_chans=1, transform=transform, batch_size=256)
    assert np.array_equal(feat_labels, np.array([int(t) for _, t in dataset.samples]))  # same order
    data = GZSLData(
        train_features=feats[is_train],
        train_labels=labels[is_train],
        test_seen_features=feats[is_test_seen],
        test_seen_labels=labels[is_test_seen],
        test_unseen_features=feats[np.isin(labels, unseen)],
        test_unseen_labels=labels[np.isin(labels, unseen)],
        class_attributes=attrs,
        class_names=chars,
    )
    return GlyphBenchmark(data, [p.name for p in fonts], seen_acc, time.perf_counter() - start)
