r"""Move weights between an MDN model and the plain timm architecture it was built from, both ways.

MDN adds no parameter, only state: ``moment_inverse``, ``remove_index`` and ``running_beta`` per layer. The
registered ``mdn_*`` models and ``convert_metadata_norm(mode="after")`` keep every parameter name, so a plain
checkpoint loads into them with ``strict=True`` as it is; the other direction only needs MDN's state dropped.
Where MDN *replaced* a norm layer (``norm_layer=`` injection, ``mode="replace"``), the affine
:math:`\gamma, \delta` keep their names but BatchNorm's running statistics exist on one side only.
:func:`load_weights` handles all of these cases::

    plain = timm.create_model("resnet18", num_classes=10)
    load_weights(plain, mdn_model)            # MDN -> plain
    load_weights(mdn_model, plain)            # plain -> MDN
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

__all__ = ["MDN_STATE", "load_weights", "plain_state_dict"]

MDN_STATE = ("moment_inverse", "remove_index", "running_beta")
"""The names of Metadata Normalization's buffers (its only state)."""

_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _split(key: str) -> tuple[str, str]:
    prefix, _, name = key.rpartition(".")
    return prefix, name


def _explained(key: str, source_mdn_sites: set[str], source_keys: set[str]) -> bool:
    """A key of ``target`` that a source MDN site cannot fill, and whose initial value is the right one."""
    prefix, name = _split(key)
    if prefix not in source_mdn_sites:
        return False
    # Running statistics: MDN has none. gamma/delta of an MDN layer without affine: the identity, which is
    # the norm's initial (1, 0).
    return name in _NORM_STATS or (name in ("weight", "bias") and f"{prefix}.weight" not in source_keys)


def plain_state_dict(source: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``source``'s state dict without Metadata Normalization's buffers.

    Args:
        source: an MDN model or its state dict.

    Raises:
        TypeError: if ``source`` is neither a module nor a mapping.
    """
    if isinstance(source, nn.Module):
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise TypeError(f"source must be an nn.Module or a state dict, got {type(source).__name__}")
    return {k: v for k, v in source.items() if _split(k)[1] not in MDN_STATE}


def load_weights(
    target: nn.Module, source: nn.Module | Mapping[str, Tensor], strict: bool = True
) -> _IncompatibleKeys:
    r"""Load ``source``'s weights into ``target`` when one of them has Metadata Normalization, the other not.

    Left out: MDN's buffers that ``target`` has no place for; norm running statistics (``running_mean``,
    ``running_var``, ``num_batches_tracked``) at sites that are MDN in ``target``. Not reported as missing:
    MDN's buffers of ``target`` (as for any plain checkpoint); at sites where ``source`` had MDN, the norm's
    running statistics of ``target`` — they keep their initial values (mean 0, variance 1): recompute them on
    training data before evaluating ``target`` in ``eval()`` mode — and, where that MDN had no affine, the
    norm's :math:`\gamma, \delta`, whose initial (1, 0) is exactly MDN's identity. Every other key is matched
    strictly; a plain norm's learned :math:`\gamma, \delta` into an MDN layer without ``affine`` are reported
    as unexpected (they would be lost: build the MDN layers with ``affine=True``).

    Args:
        target: the model to load into.
        source: the model or state dict to load from.
        strict: raise on any other missing or unexpected key (default: ``True``).

    Returns:
        torch's ``(missing_keys, unexpected_keys)`` of what was not loaded and not explained above.

    Raises:
        TypeError: if ``target`` is not a module or ``source`` neither a module nor a mapping.
        RuntimeError: with ``strict``, on other missing or unexpected keys or mismatched shapes.
    """
    if not isinstance(target, nn.Module):
        raise TypeError(f"target must be an nn.Module, got {type(target).__name__}")
    if isinstance(source, nn.Module):
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise TypeError(f"source must be an nn.Module or a state dict, got {type(source).__name__}")
    own = target.state_dict()
    own_mdn_sites = {_split(k)[0] for k in own if _split(k)[1] in MDN_STATE}
    own_mdn_sites |= {
        name
        for name, module in target.named_modules()
        if any(b in module._buffers for b in MDN_STATE)  # unsized MDN layers too
    }
    source_mdn_sites = {_split(k)[0] for k in source if _split(k)[1] in MDN_STATE}

    def keep(key: str) -> bool:
        prefix, name = _split(key)
        if name in MDN_STATE:
            return key in own
        return not (name in _NORM_STATS and prefix in own_mdn_sites)

    result = target.load_state_dict({k: v for k, v in source.items() if keep(k)}, strict=False)
    source_params = set(source)
    missing = [k for k in result.missing_keys if not _explained(k, source_mdn_sites, source_params)]
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"load_weights into {type(target).__name__}: missing keys {missing}, unexpected keys {unexpected}"
        )
    return _IncompatibleKeys(missing, unexpected)
