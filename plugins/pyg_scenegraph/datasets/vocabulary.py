r"""Object and predicate vocabularies for scene-graph annotations, and encoding of one annotated image."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..data import SceneGraphData

__all__ = ["Vocabulary", "encode_scene", "normalize_name"]


def normalize_name(name: str) -> str:
    """Lower-case, trim and collapse whitespace (``"  Parked  On "`` → ``"parked on"``)."""
    return re.sub(r"\s+", " ", name.strip().lower())


class Vocabulary:
    """A 1-based vocabulary, id 0 = ``"__background__"`` (VG150's ``idx_to_label``/``idx_to_predicate``).

    Args:
        names: The class names in id order (ids ``1..len(names)``).

    Raises:
        ValueError: for an empty list or duplicate names.
    """

    background = "__background__"

    def __init__(self, names: Sequence[str]) -> None:
        names = [normalize_name(n) for n in names]
        if not names:
            raise ValueError("Vocabulary needs at least one name")
        if len(set(names)) != len(names):
            raise ValueError("Vocabulary names must be unique after normalisation")
        self.names = [self.background, *names]
        self.index = {n: i for i, n in enumerate(self.names)}

    @classmethod
    def build(cls, names: Iterable[str], max_size: int | None = None, min_count: int = 1) -> Vocabulary:
        """The ``max_size`` most frequent names seen at least ``min_count`` times (ties: alphabetical).

        Raises:
            ValueError: if no name qualifies.
        """
        counts = Counter(normalize_name(n) for n in names)
        ranked = sorted((n for n, c in counts.items() if c >= min_count), key=lambda n: (-counts[n], n))
        if not ranked:
            raise ValueError("Vocabulary.build: no name occurs often enough")
        return cls(ranked[:max_size] if max_size is not None else ranked)

    @classmethod
    def from_vg150_dicts(cls, path: str | Path) -> tuple[Vocabulary, Vocabulary]:
        """Object and predicate vocabularies of a ``VG-SGG-dicts-with-attri.json`` file.

        Raises:
            ValueError: if the file lacks ``idx_to_label``/``idx_to_predicate`` or its ids are not ``1..K``.
        """
        with open(path) as f:
            dicts = json.load(f)
        out = []
        for key in ("idx_to_label", "idx_to_predicate"):
            if key not in dicts:
                raise ValueError(f"{path}: missing '{key}'")
            table = {int(k): v for k, v in dicts[key].items()}
            if sorted(table) != list(range(1, len(table) + 1)):
                raise ValueError(f"{path}: '{key}' ids must be 1..{len(table)}")
            out.append(cls([table[i] for i in range(1, len(table) + 1)]))
        return out[0], out[1]

    def __len__(self) -> int:
        """Number of classes **including** background."""
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return (
            isinstance(name, str)
            and normalize_name(name) in self.index
            and normalize_name(name) != self.background
        )

    def __getitem__(self, name: str) -> int:
        return self.index[normalize_name(name)]

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({len(self) - 1} names + background)"


def encode_scene(
    names: Sequence[str],
    boxes: Sequence[Sequence[float]],
    relations: Sequence[tuple[int, int, str]],
    image_size: tuple[float, float],
    objects: Vocabulary,
    predicates: Vocabulary,
) -> SceneGraphData | None:
    """Encode one annotated image, dropping objects and predicates outside the vocabularies.

    Args:
        names: object names.
        boxes: object boxes ``(x1, y1, x2, y2)``.
        relations: ``(subject position, object position, predicate name)`` into ``names``.
        image_size: ``(width, height)``.
        objects: object vocabulary.
        predicates: predicate vocabulary.

    Returns:
        The graph, or ``None`` when no object survives.
    """
    keep = [i for i, n in enumerate(names) if n in objects]
    if not keep:
        return None
    new_id = {old: new for new, old in enumerate(keep)}
    rels = [
        (new_id[s], new_id[o], predicates[p])
        for s, o, p in relations
        if s in new_id and o in new_id and p in predicates
    ]
    edge = torch.tensor([(s, o) for s, o, _ in rels], dtype=torch.long).view(-1, 2).t().contiguous()
    return SceneGraphData(
        y=torch.tensor([objects[names[i]] for i in keep], dtype=torch.long),
        box=torch.tensor([list(boxes[i]) for i in keep], dtype=torch.float).view(-1, 4),
        image_size=torch.tensor([[image_size[0], image_size[1]]], dtype=torch.float),
        edge_index=edge,
        edge_predicate=torch.tensor([p for _, _, p in rels], dtype=torch.long),
    )
