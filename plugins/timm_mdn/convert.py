r"""Add Metadata Normalization to an existing model, or swap its norm layers for MDN.

Follows the recursive pattern of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` and timm's
``freeze_batch_norm_2d``. Paper: https://arxiv.org/abs/2104.09052 (MDN after the last FC layer, "MDN-Linear",
or after every conv/FC layer, "MDN-Conv").

Two modes:

- ``"after"`` keeps every chosen layer and applies an MDN layer to its output. The MDN layer lives as the
  child ``metadata_norm`` of the chosen layer and runs in a forward hook (the pattern of ``torch.nn.utils``'
  ``spectral_norm``), so no parameter is renamed: a plain model's checkpoint still loads with ``strict=True``
  into the converted model (MDN layers absent from a checkpoint keep their state and are not reported
  missing).
- ``"replace"`` swaps chosen norm layers (BatchNorm, LayerNorm, GroupNorm, timm's norm layers) for MDN layers,
  copying the affine :math:`\gamma, \beta` as ``convert_sync_batchnorm`` copies BatchNorm state. timm's
  norm-act layers (``BatchNormAct2d`` in EfficientNet, MobileNetV3, RegNet) become
  :class:`~timm_mdn.MetadataNormAct2d` holding the same dropout and activation modules. The replaced layers'
  running mean/variance no longer exist, so load a plain checkpoint *before* converting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .kernel import MetadataKernel
from .metadata_norm import MetadataNorm, MetadataNorm1d, MetadataNorm2d, MetadataNormBase
from .norm_act import MetadataNormAct2d

__all__ = ["ApplyMetadataNorm", "convert_metadata_norm", "is_norm_layer", "metadata_norm_for"]

LayerSelector = Iterable[str] | Callable[[str, nn.Module], bool] | None

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` normalises: Batch/Instance/Layer/Group/RMS norms and timm's norm layers."""
    if isinstance(module, MetadataNormBase):
        return False
    if isinstance(module, _NORM_TYPES):
        return True
    return type(module).__module__.startswith("timm.layers.norm") and "Norm" in type(module).__name__


def _channels_first_2d(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm, nn.Conv2d)) or name.endswith(
        "2d"
    )


def metadata_norm_for(module: nn.Module, **kwargs: Any) -> MetadataNormBase:
    """An MDN layer of the layout and width of ``module``'s output, on its device and dtype.

    ``Conv2d``/``BatchNorm2d``/``GroupNorm``/timm ``*2d`` norms → :class:`MetadataNorm2d`; ``BatchNorm1d`` →
    :class:`MetadataNorm1d`; ``Linear``/``LayerNorm``/``RMSNorm`` → :class:`MetadataNorm` (channels last, so
    ViT tokens work).

    Raises:
        TypeError: for a module whose output width cannot be read.
    """
    if isinstance(module, nn.Conv2d):
        width = module.out_channels
    elif isinstance(module, nn.Linear):
        width = module.out_features
    elif isinstance(module, nn.GroupNorm):
        width = module.num_channels
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        width = module.num_features
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or hasattr(module, "normalized_shape"):
        shape = tuple(module.normalized_shape)  # type: ignore[arg-type]
        width = int(shape[-1])
    elif isinstance(getattr(module, "num_features", None), int):
        width = int(module.num_features)  # type: ignore[arg-type]
    else:
        raise TypeError(
            f"cannot add MetadataNorm after {type(module).__name__}: "
            "supported are Conv2d, Linear and norm layers"
        )
    if isinstance(module, (nn.BatchNorm1d, nn.InstanceNorm1d)):
        cls: type[MetadataNormBase] = MetadataNorm1d
    elif _channels_first_2d(module):
        cls = MetadataNorm2d
    else:
        cls = MetadataNorm
    reference: Tensor | None = next(iter(module.parameters()), None)
    if reference is None:
        reference = next(iter(module.buffers()), None)
    if reference is not None:
        kwargs.setdefault("device", reference.device)
        if reference.is_floating_point():
            kwargs.setdefault("dtype", reference.dtype)
    return cls(width, **kwargs)


class ApplyMetadataNorm:
    """Forward hook that passes a layer's output through its ``metadata_norm`` child (``mode="after"``)."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        """Return ``module.metadata_norm(output)``."""
        mdn: nn.Module = module.get_submodule("metadata_norm")
        return mdn(output)


def _select(layers: LayerSelector, mode: str) -> Callable[[str, nn.Module], bool]:
    if layers is None:
        return lambda name, module: is_norm_layer(module)
    if callable(layers):
        return layers
    if isinstance(layers, str):
        raise TypeError("layers must be an iterable of module names, a predicate or None, not a single str")
    names = set(layers)
    return lambda name, module: name in names


def convert_metadata_norm(
    module: nn.Module,
    kernel: MetadataKernel | None = None,
    layers: LayerSelector = None,
    mode: Literal["after", "replace"] = "after",
    **mdn_kwargs: Any,
) -> nn.Module:
    """Add MDN after (``mode="after"``) or in place of (``mode="replace"``) chosen layers of ``module``.

    Args:
        module: any model, e.g. from ``timm.create_model``; converted in place where possible.
        kernel: the training-set :class:`MetadataKernel` for the new layers (default: ``None``, set it later
            with :func:`~timm_mdn.set_metadata_kernel`).
        layers: qualified module names (as in ``named_modules()``), a predicate ``(name, module) -> bool``, or
            ``None`` for every norm layer (default: ``None``).
        mode: ``"after"`` (keep the layer, MDN on its output) or ``"replace"`` (swap a norm layer for MDN)
            (default: ``"after"``).
        **mdn_kwargs: forwarded to the MDN layers (``momentum``, ``sync_stats``, ``process_group``).

    Returns:
        The converted module (a new object only if ``module`` itself was replaced).

    Raises:
        ValueError: for an unknown ``mode``, a named layer that does not exist, nothing selected, replacing a
            non-norm layer, or a layer that already has MDN.
        TypeError: for a layer MDN cannot follow, or an invalid ``layers``.
    """
    if mode not in ("after", "replace"):
        raise ValueError(f"mode must be 'after' or 'replace', got {mode!r}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if layers is not None and not callable(layers) and not isinstance(layers, str):
        layers = list(layers)
        missing = set(layers) - {name for name, _ in module.named_modules()}
        if missing:
            raise ValueError(f"layers {sorted(missing)} are not modules of {type(module).__name__}")
    select = _select(layers, mode)
    chosen = [
        (name, m)
        for name, m in module.named_modules()
        if not isinstance(m, MetadataNormBase) and not name.endswith("metadata_norm") and select(name, m)
    ]
    if not chosen:
        raise ValueError("no layer selected for MetadataNorm")
    if mode == "after":
        for name, target in chosen:
            _add_after(name, target, kernel, mdn_kwargs)
        return module
    replaced = module
    for name, target in chosen:
        if not is_norm_layer(target):
            raise ValueError(f"mode='replace' swaps norm layers only; {name!r} is a {type(target).__name__}")
        new = _replacement(target, kernel, mdn_kwargs)
        if name == "":
            replaced = new
        else:
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, new)
    return replaced


def _add_after(name: str, target: nn.Module, kernel: MetadataKernel | None, kwargs: dict[str, Any]) -> None:
    if hasattr(target, "metadata_norm"):
        raise ValueError(f"layer {name!r} already has a metadata_norm")
    mdn = metadata_norm_for(target, kernel=kernel, **kwargs)
    mdn.train(target.training)
    target.add_module("metadata_norm", mdn)
    target.register_forward_hook(ApplyMetadataNorm())


def _replacement(
    target: nn.Module, kernel: MetadataKernel | None, kwargs: dict[str, Any]
) -> MetadataNormBase:
    weight = getattr(target, "weight", None)
    bias = getattr(target, "bias", None)
    affine = isinstance(weight, Tensor) and weight.dim() == 1
    new = metadata_norm_for(target, kernel=kernel, affine=affine, **kwargs)
    act, drop = getattr(target, "act", None), getattr(target, "drop", None)
    if type(new) is MetadataNorm2d and isinstance(act, nn.Module) and isinstance(drop, nn.Module):
        # A norm-act layer (timm's BatchNormAct2d): keep its activation and dropout modules.
        new_act = MetadataNormAct2d(
            new.num_features,
            kernel=kernel,
            affine=affine,
            apply_act=False,
            device=new.running_beta.device,
            dtype=new.running_beta.dtype,
            **kwargs,
        )
        new_act.act, new_act.drop = act, drop
        new = new_act
    if affine:
        with torch.no_grad():
            assert new.weight is not None and new.bias is not None
            new.weight.copy_(weight)  # type: ignore[arg-type]
            if isinstance(bias, Tensor):
                new.bias.copy_(bias)
            new.weight.requires_grad_(weight.requires_grad)  # type: ignore[union-attr]
    new.train(target.training)
    return new
