r"""Scene graphs with Visual Genome's predicate bias: generic labels, context-determined specific ones.

:class:`BiasedSceneGraphs` reproduces the three properties of Visual Genome that energy-based scene-graph
learning (`Suhail et al., CVPR 2021 <https://arxiv.org/abs/2103.02221>`_) is meant to fix:

1. **A long tail whose head predicates are generic parents of tail ones.** Three *families*: ``on`` →
   ``parked on``, ``placed on``, ``standing on``, ``lying on``, ``sitting on``, ``mounted on``,
   ``hanging on``; ``has`` → ``carrying``, ``using``, ``wearing``, ``playing with``, ``holding``; ``near``
   → ``walking past``, ``standing by``, ``next to``, ``looking at``, ``facing``, ``walking near``; plus
   three stand-alone predicates (``in``, ``behind``, ``under``) without children: 24 predicates.
2. **Annotation bias towards the generic label**, in every split: a family relation whose true predicate
   is the specific child :math:`c` is annotated as its parent :math:`\pi(c)` with probability
   :math:`q` (``generic_rate``) and as :math:`c` otherwise. The true child is kept for analysis in
   ``edge_true_predicate``; models are trained and evaluated on ``edge_predicate``.
3. **The specific predicate is a function of the graph context, not of the pair.** Each scene has a hidden
   type :math:`t \in` {street, kitchen, park, bedroom, beach, office, farm}. The true child is

   .. math::
       c = \begin{cases} \texttt{holding} & \pi = \texttt{has} \text{ and the subject is the subject of
           an } \texttt{on}\text{-family relation} \\ T[\pi, t] & \text{otherwise,} \end{cases}

   with the table :math:`T` of :data:`CHILD_TABLE`. The pair's own classes, boxes and features are drawn
   independently of :math:`t`, so they do not determine :math:`c`; :math:`t` is readable only from the
   *other* objects of the scene: two or three *context objects* of the type's signature classes
   (:data:`SIGNATURES`), plus with probability ``distractor_rate`` one signature object of another type
   (so :math:`t` is the majority signature type, never a single object's class), and ``holding`` needs
   the subject's other relations.

Scene layout (image :math:`W \times H`, :math:`W \sim U[500, 700]`, :math:`H \sim U[380, 520]`): context
objects are large boxes; 2–4 agents, 2–5 hand-held items and 1–3 supports are placed so that each
relation has its family's geometry (``on``: the subject stands on the support's top edge; ``has``: the
item overlaps the agent's box; ``near``: an agent beside the nearest other agent or support), which all
children of a family share. Stand-alone relations are geometric and annotated sparsely (probability
0.4), as VG's annotations are. Node features are a noisy rendering of the class,
:math:`\mathbf{x}_i = \mathbf{p}_{y_i} + \sigma\,\boldsymbol\epsilon`, with prototypes
:math:`\mathbf{p} \sim \mathcal{N}(0, I)` shared by all splits (``world_seed``): PredCls is given the
labels, SGCls must read them from :math:`\mathbf{x}` (and the box).
"""

from __future__ import annotations

import hashlib
import os.path as osp
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor
from torch_geometric.data import InMemoryDataset

from ..data import SceneGraphData
from ..transforms import SceneGraphTransform

__all__ = ["BiasedSceneGraphs"]

_T = TypeVar("_T")

#: Hidden scene types; each has three signature (context) object classes.
SCENE_TYPES = ("street", "kitchen", "park", "bedroom", "beach", "office", "farm")
SIGNATURES = (
    ("road", "car", "sign"), ("counter", "oven", "sink"), ("grass", "tree", "fence"),
    ("bed", "lamp", "pillow"), ("sand", "wave", "boat"), ("desk", "computer", "shelf"),
    ("barn", "hay", "cow"),
)  # fmt: skip
AGENTS = ("person", "man", "woman", "child", "dog")
ITEMS = ("hat", "shirt", "bag", "cup", "phone", "ball", "umbrella", "book")
SUPPORTS = ("chair", "bench", "table", "bike", "box")
OBJECT_CLASSES = ("__background__", *AGENTS, *ITEMS, *SUPPORTS, *(c for sig in SIGNATURES for c in sig))

#: Specific child of each generic parent per scene type (``has`` → ``holding`` overrides, see the docs).
CHILD_TABLE = {
    "on": ("parked on", "placed on", "standing on", "lying on", "sitting on", "mounted on", "hanging on"),
    "has": ("carrying", "using", "wearing", "wearing", "wearing", "using", "playing with"),
    "near": ("walking past", "standing by", "next to", "next to", "looking at", "facing", "walking near"),
}
HEADS = ("on", "has", "near")
STANDALONE = ("in", "behind", "under")
_TAILS = tuple(dict.fromkeys([c for p in HEADS for c in CHILD_TABLE[p]] + ["holding"]))
PREDICATES = ("__background__", *HEADS, *_TAILS, *STANDALONE)
#: ``PARENT[p]``: the generic parent of predicate id ``p`` (heads and stand-alone predicates: ``p`` itself).
PARENT = tuple(
    next((PREDICATES.index(h) for h in HEADS if name in CHILD_TABLE[h] or (h, name) == ("has", "holding")), i)
    for i, name in enumerate(PREDICATES)
)

_CLS = {name: i for i, name in enumerate(OBJECT_CLASSES)}
_PRED = {name: i for i, name in enumerate(PREDICATES)}


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """An integer in ``[lo, hi]``."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def _choice(g: torch.Generator, options: Sequence[_T]) -> _T:
    return options[_randint(g, 0, len(options) - 1)]


def _make_scene(
    g: torch.Generator, prototypes: Tensor, noise: float, generic_rate: float, distractor_rate: float
) -> SceneGraphData:
    width, height = _uniform(g, 500, 700), _uniform(g, 380, 520)
    scene = _randint(g, 0, len(SCENE_TYPES) - 1)
    classes: list[int] = []
    boxes: list[list[float]] = []

    def add(name: str, cx: float, bottom: float, w: float, h: float) -> int:
        x1 = min(max(cx - w / 2, 0.0), width - w - 1)
        y2 = min(max(bottom, h + 1), height - 1)
        classes.append(_CLS[name])
        boxes.append([round(x1), round(y2 - h), round(x1 + w), round(y2)])
        return len(classes) - 1

    # context objects: 2-3 of the scene's signature, optionally one distractor from another type
    context = [str(_choice(g, SIGNATURES[scene])) for _ in range(_randint(g, 2, 3))]
    if _uniform(g, 0, 1) < distractor_rate:
        other = (scene + _randint(g, 1, len(SCENE_TYPES) - 1)) % len(SCENE_TYPES)
        context.append(str(_choice(g, SIGNATURES[other])))
    context_ids = [
        add(name, _uniform(g, 0, width), _uniform(g, 0.4, 1.0) * height,
            _uniform(g, 0.25, 0.55) * width, _uniform(g, 0.2, 0.5) * height)
        for name in context
    ]  # fmt: skip
    supports = [
        add(str(_choice(g, SUPPORTS)), _uniform(g, 0.1, 0.9) * width, _uniform(g, 0.7, 0.98) * height,
            _uniform(g, 0.12, 0.22) * width, _uniform(g, 0.08, 0.16) * height)
        for _ in range(_randint(g, 1, 3))
    ]  # fmt: skip
    relations: dict[tuple[int, int], int] = {}  # (subject, object) -> true predicate
    on_subjects: set[int] = set()
    agents = []
    for _ in range(_randint(g, 2, 4)):
        w, h = _uniform(g, 0.07, 0.12) * width, _uniform(g, 0.2, 0.32) * height
        if _uniform(g, 0, 1) < 0.5:  # on a support: stands on its top edge
            sup = int(_choice(g, supports))
            sx1, sy1, sx2, _ = boxes[sup]
            a = add(str(_choice(g, AGENTS)), _uniform(g, sx1, sx2), sy1 + 2, w, h)
            relations[(a, sup)] = _PRED[CHILD_TABLE["on"][scene]]
            on_subjects.add(a)
        else:
            a = add(
                str(_choice(g, AGENTS)),
                _uniform(g, 0.05, 0.95) * width,
                _uniform(g, 0.6, 0.98) * height,
                w,
                h,
            )
        agents.append(a)
    for _ in range(_randint(g, 2, 5)):
        w, h = _uniform(g, 0.03, 0.06) * width, _uniform(g, 0.04, 0.08) * height
        move, name = _uniform(g, 0, 1), str(_choice(g, ITEMS))
        if move < 0.5:  # an agent has it: inside the agent's box
            owner = int(_choice(g, agents))
            ax1, ay1, ax2, ay2 = boxes[owner]
            i = add(name, _uniform(g, ax1, ax2), _uniform(g, ay1 + h, ay2), w, h)
            relations[(owner, i)] = -_PRED["has"]  # resolved below (holding needs every on-relation)
        elif move < 0.8:  # on a support
            sup = int(_choice(g, supports))
            sx1, sy1, sx2, _ = boxes[sup]
            i = add(name, _uniform(g, sx1, sx2), sy1 + 1, w, h)
            relations[(i, sup)] = _PRED[CHILD_TABLE["on"][scene]]
        elif move < 0.9:  # under a support
            sup = int(_choice(g, supports))
            sx1, _, sx2, sy2 = boxes[sup]
            i = add(name, _uniform(g, sx1, sx2), sy2 + h + 2, w, h)
            if _uniform(g, 0, 1) < 0.4:
                relations[(i, sup)] = _PRED["under"]
        else:
            add(name, _uniform(g, 0, width), _uniform(g, 0.5, 1.0) * height, w, h)
    for key, p in list(relations.items()):
        if p == -_PRED["has"]:
            child = "holding" if key[0] in on_subjects else CHILD_TABLE["has"][scene]
            relations[key] = _PRED[child]
    box = torch.tensor(boxes, dtype=torch.float)
    centre = (box[:, :2] + box[:, 2:]) / 2
    for a in agents:  # near: the closest other agent or support, when beside it and otherwise unrelated
        others = [
            o for o in agents + supports if o != a and (a, o) not in relations and (o, a) not in relations
        ]
        if not others or _uniform(g, 0, 1) > 0.6:
            continue
        o = min(others, key=lambda j: float((centre[j] - centre[a]).norm()))
        if float((centre[o] - centre[a]).abs()[0]) < 0.3 * width:
            relations[(a, o)] = _PRED[CHILD_TABLE["near"][scene]]
        for c in context_ids:  # stand-alone, sparse: in / behind a context object
            cx1, cy1, cx2, cy2 = boxes[c]
            inside = cx1 <= centre[a, 0] <= cx2 and cy1 <= centre[a, 1] <= cy2
            if inside and (a, c) not in relations and _uniform(g, 0, 1) < 0.4:
                relations[(a, c)] = _PRED["in"]
            elif not inside and cx1 <= centre[a, 0] <= cx2 and cy1 < boxes[a][1] and _uniform(g, 0, 1) < 0.4:
                relations[(c, a)] = _PRED["behind"]

    pairs = sorted(relations)
    true = torch.tensor([relations[k] for k in pairs], dtype=torch.long)
    parent = torch.tensor(PARENT)[true]
    generic = (parent != true) & (torch.rand(true.numel(), generator=g) < generic_rate)
    cls = torch.tensor(classes)
    x = prototypes[cls] + noise * torch.randn(len(classes), prototypes.size(1), generator=g)
    return SceneGraphData(
        x=x,
        y=cls,
        box=box,
        image_size=torch.tensor([[round(width), round(height)]]),
        edge_index=torch.tensor(pairs, dtype=torch.long).view(-1, 2).t().contiguous(),
        edge_predicate=torch.where(generic, parent, true),
        edge_true_predicate=true,
        scene_type=torch.tensor([scene]),
    )


class BiasedSceneGraphs(InMemoryDataset):
    r"""Scene graphs with VG's predicate bias and a known ground truth (see the module docs).

    Fields: ``x`` ``[N, feature_dim]``, ``y`` (1-based classes), ``box`` (xyxy pixels), ``image_size``,
    ``edge_index`` / ``edge_predicate`` (the *annotated* relations, biased towards generic parents), and the
    hidden truth for analysis: ``edge_true_predicate`` ``[R]`` (the specific predicate before annotation) and
    ``scene_type`` ``[1]`` (index into :data:`SCENE_TYPES`). Class attributes: ``object_classes``,
    ``predicates``, ``parent`` (``parent[p]`` = generic parent id of predicate ``p``), ``head_predicates``,
    ``tail_predicates``, ``standalone_predicates``, ``scene_types``.

    Args:
        root: Optional folder to cache the generated graphs in (``processed/``); ``None`` keeps them in
            memory only. (default: ``None``)
        num_graphs: Number of scenes. (default: ``1000``)
        seed: Seed of the scenes (different seeds for train and test splits). (default: ``0``)
        generic_rate: Probability :math:`q` that a family relation is annotated with its generic parent.
            (default: ``0.75``: a CE ``RelationPredictor`` then has VG's PredCls profile, R@50 / mR@50
            = 4.3 against Motifs' 65.2 / 14.8 = 4.4 on VG150)
        distractor_rate: Probability of one context object of another scene type. (default: ``0.3``)
        feature_dim: Size of ``x``. (default: ``32``)
        feature_noise: :math:`\sigma` of the feature noise (prototypes have unit-variance entries).
            (default: ``2.0``; a nearest-class-mean classifier reads 67 % of the classes)
        world_seed: Seed of the class prototypes, shared by all splits. (default: ``12345``)
        transform: PyG transform applied on access (guarded by
            :class:`~pyg_scenegraph.transforms.SceneGraphTransform`).
        pre_transform: PyG transform applied once after generation (guarded likewise).
        force_reload: Regenerate even if ``root`` holds a cached copy. (default: ``False``)

    Raises:
        ValueError: for a non-positive ``num_graphs`` or ``feature_dim``, rates outside ``[0, 1]`` or a
            negative ``feature_noise``.
    """

    object_classes = OBJECT_CLASSES
    predicates = PREDICATES
    parent = PARENT
    scene_types = SCENE_TYPES
    head_predicates = tuple(_PRED[p] for p in HEADS)
    tail_predicates = tuple(_PRED[p] for p in _TAILS)
    standalone_predicates = tuple(_PRED[p] for p in STANDALONE)

    def __init__(
        self,
        root: str | None = None,
        num_graphs: int = 1000,
        seed: int = 0,
        generic_rate: float = 0.75,
        distractor_rate: float = 0.3,
        feature_dim: int = 32,
        feature_noise: float = 2.0,
        world_seed: int = 12345,
        transform: Callable | None = None,
        pre_transform: Callable | None = None,
        force_reload: bool = False,
    ) -> None:
        name = type(self).__name__
        if num_graphs <= 0 or feature_dim <= 0:
            raise ValueError(
                f"{name} needs positive 'num_graphs' and 'feature_dim' (got {num_graphs}, {feature_dim})"
            )
        for arg, value in (("generic_rate", generic_rate), ("distractor_rate", distractor_rate)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: '{arg}' must lie in [0, 1] (got {value})")
        if not feature_noise >= 0:
            raise ValueError(f"{name} needs 'feature_noise' >= 0 (got {feature_noise})")
        self.num_graphs, self.seed, self.world_seed = num_graphs, seed, world_seed
        self.generic_rate, self.distractor_rate = generic_rate, distractor_rate
        self.feature_dim, self.feature_noise = feature_dim, feature_noise
        self._cached = root is not None
        super().__init__(
            root,
            SceneGraphTransform.wrap(transform),
            SceneGraphTransform.wrap(pre_transform),
            force_reload=force_reload,
        )
        if self._cached:
            self.load(self.processed_paths[0], data_cls=SceneGraphData)
        else:
            self.data, self.slices = self.collate(self._generate())

    @property
    def has_process(self) -> bool:
        """Generation is cached under ``root/processed`` only when a ``root`` is given."""
        return self._cached

    @property
    def processed_file_names(self) -> str:
        """One file per setting (size, seeds, rates, features), so that splits can share a ``root``."""
        settings = (self.num_graphs, self.seed, self.generic_rate, self.distractor_rate, self.feature_dim,
                    self.feature_noise, self.world_seed)  # fmt: skip
        return f"biased_{hashlib.sha1(repr(settings).encode()).hexdigest()[:12]}.pt"

    @property
    def raw_file_names(self) -> list[str]:
        """Nothing to download: the graphs are generated."""
        return []

    def process(self) -> None:
        """Generate the graphs and save them to ``processed_paths[0]``."""
        self.save(self._generate(), osp.join(self.processed_dir, self.processed_file_names))

    def _generate(self) -> list[SceneGraphData]:
        world = torch.Generator().manual_seed(self.world_seed)
        prototypes = torch.randn(len(OBJECT_CLASSES), self.feature_dim, generator=world)
        g = torch.Generator().manual_seed(self.seed)
        data_list: list[SceneGraphData] = []
        while len(data_list) < self.num_graphs:
            data = _make_scene(g, prototypes, self.feature_noise, self.generic_rate, self.distractor_rate)
            if data.edge_predicate.numel() > 0:
                data_list.append(data if self.pre_transform is None else self.pre_transform(data))
        return data_list

    @property
    def num_object_classes(self) -> int:
        """Object classes including background."""
        return len(OBJECT_CLASSES)

    @property
    def num_predicate_classes(self) -> int:
        """Predicate classes including background."""
        return len(PREDICATES)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({len(self)}, seed={self.seed}, generic_rate={self.generic_rate})"
