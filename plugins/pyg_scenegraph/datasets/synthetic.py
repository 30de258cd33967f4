r"""Synthetic scenes whose relations follow exactly from geometry, with a long-tailed predicate distribution.

Each scene is a set of boxes in an image. Objects are placed by simple generative moves (free, stacked on a
surface, put inside a container, ridden, held, looked at), and then **every** ordered pair is labelled by
fixed geometric rules, highest priority first — so the ground truth is a deterministic function of the
boxes, the classes and one hidden per-object attribute (the direction an agent faces). The predicates come
out long-tailed (``near``/``above``/``below`` dominate; ``riding``, ``holding``, ``inside`` are rare), as
in Visual Genome. Visual features ``x`` are a noisy rendering of the class and of the hidden facing
direction: a PredCls model must read the facing direction from ``x`` to tell ``looking at`` from
``beside``, and an SGCls model must read the class from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch_geometric.data import InMemoryDataset

from ..data import SceneGraphData
from ..transforms import SceneGraphTransform

__all__ = ["SyntheticSceneGraphs"]

#: Object classes (index 0 is background). Roles drive both the placement moves and the rules.
OBJECT_CLASSES = (
    "__background__", "person", "dog", "horse", "table", "shelf", "box", "basket", "cup", "ball", "book",
    "tree", "lamp",
)  # fmt: skip
#: Predicates in rule priority (index 0 = no relation).
PREDICATES = (
    "__background__", "riding", "holding", "inside", "on", "looking at", "behind", "beside", "above",
    "below", "near",
)  # fmt: skip
_AGENTS = {1, 2}
_RIDABLE = {3}
_SURFACES = {4, 5, 3}
_CONTAINERS = {6, 7}
_SMALL = {8, 9, 10}
_BACKDROPS = {11}
#: Long-tailed class prior of freely placed objects.
_CLASS_PRIOR = torch.tensor([0, 6, 3, 1.2, 3, 2, 1.5, 1.2, 3, 2, 2, 2.5, 2.0])


def _rule(s: int, o: int, cls: Tensor, box: Tensor, facing: Tensor, size: tuple[float, float]) -> int:
    """The predicate of the ordered pair (s, o): the first rule that holds, else 0."""
    width, height = size
    sx1, sy1, sx2, sy2 = box[s].tolist()
    ox1, oy1, ox2, oy2 = box[o].tolist()
    cs, co = int(cls[s]), int(cls[o])
    overlap_x = min(sx2, ox2) - max(sx1, ox1)
    overlap_y = min(sy2, oy2) - max(sy1, oy1)
    gap_x = max(ox1 - sx2, sx1 - ox2, 0.0)
    gap_y = max(oy1 - sy2, sy1 - oy2, 0.0)
    gap = math.hypot(gap_x, gap_y)
    scx, scy, ocx, ocy = (sx1 + sx2) / 2, (sy1 + sy2) / 2, (ox1 + ox2) / 2, (oy1 + oy2) / 2
    s_w, o_w = sx2 - sx1, ox2 - ox1
    faces_o = (ocx - scx) * float(facing[s]) > 0
    tol = 0.02 * height
    if cs == 1 and co in _RIDABLE and overlap_x > 0.5 * s_w and oy1 - tol <= sy2 <= (oy1 + oy2) / 2:
        return 1  # riding
    if cs == 1 and co in _SMALL and overlap_x > 0 and overlap_y > 0 and faces_o and o_w < s_w:
        return 2  # holding
    if co in _CONTAINERS and sx1 >= ox1 and sx2 <= ox2 and sy1 >= oy1 and sy2 <= oy2:
        return 3  # inside
    if co in _SURFACES and abs(sy2 - oy1) <= tol and overlap_x > 0.5 * min(s_w, o_w) and s_w < o_w * 1.2:
        return 4  # on
    if cs in _AGENTS and faces_o and overlap_x <= 0 and abs(scy - ocy) < 0.12 * height and gap < 0.2 * width:
        return 5  # looking at
    if cs in _BACKDROPS and overlap_x > 0.5 * o_w and overlap_y > 0 and sy1 < oy1:
        return 6  # behind (a backdrop behind an object in front of it)
    if overlap_x <= 0 and gap < 0.06 * width and abs(sy2 - oy2) < 0.05 * height:
        return 7  # beside: side by side on the same ground line
    if overlap_x > 0.3 * min(s_w, o_w) and sy2 < oy1 and gap < 0.25 * height:
        return 8  # above
    if overlap_x > 0.3 * min(s_w, o_w) and sy1 > oy2 and gap < 0.25 * height:
        return 9  # below
    if (overlap_x <= 0 or overlap_y <= 0) and gap < 0.03 * width:
        return 10  # near
    return 0


def _make_scene(
    g: torch.Generator, prototypes: Tensor, facing_direction: Tensor, noise: float
) -> SceneGraphData:
    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    width, height = round(uniform(480, 640)), round(uniform(360, 480))
    num_objects = int(torch.randint(5, 11, (), generator=g))
    classes: list[int] = []
    boxes: list[list[float]] = []
    facing: list[float] = []

    def add(c: int, b: list[float], face: float = 0.0) -> None:
        x1, y1, x2, y2 = b
        x1, x2 = max(0.0, min(x1, width - 2.0)), max(1.0, min(x2, width - 1.0))
        y1, y2 = max(0.0, min(y1, height - 2.0)), max(1.0, min(y2, height - 1.0))
        classes.append(c)
        boxes.append([round(x1), round(y1), max(round(x2), round(x1) + 1), max(round(y2), round(y1) + 1)])
        facing.append(face if c in _AGENTS else 0.0)

    def free(c: int) -> None:
        w = uniform(0.08, 0.3) * width * (2.0 if c in _BACKDROPS | {4, 3} else 1.0)
        h = uniform(0.1, 0.35) * height * (1.8 if c in _BACKDROPS | {1, 5} else 1.0)
        ground = uniform(0.55, 0.98) * height
        x1 = uniform(0, max(1.0, width - w))
        add(c, [x1, ground - h, x1 + w, ground], 1.0 if torch.rand((), generator=g) < 0.5 else -1.0)

    while len(classes) < num_objects:
        move = float(torch.rand((), generator=g))
        hosts = list(range(len(classes)))
        if move < 0.15 and any(classes[i] in _SURFACES for i in hosts):  # stack a small object on a surface
            host = next(i for i in reversed(hosts) if classes[i] in _SURFACES)
            hx1, hy1, hx2, _ = boxes[host]
            c = int(
                torch.multinomial(torch.tensor([0.0, 0, 0, 0, 0, 0, 1, 1, 2, 1.5, 1.5, 0, 1]), 1, generator=g)
            )
            w = min(uniform(0.2, 0.5) * (hx2 - hx1), 0.2 * width)
            x1 = uniform(hx1, hx2 - w)
            add(c, [x1, hy1 - uniform(0.08, 0.18) * height, x1 + w, hy1])
        elif move < 0.22 and any(
            classes[i] in _CONTAINERS for i in hosts
        ):  # put something inside a container
            host = next(i for i in reversed(hosts) if classes[i] in _CONTAINERS)
            hx1, hy1, hx2, hy2 = boxes[host]
            c = int(torch.multinomial(torch.tensor([0.0] * 8 + [1, 1, 1, 0, 0]), 1, generator=g))
            w, h = uniform(0.3, 0.6) * (hx2 - hx1), uniform(0.3, 0.6) * (hy2 - hy1)
            x1, y1 = uniform(hx1 + 1, hx2 - w - 1), uniform(hy1 + 1, hy2 - h - 1)
            add(c, [x1, y1, x1 + w, y1 + h])
        elif move < 0.30 and any(classes[i] in _RIDABLE for i in hosts):  # a person rides a horse
            host = next(i for i in reversed(hosts) if classes[i] in _RIDABLE)
            hx1, hy1, hx2, hy2 = boxes[host]
            w = 0.5 * (hx2 - hx1)
            x1 = uniform(hx1, hx2 - w)
            bottom = hy1 + uniform(0.05, 0.4) * (hy2 - hy1)
            add(
                1,
                [x1, bottom - uniform(0.2, 0.3) * height, x1 + w, bottom],
                1.0 if uniform(0, 1) < 0.5 else -1.0,
            )
        elif move < 0.38 and any(classes[i] == 1 for i in hosts):  # an agent holds or looks at a small object
            host = next(i for i in reversed(hosts) if classes[i] == 1)
            hx1, hy1, hx2, hy2 = boxes[host]
            side = facing[host]
            w, h = 0.4 * (hx2 - hx1), uniform(0.05, 0.1) * height
            held = uniform(0, 1) < 0.5
            cx = (hx2 if side > 0 else hx1) - side * (0.1 * w if held else -uniform(0.5, 4.0) * w)
            cy = (hy1 + hy2) / 2 + uniform(-0.1, 0.1) * (hy2 - hy1)
            c = int(torch.multinomial(torch.tensor([0.0] * 8 + [1, 1, 1, 0, 0]), 1, generator=g))
            add(c, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        else:
            free(int(torch.multinomial(_CLASS_PRIOR, 1, generator=g)))

    cls = torch.tensor(classes)
    box = torch.tensor(boxes, dtype=torch.float)
    face = torch.tensor(facing)
    pairs, labels = [], []
    for s in range(len(classes)):
        for o in range(len(classes)):
            if s != o:
                p = _rule(s, o, cls, box, face, (float(width), float(height)))
                if p:
                    pairs.append((s, o))
                    labels.append(p)
    edge_index = torch.tensor(pairs, dtype=torch.long).view(-1, 2).t().contiguous()
    x = (
        prototypes[cls]
        + face.view(-1, 1) * facing_direction
        + noise * torch.randn(len(classes), prototypes.size(1), generator=g)
    )
    return SceneGraphData(
        x=x,
        y=cls,
        box=box,
        image_size=torch.tensor([[width, height]]),
        edge_index=edge_index,
        edge_predicate=torch.tensor(labels, dtype=torch.long),
        facing=face,
    )


class SyntheticSceneGraphs(InMemoryDataset):
    r"""Procedurally generated scene graphs with exact, geometry-defined relations (see the module docs).

    Each graph also stores the hidden ground truth ``facing`` ``[N]`` (+1 right, -1 left, 0 for non-agents),
    for analysis only: a model sees it only through ``x``.

    Object classes: ``SyntheticSceneGraphs.object_classes`` (12 + background); predicates:
    ``SyntheticSceneGraphs.predicates`` (10 + background). Images without relations are dropped.

    Args:
        num_graphs: Number of scenes. (default: ``1000``)
        seed: Seed of the scenes (use different seeds for train and test splits). (default: ``0``)
        feature_dim: Size of the visual feature ``x``. (default: ``32``)
        feature_noise: Standard deviation of the feature noise; class prototypes and the facing direction
            have unit-scale entries. (default: ``0.5``)
        world_seed: Seed of the class prototypes and facing direction, shared by all splits.
            (default: ``12345``)
        transform: PyG transform applied on access (guarded by
            :class:`~pyg_scenegraph.transforms.SceneGraphTransform`).
        pre_transform: PyG transform applied once after generation (guarded likewise).

    Raises:
        ValueError: for a non-positive size or negative noise.
    """

    object_classes = OBJECT_CLASSES
    predicates = PREDICATES

    def __init__(
        self,
        num_graphs: int = 1000,
        seed: int = 0,
        feature_dim: int = 32,
        feature_noise: float = 0.5,
        world_seed: int = 12345,
        transform: Callable | None = None,
        pre_transform: Callable | None = None,
    ) -> None:
        if num_graphs <= 0 or feature_dim <= 0:
            raise ValueError(
                "SyntheticSceneGraphs needs positive 'num_graphs' and 'feature_dim' "
                f"(got {num_graphs}, {feature_dim})"
            )
        if feature_noise < 0:
            raise ValueError(f"SyntheticSceneGraphs needs 'feature_noise' >= 0 (got {feature_noise})")
        super().__init__(None, SceneGraphTransform.wrap(transform))
        pre_transform = SceneGraphTransform.wrap(pre_transform)
        self.seed = seed
        world = torch.Generator().manual_seed(world_seed)
        prototypes = torch.randn(len(OBJECT_CLASSES), feature_dim, generator=world)
        facing_direction = torch.randn(feature_dim, generator=world)
        g = torch.Generator().manual_seed(seed)
        data_list: list[SceneGraphData] = []
        while len(data_list) < num_graphs:
            data = _make_scene(g, prototypes, facing_direction, feature_noise)
            if data.edge_predicate.numel() > 0:
                data_list.append(data if pre_transform is None else pre_transform(data))
        self.data, self.slices = self.collate(data_list)

    @property
    def num_object_classes(self) -> int:
        """Object classes including background."""
        return len(OBJECT_CLASSES)

    @property
    def num_predicate_classes(self) -> int:
        """Predicate classes including background."""
        return len(PREDICATES)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({len(self)}, seed={self.seed})"
