"""Stanford Online Products (Song et al., CVPR 2016) in its released folder layout."""

from __future__ import annotations

from pathlib import Path

from ._base import RetrievalFolderDataset, require_file

__all__ = ["StanfordOnlineProducts"]

_LAYOUT = "Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <super class>_final/<image>.JPG}"


class StanfordOnlineProducts(RetrievalFolderDataset):
    """Stanford Online Products: 120,053 images of 22,634 products; train 11,318 classes, test 11,316.

    The released split files define the class-disjoint split used by the SoftTriple paper. ``root`` is the
    ``Stanford_Online_Products`` folder or its parent::

        Stanford_Online_Products/Ebay_train.txt   header, then "<image id> <class id> <super class id> <path>"
        Stanford_Online_Products/Ebay_test.txt
        Stanford_Online_Products/bicycle_final/111085122871_0.JPG

    Labels are the class ids of the split, remapped to ``0 .. num_classes - 1`` in increasing order (see
    :class:`~pml_softtriple.datasets.RetrievalFolderDataset` for the arguments and errors).
    ``super_class_ids`` holds the 12 product categories.
    """

    def _base(self) -> Path:
        root = Path(self.root)
        nested = root / "Stanford_Online_Products"
        return nested if nested.is_dir() else root

    def read_index(self, split: str) -> tuple[list[str], list[int]]:
        """Image paths and class ids of ``split``, from ``Ebay_<split>.txt``."""
        base = self._base()
        index = require_file(base / f"Ebay_{split}.txt", type(self).__name__, _LAYOUT)
        lines = [line.split() for line in index.read_text().splitlines()[1:] if line.strip()]
        self._super = getattr(self, "_super", []) + [int(parts[2]) for parts in lines]
        return [str(base / parts[3]) for parts in lines], [int(parts[1]) for parts in lines]

    def generate_split(self) -> None:
        """Read the split and keep each image's super class id in ``super_class_ids``."""
        self._super = []
        super().generate_split()
        self.super_class_ids = self._super
        del self._super
