"""CUB-200-2011 (Wah et al., 2011) in its released folder layout, with the metric-learning split."""

from __future__ import annotations

from pathlib import Path

from ._base import RetrievalFolderDataset, require_file

__all__ = ["CUB"]

_LAYOUT = "CUB_200_2011/{images.txt, image_class_labels.txt, images/<class folder>/<image>.jpg}"


class CUB(RetrievalFolderDataset):
    """CUB-200-2011 birds: 11,788 images of 200 species; train on classes 1-100, test on 101-200.

    The class-disjoint split used by the SoftTriple paper and the deep metric learning literature (Song et
    al., CVPR 2016). ``root`` is either the ``CUB_200_2011`` folder of the official archive or its parent::

        CUB_200_2011/images.txt               "<image id> <relative path>"
        CUB_200_2011/image_class_labels.txt   "<image id> <class id 1..200>"
        CUB_200_2011/images/001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg

    Labels are ``class id - 1`` for ``"train"``, ``class id - 101`` for ``"test"`` (see
    :class:`~pml_softtriple.datasets.RetrievalFolderDataset` for the arguments and errors).
    """

    first_test_class = 101

    def _base(self) -> Path:
        root = Path(self.root)
        return root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root

    def read_index(self, split: str) -> tuple[list[str], list[int]]:
        """Image paths and class ids (1..200) of ``split``."""
        base = self._base()
        owner = type(self).__name__
        images = require_file(base / "images.txt", owner, _LAYOUT)
        labels = require_file(base / "image_class_labels.txt", owner, _LAYOUT)
        path_of = dict(line.split(maxsplit=1) for line in images.read_text().splitlines() if line.strip())
        paths, class_ids = [], []
        for line in labels.read_text().splitlines():
            if not line.strip():
                continue
            image_id, class_id = line.split()
            cid = int(class_id)
            if (cid < self.first_test_class) == (split == "train"):
                paths.append(str(base / "images" / path_of[image_id].strip()))
                class_ids.append(cid)
        return paths, class_ids
