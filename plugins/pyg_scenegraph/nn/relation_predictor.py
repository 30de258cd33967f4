r"""A cross-entropy baseline scene-graph generator in PyG (Motifs-style: context + frequency bias)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Embedding, LayerNorm, Linear, ReLU, Sequential
from torch_geometric.nn import TransformerConv

from ..graphs import all_pairs
from ._checks import check_float_input, check_index

__all__ = ["RelationPredictor"]

_TASKS = ("predcls", "sgcls")


def pair_geometry(box_code: Tensor, pair_index: Tensor) -> Tensor:
    r"""Relative geometry of a pair from the 9-d box codes.

    Both codes and :math:`(\Delta c_x / w_s, \Delta c_y / h_s, \log w_o / w_s, \log h_o / h_s)`.
    """
    sub, obj = box_code[pair_index[0]], box_code[pair_index[1]]
    size_s, size_o = sub[:, 0:2].clamp(min=1e-4), obj[:, 0:2].clamp(min=1e-4)
    delta = torch.cat([(obj[:, 2:4] - sub[:, 2:4]) / size_s, (size_o / size_s).log()], dim=-1)
    return torch.cat([sub, obj, delta], dim=-1)


class RelationPredictor(torch.nn.Module):
    r"""A compact cross-entropy scene-graph generator: the base model that energy-based learning trains.

    Each object is encoded from its visual feature, its box code and (PredCls) its given label; a stack of
    :class:`~torch_geometric.nn.conv.TransformerConv` layers over all object pairs of an image provides
    context (as the BiLSTM of Neural Motifs does); a pair head classifies each proposed pair from both
    context vectors and their relative geometry, plus the frequency bias of `Zellers et al., CVPR 2018
    <https://arxiv.org/abs/1711.06640>`_ — :math:`\log p(\text{predicate} \mid c_s, c_o)` counted on the
    training set, then learned.

    .. math::
        \mathbf{r}_{ij} = \mathrm{MLP}\big([\mathbf{h}_i \Vert \mathbf{h}_j \Vert \phi(\mathbf{b}_i,
            \mathbf{b}_j)]\big) + \mathbf{f}_{c_i, c_j}

    Args:
        in_channels (int): Size of each visual feature.
        num_object_classes (int): Object classes incl. background.
        num_predicate_classes (int): Predicate classes incl. background.
        hidden_channels (int, optional): Width. (default: :obj:`128`)
        num_layers (int, optional): Context layers. (default: :obj:`2`)
        heads (int, optional): Attention heads of each context layer. (default: :obj:`4`)
        task (str, optional): ``"predcls"`` (labels given) or ``"sgcls"`` (labels predicted).
            (default: :obj:`"predcls"`)
        frequency_bias (Tensor, optional): ``[C, C, P]`` predicate counts per (subject, object) class pair
            for the bias initialisation; :obj:`None` disables the bias. (default: :obj:`None`)

    Shapes:
        - **input:** features :math:`(N, F)`, box codes :math:`(N, 9)`, labels :math:`(N)` (PredCls),
          pairs :math:`(2, Q)`, batch :math:`(N)`
        - **output:** relation logits :math:`(Q, P)`, object logits :math:`(N, C)`

    Raises:
        ValueError: for an unknown task, non-positive sizes, or a frequency table of the wrong shape.
    """

    def __init__(
        self,
        in_channels: int,
        num_object_classes: int,
        num_predicate_classes: int,
        hidden_channels: int = 128,
        num_layers: int = 2,
        heads: int = 4,
        task: str = "predcls",
        frequency_bias: Tensor | None = None,
    ) -> None:
        super().__init__()
        if task not in _TASKS:
            raise ValueError(f"RelationPredictor: 'task' must be one of {_TASKS} (got {task!r})")
        if min(in_channels, num_object_classes, num_predicate_classes, hidden_channels, heads) <= 0:
            raise ValueError("RelationPredictor needs positive sizes")
        if hidden_channels % heads:
            raise ValueError(
                f"RelationPredictor: 'hidden_channels' ({hidden_channels}) must divide by 'heads' ({heads})"
            )
        shape = (num_object_classes, num_object_classes, num_predicate_classes)
        if frequency_bias is not None and tuple(frequency_bias.shape) != shape:
            raise ValueError(
                f"RelationPredictor: 'frequency_bias' must be {list(shape)} "
                f"(got {list(frequency_bias.shape)})"
            )
        self.in_channels = in_channels
        self.num_object_classes = num_object_classes
        self.num_predicate_classes = num_predicate_classes
        self.hidden_channels = hidden_channels
        self.task = task

        self.label_embedding = Embedding(num_object_classes, hidden_channels) if task == "predcls" else None
        self.encoder = Sequential(
            Linear(in_channels + 9, hidden_channels), ReLU(), Linear(hidden_channels, hidden_channels)
        )
        self.convs = torch.nn.ModuleList(
            [
                TransformerConv(hidden_channels, hidden_channels // heads, heads=heads)
                for _ in range(num_layers)
            ]
        )
        self.norms = torch.nn.ModuleList([LayerNorm(hidden_channels) for _ in range(num_layers)])
        self.object_head = Linear(hidden_channels, num_object_classes)
        self.pair_head = Sequential(
            Linear(2 * hidden_channels + 22, hidden_channels),
            ReLU(),
            Linear(hidden_channels, num_predicate_classes),
        )
        self.frequency: Embedding | None = None
        if frequency_bias is not None:
            self.frequency = Embedding(num_object_classes * num_object_classes, num_predicate_classes)
            self.register_buffer(
                "_frequency_counts", frequency_bias.float().reshape(-1, num_predicate_classes)
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Re-initialise all learnable parameters."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()  # type: ignore[operator]
        if self.frequency is not None:
            counts: Tensor = self._frequency_counts  # type: ignore[assignment]
            smoothed = counts + 1.0  # Laplace-smoothed p(predicate | subject class, object class)
            probs = smoothed / smoothed.sum(dim=-1, keepdim=True)
            with torch.no_grad():
                self.frequency.weight.copy_(probs.log())

    def forward(
        self,
        x: Tensor,
        box_code: Tensor,
        pair_index: Tensor,
        y: Tensor | None = None,
        batch: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Relation logits over ``pair_index`` and object logits over all objects."""
        if self.task == "predcls" and y is None:
            raise ValueError("RelationPredictor(task='predcls') needs the given object labels 'y'")
        name = type(self).__name__
        if x.dim() != 2 or x.size(-1) != self.in_channels:
            raise ValueError(f"{name}: 'x' must be [num_nodes, {self.in_channels}] (got {list(x.shape)})")
        weight = self.object_head.weight
        check_float_input(name, "x", x, weight)
        check_float_input(name, "box_code", box_code, weight)
        if box_code.shape != (x.size(0), 9):
            raise ValueError(f"{name}: 'box_code' must be [{x.size(0)}, 9] (got {list(box_code.shape)})")
        check_index(name, "pair_index", pair_index)
        if pair_index.dim() != 2 or pair_index.size(0) != 2:
            raise ValueError(f"{name}: 'pair_index' must be [2, num_pairs] (got {list(pair_index.shape)})")
        if not torch.compiler.is_compiling() and pair_index.numel() > 0:
            low, high = int(pair_index.min()), int(pair_index.max())
            if low < 0 or high >= x.size(0):
                raise ValueError(
                    f"{name}: 'pair_index' must point into [0, {x.size(0)}) (got [{low}, {high}])"
                )
        if y is not None:
            check_index(name, "y", y)
            if y.shape != (x.size(0),):
                raise ValueError(f"{name}: 'y' must be [{x.size(0)}] (got {list(y.shape)})")
        h = self.encoder(torch.cat([x, box_code], dim=-1))
        if self.label_embedding is not None and y is not None:
            h = h + self.label_embedding(y)
        context = all_pairs(None if batch is None else batch.to(x.device), x.size(0), device=x.device)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = norm(h + F.relu(conv(h, context)))
        object_logits = self.object_head(h)
        logits = self.pair_head(
            torch.cat([h[pair_index[0]], h[pair_index[1]], pair_geometry(box_code, pair_index)], -1)
        )
        if self.frequency is not None:
            labels = y if self.task == "predcls" and y is not None else object_logits[:, 1:].argmax(-1) + 1
            logits = logits + self.frequency(
                labels[pair_index[0]] * self.num_object_classes + labels[pair_index[1]]
            )
        return logits, object_logits

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, num_object_classes={self.num_object_classes}, "
            f"num_predicate_classes={self.num_predicate_classes}, hidden_channels={self.hidden_channels}, "
            f"task={self.task!r}, frequency_bias={self.frequency is not None})"
        )
