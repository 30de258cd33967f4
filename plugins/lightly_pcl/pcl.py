"""The PCL encoder pair, assembled from Lightly's MoCo building blocks."""

from __future__ import annotations

import copy

import torch
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import batch_shuffle, batch_unshuffle, deactivate_requires_grad, update_momentum
from torch import Tensor, nn

from . import _distributed as ddp

__all__ = ["PCL"]


class PCL(nn.Module):
    """Query encoder and momentum (key) encoder of Prototypical Contrastive Learning [0].

    PCL v2 is MoCo v2 [1] plus the E-step: a backbone with a ``MoCoProjectionHead`` ("an MLP head
    2048-2048-ReLU-128" [0]) as the query encoder, and an exponential moving average of both as the momentum
    encoder, whose features the E-step clusters. The memory bank of negatives lives in the loss
    (:class:`~lightly_pcl.ProtoNCELoss`), as in Lightly's ``NTXentLoss``.

    - [0] PCL, 2021, https://arxiv.org/abs/2005.04966
    - [1] MoCo v2, 2020, https://arxiv.org/abs/2003.04297

    Args:
        backbone: Maps images to features ``(B, input_dim)`` (any trailing singleton dims are flattened).
        input_dim: Backbone feature dimension (default: ``2048``, ResNet-50).
        hidden_dim: Hidden width of the projection head (default: ``2048``).
        output_dim: Projection dimension (default: ``128``).
        projection_head: A custom head ``(B, input_dim) -> (B, output_dim)`` instead of the MoCo v2 MLP, e.g.
            ``nn.Linear(input_dim, 128)`` for PCL v1 (then ``hidden_dim`` is unused).

    Shapes:
        - x: images ``(B, ...)`` as the backbone expects.
        - output of :meth:`forward` and :meth:`forward_momentum`: ``(B, output_dim)``, not normalised.

    Raises:
        ValueError: If a dimension is not positive; in the forward passes, if the backbone's features do not
            have ``input_dim`` entries (the message gives the dimension to pass).
        TypeError: In the forward passes, for integer images, or floating images of another precision
            than the parameters outside autocast (the message names the fix, ``model.to(dtype)``).

    Examples:
        >>> backbone = torchvision.models.resnet18()
        >>> backbone.fc = nn.Identity()
        >>> model = PCL(backbone, input_dim=512, hidden_dim=512)
        >>> model.update_momentum(0.999)
        >>> query, key = model(x_query), model.forward_momentum(x_key)
    """

    def __init__(
        self,
        backbone: nn.Module,
        input_dim: int = 2048,
        hidden_dim: int = 2048,
        output_dim: int = 128,
        projection_head: nn.Module | None = None,
    ):
        super().__init__()
        if min(input_dim, hidden_dim, output_dim) < 1:
            raise ValueError(
                "input_dim, hidden_dim and output_dim must be positive, got "
                f"{input_dim}, {hidden_dim}, {output_dim}"
            )
        self.input_dim, self.hidden_dim, self.output_dim = input_dim, hidden_dim, output_dim
        self.backbone = backbone
        self.projection_head = (
            MoCoProjectionHead(input_dim, hidden_dim, output_dim)
            if projection_head is None
            else projection_head
        )
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: Tensor) -> Tensor:
        """Query projections ``(B, output_dim)``."""
        return self.projection_head(self.forward_features(x))

    def forward_features(self, x: Tensor) -> Tensor:
        """Query-encoder backbone features ``(B, input_dim)``, e.g. for kNN or linear evaluation."""
        self._check_images(x)
        return self._checked_features(self.backbone(x))

    def _check_images(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"PCL: x must be a torch.Tensor of images, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"PCL: x must be a floating tensor of images, got dtype {x.dtype}; convert it")
        weight = next(self.backbone.parameters(), None)
        if (
            weight is not None
            and weight.is_floating_point()
            and x.dtype != weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
        ):
            raise TypeError(
                f"PCL: x has dtype {x.dtype} but the parameters are {weight.dtype}; convert one of them, "
                f"e.g. model.to({x.dtype}) or x.to({weight.dtype})"
            )

    def _checked_features(self, features: Tensor) -> Tensor:
        features = features.flatten(start_dim=1)
        if features.shape[1] != self.input_dim:
            raise ValueError(
                f"PCL: the backbone returns features of dim {features.shape[1]} (shape "
                f"{tuple(features.shape)}) but input_dim={self.input_dim}; build PCL(backbone, "
                f"input_dim={features.shape[1]}, ...)"
            )
        return features

    @torch.no_grad()
    def forward_momentum(self, x: Tensor, shuffle: bool = False) -> Tensor:
        """Key projections ``(B, output_dim)`` from the momentum encoder, detached.

        Args:
            x: Images.
            shuffle: Shuffle the batch before the encoder and unshuffle after ("shuffling BN" of MoCo; across
                ranks under ``torch.distributed``), so batch-norm statistics cannot leak the positive pair.
        """
        self._check_images(x)
        idx = None
        if shuffle:
            x, idx = batch_shuffle(x, distributed=ddp.is_distributed())
        key = self.projection_head_momentum(self._checked_features(self.backbone_momentum(x)))
        if idx is not None:
            key = batch_unshuffle(key, idx, distributed=ddp.is_distributed())
        return key.detach()

    def update_momentum(self, m: float) -> None:
        """EMA update of the momentum encoder: ``theta_k <- m * theta_k + (1 - m) * theta_q``.

        Raises:
            ValueError: If ``m`` is outside ``[0, 1]``.
        """
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"momentum m must be in [0, 1], got {m}")
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)

    def extra_repr(self) -> str:
        """The projection head's dimensions."""
        return f"input_dim={self.input_dim}, hidden_dim={self.hidden_dim}, output_dim={self.output_dim}"
