r"""Fused SoftTriple computation: per-sample losses and their exact gradients in one autograd node.

SoftTriple loss, Qian et al., ICCV 2019, https://arxiv.org/abs/1909.05235.

The forward pass is the paper's Eq. (8)-(9):

.. math::
    \mathcal{S}_{i,c} = \sum_k q_k^c \, \hat x_i^\top \hat w_c^k, \qquad
    q_k^c = \frac{\exp(\hat x_i^\top \hat w_c^k / \gamma)}
        {\sum_{k'} \exp(\hat x_i^\top \hat w_c^{k'} / \gamma)}

.. math::
    \ell_i = -\log \frac{\exp(\lambda(\mathcal{S}_{i,y_i} - \delta))}
        {\exp(\lambda(\mathcal{S}_{i,y_i} - \delta)) + \sum_{j \ne y_i} \exp(\lambda \mathcal{S}_{i,j})}

and the backward pass is its closed form, with
:math:`\partial \mathcal{S}_{i,c} / \partial s_{i,c,k} =
q_k^c (1 + (s_{i,c,k} - \mathcal{S}_{i,c}) / \gamma)`,
where :math:`s_{i,c,k} = \hat x_i^\top \hat w_c^k`.

Why a custom node: the work that cannot be avoided is three ``B x d x (C K)`` matmuls (similarities, the
embedding gradient, the centre gradient). Everything else is elementwise on ``B x C K`` or ``d x C K`` arrays,
and on a CPU each fresh allocation of such an array costs page faults comparable to the arithmetic itself.
This node never materialises the normalised centres (the column norms are folded into the similarities and
into an in-place correction of the centre gradient) and never calls the slow small-last-dimension softmax
kernel.

Two implementations give the same values and gradients:

- on a CPU, for float32/float64, the fused kernels of :mod:`pml_softtriple._cpu_kernels`: the operator
  ``torch.ops.graftkit_soft_triple.losses``, an autograd node written in C++ whose forward and backward
  passes are one C++ call each (the products included), so no Python runs inside or between them; only the
  products ``w^T x_hat`` and the class probabilities are kept for the backward pass, which recomputes the
  cosines and the soft assignment;
- elsewhere (GPUs, half precision inputs, kernels unavailable), :class:`_SoftTripleFunction`, PyTorch
  operations, which keep the cosines, the softmax numerators and, for K > 2, ``exp(s / gamma)`` (for K = 2,
  one ``C x B`` array).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _cpu_kernels

__all__ = ["Workspace", "soft_triple_losses", "soft_triple_similarity", "uses_cpu_kernels"]

_NORM_EPS = 1e-12  # same clamp as torch.nn.functional.normalize (used by PML's CosineSimilarity)
_ROW_BLOCK = 8  # fewest rows accumulated at once in column-wise reductions
_ACC_ELEMENTS = 1 << 16  # accumulator size of column-wise reductions (256 KiB of float32)
_BMM_ROW_DOT = 1 << 21  # elements from which row dots are batched matmuls (faster there, no temporary)


def _column_sq_norms(weight: torch.Tensor) -> torch.Tensor:
    """``(weight * weight).sum(0)``, accumulated in place over row blocks: no ``d x N`` temporary."""
    rows, cols = weight.shape
    block = min(rows, max(_ROW_BLOCK, _ACC_ELEMENTS // max(cols, 1)))  # accumulator stays in cache
    acc = weight[:block].square()
    full = rows - rows % block
    for start in range(block, full, block):
        acc.addcmul_(weight[start : start + block], weight[start : start + block])
    out = acc.sum(0)
    if full < rows:
        out += weight[full:].square().sum(0)
    return out


class Workspace:
    """Scratch buffers reused across calls for the temporaries of one forward or one backward pass.

    PyTorch's CPU allocator does not cache: every fresh ``(C K, B)`` temporary is new memory from the OS, and
    its first touch costs page faults comparable to the arithmetic done on it. Only arrays that die inside
    the call that took them come from here (never a tensor saved for backward or returned), and buffers are
    per thread, so reentrant or concurrent use of one loss stays correct. Copies and pickles start empty.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def take(self, key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A buffer of ``shape`` with ``like``'s dtype and device (uninitialised)."""
        buffers: dict[str, torch.Tensor] = self._local.__dict__.setdefault("buffers", {})
        buf = buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def clear(self) -> None:
        """Free this thread's buffers."""
        self._local.__dict__.pop("buffers", None)

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._local = threading.local()

    def __deepcopy__(self, memo: dict[int, Any]) -> Workspace:
        return Workspace()


def _take(workspace: Workspace | None, key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    if workspace is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return workspace.take(key, shape, like)


def _row_dot(a: torch.Tensor, b: torch.Tensor, workspace: Workspace | None, key: str) -> torch.Tensor:
    """``(a * b).sum(1)`` for contiguous 2-D tensors.

    Batched dot products when large (faster there, and no temporary), else the product in a scratch buffer.
    """
    if a.numel() >= _BMM_ROW_DOT:
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
    return torch.mul(a, b, out=_take(workspace, key, a.shape, a)).sum(1)


def _unshifted_exp_is_safe(inv_gamma: float, num_centers: int, dtype: torch.dtype) -> bool:
    """Whether ``exp(s / gamma)`` for ``|s| <= 1`` neither overflows (summed over K) nor underflows."""
    info = torch.finfo(dtype)
    bound = inv_gamma * (1.0 + 1e-3)  # cosines may exceed 1 by a few ulps
    return bound + math.log(num_centers) < math.log(info.max) - 2.0 and bound < -math.log(info.tiny) - 2.0


class _SoftTripleFunction(torch.autograd.Function):
    r"""Everything runs on transposed ``(C * K, B)`` similarity arrays.

    Viewed as ``(C, K, B)``, the K centres of a class are K slices ``[:, k, :]`` whose rows are contiguous
    batch vectors, so sums and products over centres vectorise; the ``(B, C, K)`` layout would put a tiny K
    axis innermost, where CPU kernels (softmax especially) are an order of magnitude slower. Broadcasts over
    the K axis use ``(C, 1, B)`` operands against contiguous ``(C, K, B)`` arrays (``addcmul`` with strided
    operands leaves PyTorch's vectorised CPU path).

    The normalised embeddings are kept transposed and contiguous, ``(d, B)``: with them both the similarity
    product and the centre-gradient product run in BLAS's fastest operand layouts (at 11318 classes the
    similarity product from the ``(B, d)`` embeddings takes about a fifth longer).

    Fresh arrays of this size cost page faults comparable to the arithmetic on them, so the passes are
    arranged to allocate few: the logits become the softmax numerators in place. On the PyTorch path K = 2
    (the paper's setting for many classes) uses its closed form through one sigmoid, saving only
    :math:`\partial S' / \partial s_1` (one ``(C, B)`` array) for the backward pass, and for K > 2 the kept
    similarities are :math:`t = s / \gamma` (the column norms and :math:`1/\gamma` scale the product in
    one pass). The fused CPU kernels keep :math:`s` and recompute the soft assignment.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        embeddings: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        centers_per_class: int,
        la: float,
        gamma: float,
        margin: float,
        workspace: Workspace | None,
    ) -> torch.Tensor:
        batch, dim = embeddings.shape
        k = centers_per_class
        inv_gamma = 1.0 / gamma
        x_norm = torch.linalg.vector_norm(embeddings, dim=1)
        # x_hat^T, (d, B) and contiguous (torch.nn.functional.normalize, transposed): a blocked transposing
        # copy, then a contiguous scaling, is faster than one strided multiply.
        inv_x_norm = x_norm.clamp_min(_NORM_EPS).reciprocal_()
        x_hat_t = embeddings.new_empty((dim, batch)).copy_(embeddings.t()).mul_(inv_x_norm)
        norm = _column_sq_norms(weight).sqrt_()
        live = norm > _NORM_EPS
        inv_norm = norm.clamp_min_(_NORM_EPS).reciprocal_()[:, None]
        sim = torch.mm(weight.t(), x_hat_t)  # x_hat_i . w_j, (C*K, B)
        # s_{(c,k),i} = x_hat_i . w_j / ||w_j||; for K > 2 scaled by 1/gamma in the same pass
        sim.mul_(inv_norm if k <= 2 else inv_norm * inv_gamma)
        sim3 = sim.view(num_classes, k, batch)

        saved: tuple[torch.Tensor, ...] = ()
        if k == 1:
            logits = torch.mul(sim, la)  # K = 1: S' = s (normalised softmax)
        elif k == 2:
            # q_1 = sigmoid((s_1 - s_0) / gamma), S' = s_0 + q_1 (s_1 - s_0): stable for any gamma.
            diff = torch.sub(sim3[:, 1], sim3[:, 0])
            q1 = torch.mul(diff, inv_gamma, out=_take(workspace, "q1", diff.shape, diff)).sigmoid_()
            part = torch.mul(q1, diff)  # q_1 (s_1 - s_0); becomes the logits
            # dS'/ds_1 = q_1 + q_0 q_1 (s_1 - s_0) / gamma (into diff's buffer), and dS'/ds_0 = 1 - dS'/ds_1.
            d1 = torch.add(q1, torch.addcmul(part, part, q1, value=-1.0, out=diff), alpha=inv_gamma, out=diff)
            logits = part.add_(sim3[:, 0]).mul_(la)
            saved = (d1,)
        else:
            # sim holds t = s / gamma here.
            if _unshifted_exp_is_safe(inv_gamma, k, sim.dtype):
                expo = torch.exp(sim)
            else:  # hard-max regime: subtract each class's best centre before exponentiating
                expo = torch.sub(sim3, sim3.amax(dim=1, keepdim=True)).exp_().view(-1, batch)
            denom = expo.view(num_classes, k, batch).sum(1)
            weighted = torch.mul(expo, sim, out=_take(workspace, "weighted", sim.shape, sim))
            smooth = weighted.view(num_classes, k, batch).sum(1).div_(denom)  # S' / gamma
            logits = torch.mul(smooth, la * gamma)
            saved = (expo, denom, smooth)

        cols = torch.arange(batch, device=embeddings.device)
        logits[labels, cols] -= la * margin  # lambda (S'_{c,i} - delta 1[c = y_i]), (C, B)
        target = logits[labels, cols]
        info = torch.finfo(logits.dtype)
        if la * (2.0 + margin) + 2.0 < -math.log(info.tiny) - 2.0:
            # logits lie in [-la (1 + delta), la]: shifting by la can neither overflow nor underflow.
            top: torch.Tensor | float = la
        else:
            top = logits.amax(dim=0)
        numer = logits.sub_(top).exp_()  # softmax numerators, in the logits' buffer
        total = numer.sum(0)
        losses = total.log().add_(top).sub_(target)

        ctx.save_for_backward(
            embeddings, x_norm, x_hat_t, weight, inv_norm, live, sim, numer, total, labels, *saved
        )
        ctx.hyper = (num_classes, k, la, gamma)
        ctx.workspace = workspace
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        embeddings, x_norm, x_hat_t, weight, inv_norm, live, sim, numer, total, labels, *saved = (
            ctx.saved_tensors
        )
        num_classes, k, la, gamma = ctx.hyper
        batch = x_hat_t.shape[1]
        cols = torch.arange(batch, device=x_hat_t.device)

        # dl_i / dS'_{c,i} = lambda * (p_{c,i} - 1[c = y_i]), times the incoming per-sample gradient.
        scale = grad_losses * la
        workspace = ctx.workspace
        grad_sim = _take(workspace, "grad_sim", sim.shape, sim)
        sim_scale = 1.0  # s = sim_scale * sim
        if k > 2:
            # With t = s / gamma: dS'/ds_k = q_k (1 + t_k - S'/gamma) = e_k [r (1 - S'/gamma) + r t_k],
            # where r = g / Z.
            expo, denom, smooth = saved
            sim_scale = gamma
            ratio = torch.mul(numer, scale / total, out=_take(workspace, "ratio", numer.shape, numer))
            ratio[labels, cols] -= scale
            ratio.div_(denom)
            offset = torch.addcmul(
                ratio, ratio, smooth, value=-1.0, out=_take(workspace, "offset", ratio.shape, ratio)
            )
            grad3 = grad_sim.view(num_classes, k, batch)
            torch.addcmul(offset[:, None, :], sim.view(num_classes, k, batch), ratio[:, None, :], out=grad3)
            grad_sim.mul_(expo)
        elif k == 2:
            (d1,) = saved
            grad3 = grad_sim.view(num_classes, 2, batch)
            grad0, grad1 = grad3[:, 0], grad3[:, 1]
            torch.mul(numer, scale / total, out=grad0)
            grad0[labels, cols] -= scale  # dl/dS'
            torch.mul(grad0, d1, out=grad1)  # dl/ds_1
            grad0.sub_(grad1)  # dl/ds_0
        else:
            torch.mul(numer, scale / total, out=grad_sim)
            grad_sim[labels, cols] -= scale
        grad_sim.mul_(inv_norm)  # dl / d(x_hat . w_j), (C*K, B)

        grad_embeddings = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x_hat = torch.mm(grad_sim.t(), weight.t())  # (B, d), contiguous like the embeddings
            # Backward of x / max(||x||, eps): (g - x_hat (x_hat . g)) / ||x||, with x_hat (x_hat . g) =
            # x (x . g) / ||x||^2.
            inv_x_norm = x_norm.clamp_min(_NORM_EPS).reciprocal_()
            radial = _row_dot(grad_x_hat, embeddings, workspace, "x_dot").mul_(inv_x_norm.square())
            radial.masked_fill_(x_norm <= _NORM_EPS, 0.0)
            grad_embeddings = torch.addcmul(grad_x_hat, embeddings, radial[:, None], value=-1.0)
            grad_embeddings.mul_(inv_x_norm[:, None])
        if ctx.needs_input_grad[1]:
            # d s_{j,i} / d w_j = (x_hat_i - s_{j,i} w_j / ||w_j||) / ||w_j||  (zero columns: no radial part).
            row_dots = _row_dot(grad_sim, sim, workspace, "w_dot")
            radial_w = row_dots.mul_(inv_norm[:, 0] * sim_scale)
            radial_w.masked_fill_(~live, 0.0)
            if weight.numel() >= _BMM_ROW_DOT:  # large: let the GEMM accumulate onto the radial part
                grad_weight = torch.mul(weight, radial_w.neg_()).addmm_(x_hat_t, grad_sim.t())
            else:
                grad_weight = torch.mm(x_hat_t, grad_sim.t()).addcmul_(weight, radial_w, value=-1.0)
        return grad_embeddings, grad_weight, None, None, None, None, None, None, None


def uses_cpu_kernels(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether :func:`soft_triple_losses` runs these inputs through the fused CPU kernels.

    The kernels check the label range and the embeddings' finiteness themselves (``ValueError``), so a caller
    that validates its inputs can leave those two checks (a reduction each) to them.
    """
    return (
        _cpu_kernels.use_for(weight)
        and embeddings.dtype == weight.dtype
        and embeddings.is_contiguous()
        and weight.is_contiguous()
        and labels.dtype == torch.int64
        and labels.is_contiguous()
    )


def _call_losses_operator(*args: Any) -> torch.Tensor:
    out: torch.Tensor = torch.ops.graftkit_soft_triple.losses(*args)
    return out


_call_losses_operator_eagerly = torch.compiler.disable(_call_losses_operator)  # a graph break when compiled


def _cpu_kernel_losses(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    centers_per_class: int,
    la: float,
    gamma: float,
    margin: float,
) -> torch.Tensor:
    """:func:`soft_triple_losses` through the fused CPU kernels, for inputs :func:`uses_cpu_kernels` accepts.

    One C++ autograd node (``csrc/soft_triple_cpu.cpp``): no Python in either pass. Its backward reuses
    scratch arrays of its own, per thread. Under ``torch.compile`` the call is a graph break: the operator
    has no fake-tensor implementation, so it runs eagerly between the compiled parts.
    """
    args = (embeddings, weight, labels, centers_per_class, float(la), float(gamma), float(margin), _NORM_EPS)
    if torch.compiler.is_compiling():
        return _call_losses_operator_eagerly(*args)
    return _call_losses_operator(*args)


def soft_triple_losses(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    centers_per_class: int,
    la: float = 20.0,
    gamma: float = 0.1,
    margin: float = 0.01,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    r"""Per-sample SoftTriple losses :math:`\ell_i` (no reduction, no centre regulariser).

    This is the functional core of :class:`~pml_softtriple.SoftTripleLoss`. It does no input validation
    beyond what the shapes force; use the module for checked inputs, autocast handling and PML integration.

    Args:
        embeddings: :math:`x`, shape ``(B, d)``; normalised inside.
        weight: the centres :math:`w`, shape ``(d, C * K)``, column ``c * K + k`` is centre ``k`` of class
            ``c`` (PML's layout); normalised inside.
        labels: :math:`y`, integer class indices in ``[0, C)``, shape ``(B,)``.
        centers_per_class: :math:`K`.
        la: :math:`\lambda`, the scale (default: ``20``).
        gamma: :math:`\gamma`, the entropy weight over centres (default: ``0.1``).
        margin: :math:`\delta`, subtracted from the true class similarity (default: ``0.01``).
        workspace: scratch buffers reused across calls (see :class:`Workspace`); ``None`` allocates fresh
            ones each call (default: ``None``).

    Returns:
        Tensor of shape ``(B,)`` in the common dtype of ``embeddings`` and ``weight``.
    """
    out: torch.Tensor
    if uses_cpu_kernels(embeddings, weight, labels):
        return _cpu_kernel_losses(embeddings, weight, labels, centers_per_class, la, gamma, margin)
    num_classes = weight.shape[1] // centers_per_class
    out = _SoftTripleFunction.apply(
        embeddings,
        weight,
        labels,
        num_classes,
        centers_per_class,
        float(la),
        float(gamma),
        float(margin),
        workspace,
    )
    return out


def soft_triple_similarity(
    embeddings: torch.Tensor, weight: torch.Tensor, centers_per_class: int, gamma: float = 0.1
) -> torch.Tensor:
    r"""The relaxed class similarity :math:`\mathcal{S}'_{i,c}` (Eq. 8), differentiable, shape ``(B, C)``.

    ``la * soft_triple_similarity(...)`` are the logits of the SoftTriple classifier.

    Args:
        embeddings: shape ``(B, d)``.
        weight: shape ``(d, C * K)`` (PML's layout).
        centers_per_class: :math:`K`.
        gamma: :math:`\gamma` (default: ``0.1``).
    """
    sim = F.normalize(embeddings, dim=1, eps=_NORM_EPS) @ F.normalize(weight, dim=0, eps=_NORM_EPS)
    sim3 = sim.view(sim.shape[0], -1, centers_per_class)
    if centers_per_class == 1:
        return sim3[:, :, 0]
    prob = torch.softmax(sim3 / gamma, dim=2)
    return (prob * sim3).sum(2)
