r"""The VG150 split of Visual Genome (Xu et al., CVPR 2017) in the h5 format of Neural Motifs / SGB."""

from __future__ import annotations

import json
import os.path as osp
from collections.abc import Callable

import numpy as np
import torch
from torch_geometric.data import InMemoryDataset

from ..boxes import cxcywh_to_xyxy
from ..data import SceneGraphData
from ..transforms import SceneGraphTransform, dataset_transform

__all__ = ["VG150"]

#: Images of ``image_data.json`` that the h5 file skips (Scene-Graph-Benchmark's ``corrupted_ims``).
CORRUPTED_IMAGE_IDS = frozenset({1592, 1722, 4616, 4617})


class VG150(InMemoryDataset):
    r"""The VG150 split of Visual Genome (150 objects, 50 predicates) from its standard h5 files.

    The split used by scene-graph generation papers (`Xu et al., CVPR 2017 <https://arxiv.org/abs/1701.02426>`_;
    Neural Motifs; Scene-Graph-Benchmark), read
    from its standard files in ``root/raw``:

    * ``VG-SGG-with-attri.h5`` — ``labels`` ``[N_obj, 1]`` (1..150), ``boxes_1024``/``boxes_512``
      ``[N_obj, 4]`` as :math:`(c_x, c_y, w, h)` at longest image side 1024/512, ``img_to_first_box`` /
      ``img_to_last_box`` (**inclusive** ranges, ``-1`` = no box), ``relationships`` ``[N_rel, 2]`` (global
      object rows), ``predicates`` ``[N_rel, 1]`` (1..50), ``img_to_first_rel`` / ``img_to_last_rel``
      (inclusive, ``-1`` = none) and ``split`` (0 = train, 2 = test);
    * ``VG-SGG-dicts-with-attri.json`` — ``idx_to_label``, ``idx_to_predicate``, ...;
    * ``image_data.json`` — per image ``width``/``height`` (for the box scale), aligned with the h5 rows after
      dropping the 4 corrupted images, as Scene-Graph-Benchmark does.

    Splits follow Scene-Graph-Benchmark: ``"val"`` is the **first** ``num_val_images`` training images,
    ``"train"`` the rest, ``"test"`` the images with split 2; images without boxes (and, with
    ``filter_empty_rels``, without relations) are dropped first. Boxes are converted to corners
    :math:`(c_x - w/2,\ c_y - h/2,\ x_1 + w,\ y_1 + h)` and rescaled by :math:`\max(W, H) / 1024`. There
    are no visual features in the files: with ``default_features`` each graph gets the default ``x`` of
    :class:`~pyg_scenegraph.ObjectFeatures` (class one-hot and box code, ``C + 9``) on access, before
    ``transform`` (which can replace it with detector features). ``transform`` and ``pre_transform`` are
    guarded by :class:`~pyg_scenegraph.transforms.SceneGraphTransform`.

    Args:
        root: Root directory; the three files go into ``root/raw`` (nothing is downloaded).
        split: ``"train"``, ``"val"`` or ``"test"``. (default: ``"train"``)
        num_val_images: Size of the validation split. (default: ``5000``)
        filter_empty_rels: Drop images without relations. (default: ``True``)
        filter_duplicate_rels: Keep one predicate per object pair (the first; SGB picks one at random per
            access). (default: ``True`` for ``"train"``, else ``False``)
        box_scale: ``1024`` or ``512``: which ``boxes_*`` array to read. (default: ``1024``)
        default_features: Add :class:`~pyg_scenegraph.ObjectFeatures` as ``x``. (default: ``True``)
        transform, pre_transform, force_reload: as in every PyG dataset.

    Raises:
        ValueError: for an unknown split or box scale, inconsistent index ranges, or labels outside the
            vocabulary of the dicts file.
        FileNotFoundError: if a raw file is missing.
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        num_val_images: int = 5000,
        filter_empty_rels: bool = True,
        filter_duplicate_rels: bool | None = None,
        box_scale: int = 1024,
        default_features: bool = True,
        transform: Callable | None = None,
        pre_transform: Callable | None = None,
        force_reload: bool = False,
    ) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"VG150: 'split' must be 'train', 'val' or 'test' (got {split!r})")
        if box_scale not in (512, 1024):
            raise ValueError(f"VG150: 'box_scale' must be 512 or 1024 (got {box_scale})")
        self.split = split
        self.num_val_images = num_val_images
        self.filter_empty_rels = filter_empty_rels
        self.filter_duplicate_rels = (
            split == "train" if filter_duplicate_rels is None else filter_duplicate_rels
        )
        self.box_scale = box_scale
        super().__init__(root, transform, SceneGraphTransform.wrap(pre_transform), force_reload=force_reload)
        self.load(self.processed_paths[0], data_cls=SceneGraphData)
        self.transform = dataset_transform(transform, self.num_object_classes, default_features)

    @property
    def raw_file_names(self) -> list[str]:
        r"""The annotation files expected in ``raw_dir``."""
        return ["VG-SGG-with-attri.h5", "VG-SGG-dicts-with-attri.json", "image_data.json"]

    @property
    def processed_file_names(self) -> str:
        r"""The cache file; its name encodes the split and filtering options."""
        flags = f"{int(self.filter_empty_rels)}{int(self.filter_duplicate_rels)}"
        return f"{self.split}_{self.num_val_images}_{self.box_scale}_{flags}.pt"

    def download(self) -> None:
        r"""Nothing is downloaded: raise with the list of files to provide."""
        raise FileNotFoundError(
            f"VG150: put {self.raw_file_names} into {self.raw_dir} "
            "(Scene-Graph-Benchmark's DATASET.md lists them); "
            "nothing is downloaded"
        )

    def process(self) -> None:
        r"""Read the raw files into :class:`~pyg_scenegraph.SceneGraphData` graphs."""
        import h5py  # optional dependency of the [pyg] extra

        with open(self.raw_paths[1]) as f:
            dicts = json.load(f)
        num_labels, num_predicates = len(dicts["idx_to_label"]), len(dicts["idx_to_predicate"])
        with open(self.raw_paths[2]) as f:
            image_data = [im for im in json.load(f) if int(im["image_id"]) not in CORRUPTED_IMAGE_IDS]

        with h5py.File(self.raw_paths[0], "r") as h5:
            split = np.asarray(h5["split"][:]).astype(np.int64)
            first_box = np.asarray(h5["img_to_first_box"][:]).astype(np.int64)
            last_box = np.asarray(h5["img_to_last_box"][:]).astype(np.int64)
            first_rel = np.asarray(h5["img_to_first_rel"][:]).astype(np.int64)
            last_rel = np.asarray(h5["img_to_last_rel"][:]).astype(np.int64)
            labels = np.asarray(h5["labels"][:]).astype(np.int64).reshape(-1)
            boxes = np.asarray(h5[f"boxes_{self.box_scale}"][:]).astype(np.float32).reshape(-1, 4)
            relationships = np.asarray(h5["relationships"][:]).astype(np.int64).reshape(-1, 2)
            predicates = np.asarray(h5["predicates"][:]).astype(np.int64).reshape(-1)

        if len(image_data) != split.shape[0]:
            raise ValueError(
                f"VG150: image_data.json has {len(image_data)} images (after dropping corrupted ones) "
                "but the h5 "
                f"file has {split.shape[0]}"
            )
        mask = (split == (2 if self.split == "test" else 0)) & (first_box >= 0)
        if self.filter_empty_rels:
            mask &= first_rel >= 0
        index = np.nonzero(mask)[0]
        if self.num_val_images > 0 and self.split != "test":
            index = index[: self.num_val_images] if self.split == "val" else index[self.num_val_images :]

        if labels.size and (labels.min() < 1 or labels.max() > num_labels):
            raise ValueError(
                f"VG150: object labels must lie in [1, {num_labels}] (the dicts file's vocabulary)"
            )
        if predicates.size and (predicates.min() < 1 or predicates.max() > num_predicates):
            raise ValueError(
                f"VG150: predicates must lie in [1, {num_predicates}] (the dicts file's vocabulary)"
            )
        corners = cxcywh_to_xyxy(torch.from_numpy(boxes))

        data_list = []
        for i in index.tolist():
            lo, hi = int(first_box[i]), int(last_box[i])
            if hi < lo:
                raise ValueError(f"VG150: image row {i} has img_to_last_box < img_to_first_box")
            num_objects = hi - lo + 1
            width, height = float(image_data[i]["width"]), float(image_data[i]["height"])
            box = corners[lo : hi + 1] / self.box_scale * max(width, height)
            if first_rel[i] >= 0:
                r_lo, r_hi = int(first_rel[i]), int(last_rel[i])
                pairs = relationships[r_lo : r_hi + 1] - lo
                preds = predicates[r_lo : r_hi + 1]
                if pairs.size and (pairs.min() < 0 or pairs.max() >= num_objects):
                    raise ValueError(
                        f"VG150: relations of image row {i} point outside its box range [{lo}, {hi}]"
                    )
            else:
                pairs, preds = np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64)
            if self.filter_duplicate_rels and len(pairs):
                _, first = np.unique(pairs, axis=0, return_index=True)
                first = np.sort(first)
                pairs, preds = pairs[first], preds[first]
            data = SceneGraphData(
                y=torch.from_numpy(labels[lo : hi + 1].copy()),
                box=box,
                image_size=torch.tensor([[width, height]]),
                edge_index=torch.from_numpy(pairs.T.copy()).long().view(2, -1),
                edge_predicate=torch.from_numpy(preds.copy()).long(),
                image_id=torch.tensor([int(image_data[i]["image_id"])]),
            )
            data_list.append(data if self.pre_transform is None else self.pre_transform(data))
        self.save(data_list, self.processed_paths[0])

    def _dicts(self) -> dict:
        with open(osp.join(self.raw_dir, self.raw_file_names[1])) as f:
            return json.load(f)

    @property
    def num_object_classes(self) -> int:
        """Object classes including background (151 for the real file)."""
        return len(self._dicts()["idx_to_label"]) + 1

    @property
    def num_predicate_classes(self) -> int:
        """Predicate classes including background (51 for the real file)."""
        return len(self._dicts()["idx_to_predicate"]) + 1

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({len(self)}, split={self.split!r})"
