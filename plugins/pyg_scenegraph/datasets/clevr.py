r"""CLEVR scenes (Johnson et al., CVPR 2017) as scene graphs."""

from __future__ import annotations

import json
import os.path as osp
from collections.abc import Callable

from .raw_json import _RawSceneGraphs, _Scene
from .vocabulary import Vocabulary

__all__ = ["CLEVRSceneGraphs"]

#: CLEVR's object properties (``properties.json`` of the CLEVR generator).
SHAPES = ("cube", "sphere", "cylinder")
SIZES = {"large": 0.7, "small": 0.35}  # object radius in world units
COLORS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
MATERIALS = ("rubber", "metal")
#: CLEVR's four spatial relations.
RELATIONS = ("left", "right", "front", "behind")
#: Rendered image size of CLEVR v1.0 ``(W, H)``.
IMAGE_SIZE = (480.0, 320.0)


class CLEVRSceneGraphs(_RawSceneGraphs):
    r"""The scene graphs of `CLEVR <https://cs.stanford.edu/people/jcjohns/clevr/>`_ scene files.

    Reads ``CLEVR_{split}_scenes.json`` (Johnson et al., CVPR 2017).

    Every object of a CLEVR scene is a node; its class is its shape (``label="shape"``: 3 classes) or the
    full ``"size color material shape"`` description (``label="attributes"``: 96 classes), in the fixed
    order of CLEVR's properties, so train and val share ids. CLEVR's ``relationships[rel][i]`` lists the
    objects :math:`j` that are ``rel`` of object :math:`i`; each becomes the relation
    :math:`(j, \mathrm{rel}, i)`, e.g. ``(j, "left", i)`` = "j is left of i".

    Every ordered pair of a CLEVR scene holds exactly two relations (left or right, and front or behind).
    With ``filter_duplicate_rels`` (default, one predicate per pair as for VG150's training split) the
    pair keeps the first of its predicates in the order of ``predicates`` — by default its left/right
    relation; pass ``predicates=("front", "behind")`` for the other axis, or ``filter_duplicate_rels=False``
    for both.

    The scene files hold no boxes: each object gets the square box of side :math:`2 f r / d` centred at
    its ``pixel_coords`` :math:`(u, v, d)`, with :math:`r` its radius (0.7 large, 0.35 small) and
    :math:`f` = ``focal_length`` in pixels — an approximation of its extent in the 480 x 320 image, for the
    box code of the models, not a ground-truth box.

    Args:
        root: Root directory; the JSON file in ``root/raw``.
        split: ``"train"`` or ``"val"``: reads ``CLEVR_{split}_scenes.json`` unless ``file_name`` is given.
        label: ``"shape"`` or ``"attributes"``. (default: ``"shape"``)
        predicates: The relations to read, in priority order. (default: ``("left", "right", "front",
            "behind")``)
        filter_empty_rels: Drop images without relations. (default: ``True``)
        filter_duplicate_rels: Keep one predicate per ordered pair (see above). (default: ``True``)
        default_features: Add :class:`~pyg_scenegraph.ObjectFeatures` as ``x`` on access. (default: ``True``)
        focal_length: :math:`f` of the approximate boxes, in pixels. (default: ``525.0``)
        file_name: Explicit file name in ``root/raw``.
        transform, pre_transform, pre_filter, force_reload: as in every PyG dataset (the transforms guarded
            by :class:`~pyg_scenegraph.transforms.SceneGraphTransform`).

    Raises:
        ValueError: for an unknown split, label or relation, a property outside CLEVR's, or a relation to
            an object index outside the scene.
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        label: str = "shape",
        predicates: tuple[str, ...] = RELATIONS,
        filter_empty_rels: bool = True,
        filter_duplicate_rels: bool = True,
        default_features: bool = True,
        focal_length: float = 525.0,
        file_name: str | None = None,
        transform: Callable | None = None,
        pre_transform: Callable | None = None,
        pre_filter: Callable | None = None,
        force_reload: bool = False,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"CLEVRSceneGraphs: 'split' must be 'train' or 'val' (got {split!r})")
        if label not in ("shape", "attributes"):
            raise ValueError(f"CLEVRSceneGraphs: 'label' must be 'shape' or 'attributes' (got {label!r})")
        unknown = [p for p in predicates if p not in RELATIONS]
        if not predicates or unknown:
            raise ValueError(
                f"CLEVRSceneGraphs: 'predicates' must be a non-empty subset of {RELATIONS} (got {predicates})"
            )
        if focal_length <= 0:
            raise ValueError(f"CLEVRSceneGraphs: 'focal_length' must be > 0 (got {focal_length})")
        self.split, self.label, self.focal_length = split, label, focal_length
        self.file_name = file_name or f"CLEVR_{split}_scenes.json"
        classes = (
            list(SHAPES)
            if label == "shape"
            else [f"{s} {c} {m} {h}" for s in SIZES for c in COLORS for m in MATERIALS for h in SHAPES]
        )
        super().__init__(
            root, Vocabulary(classes), Vocabulary(list(predicates)), None, None, filter_empty_rels,
            transform, pre_transform, force_reload, filter_duplicate_rels, default_features, pre_filter,
        )  # fmt: skip

    @property
    def raw_file_names(self) -> list[str]:
        r"""The scene file expected in ``raw_dir``."""
        return [self.file_name]

    def _stem(self) -> str:
        return f"{osp.splitext(self.file_name)[0]}_{self.label}_{self.focal_length:g}"

    def _name(self, obj: dict) -> str:
        for key, allowed in (
            ("shape", SHAPES),
            ("size", tuple(SIZES)),
            ("color", COLORS),
            ("material", MATERIALS),
        ):
            if obj.get(key) not in allowed:
                raise ValueError(f"CLEVRSceneGraphs: object {key} {obj.get(key)!r} is not one of {allowed}")
        if self.label == "shape":
            return obj["shape"]
        return f"{obj['size']} {obj['color']} {obj['material']} {obj['shape']}"

    def _box(self, obj: dict) -> list[float]:
        u, v, depth = (float(c) for c in obj["pixel_coords"])
        half = self.focal_length * SIZES[obj["size"]] / max(depth, 1e-6)
        width, height = IMAGE_SIZE
        return [max(u - half, 0.0), max(v - half, 0.0), min(u + half, width - 1), min(v + half, height - 1)]

    def _scenes(self) -> list[_Scene]:
        with open(self.raw_paths[0]) as f:
            content = json.load(f)
        scenes: list[_Scene] = []
        for scene in content["scenes"] if isinstance(content, dict) else content:
            objects = scene["objects"]
            relations = []
            for rel in self._predicates.names[1:] if self._predicates is not None else RELATIONS:
                for i, others in enumerate(scene.get("relationships", {}).get(rel, [])):
                    for j in others:
                        if not (0 <= j < len(objects) and i < len(objects)):
                            raise ValueError(
                                f"CLEVRSceneGraphs: scene {scene.get('image_index')} relates object {j} to "
                                f"{i} but has {len(objects)} objects"
                            )
                        relations.append((int(j), i, rel))
            relations.sort(key=lambda r: (r[0], r[1]))  # stable: a pair's relations stay in priority order
            names = [self._name(o) for o in objects]
            boxes = [self._box(o) for o in objects]
            scenes.append((scene.get("image_index", len(scenes)), names, boxes, relations, IMAGE_SIZE))
        return scenes

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({len(self)}, split={self.split!r}, label={self.label!r})"
