r"""Metadata Normalization + activation, for the timm families that build norm-act layers.

EfficientNet, MobileNetV3, RegNet and friends do not call ``norm_layer`` directly: they turn it into a
norm-act layer with ``timm.layers.get_norm_act_layer(norm_layer, act_layer)`` and call that with
``apply_act``, ``act_layer``, ``inplace``, ``drop_layer``. :class:`MetadataNormAct2d` is that layer for MDN,
in the pattern of timm's ``BatchNormAct2d`` (MDN, then dropout, then the activation, as ``self.drop`` and
``self.act``).

timm keeps no public registry of norm-act layers, so importing :mod:`timm_mdn` adds MDN to the private maps of
``timm.layers.create_norm_act`` (and ``create_norm``) — additions only, no existing entry changes. Then
``norm_layer=MetadataNorm2d``, ``norm_layer=partial(MetadataNorm2d, kernel=k)``,
``norm_layer=MetadataNormAct2d`` and ``norm_layer="metadatanorm2d"`` all resolve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from timm.layers import create_act_layer
from torch import Tensor, nn

from .kernel import MetadataKernel
from .metadata_norm import MetadataNorm, MetadataNorm2d

if TYPE_CHECKING:
    from timm.layers.typing import LayerType

__all__ = ["MetadataNormAct2d", "register_with_timm"]


class MetadataNormAct2d(MetadataNorm2d):
    r"""Metadata Normalization of a :math:`(B, C, H, W)` map, then dropout and an activation.

    :math:`\mathrm{act}(\mathrm{drop}(\mathrm{MDN}(f)))`, with MDN as in :class:`~timm_mdn.MetadataNorm2d`.
    The arguments after ``num_features`` are timm's ``BatchNormAct2d``'s (``eps``, ``momentum``,
    ``affine``, ``apply_act``, ``act_layer``, ``act_kwargs``, ``inplace``, ``drop_layer``, ``device``,
    ``dtype``) and MDN's (``kernel``, ``sync_stats``, ``process_group``, ``validate_args``). ``affine``
    defaults to ``True`` as for ``BatchNormAct2d``, unlike the other MDN layers: these families initialise the
    norm's :math:`\gamma` themselves (RegNet and EfficientNet zero the last one of each block).
    ``track_running_stats`` is accepted and must be ``True``.

    Args:
        num_features: :math:`C`.
        apply_act: apply ``act_layer`` (default: ``True``).
        act_layer: the activation, a class, name or callable as timm's ``create_act_layer`` takes (default:
            ``nn.ReLU``).
        act_kwargs: extra arguments of the activation (default: ``None``).
        inplace: in-place activation (default: ``True``).
        drop_layer: a dropout class applied before the activation (default: ``None``).
        **kwargs: :class:`~timm_mdn.MetadataNormBase`'s arguments.

    Raises:
        ValueError: for ``track_running_stats=False`` (MDN needs its running :math:`\beta` in evaluation), and
            as :class:`~timm_mdn.MetadataNormBase` in ``forward``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: LayerType = nn.ReLU,
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: type[nn.Module] | None = None,
        kernel: MetadataKernel | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        if not track_running_stats:
            raise ValueError("MetadataNormAct2d needs track_running_stats=True (the running beta)")
        super().__init__(
            num_features,
            kernel=kernel,
            momentum=momentum,
            eps=eps,
            affine=affine,
            device=device,
            dtype=dtype,
            **kwargs,
        )
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        act = None
        if apply_act:
            act = create_act_layer(act_layer, **{"inplace": inplace, **(act_kwargs or {})})
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        """MDN, then dropout, then the activation."""
        return self.act(self.drop(super().forward(input)))


def register_with_timm() -> None:
    """Make timm's ``get_norm_act_layer`` and ``get_norm_layer`` resolve the MDN layers (idempotent).

    Adds ``metadatanorm2d`` → :class:`MetadataNormAct2d` to timm's norm-act maps (by name and as the
    norm-act equivalent of :class:`~timm_mdn.MetadataNorm2d`, with ``act_layer`` bound per call), and
    ``metadatanorm2d``/``metadatanorm`` to timm's norm map. Called on ``import timm_mdn``.

    Raises:
        RuntimeError: if timm's private maps are gone (a timm release changed them); the message names them.
    """
    from timm.layers import create_norm, create_norm_act

    names = ("_NORM_ACT_MAP", "_NORM_ACT_TYPES", "_NORM_TO_NORM_ACT_MAP", "_NORM_ACT_REQUIRES_ARG")
    missing = [n for n in names if not hasattr(create_norm_act, n)]
    missing += [n for n in ("_NORM_MAP", "_NORM_TYPES") if not hasattr(create_norm, n)]
    if missing:
        raise RuntimeError(
            f"this timm release lacks {missing}: timm_mdn cannot register its norm-act layer; use "
            "timm_mdn.convert_metadata_norm(model, kernel, mode='replace') instead"
        )
    create_norm_act._NORM_ACT_MAP.setdefault("metadatanorm2d", MetadataNormAct2d)
    create_norm_act._NORM_ACT_TYPES.add(MetadataNormAct2d)
    create_norm_act._NORM_TO_NORM_ACT_MAP.setdefault("metadatanorm2d", MetadataNormAct2d)
    create_norm_act._NORM_TO_NORM_ACT_MAP.setdefault("metadatanormact2d", MetadataNormAct2d)
    create_norm_act._NORM_ACT_REQUIRES_ARG.add(MetadataNormAct2d)
    create_norm._NORM_MAP.setdefault("metadatanorm2d", MetadataNorm2d)
    create_norm._NORM_MAP.setdefault("metadatanorm", MetadataNorm)
    create_norm._NORM_TYPES.update((MetadataNorm2d, MetadataNorm))
