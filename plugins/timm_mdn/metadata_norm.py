r"""Metadata Normalization layers with timm's norm-layer contract (drop-in for ``BatchNorm2d``/``LayerNorm``).

Paper: Lu, Zhao, Yang, Pohl, Adeli et al., "Metadata Normalization", CVPR 2021,
    https://arxiv.org/abs/2104.09052.

Three layouts, as timm's ``LayerNorm`` / ``LayerNorm2d`` and torch's ``BatchNorm1d``; the regression itself
always runs per sample on the flattened feature map, so they differ only in where the channels are checked and
where the optional affine transform applies:

===================  =========================  ===========================================================
layer                input                      where
===================  =========================  ===========================================================
``MetadataNorm``     :math:`(B, C)`, :math:`(B, N, C)`   pooled features, ViT tokens (channels last)
``MetadataNorm1d``   :math:`(B, C)`, :math:`(B, C, L)`   like ``BatchNorm1d``
``MetadataNorm2d``   :math:`(B, C, H, W)`                after a convolution, like ``BatchNorm2d``
===================  =========================  ===========================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._lazy import LazyBuffer, Lineage, assign_buffer, is_unsized
from .functional import channel_affine, metadata_norm
from .kernel import MetadataKernel

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["MetadataNorm", "MetadataNorm1d", "MetadataNorm2d", "MetadataNormBase"]

_STATE = ("moment_inverse", "remove_index", "running_beta")
_HALF = (torch.float16, torch.bfloat16)


class MetadataNormBase(nn.Module):
    r"""Metadata Normalization: remove the part of the features that the metadata's confounders explain.

    For a batch of :math:`b` samples with metadata rows :math:`X_b` (:math:`b \times K`) and features
    flattened to :math:`f_b` (:math:`b \times D`):

    .. math::
        \beta = \frac{N}{b}\,(X^\top X)^{-1} X_b^\top f_b, \qquad
        \mathrm{MDN}(f_b) = f_b - X_{b,R}\,\beta_R \;(\odot\,\gamma + \delta \text{ if affine}),

    with :math:`(X^\top X)^{-1}` from the whole training set (a :class:`~timm_mdn.MetadataKernel`), :math:`b`
    the actual batch size (summed over processes under ``torch.distributed``), and :math:`R` the removed
    columns. Training uses the batch's :math:`\beta` and back-propagates through it; evaluation uses the
    running average :math:`\bar\beta \leftarrow (1-m)\bar\beta + m\beta`. There is no variance normalisation
    and, unless ``affine=True``, no parameter.

    Symbols → arguments: :math:`K`, :math:`R`, :math:`N`, :math:`(X^\top X)^{-1}` → ``kernel``; :math:`m` →
    ``momentum``; :math:`X_b` → the metadata routed by :func:`~timm_mdn.metadata_context` or
    ``model(x, metadata=X_b)`` (see :func:`~timm_mdn.enable_metadata_kwarg`); :math:`\gamma, \delta` →
    ``weight``, ``bias``.

    Lazy state: :math:`\bar\beta` has shape :math:`(K, *\text{feature shape})`, known only from the first
    training batch (the spatial size of a map, the number of tokens), so, as in ``torch.nn.modules.lazy``, the
    buffer ``running_beta`` is an :class:`~torch.nn.parameter.UninitializedBuffer` until then (and
    ``moment_inverse``/``remove_index`` until a kernel is set); uninitialized buffers are left out of
    ``state_dict()``, and ``load_state_dict`` sizes them from the checkpoint. Copies made while unsized
    (the deep copy inside ``timm.utils.ModelEmaV2``/``ModelEmaV3``) are sized together with their original:
    they get the same kernel, and zeros of the same shape for :math:`\bar\beta`, the value an eagerly sized
    buffer would have held, so the EMA created before the first step pairs with the model entry by entry.

    Non-finite input (docs/reliability.md): with ``validate_args=True`` a training batch whose :math:`\beta`
    is not finite (any inf/NaN in the features or metadata makes it so) raises ``ValueError`` before the
    running :math:`\beta` is touched (one host-device synchronisation per layer and step, on :math:`\beta`,
    :math:`K/b` the size of the input). With ``validate_args=False`` there is no check and no synchronisation:
    the update is masked on the device (the running :math:`\beta` keeps its value for such a batch) and the
    output, non-finite, is the caller's to catch (``GradScaler`` skips the step). Under ``torch.compile`` the
    masked form is used either way. In evaluation the layer is pure and passes NaN through.

    Args:
        num_features: :math:`C`, the channel count (first, as for every timm norm layer).
        kernel: the training-set kernel; may be set later with :meth:`set_kernel` or
            :func:`~timm_mdn.set_metadata_kernel` (default: ``None``).
        momentum: :math:`m` of the running :math:`\beta` (default: ``0.1``, as the official code).
        eps: accepted for drop-in compatibility with timm's ``norm_layer(..., eps=...)``; unused, MDN divides
            by nothing (default: ``1e-5``).
        affine: learn a per-channel scale and shift after the residual (default: ``False``: the paper's layer
            has no parameters).
        sync_stats: sum :math:`X_b^\top f_b` and :math:`b` over processes when ``torch.distributed`` is
            initialised (default: ``True``).
        process_group: the group for ``sync_stats`` (default: ``None``, the world).
        validate_args: raise on non-finite features or metadata instead of the masked update (default:
            ``True``).
        device, dtype: factory arguments of the parameters and the running :math:`\beta`.

    Shapes:
        - input: see the layout of each subclass; output: the same.
        - metadata: :math:`(B, K)`; in evaluation :math:`(B, |R|)` is also accepted, as only the removed
          columns are used there (the label columns are not needed at test time).

    Raises:
        ValueError: in ``forward`` when no kernel is set, the batch is empty, the metadata are missing, are
            not :math:`(B, K)`, have a different batch size than the input, the channel count differs from
            ``num_features``, the feature shape changed since the running :math:`\beta` was estimated, in
            evaluation before any running :math:`\beta` exists, the input is on another device than the layer,
            or (``validate_args=True``) the metadata or the training features are not finite.
        TypeError: for integer input, or floating input of another precision than the layer (float64 into a
            float32 layer; half precision into a float32 layer is computed in float32, as under autocast).
    """

    _channel_dim: int = 1
    _layout: str = ""
    moment_inverse: Tensor
    remove_index: Tensor
    running_beta: Tensor
    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def __init__(
        self,
        num_features: int,
        kernel: MetadataKernel | None = None,
        momentum: float = 0.1,
        eps: float = 1e-5,
        affine: bool = False,
        sync_stats: bool = True,
        process_group: ProcessGroup | None = None,
        validate_args: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must lie in (0, 1], got {momentum}")
        self.num_features = num_features
        self.momentum = float(momentum)
        self.eps = eps
        self.affine = affine
        self.sync_stats = sync_stats
        self.process_group = process_group
        self.validate_args = bool(validate_args)
        self.metadata: Tensor | None = None
        self._finite: Tensor | None = None  # the last metadata checked for inf/NaN (one sync per batch)
        self._beta_unestimated = (
            False  # sized (reset, or by a copy's first batch) but no batch of its own yet
        )
        self._lineage = Lineage()
        self._lineage.members.add(self)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("moment_inverse", LazyBuffer(device=device, dtype=torch.float64))
        self.register_buffer("remove_index", LazyBuffer(device=device, dtype=torch.long))
        self.register_buffer("running_beta", LazyBuffer(**factory))
        if kernel is not None:
            self.set_kernel(kernel)
        self.reset_parameters()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lineage.members.add(self)  # a deep copy joins its original's lineage; an unpickled one its own

    def has_uninitialized_params(self) -> bool:
        """Whether any state is still unsized (``torch.nn.modules.lazy``'s name for it)."""
        return any(is_unsized(buffer) for buffer in self._buffers.values())

    def reset_running_stats(self) -> None:
        r"""Zero the running :math:`\beta` in place (as BatchNorm does); the next training batch estimates it.

        That batch may also change its feature shape (a new input size).
        """
        beta = self.running_beta
        if not is_unsized(beta):
            with torch.no_grad():
                beta.zero_()
            self._beta_unestimated = True

    def reset_parameters(self) -> None:
        r"""Reset the running :math:`\beta` and, with ``affine``, set :math:`\gamma = 1, \delta = 0`."""
        self.reset_running_stats()
        if self.weight is not None and self.bias is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def set_kernel(self, kernel: MetadataKernel) -> None:
        r"""Use ``kernel`` (built from the whole training set's metadata); forgets the running :math:`\beta`.

        Copies of this layer made before any kernel was set (an EMA copy) receive the kernel too.

        Raises:
            TypeError: if ``kernel`` is not a :class:`~timm_mdn.MetadataKernel`.
        """
        if not isinstance(kernel, MetadataKernel):
            raise TypeError(f"kernel must be a MetadataKernel, got {type(kernel).__name__}")
        moment_inverse = kernel.inverse.to(dtype=torch.float64) * kernel.num_samples
        remove = torch.tensor(kernel.remove, dtype=torch.long)
        self._set_kernel_state(moment_inverse, remove)
        for other in self._lineage.others(self):
            if isinstance(other, MetadataNormBase) and not other.has_kernel:
                other._set_kernel_state(moment_inverse, remove)

    def _set_kernel_state(self, moment_inverse: Tensor, remove_index: Tensor) -> None:
        assign_buffer(self, "moment_inverse", moment_inverse)
        assign_buffer(self, "remove_index", remove_index)
        beta = self.running_beta
        if not is_unsized(beta) and beta.shape[0] != moment_inverse.shape[0]:  # another K: unsized again
            self._buffers["running_beta"] = LazyBuffer(device=beta.device, dtype=beta.dtype)
        self.reset_running_stats()

    @property
    def has_kernel(self) -> bool:
        """Whether a kernel has been set (directly or through a loaded ``state_dict``)."""
        return not is_unsized(self.moment_inverse)

    @property
    def num_columns(self) -> int:
        """:math:`K`, the metadata columns the kernel expects (0 before a kernel is set)."""
        return int(self.moment_inverse.shape[0]) if self.has_kernel else 0

    def copy_kernel_from(self, other: MetadataNormBase) -> None:
        r"""Use the kernel of another MDN layer; the running :math:`\beta` starts afresh."""
        if other.has_kernel:
            self._set_kernel_state(other.moment_inverse, other.remove_index)

    def _check(self, input: Tensor, metadata: Tensor | None) -> Tensor:
        name = type(self).__name__
        if not self.has_kernel:
            raise ValueError(
                f"{name} has no metadata kernel: pass kernel=MetadataKernel.from_design(X_train, remove=...) "
                "or call timm_mdn.set_metadata_kernel(model, kernel) before the first forward"
            )
        self._check_layout(input)
        self._check_input(input)
        if metadata is None:
            raise ValueError(
                f"{name} needs the batch's metadata: call model(x, metadata=X) on a model prepared with "
                "timm_mdn.enable_metadata_kwarg(model) (registered mdn_* models are), or run the forward "
                "inside `with timm_mdn.metadata_context(model, X):`"
            )
        if not isinstance(metadata, Tensor):
            raise TypeError(f"metadata must be a torch.Tensor, got {type(metadata).__name__}")
        k, k_removed = self.num_columns, self.remove_index.numel()
        allowed = (k,) if self.training else (k, k_removed)
        if metadata.dim() != 2 or metadata.shape[1] not in allowed:
            expected = (
                f"(B, {k})" if self.training else f"(B, {k}) or (B, {k_removed}) (removed columns only)"
            )
            raise ValueError(f"metadata must have shape {expected}, got {tuple(metadata.shape)}")
        if metadata.shape[0] != input.shape[0]:
            raise ValueError(
                f"metadata has {metadata.shape[0]} rows but the batch has {input.shape[0]} samples; pass the "
                "metadata of exactly this batch (per process under DDP)"
            )
        if metadata.is_complex() or metadata.dtype == torch.bool:
            raise TypeError(f"metadata must be a real tensor, got {metadata.dtype}")
        if self.validate_args and not torch.compiler.is_compiling() and metadata is not self._finite:
            if not bool(torch.isfinite(metadata).all()):
                raise ValueError(f"{name}: metadata hold inf or NaN; expected finite metadata rows")
            self._finite = metadata
        if metadata.device != input.device:
            metadata = metadata.to(input.device)
        return metadata

    def _check_input(self, input: Tensor) -> None:
        name = type(self).__name__
        if input.shape[0] == 0:
            raise ValueError(f"{name}: input is an empty batch {tuple(input.shape)}; expected B >= 1 samples")
        own = self.running_beta.dtype
        if not input.is_floating_point():
            raise TypeError(f"{name}: input must be floating point like the layer ({own}), got {input.dtype}")
        if input.dtype != own and not (own == torch.float32 and input.dtype in _HALF):
            raise TypeError(
                f"{name}: input is {input.dtype} but the layer is {own}; convert one of them, e.g. "
                f"layer.to({input.dtype}) or input.to({own})"
            )
        if input.device != self.moment_inverse.device:
            raise ValueError(
                f"{name}: input is on {input.device} but the layer's state is on "
                f"{self.moment_inverse.device}; move the model with model.to({str(input.device)!r})"
            )

    def _check_layout(self, input: Tensor) -> None:
        if input.dim() < 2 or input.shape[self._channel_dim] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects input of shape {self._layout} with "
                f"C={self.num_features}, got {tuple(input.shape)}"
            )

    def _running_beta(self, input: Tensor) -> Tensor:
        shape = (self.num_columns, *input.shape[1:])
        beta = self.running_beta
        name = type(self).__name__
        if is_unsized(beta):
            if not self.training:
                raise ValueError(
                    f"{name} has no running beta yet: train on at least one batch, or load a state_dict "
                    "that holds one, before evaluation"
                )
            self._size_running_beta(shape)
            for other in self._lineage.others(self):  # an EMA copy made before this first batch
                if (
                    isinstance(other, MetadataNormBase)
                    and is_unsized(other.running_beta)
                    and other.num_columns == self.num_columns
                ):
                    other._size_running_beta(shape)
                    other._beta_unestimated = True
        elif beta.shape != shape:
            if not (self.training and self._beta_unestimated):
                raise ValueError(
                    f"{name}: the running beta was estimated for features of shape {tuple(beta.shape[1:])}, "
                    f"got {tuple(input.shape[1:])}; call reset_running_stats() to start over"
                )
            self._size_running_beta(shape)  # reset, or sized by a copy trained at another size
        if self.training:
            self._beta_unestimated = False
        return self.running_beta

    def _size_running_beta(self, shape: tuple[int, ...]) -> None:
        beta = self.running_beta
        assign_buffer(self, "running_beta", torch.zeros(shape, device=beta.device, dtype=beta.dtype))

    def _affine(self, out: Tensor) -> Tensor:
        if self.weight is None or self.bias is None:
            return out
        # Half-precision activations (autocast) meet float32 parameters in float32, as addcmul would promote.
        return channel_affine(out.to(self.weight.dtype), self.weight, self.bias, self._channel_dim)

    def forward(self, input: Tensor) -> Tensor:
        """Remove the confounders' linear effect from ``input``; the metadata come from :attr:`metadata`."""
        metadata = self._check(input, self.metadata)
        running_beta = self._running_beta(input)
        channels_first = self._channel_dim == 1  # the affine goes into the same node
        out = metadata_norm(
            input,
            metadata,
            self.moment_inverse,
            self.remove_index,
            running_beta,
            self.training,
            self.momentum,
            sync=self.sync_stats,
            process_group=self.process_group,
            validate_args=self.validate_args,
            weight=self.weight if channels_first else None,
            bias=self.bias if channels_first else None,
        )
        return out if channels_first else self._affine(out).to(input.dtype)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        # As torch.nn.modules.lazy, but unsized buffers are left out (nothing to save; weights_only loads).
        for name, param in self._parameters.items():
            if param is not None:
                destination[prefix + name] = param if keep_vars else param.detach()
        for name, buf in self._buffers.items():
            if buf is not None and name not in self._non_persistent_buffers_set and not is_unsized(buf):
                destination[prefix + name] = buf if keep_vars else buf.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Lazily sized buffers adopt the checkpoint's shape. Missing keys are not reported for buffers that
        # are still unsized (nothing was lost), nor at all for a checkpoint without any MDN state (a plain
        # model's), so plain checkpoints load with strict=True.
        present = [name for name in _STATE if prefix + name in state_dict]
        for name in present:
            incoming = state_dict[prefix + name]
            own = self._buffers[name]
            if isinstance(incoming, Tensor) and not is_unsized(incoming) and own is not None:
                if is_unsized(own) or own.shape != incoming.shape:
                    assign_buffer(self, name, incoming)  # sized here, filled again by the load below
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._beta_unestimated = False
        for name in _STATE:
            key = prefix + name
            if key in missing_keys and (not present or is_unsized(self._buffers[name])):
                missing_keys.remove(key)

    def extra_repr(self) -> str:
        """``num_features``, ``momentum``, ``affine`` and, once set, the kernel's columns."""
        text = f"{self.num_features}, momentum={self.momentum}, affine={self.affine}"
        if self.has_kernel:
            text += f", num_columns={self.num_columns}, remove={self.remove_index.tolist()}"
        return text


class MetadataNorm(MetadataNormBase):
    r"""Metadata Normalization for channels-last features: :math:`(B, C)` or tokens :math:`(B, N, C)`.

    The ``norm_layer`` of timm's ViT and of pooled heads. See :class:`MetadataNormBase` for the formula,
    arguments and errors.
    """

    _channel_dim = -1
    _layout = "(B, C) or (B, N, C)"


class MetadataNorm1d(MetadataNormBase):
    r"""Metadata Normalization for :math:`(B, C)` or :math:`(B, C, L)` inputs, a drop-in for ``BatchNorm1d``.

    See :class:`MetadataNormBase` for the formula, arguments and errors.
    """

    _layout = "(B, C) or (B, C, L)"

    def _check_layout(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"MetadataNorm1d expects a 2-D or 3-D input, got {tuple(input.shape)}")
        super()._check_layout(input)


class MetadataNorm2d(MetadataNormBase):
    r"""Metadata Normalization for :math:`(B, C, H, W)` feature maps, a drop-in for ``BatchNorm2d``.

    One regression per element of the :math:`C \times H \times W` map, as in the paper's MDN-Conv. See
    :class:`MetadataNormBase` for the formula, arguments and errors.
    """

    _layout = "(B, C, H, W)"

    def _check_layout(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"MetadataNorm2d expects a 4-D input (B, C, H, W), got {tuple(input.shape)}")
        super()._check_layout(input)
