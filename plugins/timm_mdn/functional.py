r"""Functional Metadata Normalization: the per-batch regression and its residual.

Metadata Normalization (Lu et al., CVPR 2021, https://arxiv.org/abs/2104.09052). With the training-set design
matrix :math:`X \in \mathbb{R}^{N \times K}`, a batch's metadata rows :math:`X_b \in \mathbb{R}^{b \times K}`
and its features flattened to :math:`f_b \in \mathbb{R}^{b \times D}` (one regression per feature element):

.. math::
    \beta = \frac{N}{b}\,(X^\top X)^{-1} X_b^\top f_b
          = \frac{1}{b}\Big(\tfrac{1}{N} X^\top X\Big)^{-1} X_b^\top f_b,
    \qquad r = f_b - X_{b,R}\,\beta_R,

where :math:`R` are the removed columns (confounders, usually the intercept). In training the gradient flows
through :math:`\beta`; in evaluation the running average of :math:`\beta` is used. Under ``torch.distributed``
the sufficient statistics :math:`X_b^\top f_b` and :math:`b` are summed over processes first, so every process
uses the :math:`\beta` of the global batch — exactly what one process would compute on the concatenated batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["channel_affine", "metadata_norm", "metadata_residual"]


class _Residual(torch.autograd.Function):
    r""":math:`r = f - U T` with :math:`T = X_b^\top f` summed over processes, as one fused autograd node.

    Forward: one read of :math:`f` for :math:`T`, one ``addmm`` for :math:`r`. Backward (:math:`U` and
    :math:`X_b` are constants): :math:`\partial L/\partial f = g - X_b\,\mathrm{allreduce}(U^\top g)`, again
    one ``mm`` and one ``addmm``; autograd's generic graph would spend an extra full-size add.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        features: Tensor,
        metadata: Tensor,
        projector: Tensor,
        moment_inverse: Tensor,
        group: ProcessGroup | None,
        sync: bool,
    ) -> tuple[Tensor, Tensor]:
        stats = metadata.T @ features  # (K, D)
        count = features.new_full((1,), features.shape[0])
        if sync:
            packed = torch.cat([stats.flatten(), count])
            dist.all_reduce(packed, group=group)
            stats, count = packed[:-1].view_as(stats), packed[-1:]
        scale = 1.0 / count
        out = torch.addmm(features, projector * scale, stats, alpha=-1.0)
        beta = (moment_inverse @ stats) * scale  # (K, D): the full per-batch estimate
        ctx.save_for_backward(metadata, projector * scale)
        ctx.group = group  # type: ignore[attr-defined]
        ctx.sync = sync  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(beta)
        return out, beta

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor, grad_beta: Tensor | None
    ) -> tuple[Tensor | None, None, None, None, None, None]:
        metadata, projector = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_out = grad_out.to(projector.dtype)  # the backward runs outside autocast: one dtype
        grad_stats = projector.T @ grad_out  # (K, D)
        if ctx.sync:  # type: ignore[attr-defined]
            dist.all_reduce(grad_stats, group=ctx.group)  # type: ignore[attr-defined]
        grad_features = torch.addmm(grad_out, metadata, grad_stats, alpha=-1.0)
        return grad_features, None, None, None, None, None


class _AffineResidual(torch.autograd.Function):
    r""":math:`y = \gamma \odot (f - U T) + \delta` for channels-first features :math:`(b, C, S)`, one node.

    Forward: :math:`T = X_b^\top f` (one read), :math:`\gamma \odot f` (one pass), then one ``addmm_`` in
    place with :math:`[-U, 1]` and :math:`[\gamma \odot T; \delta]` that subtracts the confounders' part and
    adds :math:`\delta` together. Backward, with :math:`G = U^\top g` (:math:`K \times D`, summed over
    processes where :math:`T` is): :math:`h = \gamma \odot g`, :math:`\partial L/\partial f =
    h - X_b (G \odot \gamma)` in place on :math:`h`, :math:`\partial L/\partial \gamma = \sum g \odot f -
    \sum_k T \odot G_{\text{local}}` (the residual is never stored), :math:`\partial L/\partial \delta =
    \sum g`: six reads and two writes of a full-size tensor, against nine and five for the two nodes apart.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        features: Tensor,
        metadata: Tensor,
        projector: Tensor,
        moment_inverse: Tensor,
        weight: Tensor,
        bias: Tensor,
        group: ProcessGroup | None,
        sync: bool,
    ) -> tuple[Tensor, Tensor]:
        b, c = features.shape[0], weight.shape[0]
        stats = metadata.T @ features  # (K, D)
        count = features.new_full((1,), b)
        if sync:
            packed = torch.cat([stats.flatten(), count])
            dist.all_reduce(packed, group=group)
            stats, count = packed[:-1].view_as(stats), packed[-1:]
        scale = 1.0 / count
        scaled = projector * scale  # U, (b, K)
        gamma = weight.view(1, c, 1)
        out = torch.empty_like(features)  # not a view: the caller may apply an in-place activation
        torch.mul(features.view(b, c, -1), gamma, out=out.view(b, c, -1))
        left = torch.cat([-scaled, scaled.new_ones(b, 1)], dim=1)  # (b, K + 1)
        right = torch.cat(
            [
                (stats.view(-1, c, stats.shape[1] // c) * gamma).view_as(stats),
                bias.view(c, 1).expand(c, stats.shape[1] // c).reshape(1, -1),
            ]
        )
        out.addmm_(left, right)
        beta = (moment_inverse @ stats) * scale  # (K, D): the full per-batch estimate
        ctx.save_for_backward(features, metadata, scaled, stats, weight)
        ctx.group = group  # type: ignore[attr-defined]
        ctx.sync = sync  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(beta)
        return out, beta

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor, grad_beta: Tensor | None
    ) -> tuple[Tensor | None, None, None, None, Tensor | None, Tensor | None, None, None]:
        features, metadata, scaled, stats, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_out = grad_out.to(features.dtype)
        b, c = features.shape[0], weight.shape[0]
        g3 = grad_out.reshape(b, c, -1)
        local = scaled.T @ grad_out  # (K, D)
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad_weight = grad_bias = None
        if needs[4]:
            cross = torch.linalg.vecdot(g3, features.view(b, c, -1)).sum(0)
            grad_weight = cross - (stats * local).sum(0).view(c, -1).sum(1)
        if needs[5]:
            grad_bias = g3.sum((0, 2))
        gamma_d = weight.view(1, c, 1)
        grad_stats = (local.view(-1, c, local.shape[1] // c) * gamma_d).view_as(local)
        if ctx.sync:  # type: ignore[attr-defined]
            dist.all_reduce(grad_stats, group=ctx.group)  # type: ignore[attr-defined]
        grad_features = (g3 * gamma_d).view(b, -1)
        grad_features.addmm_(metadata, grad_stats, alpha=-1.0)
        return grad_features, None, None, None, grad_weight, grad_bias, None, None


class _ChannelAffine(torch.autograd.Function):
    r""":math:`y = \gamma \odot x + \delta` per channel, with a backward of three passes over the gradient.

    Autograd's ``addcmul`` backward spends four full-size products; here
    :math:`\partial L/\partial x = g\,\gamma`, :math:`\partial L/\partial \delta = \sum g` and
    :math:`\partial L/\partial \gamma = \sum g \odot x` (a batched dot product, without a full-size product,
    when the channels are dimension 1 of contiguous tensors).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        input: Tensor,
        weight: Tensor,
        bias: Tensor,
        channel_dim: int,
    ) -> Tensor:
        shape = [1] * input.dim()
        shape[channel_dim] = -1
        out = input * weight.view(shape)
        out.add_(bias.view(shape))
        ctx.save_for_backward(input, weight)
        ctx.channel_dim = channel_dim % input.dim()  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        input, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        dim: int = ctx.channel_dim  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        shape = [1] * input.dim()
        shape[dim] = -1
        others = [d for d in range(input.dim()) if d != dim]
        grad_input = grad * weight.view(shape) if needs[0] else None
        grad_weight = grad_bias = None
        if needs[1]:
            if dim == 1 and input.dim() > 2 and grad.is_contiguous() and input.is_contiguous():
                b, c = input.shape[:2]
                grad_weight = torch.linalg.vecdot(grad.view(b, c, -1), input.view(b, c, -1)).sum(0)
            else:
                grad_weight = (grad * input).sum(others)
        if needs[2]:
            grad_bias = grad.sum(others)
        return grad_input, grad_weight, grad_bias, None


def channel_affine(input: Tensor, weight: Tensor, bias: Tensor, channel_dim: int = 1) -> Tensor:
    r"""Per-channel :math:`\gamma \odot x + \delta` along ``channel_dim`` (the affine of a norm layer).

    Args:
        input: any shape; ``input.shape[channel_dim]`` is :math:`C`.
        weight: :math:`\gamma`, shape :math:`(C,)`.
        bias: :math:`\delta`, shape :math:`(C,)`.
        channel_dim: the channel dimension (default: ``1``; ``-1`` for channels-last layouts).

    Returns:
        A tensor of ``input``'s shape.
    """
    out: Tensor = _ChannelAffine.apply(input, weight, bias, channel_dim)
    return out


def _sync_enabled(sync: bool, group: ProcessGroup | None) -> bool:
    return bool(sync and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1)


def metadata_residual(
    features: Tensor,
    metadata: Tensor,
    moment_inverse: Tensor,
    remove_index: Tensor,
    *,
    sync: bool = True,
    process_group: ProcessGroup | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Training-mode MDN on flat features: the residual and the per-batch :math:`\beta` (no running average).

    Args:
        features: :math:`f_b`, shape :math:`(b, D)`.
        metadata: :math:`X_b`, shape :math:`(b, K)`, same dtype as ``features``.
        moment_inverse: :math:`(X^\top X / N)^{-1}`, shape :math:`(K, K)`.
        remove_index: long tensor with the removed columns :math:`R`.
        sync: sum :math:`X_b^\top f_b` and :math:`b` over ``process_group`` when ``torch.distributed`` is
            initialised with more than one process (default: ``True``).
        process_group: the group to sum over (default: ``None``, the world).
        weight: :math:`\gamma`, shape :math:`(C,)`: an affine on the residual for features laid out as
            :math:`(b, C, S)` in memory, fused into the same node (default: ``None``, no affine).
        bias: :math:`\delta`, shape :math:`(C,)`, with ``weight`` (default: ``None``).

    Returns:
        ``(r, beta)``: the residual (after the affine, if any), shape :math:`(b, D)`, differentiable w.r.t.
        ``features`` (also through :math:`\beta`), and the detached :math:`\beta`, shape :math:`(K, D)`.
    """
    w = moment_inverse.to(torch.float64)
    x = metadata.to(torch.float64)
    projector = (x.index_select(1, remove_index) @ w.index_select(0, remove_index)).to(
        features.dtype
    )  # (b, K)
    sync_enabled = _sync_enabled(sync, process_group)
    if weight is not None and bias is not None:
        out, beta = _AffineResidual.apply(
            features,
            metadata,
            projector,
            moment_inverse.to(features.dtype),
            weight.to(features.dtype),
            bias.to(features.dtype),
            process_group,
            sync_enabled,
        )
        return out, beta
    out, beta = _Residual.apply(
        features, metadata, projector, moment_inverse.to(features.dtype), process_group, sync_enabled
    )
    return out, beta


def metadata_norm(
    input: Tensor,
    metadata: Tensor,
    moment_inverse: Tensor,
    remove_index: Tensor,
    running_beta: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    *,
    sync: bool = True,
    process_group: ProcessGroup | None = None,
    validate_args: bool = True,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    r"""Metadata Normalization of ``input`` (any shape :math:`(b, \ldots)`), flattened per sample.

    Args:
        input: features, shape :math:`(b, \ldots)`; one regression per element of ``input[i]``.
        metadata: :math:`X_b`, shape :math:`(b, K)`; in evaluation :math:`(b, |R|)` (only the removed columns)
            is accepted too.
        moment_inverse: :math:`(X^\top X / N)^{-1} = N (X^\top X)^{-1}`, shape :math:`(K, K)`.
        remove_index: long tensor with the removed columns :math:`R`.
        running_beta: running average of :math:`\beta`, shape :math:`(K, \ldots)` like ``input[0]``; updated
            in place in training when given, required in evaluation.
        training: use the batch's :math:`\beta` (with gradients) instead of ``running_beta``.
        momentum: weight of the new batch in the running average (default: ``0.1``).
        sync: sum the sufficient statistics over processes in training (default: ``True``).
        process_group: the process group for ``sync`` (default: the world).
        validate_args: in training with a ``running_beta``, raise ``ValueError`` when the batch's
            :math:`\beta` is not finite (inf/NaN in ``input`` or ``metadata``), before ``running_beta`` is
            touched; one host-device synchronisation. ``False`` (and under ``torch.compile``): no check, the
            update is masked on the device so ``running_beta`` keeps its value for such a batch (default:
            ``True``).
        weight: :math:`\gamma`, shape :math:`(C,)` with :math:`C` = ``input.shape[1]``: the per-channel affine
            on the residual, fused with the regression for contiguous channels-first input (default: ``None``,
            no affine).
        bias: :math:`\delta`, shape :math:`(C,)`, with ``weight`` (default: ``None``).

    Raises:
        ValueError: see ``validate_args``. Otherwise a pure function: NaN in gives NaN out.

    Returns:
        The residual :math:`r`, same shape and dtype as ``input``. Half-precision inputs are computed in
        float32, with autocast switched off inside (the regression is a float32 computation whatever the
        autocast region around it), so a backward outside the autocast region sees one dtype.
    """
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return metadata_norm(
                input,
                metadata,
                moment_inverse,
                remove_index,
                running_beta,
                training,
                momentum,
                sync=sync,
                process_group=process_group,
                validate_args=validate_args,
                weight=weight,
                bias=bias,
            )
    b = input.shape[0]
    compute_dtype = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    # Flatten in memory order (e.g. channels_last) so no copy is made; beta follows the same permutation.
    order = _memory_order(input)
    permuted = input.permute(0, *order)
    flat = permuted.reshape(b, -1).to(compute_dtype)
    x = metadata.to(compute_dtype)
    affine = weight is not None and bias is not None
    fused = affine and training and order == list(range(1, input.dim())) and input.is_contiguous()
    if training:
        out, beta = metadata_residual(
            flat,
            x,
            moment_inverse,
            remove_index,
            sync=sync,
            process_group=process_group,
            weight=weight if fused else None,
            bias=bias if fused else None,
        )
        if running_beta is not None:
            with torch.no_grad():
                _update_running_beta(running_beta, beta, order, momentum, validate_args)
    else:
        if running_beta is None:
            raise ValueError("running_beta is required in evaluation")
        beta_removed = (
            running_beta.index_select(0, remove_index).permute(0, *order).reshape(len(remove_index), -1)
        )
        if x.shape[1] != remove_index.numel():
            x = x.index_select(1, remove_index)
        out = torch.addmm(flat, x, beta_removed.to(compute_dtype), alpha=-1.0)
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim - 1] = position + 1
    result = out.view(permuted.shape).permute(0, *inverse)
    if weight is not None and bias is not None and not fused:
        result = channel_affine(result, weight.to(result.dtype), bias.to(result.dtype), 1)
    return result.to(input.dtype)


def _update_running_beta(
    running_beta: Tensor, beta: Tensor, order: list[int], momentum: float, validate_args: bool
) -> None:
    """``running_beta <- lerp(running_beta, beta, momentum)``, never from a non-finite ``beta``."""
    target = running_beta.permute(0, *order)
    new = beta.view(target.shape).to(running_beta.dtype)
    finite = torch.isfinite(new).all()  # any inf/NaN in a feature column or a metadata row reaches beta
    if validate_args and not torch.compiler.is_compiling():
        if not bool(finite):
            raise ValueError(
                "input contains non-finite values (nan or inf), or the metadata do; expected finite features "
                "in training (the running beta was left unchanged; validate_args=False skips such a batch's "
                "update without this check)"
            )
    else:
        new = torch.where(finite, new, target)  # lerp(a, a, m) == a: the masked, sync-free skip
    target.lerp_(new, momentum)


def _memory_order(input: Tensor) -> list[int]:
    """Non-batch dims in memory order: (H, W, C) for a channels_last map, else as they are."""
    if (
        input.dim() == 4
        and not input.is_contiguous()
        and input.is_contiguous(memory_format=torch.channels_last)
    ):
        return [2, 3, 1]
    return list(range(1, input.dim()))
