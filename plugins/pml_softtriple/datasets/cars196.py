"""Cars196 (Krause et al., 2013) in either of its two common folder layouts."""

from __future__ import annotations

import csv
from pathlib import Path

from ._base import RetrievalFolderDataset

__all__ = ["Cars196"]


class Cars196(RetrievalFolderDataset):
    """Stanford Cars: 16,185 images of 196 models; train on classes 1-98, test on 99-196.

    The class-disjoint split of the SoftTriple paper and the metric learning literature, which ignores the
    dataset's own train/test flag. ``root`` holds one of two layouts:

    - the official "all images" release (what the metric learning literature uses)::

        cars_annos.mat          struct array "annotations": relative_im_path, bbox_*, class (1..196), test
        car_ims/000001.jpg

    - the by-class folder copy that ``pytorch_metric_learning.datasets.Cars196`` downloads::

        names.csv               one class name per line, line n = class n
        anno_train.csv          "<file>,<x1>,<y1>,<x2>,<y2>,<class>"
        anno_test.csv
        car_data/car_data/{train,test}/<class name with '/' as '-'>/<file>

    Reading ``cars_annos.mat`` needs scipy. Labels are ``class - 1`` for ``"train"`` and ``class - 99`` for
    ``"test"`` (see :class:`~pml_softtriple.datasets.RetrievalFolderDataset` for arguments and errors).
    """

    first_test_class = 99

    def _keep(self, class_id: int, split: str) -> bool:
        return (class_id < self.first_test_class) == (split == "train")

    def read_index(self, split: str) -> tuple[list[str], list[int]]:
        """Image paths and class ids (1..196) of ``split``, from whichever layout ``root`` holds."""
        root = Path(self.root)
        if (root / "cars_annos.mat").is_file():
            entries = self._read_mat(root)
        elif (root / "names.csv").is_file():
            entries = self._read_csv(root)
        else:
            raise FileNotFoundError(
                f"Cars196: expected {str(root / 'cars_annos.mat')!r} (with car_ims/) or "
                f"{str(root / 'names.csv')!r} (with anno_train.csv, anno_test.csv, car_data/car_data/)"
            )
        kept = [(path, cid) for path, cid in entries if self._keep(cid, split)]
        return [p for p, _ in kept], [c for _, c in kept]

    @staticmethod
    def _read_mat(root: Path) -> list[tuple[str, int]]:
        from scipy.io import loadmat  # scipy comes with scikit-learn, a PML dependency

        annotations = loadmat(str(root / "cars_annos.mat"), squeeze_me=True)["annotations"]
        annotations = annotations.reshape(-1)
        return [(str(root / str(a["relative_im_path"])), int(a["class"])) for a in annotations]

    @staticmethod
    def _read_csv(root: Path) -> list[tuple[str, int]]:
        names = [line.strip() for line in (root / "names.csv").read_text().splitlines()]
        entries = []
        for part in ("train", "test"):
            with open(root / f"anno_{part}.csv", newline="") as handle:
                for row in csv.reader(handle):
                    if not row:
                        continue
                    cid = int(row[-1])
                    folder = names[cid - 1].replace("/", "-")
                    entries.append((str(root / "car_data" / "car_data" / part / folder / row[0]), cid))
        return entries
