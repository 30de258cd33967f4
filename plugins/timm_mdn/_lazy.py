r"""Lazily sized state that copies made before the first batch still share (``ModelEmaV2``/``V3``).

An MDN layer's running :math:`\beta` has shape :math:`(K, *\text{feature shape})`, and the feature shape
(the spatial size of a convolution map, the number of ViT tokens) is known only from the first batch. As in
``torch.nn.modules.lazy``, the buffer is a :class:`torch.nn.parameter.UninitializedBuffer` until then.

timm's ``ModelEmaV2``/``ModelEmaV3`` deep-copy the model when they are created, usually right after the model
and before the first step, and then pair the copy's ``state_dict()`` with the model's entry by entry. A lazy
buffer sized in the model but not in the copy would break that pairing, so the layers copied from one another
while unsized form a *lineage*: when one of them is sized (a kernel is set, or its first training batch
arrives), every unsized member receives the same shape, with the value an eagerly sized buffer would have had
(zeros for the running :math:`\beta`, the kernel itself for the kernel buffers). From then on they are
independent.
"""

from __future__ import annotations

import weakref
from typing import Any, ClassVar

import torch
from torch.nn.parameter import UninitializedBuffer

__all__ = ["LazyBuffer", "Lineage", "assign_buffer", "is_unsized"]


class LazyBuffer(UninitializedBuffer):
    """An :class:`~torch.nn.parameter.UninitializedBuffer` that can be deep-copied and pickled with its dtype.

    torch's own uninitialized buffer refuses ``copy.deepcopy`` (so ``ModelEmaV3`` cannot copy a ``Lazy*``
    module); this one copies to a new uninitialized buffer of the same device and dtype, as
    :class:`~torch.nn.parameter.UninitializedParameter` does.
    """

    cls_to_become = torch.Tensor

    def __new__(
        cls,
        requires_grad: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> LazyBuffer:
        return super().__new__(cls, requires_grad, device, dtype)  # type: ignore[no-any-return]

    # ``detach``: DistributedDataParallel broadcasts every buffer (empty while unsized) at construction.
    _allowed_methods: ClassVar[list[Any]] = [*UninitializedBuffer._allowed_methods, torch.Tensor.detach]  # type: ignore[attr-defined]

    def __deepcopy__(self, memo: dict[int, Any]) -> LazyBuffer:
        if id(self) not in memo:
            memo[id(self)] = type(self)(device=self.device, dtype=self.dtype)
        return memo[id(self)]  # type: ignore[no-any-return]

    def __reduce_ex__(self, proto: Any) -> tuple[Any, ...]:
        return (type(self), (False, None, self.dtype))


class Lineage:
    """The layers deep-copied from one another while their state was unsized.

    ``copy.deepcopy`` keeps the lineage (the copy joins it in ``__setstate__``); pickling starts a new one.
    Members are held weakly.
    """

    def __init__(self) -> None:
        self.members: weakref.WeakSet[Any] = weakref.WeakSet()

    def __deepcopy__(self, memo: dict[int, Any]) -> Lineage:
        return self

    def __reduce__(self) -> tuple[type[Lineage], tuple[()]]:
        return (Lineage, ())

    def others(self, member: object) -> list[Any]:
        """The members other than ``member``."""
        return [other for other in list(self.members) if other is not member]


def is_unsized(tensor: object) -> bool:
    """``torch.nn.parameter.is_lazy``, as a plain ``isinstance`` that torch.compile traces without a break."""
    return isinstance(tensor, UninitializedBuffer)


def assign_buffer(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Set buffer ``name`` to ``value``'s shape and values, on the buffer's own device and dtype.

    An unsized buffer is materialized in place and a same-shaped one copied into, so the tensor object stays
    the one that ``DistributedDataParallel`` and optimizers hold; only a change of shape makes a new tensor.
    """
    own = module._buffers[name]
    assert own is not None
    with torch.no_grad():
        if isinstance(own, UninitializedBuffer):
            own.materialize(value.shape)
            own.copy_(value)
        elif own.shape == value.shape:
            own.copy_(value)
        else:
            module._buffers[name] = value.to(device=own.device, dtype=own.dtype, copy=True)
