"""Getting each batch's metadata and the training-set kernel into the MDN layers of an unmodified timm model.

timm models take images only. Three ways to hand the batch's metadata :math:`X_b` to every Metadata
Normalization layer inside, none of which stores it as a buffer (DDP re-broadcasts buffers from rank 0 at
every forward, which would give every process rank 0's metadata):

- ``model(x, metadata=X_b)`` after :func:`enable_metadata_kwarg` (a forward pre-hook with
  ``with_kwargs=True``; the registered ``mdn_*`` models install it themselves). The metadata stay set after
  the call, so gradient checkpointing can recompute the forward during backward; a later call without
  ``metadata=`` clears them, so a training step can never silently reuse a previous batch's metadata.
- ``with metadata_context(model, X_b): model(x)`` — scoped, restores the previous metadata on exit.
- :func:`set_metadata` — explicit, for custom loops.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .kernel import MetadataKernel
from .metadata_norm import MetadataNormBase

__all__ = [
    "MetadataKwargHook",
    "enable_metadata_kwarg",
    "metadata_context",
    "metadata_norm_layers",
    "set_metadata",
    "set_metadata_kernel",
]


def metadata_norm_layers(model: nn.Module) -> list[MetadataNormBase]:
    """All Metadata Normalization layers in ``model`` (including ``model`` itself), in module order."""
    return [m for m in model.modules() if isinstance(m, MetadataNormBase)]


def _layers_or_raise(model: nn.Module) -> list[MetadataNormBase]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = metadata_norm_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no MetadataNorm layer; build it with norm_layer=MetadataNorm2d, a "
            "registered mdn_* model, or timm_mdn.convert_metadata_norm"
        )
    return layers


def _check_metadata(metadata: Tensor | None) -> None:
    if metadata is not None and not isinstance(metadata, Tensor):
        raise TypeError(
            f"metadata must be a torch.Tensor of shape (B, K) or None, got {type(metadata).__name__}"
        )


def _route(layers: list[MetadataNormBase], metadata: Tensor | None) -> None:
    """Give ``metadata`` to ``layers``, checking finiteness once here instead of once per layer.

    The check (a host-device synchronisation) is skipped when every layer has ``validate_args=False``.
    """
    validate = any(layer.validate_args for layer in layers)
    if validate and metadata is not None and not bool(torch.isfinite(metadata).all()):
        raise ValueError("metadata hold inf or NaN; expected finite metadata rows")
    for layer in layers:
        layer.metadata = metadata
        layer._finite = metadata


def set_metadata(model: nn.Module, metadata: Tensor | None) -> None:
    """Give every MDN layer of ``model`` the metadata rows of the next batch (``None`` clears them).

    Raises:
        TypeError: if ``metadata`` is neither a tensor nor ``None``.
        ValueError: if ``model`` has no MDN layer.
    """
    _check_metadata(metadata)
    _route(_layers_or_raise(model), metadata)


def set_metadata_kernel(model: nn.Module, kernel: MetadataKernel) -> None:
    r"""Set the training-set kernel :math:`(X^\top X)^{-1}` on every MDN layer of ``model``.

    Raises:
        TypeError: if ``kernel`` is not a :class:`MetadataKernel`.
        ValueError: if ``model`` has no MDN layer.
    """
    for layer in _layers_or_raise(model):
        layer.set_kernel(kernel)


@contextmanager
def metadata_context(model: nn.Module, metadata: Tensor) -> Iterator[nn.Module]:
    """Route ``metadata`` (shape :math:`(B, K)`) to every MDN layer of ``model`` for the enclosed forwards.

    Example::

        with metadata_context(model, kernel.design(cf, y)):
            loss = criterion(model(images), y)
        loss.backward()

    Raises:
        TypeError: if ``metadata`` is not a tensor.
        ValueError: if ``model`` has no MDN layer.
    """
    if not isinstance(metadata, Tensor):
        raise TypeError(f"metadata must be a torch.Tensor of shape (B, K), got {type(metadata).__name__}")
    layers = _layers_or_raise(model)
    previous = [layer.metadata for layer in layers]
    _route(layers, metadata)
    try:
        yield model
    finally:
        for layer, old in zip(layers, previous, strict=True):
            layer.metadata = old


class MetadataKwargHook:
    """Forward pre-hook that takes ``metadata=`` out of a model's call and gives it to the model's MDN layers.

    Installed by :func:`enable_metadata_kwarg`; a plain object so models holding it still pickle and
    deep-copy.
    """

    def __init__(self, kwarg: str = "metadata") -> None:
        self.kwarg = kwarg
        self._last: Tensor | None = None

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Pop the metadata keyword; set it on every MDN layer, or clear what this hook set last time."""
        if self.kwarg in kwargs:
            kwargs = dict(kwargs)
            metadata = kwargs.pop(self.kwarg)
            _check_metadata(metadata)
            if torch.compiler.is_compiling():
                for layer in metadata_norm_layers(module):
                    layer.metadata = metadata
            else:
                _route(metadata_norm_layers(module), metadata)
            self._last = metadata
        elif self._last is not None:
            # A call without metadata must not reuse the previous batch's (a context's metadata stay).
            for layer in metadata_norm_layers(module):
                if layer.metadata is self._last:
                    layer.metadata = None
            self._last = None
        return args, kwargs

    def __getstate__(self) -> dict[str, Any]:
        return {"kwarg": self.kwarg, "_last": None}


def enable_metadata_kwarg(model: nn.Module, kwarg: str = "metadata") -> RemovableHandle:
    """Let an unmodified timm model take ``model(x, metadata=X_b)``.

    Registers a :class:`MetadataKwargHook` as a forward pre-hook (``with_kwargs=True``), which removes the
    keyword before the model's own ``forward`` runs. Idempotent: a second call returns a handle to the
    existing hook.

    Returns:
        The hook's handle; ``handle.remove()`` uninstalls it.

    Raises:
        ValueError: if ``model`` has no MDN layer.
    """
    _layers_or_raise(model)
    for hook_id, hook in model._forward_pre_hooks.items():
        if isinstance(hook, MetadataKwargHook) and hook.kwarg == kwarg:
            handle = RemovableHandle(
                model._forward_pre_hooks, extra_dict=model._forward_pre_hooks_with_kwargs
            )
            handle.id = hook_id
            return handle
    return model.register_forward_pre_hook(MetadataKwargHook(kwarg), with_kwargs=True)
