"""Two class-disjoint glyph retrieval tasks for tuning SoftTriple against normalised softmax (issue #19).

- ``multimodal``: every class is a random union of ``modes_per_class`` unrelated characters from several
  scripts (Latin, Greek, Cyrillic, Armenian, Georgian, Hebrew, katakana), each drawn in up to
  ``fonts_per_char`` fonts. A class therefore has several distinct glyph forms by construction -- the case
  several centres per class are meant for -- and low resolution plus strong augmentation keep it from
  saturating. Characters that look alike in DejaVu Sans (Latin "A" and Greek "Alpha", Cyrillic "o" and Latin
  "o", ...) are dropped so that no two classes share a glyph form.
- ``hangul``: the Stanford Online Products regime: thousands of classes (hangul syllable blocks) with a few
  instances each (the syllable in ``instances_per_class`` different fonts). Needs hangul fonts (Debian
  ``fonts-nanum``, ``fonts-unfonts-core``, ``fonts-baekmuk``; ``apt-get install fonts-nanum
  fonts-unfonts-core fonts-baekmuk``); ``hangul_fonts()`` says which are present.

Both tasks split their classes three ways: test classes (never seen while tuning or training), training
classes, and validation classes carved out of the training classes. The hyperparameter search trains on
``train - val`` and scores on ``val``; the final models train on all of ``train`` and are scored on ``test``.
Glyphs are rendered with ``softtriple_retrieval.render_font`` (one scale and baseline per font).
"""

from __future__ import annotations

import glob
import os
import string
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import softtriple_retrieval as base

__all__ = ["Task", "available_fonts", "hangul_fonts", "hangul_task", "multimodal_task"]

SCRIPTS = {
    "latin": string.ascii_letters + string.digits,
    "greek": "".join(map(chr, range(0x391, 0x3AA))) + "".join(map(chr, range(0x3B1, 0x3CA))),
    "cyrillic": "".join(map(chr, range(0x410, 0x450))),
    "armenian": "".join(map(chr, [*range(0x531, 0x557), *range(0x561, 0x588)])),
    "georgian": "".join(map(chr, range(0x10D0, 0x10F1))),
    "hebrew": "".join(map(chr, range(0x5D0, 0x5EB))),
    "katakana": "".join(map(chr, range(0x30A1, 0x30FB))),
}
BAND = "Hbdlgpy"  # render_font measures the font's ascender-to-descender band on these
LOOKALIKE = 0.9  # correlation of two DejaVu Sans renderings above which the later character is dropped


@dataclass(frozen=True)
class Task:
    """Images, class labels and glyph (mode) ids of one task, with its class-disjoint split.

    Attributes:
        name: task name.
        images: ``(N, 1, S, S)`` float32 glyphs in ``[0, 1]``.
        labels: ``(N,)`` class ids.
        modes: ``(N,)`` glyph ids (the character an image draws; several per class in ``multimodal``).
        train: class ids the final models train on (``val`` included).
        val: class ids carved from ``train`` to score the hyperparameter search.
        test: class ids the final models are scored on (disjoint from ``train``).
        description: one line for the report.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    modes: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    description: str

    def subset(self, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Images, labels renumbered ``0 ... len(classes) - 1`` and modes of the given classes."""
        lookup = np.full(self.labels.max() + 1, -1)
        lookup[classes] = np.arange(len(classes))
        keep = lookup[self.labels] >= 0
        return self.images[keep], lookup[self.labels[keep]], self.modes[keep]

    def search_split(self) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        """(fit, score) sets of the search: ``train - val`` and ``val``."""
        fit = np.setdiff1d(self.train, self.val)
        return self.subset(fit), self.subset(self.val)

    def final_split(self) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        """(fit, score) sets of the final runs: ``train`` and ``test``."""
        return self.subset(self.train), self.subset(self.test)


def available_fonts(paths: list[str] | None = None) -> list[tuple[str, str]]:
    """(name, path) of the distinct fonts (matplotlib's and ``/usr/share/fonts``) that draw ``BAND``."""
    import matplotlib
    from matplotlib.ft2font import FT2Font

    if paths is None:
        paths = sorted(glob.glob(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "*.ttf")))
        paths += sorted(glob.glob("/usr/share/fonts/**/*.[ot]tf", recursive=True))
    fonts: dict[str, str] = {}
    for path in paths:
        try:
            face = FT2Font(path)
        except (OSError, RuntimeError):
            continue
        name = f"{face.family_name} {face.style_name}".strip()
        if any(bad.lower() in (name + os.path.basename(path)).lower() for bad in base.EXCLUDED_FONTS):
            continue
        if all(face.get_char_index(ord(c)) != 0 for c in BAND):
            fonts.setdefault(name, path)
    return sorted(fonts.items())


def _coverage(fonts: list[tuple[str, str]], chars: str) -> np.ndarray:
    """Boolean ``(len(fonts), len(chars))``: which font maps which character."""
    from matplotlib.ft2font import FT2Font

    faces = [FT2Font(path) for _, path in fonts]
    return np.array([[face.get_char_index(ord(c)) != 0 for c in chars] for face in faces], dtype=bool)


def _render(fonts: list[tuple[str, str]], pairs: list[tuple[int, str]], size: int) -> np.ndarray:
    """Images of (font index, character) pairs, in the given order."""
    by_font: dict[int, list[int]] = {}
    for i, (f, _) in enumerate(pairs):
        by_font.setdefault(f, []).append(i)
    out = np.zeros((len(pairs), 1, size, size), np.float32)
    for f, rows in by_font.items():
        out[rows, 0] = base.render_font(fonts[f][1], "".join(pairs[i][1] for i in rows), size)
    return out


def _split(num_classes: int, test_fraction: float, val_fraction: float, rng: np.random.Generator):
    perm = rng.permutation(num_classes)
    n_test = round(num_classes * test_fraction)
    test, train = np.sort(perm[:n_test]), perm[n_test:]
    val = np.sort(train[: round(len(train) * val_fraction)])
    return np.sort(train), val, test


def _distinct(chars: str, font_path: str, size: int = 16) -> str:
    """``chars`` without those drawn (nearly) like an earlier one in the given font."""
    images = base.render_font(font_path, chars, size).reshape(len(chars), -1)
    centred = images - images.mean(1, keepdims=True)
    unit = centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-6)
    kept: list[int] = []
    for i in range(len(chars)):
        if np.linalg.norm(centred[i]) > 1e-3 and all(unit[i] @ unit[j] < LOOKALIKE for j in kept):
            kept.append(i)
    return "".join(chars[i] for i in kept)


def multimodal_task(
    size: int = 16,
    modes_per_class: int = 4,
    fonts_per_char: int = 8,
    max_classes: int | None = None,
    test_fraction: float = 0.4,
    val_fraction: float = 1 / 3,
    seed: int = 0,
    fonts: list[tuple[str, str]] | None = None,
) -> Task:
    """Classes that are unions of ``modes_per_class`` unrelated characters (see the module docstring).

    Every character mapped by at least ``fonts_per_char`` fonts (and not a look-alike of another) is used
    once; each is drawn in ``fonts_per_char`` fonts chosen at random among those that map it.
    """
    fonts = available_fonts() if fonts is None else fonts
    rng = np.random.default_rng(seed)
    candidates = "".join(SCRIPTS.values())
    cover = _coverage(fonts, candidates)
    candidates = "".join(c for c, n in zip(candidates, cover.sum(0), strict=True) if n >= fonts_per_char)
    dejavu = next((p for n, p in fonts if n == "DejaVu Sans Book"), fonts[0][1])
    pool = _distinct(candidates, dejavu)
    num_classes = len(pool) // modes_per_class
    if max_classes is not None:
        num_classes = min(num_classes, max_classes)
    if num_classes < 6:
        raise ValueError(f"only {len(pool)} distinct characters in {len(fonts)} fonts: too few classes")
    chars = "".join(pool[i] for i in rng.permutation(len(pool))[: num_classes * modes_per_class])
    cover = _coverage(fonts, chars)
    pairs, labels, modes = [], [], []
    for m, char in enumerate(chars):
        for f in rng.choice(np.flatnonzero(cover[:, m]), fonts_per_char, replace=False):
            pairs.append((int(f), char))
            labels.append(m // modes_per_class)
            modes.append(m)
    train, val, test = _split(num_classes, test_fraction, val_fraction, rng)
    return Task(
        name="multimodal",
        images=_render(fonts, pairs, size),
        labels=np.asarray(labels),
        modes=np.asarray(modes),
        train=train,
        val=val,
        test=test,
        description=(
            f"{num_classes} classes, each the union of {modes_per_class} random characters "
            f"(from {len(pool)} distinct Latin/Greek/Cyrillic/Armenian/Georgian/Hebrew/katakana characters), "
            f"each character in {fonts_per_char} of {len(fonts)} fonts: {len(pairs)} images, {size}x{size} px"
        ),
    )


def hangul_fonts(fonts: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """The fonts that map the hangul syllable block U+AC00 ("ga") and ``BAND``."""
    fonts = available_fonts() if fonts is None else fonts
    return [font for font, ok in zip(fonts, _coverage(fonts, "\uac00")[:, 0], strict=True) if ok]


def hangul_task(
    num_classes: int = 3000,
    instances_per_class: int = 5,
    size: int = 20,
    test_fraction: float = 1 / 3,
    val_fraction: float = 0.25,
    seed: int = 0,
    fonts: list[tuple[str, str]] | None = None,
) -> Task:
    """Hangul syllables as classes, each in ``instances_per_class`` random fonts (SOP regime).

    Raises:
        ValueError: if fewer than ``instances_per_class`` hangul fonts are installed.
    """
    fonts = hangul_fonts(fonts)
    if len(fonts) < instances_per_class:
        raise ValueError(
            f"instances_per_class={instances_per_class} needs as many hangul fonts, found {len(fonts)} "
            "(apt-get install fonts-nanum fonts-unfonts-core fonts-baekmuk)"
        )
    rng = np.random.default_rng(seed)
    syllables = "".join(map(chr, range(0xAC00, 0xD7A4)))
    cover = _coverage(fonts, syllables)
    usable = np.flatnonzero(cover.sum(0) >= instances_per_class)
    if len(usable) < num_classes:
        raise ValueError(f"num_classes={num_classes} exceeds the {len(usable)} syllables enough fonts map")
    chosen = rng.choice(usable, num_classes, replace=False)
    pairs, labels = [], []
    for label, s in enumerate(chosen):
        for f in rng.choice(np.flatnonzero(cover[:, s]), instances_per_class, replace=False):
            pairs.append((int(f), syllables[s]))
            labels.append(label)
    train, val, test = _split(num_classes, test_fraction, val_fraction, rng)
    return Task(
        name="hangul",
        images=_render(fonts, pairs, size),
        labels=np.asarray(labels),
        modes=np.asarray(labels),
        train=train,
        val=val,
        test=test,
        description=(
            f"{num_classes} hangul syllables (classes), each in {instances_per_class} of {len(fonts)} "
            f"hangul fonts: {len(pairs)} images, {size}x{size} px"
        ),
    )
