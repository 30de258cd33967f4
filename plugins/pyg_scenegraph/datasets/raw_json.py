r"""Readers of raw scene-graph JSON: Visual Genome ``scene_graphs.json`` and GQA ``*_sceneGraphs.json``."""

from __future__ import annotations

import hashlib
import json
import os.path as osp
import warnings
from collections.abc import Callable, Sequence

from torch_geometric.data import InMemoryDataset

from ..data import SceneGraphData, first_predicate_per_pair
from ..transforms import SceneGraphTransform, dataset_transform
from .vocabulary import Vocabulary, encode_scene, normalize_name

__all__ = ["GQASceneGraphs", "VisualGenomeSceneGraphs"]

_Scene = tuple[int | str, list[str], list[list[float]], list[tuple[int, int, str]], tuple[float, float]]


class _RawSceneGraphs(InMemoryDataset):
    """Shared logic: parse scenes, build or take vocabularies, encode, clean relations, drop empty graphs.

    Relation cleaning, in this order: relations outside the vocabularies are dropped; self-relations
    (subject = object, which Scene-Graph-Benchmark's VG150 never contains) are dropped, counted in
    ``num_self_relations_dropped`` and warned about once when processing; with ``filter_duplicate_rels``
    each ``(subject, object)`` pair keeps its **first** predicate in file order, as :class:`VG150` does for
    training.
    """

    default_sizes = (150, 50)

    def __init__(
        self,
        root: str,
        objects: Vocabulary | Sequence[str] | None,
        predicates: Vocabulary | Sequence[str] | None,
        num_object_classes: int | None,
        num_predicate_classes: int | None,
        filter_empty_rels: bool,
        transform: Callable | None,
        pre_transform: Callable | None,
        force_reload: bool,
        filter_duplicate_rels: bool = True,
        default_features: bool = True,
        pre_filter: Callable | None = None,
    ) -> None:
        self._objects = objects if objects is None or isinstance(objects, Vocabulary) else Vocabulary(objects)
        self._predicates = (
            predicates if predicates is None or isinstance(predicates, Vocabulary) else Vocabulary(predicates)
        )
        self.max_objects = num_object_classes or self.default_sizes[0]
        self.max_predicates = num_predicate_classes or self.default_sizes[1]
        self.filter_empty_rels = filter_empty_rels
        self.filter_duplicate_rels = filter_duplicate_rels
        super().__init__(
            root, transform, SceneGraphTransform.wrap(pre_transform), pre_filter, force_reload=force_reload
        )
        self.load(self.processed_paths[0], data_cls=SceneGraphData)
        with open(self.processed_paths[1]) as f:
            vocab = json.load(f)
        self.objects, self.predicates = Vocabulary(vocab["objects"][1:]), Vocabulary(vocab["predicates"][1:])
        self.num_self_relations_dropped: int = vocab.get("self_relations_dropped", 0)
        self.transform = dataset_transform(transform, self.num_object_classes, default_features)

    def _key(self) -> str:
        parts = [
            repr(None if self._objects is None else self._objects.names),
            repr(None if self._predicates is None else self._predicates.names),
            str(self.max_objects), str(self.max_predicates), str(self.filter_empty_rels),
            str(self.filter_duplicate_rels),
        ]  # fmt: skip
        return hashlib.sha1("|".join(parts).encode()).hexdigest()[:10]

    @property
    def processed_file_names(self) -> list[str]:
        key = self._key()
        return [f"{self._stem()}_{key}.pt", f"{self._stem()}_{key}_vocab.json"]

    def _stem(self) -> str:
        return "data"

    def download(self) -> None:
        r"""Nothing is downloaded: raise with the list of files to provide."""
        raise FileNotFoundError(
            f"{type(self).__name__}: put {self.raw_file_names} into {self.raw_dir}; nothing is downloaded"
        )

    def _scenes(self) -> list[_Scene]:
        raise NotImplementedError

    def process(self) -> None:
        r"""Read the raw files into :class:`~pyg_scenegraph.SceneGraphData` graphs."""
        scenes = self._scenes()
        objects = self._objects or Vocabulary.build(
            (n for s in scenes for n in s[1]), max_size=self.max_objects
        )
        predicates = self._predicates or Vocabulary.build(
            (r[2] for s in scenes for r in s[3]), max_size=self.max_predicates
        )
        data_list = []
        self_relations = 0
        for image_id, names, boxes, relations, size in scenes:
            kept = [r for r in relations if r[0] != r[1]]
            self_relations += len(relations) - len(kept)
            data = encode_scene(names, boxes, kept, size, objects, predicates)
            if data is None:
                continue
            if self.filter_duplicate_rels:
                first = first_predicate_per_pair(data.edge_index)
                data.edge_index, data.edge_predicate = data.edge_index[:, first], data.edge_predicate[first]
            if self.filter_empty_rels and data.edge_predicate.numel() == 0:
                continue
            data.image_id = str(image_id)
            if self.pre_filter is not None and not self.pre_filter(data):
                continue
            data_list.append(data if self.pre_transform is None else self.pre_transform(data))
        if self_relations:
            warnings.warn(
                f"{type(self).__name__}: dropped {self_relations} self-relation(s) (subject = object); "
                "scene-graph relations join two different objects",
                stacklevel=2,
            )
        if not data_list:
            raise ValueError(
                f"{type(self).__name__}: no image has objects (and relations) in the vocabularies"
            )
        self.save(data_list, self.processed_paths[0])
        with open(self.processed_paths[1], "w") as f:
            json.dump(
                {
                    "objects": objects.names,
                    "predicates": predicates.names,
                    "self_relations_dropped": self_relations,
                },
                f,
            )

    @property
    def num_object_classes(self) -> int:
        """Object classes including background."""
        return len(self.objects)

    @property
    def num_predicate_classes(self) -> int:
        """Predicate classes including background."""
        return len(self.predicates)


class VisualGenomeSceneGraphs(_RawSceneGraphs):
    r"""Raw Visual Genome scene graphs as :class:`~pyg_scenegraph.SceneGraphData`, with vocabulary building.

    Reads `Visual Genome <https://visualgenome.org>`_ ``scene_graphs.json`` (v1.2/1.4).

    Each object takes its first name (normalised); boxes ``(x, y, w, h)`` become corners; relations refer to
    objects by ``object_id``/``subject_id``. The vocabularies are the ``num_object_classes`` /
    ``num_predicate_classes`` most frequent names, or the ones given (e.g. VG150's via
    :meth:`Vocabulary.from_vg150_dicts`); objects and relations outside them are dropped. Image sizes come
    from an optional ``image_data.json`` in ``root/raw``, otherwise from the extent of the boxes.
    Self-relations are dropped and each pair keeps its first predicate, as in VG150's training split
    (VG150's alias merging and box filtering are not reproduced; use :class:`VG150` for that split.)

    Args:
        root: Root directory; ``scene_graphs.json`` (and optionally ``image_data.json``) in ``root/raw``.
        objects: Optional object vocabulary (names, without background).
        predicates: Optional predicate vocabulary.
        num_object_classes: Size of a built object vocabulary. (default: ``150``)
        num_predicate_classes: Size of a built predicate vocabulary. (default: ``50``)
        filter_empty_rels: Drop images without relations. (default: ``True``)
        filter_duplicate_rels: Keep the first predicate of each ``(subject, object)`` pair.
            (default: ``True``)
        default_features: Add :class:`~pyg_scenegraph.ObjectFeatures` as ``x`` on access. (default: ``True``)
        scene_graphs_file: File name of the scene graphs. (default: ``"scene_graphs.json"``)
        image_data_file: File name of the image sizes. (default: ``"image_data.json"``)
        transform, pre_transform, pre_filter, force_reload: as in every PyG dataset (the transforms guarded
            by :class:`~pyg_scenegraph.transforms.SceneGraphTransform`).

    Raises:
        ValueError: if no image survives the vocabularies, or a relation names an unknown object id.
    """

    def __init__(
        self,
        root: str,
        objects: Vocabulary | Sequence[str] | None = None,
        predicates: Vocabulary | Sequence[str] | None = None,
        num_object_classes: int | None = None,
        num_predicate_classes: int | None = None,
        filter_empty_rels: bool = True,
        scene_graphs_file: str = "scene_graphs.json",
        image_data_file: str = "image_data.json",
        transform: Callable | None = None,
        pre_transform: Callable | None = None,
        force_reload: bool = False,
        filter_duplicate_rels: bool = True,
        default_features: bool = True,
        pre_filter: Callable | None = None,
    ) -> None:
        self.scene_graphs_file = scene_graphs_file
        self.image_data_file = image_data_file
        super().__init__(
            root, objects, predicates, num_object_classes, num_predicate_classes, filter_empty_rels,
            transform, pre_transform, force_reload, filter_duplicate_rels, default_features, pre_filter,
        )  # fmt: skip

    @property
    def raw_file_names(self) -> list[str]:
        r"""The annotation files expected in ``raw_dir``."""
        return [self.scene_graphs_file]

    def _stem(self) -> str:
        return osp.splitext(self.scene_graphs_file)[0]

    def _scenes(self) -> list[_Scene]:
        with open(self.raw_paths[0]) as f:
            graphs = json.load(f)
        scenes: list[_Scene] = []
        sizes: dict[int, tuple[float, float]] = {}
        image_data = osp.join(self.raw_dir, self.image_data_file)
        if osp.exists(image_data):
            with open(image_data) as f:
                sizes = {
                    int(im["image_id"]): (float(im["width"]), float(im["height"])) for im in json.load(f)
                }
        for graph in graphs:
            image_id = int(graph["image_id"])
            position = {int(obj["object_id"]): i for i, obj in enumerate(graph["objects"])}
            names = [
                normalize_name(obj["names"][0] if obj.get("names") else obj.get("name", ""))
                for obj in graph["objects"]
            ]
            boxes = [
                [float(o["x"]), float(o["y"]), float(o["x"]) + float(o["w"]), float(o["y"]) + float(o["h"])]
                for o in graph["objects"]
            ]
            relations = []
            for rel in graph.get("relationships", []):
                s, o = int(rel["subject_id"]), int(rel["object_id"])
                if s not in position or o not in position:
                    raise ValueError(
                        f"VisualGenomeSceneGraphs: image {image_id} has a relation to an unknown object id"
                    )
                relations.append((position[s], position[o], normalize_name(rel["predicate"])))
            size = sizes.get(image_id)
            if size is None:
                size = (max((b[2] for b in boxes), default=1.0), max((b[3] for b in boxes), default=1.0))
            scenes.append((image_id, names, boxes, relations, size))
        return scenes

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({len(self)})"


class GQASceneGraphs(_RawSceneGraphs):
    r"""GQA scene graphs as :class:`~pyg_scenegraph.SceneGraphData`, with vocabulary building.

    Reads `GQA <https://cs.stanford.edu/people/dorarad/gqa/>`_ ``{split}_sceneGraphs.json``.

    The JSON maps an image id to ``width``, ``height`` and ``objects`` (object id → ``name``, ``x``, ``y``,
    ``w``, ``h`` and outgoing ``relations`` ``[{"object": id, "name": predicate}]``). The energy-based paper
    uses the 200 most frequent objects and 100 most frequent predicates, the defaults here.

    Args:
        root: Root directory; the JSON file in ``root/raw``.
        split: ``"train"`` or ``"val"``: reads ``{split}_sceneGraphs.json`` unless ``file_name`` is given.
        objects, predicates: Optional vocabularies (names, without background).
        num_object_classes: Size of a built object vocabulary. (default: ``200``)
        num_predicate_classes: Size of a built predicate vocabulary. (default: ``100``)
        filter_empty_rels: Drop images without relations. (default: ``True``)
        filter_duplicate_rels: Keep the first predicate of each ``(subject, object)`` pair.
            (default: ``True``)
        default_features: Add :class:`~pyg_scenegraph.ObjectFeatures` as ``x`` on access. (default: ``True``)
        file_name: Explicit file name in ``root/raw``.
        transform, pre_transform, pre_filter, force_reload: as in every PyG dataset (the transforms guarded
            by :class:`~pyg_scenegraph.transforms.SceneGraphTransform`).

    Raises:
        ValueError: for an unknown split, a relation to an unknown object, or no surviving image.
    """

    default_sizes = (200, 100)

    def __init__(
        self,
        root: str,
        split: str = "train",
        objects: Vocabulary | Sequence[str] | None = None,
        predicates: Vocabulary | Sequence[str] | None = None,
        num_object_classes: int | None = None,
        num_predicate_classes: int | None = None,
        filter_empty_rels: bool = True,
        file_name: str | None = None,
        transform: Callable | None = None,
        pre_transform: Callable | None = None,
        force_reload: bool = False,
        filter_duplicate_rels: bool = True,
        default_features: bool = True,
        pre_filter: Callable | None = None,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"GQASceneGraphs: 'split' must be 'train' or 'val' (got {split!r})")
        self.split = split
        self.file_name = file_name or f"{split}_sceneGraphs.json"
        super().__init__(
            root, objects, predicates, num_object_classes, num_predicate_classes, filter_empty_rels,
            transform, pre_transform, force_reload, filter_duplicate_rels, default_features, pre_filter,
        )  # fmt: skip

    @property
    def raw_file_names(self) -> list[str]:
        r"""The annotation files expected in ``raw_dir``."""
        return [self.file_name]

    def _stem(self) -> str:
        return osp.splitext(self.file_name)[0]

    def _scenes(self) -> list[_Scene]:
        with open(self.raw_paths[0]) as f:
            graphs = json.load(f)
        scenes = []
        for image_id, graph in graphs.items():
            ids = list(graph["objects"])
            position = {oid: i for i, oid in enumerate(ids)}
            objs = [graph["objects"][oid] for oid in ids]
            names = [normalize_name(o["name"]) for o in objs]
            boxes = [
                [float(o["x"]), float(o["y"]), float(o["x"]) + float(o["w"]), float(o["y"]) + float(o["h"])]
                for o in objs
            ]
            relations = []
            for oid, obj in zip(ids, objs, strict=True):
                for rel in obj.get("relations", []):
                    if rel["object"] not in position:
                        raise ValueError(
                            f"GQASceneGraphs: image {image_id} has a relation to an unknown object id"
                        )
                    relations.append((position[oid], position[rel["object"]], normalize_name(rel["name"])))
            scenes.append(
                (image_id, names, boxes, relations, (float(graph["width"]), float(graph["height"])))
            )
        return scenes

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({len(self)}, split={self.split!r})"
