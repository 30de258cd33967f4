"""Visual features from images with any timm backbone (``num_classes=0``), for the GZSL models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["extract_features", "image_folder"]


def _timm_transform(model: nn.Module, image_size: int | None, in_chans: int) -> Callable[[Any], Tensor]:
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    if image_size is not None:
        config["input_size"] = (in_chans, image_size, image_size)
        config["crop_pct"] = 1.0
    if in_chans != 3:
        mean, std = config.get("mean", (0.5,)), config.get("std", (0.5,))
        config["mean"] = (float(np.mean(mean)),) * in_chans
        config["std"] = (float(np.mean(std)),) * in_chans
    return timm.data.create_transform(**config, is_training=False)  # type: ignore[no-any-return]


def image_folder(
    root: str | Path, transform: Callable[[Any], Tensor] | None = None, in_chans: int = 3
) -> Dataset[tuple[Tensor, int]]:
    """A torchvision ``ImageFolder`` (a sub-folder per class) read as RGB, or grayscale if ``in_chans == 1``.

    Raises:
        FileNotFoundError: if ``root`` is not a folder.
    """
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"`root` must be an image folder with one sub-folder per class, got {root}")
    mode = "L" if in_chans == 1 else "RGB"

    def loader(path: str) -> Image.Image:
        with Image.open(path) as image:
            return image.convert(mode)

    return ImageFolder(str(root), transform=transform, loader=loader)


@torch.no_grad()
def extract_features(
    model: str | nn.Module,
    images: str | Path | Dataset[tuple[Tensor, int]],
    image_size: int | None = None,
    in_chans: int = 3,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    transform: Callable[[Any], Tensor] | None = None,
    **model_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Pooled pre-logit features of every image, from a timm backbone, in dataset order.

    A model name is built with ``timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans,
    **model_kwargs)`` (pass ``checkpoint_path=`` for your trained weights: nothing is downloaded). A module is
    used as is: a timm model gives ``forward_head(forward_features(x), pre_logits=True)``, the same vector as
    a ``num_classes=0`` model, so a classifier trained on the seen classes can be passed directly; any other
    module gives ``model(x)``.

    Args:
        model: timm model name or module.
        images: an image folder (one sub-folder per class, see :func:`image_folder`) or a dataset of
            ``(image_tensor, label)``.
        image_size: square input size for the folder transform. (default: ``None``, the model's config)
        in_chans: image channels (1 reads grayscale). (default: ``3``)
        batch_size: inference batch size. (default: ``64``)
        device: where to run. (default: ``"cpu"``)
        transform: transform of a folder's PIL images. (default: ``None``, timm's eval transform of ``model``)
        **model_kwargs: passed to ``timm.create_model`` when ``model`` is a name.

    Returns:
        ``(features, labels, class_names)``: :math:`(N, F)` float32 features, :math:`(N,)` labels, and the
        folder's class names (``None`` for a dataset without ``classes``).

    Raises:
        FileNotFoundError: if a folder path does not exist.
        TypeError: if ``model`` is neither a string nor an ``nn.Module``.
    """
    if isinstance(model, str):
        import timm

        model = timm.create_model(model, pretrained=False, num_classes=0, in_chans=in_chans, **model_kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a timm model name or an nn.Module, got {type(model).__name__}")
    if isinstance(images, str | Path):
        images = image_folder(images, transform or _timm_transform(model, image_size, in_chans), in_chans)
    was_training = model.training
    model.eval().to(device)
    forward_head, forward_features = (
        getattr(model, "forward_head", None),
        getattr(model, "forward_features", None),
    )
    pooled = callable(forward_head) and callable(forward_features)
    feats, labels = [], []
    for batch, target in DataLoader(images, batch_size=batch_size, shuffle=False):
        batch = batch.to(device)
        out = forward_head(forward_features(batch), pre_logits=True) if pooled else model(batch)  # type: ignore[misc]
        feats.append(out.flatten(1).float().cpu())
        labels.append(torch.as_tensor(target))
    model.train(was_training)
    names = getattr(images, "classes", None)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(np.int64), names
