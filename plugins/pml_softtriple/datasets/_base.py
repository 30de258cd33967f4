"""Common base of the offline retrieval-benchmark loaders: PML's ``BaseDataset`` without downloading."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from pytorch_metric_learning.datasets.base_dataset import BaseDataset

__all__ = ["RetrievalFolderDataset"]

SPLITS = ("train", "test", "train+test")


class RetrievalFolderDataset(BaseDataset):
    """A class-disjoint retrieval split read from a dataset's standard folder layout on disk.

    Subclasses implement :meth:`read_index`, returning the image paths and the dataset's own class ids for
    a split. Compared with ``pytorch_metric_learning.datasets`` (same constructor, minus ``download``), the
    labels are remapped to ``0 .. num_classes - 1`` within the split, in the order of the original class
    ids (what a proxy loss such as ``SoftTripleLoss(num_classes=...)`` needs; ``class_ids`` keeps the
    originals), images are converted to RGB, and nothing is ever downloaded.

    Args:
        root: folder holding the dataset (see each subclass for the layout).
        split: ``"train"``, ``"test"`` or ``"train+test"`` (default: ``"train"``).
        transform: applied to the PIL image (default: ``None``).
        target_transform: applied to the integer label (default: ``None``).

    Raises:
        ValueError: for an unknown ``split``.
        FileNotFoundError: if ``root`` or an index file of the layout is missing.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        transform: Callable[[Image.Image], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"{type(self).__name__}: split must be one of {SPLITS}, got {split!r}")
        root_path = Path(root)
        if not root_path.is_dir():
            raise FileNotFoundError(f"{type(self).__name__}: root folder {str(root_path)!r} does not exist")
        self.root = str(root_path)
        self.split = split
        self.transform = transform
        self.target_transform = target_transform
        self.generate_split()

    def read_index(self, split: str) -> tuple[list[str], list[int]]:
        """Image paths and original class ids of ``split`` (``"train"`` or ``"test"``)."""
        raise NotImplementedError

    def generate_split(self) -> None:
        parts = ("train", "test") if self.split == "train+test" else (self.split,)
        paths: list[str] = []
        class_ids: list[int] = []
        for part in parts:
            part_paths, part_ids = self.read_index(part)
            paths += part_paths
            class_ids += part_ids
        index = {cid: i for i, cid in enumerate(sorted(set(class_ids)))}
        self.paths = paths
        self.class_ids = class_ids
        self.labels = [index[c] for c in class_ids]
        self.num_classes = len(index)

    def download_and_remove(self) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} reads an existing copy of the dataset; it never downloads"
        )

    def __getitem__(self, idx: int) -> tuple[Any, Any]:
        with Image.open(self.paths[idx]) as img:
            image: Any = img.convert("RGB")
        label: Any = self.labels[idx]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, "
            f"num_images={len(self)}, num_classes={self.num_classes})"
        )


def require_file(path: Path, owner: str, layout: str) -> Path:
    """``path`` if it is a file, else a FileNotFoundError that describes the expected layout."""
    if not path.is_file():
        raise FileNotFoundError(f"{owner}: expected {str(path)!r} ({layout})")
    return path
