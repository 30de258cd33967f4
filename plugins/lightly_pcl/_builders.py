"""Build the pieces of :class:`~lightly_pcl.PCLLightningModule` from plain hyperparameters (internal).

Plain values (strings, numbers, tuples) are what a Lightning checkpoint stores and
``LightningModule.load_from_checkpoint(path)`` passes back to ``__init__``; modules given directly are
recorded by name only, and must be passed again when loading.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["CUSTOM", "build_backbone", "build_projection_head", "optimizer_class"]

CUSTOM = "custom:"
"""Prefix of the hyperparameter that stands for a module passed directly (``"custom:MyBackbone"``)."""


def _custom_error(argument: str, recorded: str) -> ValueError:
    name = recorded[len(CUSTOM) :]
    return ValueError(
        f"{argument} was a custom nn.Module ({name}) when this module was built, and a checkpoint keeps only "
        f"its weights: pass it again, PCLLightningModule.load_from_checkpoint(path, {argument}={name}(...))"
    )


def build_backbone(backbone: str | nn.Module, input_dim: int | None) -> tuple[nn.Module, int, str]:
    """Return the backbone, its feature dimension and the hyperparameter that records it.

    A string is a torchvision model name (``torchvision.models.get_model(name, weights=None)``: randomly
    initialised, PCL trains from scratch, nothing is downloaded) whose last ``nn.Linear`` (the classifier)
    is replaced by ``nn.Identity``; ``input_dim`` is that layer's ``in_features``. A module is used as given,
    with ``input_dim`` (default: ``2048``).

    Raises:
        ValueError: For an unknown model name, a name without a final ``nn.Linear``, an ``input_dim`` that
            contradicts the named model, or a recorded custom backbone that was not passed again.
        TypeError: If ``backbone`` is neither a string nor an ``nn.Module``.
    """
    if isinstance(backbone, nn.Module):
        return backbone, 2048 if input_dim is None else int(input_dim), CUSTOM + type(backbone).__name__
    if not isinstance(backbone, str):
        raise TypeError(
            f"backbone must be a torchvision model name or an nn.Module, got {type(backbone).__name__}"
        )
    if backbone.startswith(CUSTOM):
        raise _custom_error("backbone", backbone)
    import torchvision

    if backbone not in torchvision.models.list_models():
        raise ValueError(
            f"backbone={backbone!r} is not a torchvision model name (see torchvision.models.list_models()); "
            "pass an nn.Module for other backbones"
        )
    model = torchvision.models.get_model(backbone, weights=None)
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise ValueError(f"backbone={backbone!r} has no final nn.Linear classifier to remove")
    parent_name, _, child = linear[-1].rpartition(".")
    parent = model.get_submodule(parent_name)
    features = int(getattr(parent, child).in_features)
    setattr(parent, child, nn.Identity())
    if input_dim is not None and int(input_dim) != features:
        raise ValueError(f"input_dim={input_dim} but {backbone} returns {features} features")
    return model, features, backbone


def build_projection_head(
    projection_head: str | nn.Module, input_dim: int, hidden_dim: int, output_dim: int
) -> tuple[nn.Module | None, str]:
    """Return the head (``None``: PCL's default MoCo v2 MLP) and the hyperparameter that records it.

    ``"mlp"``: ``MoCoProjectionHead(input_dim, hidden_dim, output_dim)`` (PCL v2). ``"linear"``:
    ``nn.Linear(input_dim, output_dim)`` (PCL v1's 128-d fc layer). A module: used as given.

    Raises:
        ValueError: For another name, or a recorded custom head that was not passed again.
    """
    if isinstance(projection_head, nn.Module):
        return projection_head, CUSTOM + type(projection_head).__name__
    if isinstance(projection_head, str) and projection_head.startswith(CUSTOM):
        raise _custom_error("projection_head", projection_head)
    if projection_head == "mlp":
        return None, "mlp"
    if projection_head == "linear":
        return nn.Linear(input_dim, output_dim), "linear"
    raise ValueError(f"projection_head must be 'mlp', 'linear' or an nn.Module, got {projection_head!r}")


def optimizer_class(name: str) -> Callable[..., Optimizer]:
    """The optimizer class ``torch.optim.<name>`` (``"SGD"``, ``"AdamW"``, ...), or Lightly's ``"LARS"``.

    Raises:
        ValueError: If no such optimizer exists.
    """
    if name == "LARS":
        from lightly.utils.lars import LARS

        return LARS
    found: Any = getattr(torch.optim, name, None)
    if not (isinstance(found, type) and issubclass(found, Optimizer)):
        raise ValueError(
            f"optimizer must name a torch.optim optimizer (e.g. 'SGD', 'AdamW') or 'LARS', got {name!r}"
        )
    return found
