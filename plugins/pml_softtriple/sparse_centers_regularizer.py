r"""The SoftTriple centre regulariser, computed block by block (C·K² work, no (C·K)² matrix or mask)."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.reducers import DivisorReducer
from pytorch_metric_learning.regularizers import BaseRegularizer
from pytorch_metric_learning.utils import common_functions as c_f
from torch.autograd.function import once_differentiable

from ._checks import check_float, check_int

__all__ = ["SparseCentersRegularizer"]

_NAME = "SparseCentersRegularizer"
_NORM_EPS = 1e-12  # torch.nn.functional.normalize's clamp, as in PML's CosineSimilarity


class _BlockGram(torch.autograd.Function):
    """Per-class Gram blocks ``G[c] = W_c^T W_c`` of centres stored as columns of ``weight`` ``(d, C K)``.

    Autograd through ``bmm`` on the strided per-class view would spend most of its time in C tiny batched
    products and in copying a transposed gradient; the backward here writes ``d G / d W`` directly in the
    parameter's layout with K broadcast passes (for small K).
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, num_classes: int, k: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        ctx.shape = (num_classes, k)
        blocks = weight.t().reshape(num_classes, k, -1)
        return torch.bmm(blocks, blocks.transpose(1, 2))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_gram: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        num_classes, k = ctx.shape
        sym = grad_gram + grad_gram.transpose(1, 2)  # dL/dW_c = W_c (G_c' + G_c'^T)
        if k > 4:
            blocks = weight.t().reshape(num_classes, k, -1)
            return torch.bmm(sym, blocks).reshape(num_classes * k, -1).t().contiguous(), None, None
        w3 = weight.t().reshape(num_classes, k, -1).permute(2, 0, 1)  # (d, C, K), a view of fc's memory
        grad = (w3 * sym.diagonal(dim1=1, dim2=2)[None]).contiguous()  # the t = s terms, one dense pass
        for t in range(k):
            for s in range(k):
                if s != t:
                    grad[:, :, t].addcmul_(w3[:, :, s], sym[None, :, s, t])
        return grad.view(weight.shape), None, None


class SparseCentersRegularizer(BaseRegularizer):
    r"""The adaptive-number-of-centres regulariser of SoftTriple (Qian et al., ICCV 2019, Eq. 11).

    Paper: `SoftTriple Loss: Deep Metric Learning Without Triplet Sampling
    <https://arxiv.org/abs/1909.05235>`_. Same centres of a class are pulled together so that redundant ones
    merge:

    .. math::
        R(w) = \frac{1}{C K (K - 1)} \sum_{c=1}^{C} \sum_{t=1}^{K} \sum_{s=t+1}^{K}
            \sqrt{2 + \epsilon - 2 \hat w_c^{t\top} \hat w_c^s}

    A drop-in replacement for PML's ``SparseCentersRegularizer`` with the same values, gradients, stats and
    reducer (``DivisorReducer`` with divisor :math:`C K (K-1)`). PML's builds the full
    :math:`(CK) \times (CK)` similarity matrix and two :math:`(CK)^2` boolean masks (about 2.6 GB of
    masks alone at C = 11318, K = 2); this one computes only each class's :math:`K \times K` Gram block
    (one batched matmul; a hand-written backward in the parameter's layout): :math:`C K^2 d` work and
    :math:`C K^2` memory beyond the weights' gradient. With ``collect_stats``, the
    mean similarity between centres of different classes is obtained exactly from
    :math:`\|\sum_j \hat w_j\|^2` minus the per-class blocks, again without a quadratic matrix.

    Symbols → arguments: :math:`C` = ``num_classes``, :math:`K` = ``centers_per_class``,
    :math:`\epsilon` = ``eps``. The loss weight :math:`\tau` is applied by the owning loss
    (``SoftTripleLoss(tau=...)``, i.e. PML's ``weight_reg_weight``).

    Args:
        num_classes: :math:`C`.
        centers_per_class: :math:`K` (at least 2: with one centre per class there is nothing to merge).
        eps: :math:`\epsilon` inside the square root; ``None`` uses ``torch.finfo(dtype).tiny`` like PML
            (default: ``None``). The official code uses ``1e-5``.
        **kwargs: forwarded to :class:`~pytorch_metric_learning.regularizers.BaseRegularizer`
            (``reducer``, ``collect_stats``).

    Shapes:
        - input: weights :math:`(C K, d)`, one centre per row, row ``c * K + k`` (what PML's
          ``WeightRegularizerMixin`` passes: ``loss.fc.t()``).
        - output: scalar.

    Raises:
        TypeError: if ``num_classes`` or ``centers_per_class`` is not an int (Python or NumPy), or ``eps`` not
            a real number.
        ValueError: if ``num_classes < 1``, ``centers_per_class < 2``, ``eps < 0``, a distance other than
            :class:`~pytorch_metric_learning.distances.CosineSimilarity` is passed, or the weights do not
            have :math:`C K` rows.
    """

    _pair_rows: torch.Tensor
    _pair_cols: torch.Tensor

    def __init__(
        self, num_classes: int, centers_per_class: int, eps: float | None = None, **kwargs: Any
    ) -> None:
        num_classes = check_int(_NAME, "num_classes", num_classes, 1)
        centers_per_class = check_int(_NAME, "centers_per_class", centers_per_class, 2)  # K = 1: no pairs
        if eps is not None:
            eps = check_float(_NAME, "eps", eps, positive=False)
        super().__init__(**kwargs)
        if not isinstance(self.distance, CosineSimilarity):
            raise ValueError(
                "SparseCentersRegularizer: only CosineSimilarity is supported (the regulariser is defined on "
                f"normalised centres), got {type(self.distance).__name__}"
            )
        self.num_classes = num_classes
        self.centers_per_class = centers_per_class
        self.eps = eps
        iu = torch.triu_indices(centers_per_class, centers_per_class, offset=1)
        self.register_buffer("_pair_rows", iu[0], persistent=False)
        self.register_buffer("_pair_cols", iu[1], persistent=False)
        self.add_to_recordable_attributes(list_of_names=["num_classes", "centers_per_class"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["same_class_center_sim", "diff_class_center_sim"], is_stat=True
        )

    def block_similarities(self, weights: torch.Tensor) -> torch.Tensor:
        """Cosine similarities between the centres of each class, ``(C, K, K)``, from ``(C K, d)`` weights."""
        expected = self.num_classes * self.centers_per_class
        if weights.ndim != 2 or weights.shape[0] != expected:
            raise ValueError(
                f"SparseCentersRegularizer: weights must have shape ({expected}, embedding_size) = "
                f"(num_classes * centers_per_class, d), got {tuple(weights.shape)}"
            )
        gram = _BlockGram.apply(weights.t(), self.num_classes, self.centers_per_class)
        inv_norm = gram.diagonal(dim1=1, dim2=2).sqrt().clamp_min(_NORM_EPS).reciprocal()
        return gram * inv_norm[:, :, None] * inv_norm[:, None, :]

    def compute_loss(self, weights: torch.Tensor) -> dict[str, Any]:  # type: ignore[override]
        r"""Per-pair terms :math:`\sqrt{2 + \epsilon - 2 \cos}` for the ``DivisorReducer``."""
        sims = self.block_similarities(weights)
        if self._pair_rows.device != sims.device:  # follow the weights' device, as the loss's fc does
            self._pair_rows = self._pair_rows.to(sims.device)
            self._pair_cols = self._pair_cols.to(sims.device)
        pair_sims = sims[:, self._pair_rows, self._pair_cols].reshape(-1)  # (C * K (K-1) / 2,)
        eps = c_f.small_val(weights.dtype) if self.eps is None else self.eps
        reg = torch.sqrt(2.0 + eps - torch.clamp(2.0 * pair_sims, max=2.0))
        if self.collect_stats:
            self._set_stats(weights, pair_sims)
        return {
            "loss": {
                "losses": reg,
                "indices": c_f.torch_arange_from_size(reg),
                "reduction_type": "element",
                "divisor": 2 * reg.numel(),  # = C K (K - 1), PML's 2 * sum(same_class_mask)
            }
        }

    def _set_stats(self, weights: torch.Tensor, pair_sims: torch.Tensor) -> None:
        with torch.no_grad():
            unit = weights / torch.linalg.vector_norm(weights, dim=1, keepdim=True).clamp_min(_NORM_EPS)
            total = unit.shape[0]
            per_class = unit.reshape(self.num_classes, self.centers_per_class, -1).sum(1)
            off_block = unit.sum(0).square().sum() - per_class.square().sum()
            off_count = total * total - self.num_classes * self.centers_per_class**2
            diff = off_block / off_count if off_count > 0 else torch.full_like(off_block, float("nan"))
            same, diff = torch.stack([pair_sims.mean(), diff]).tolist()  # one synchronisation, as PML's two
            self.same_class_center_sim, self.diff_class_center_sim = same, diff

    def get_default_distance(self) -> CosineSimilarity:
        """Cosine similarity (the regulariser is defined on normalised centres)."""
        return CosineSimilarity()

    def get_default_reducer(self) -> DivisorReducer:
        """``DivisorReducer``: the sum of the pair terms divided by C K (K - 1)."""
        return DivisorReducer()

    def extra_repr(self) -> str:  # noqa: D102
        return f"num_classes={self.num_classes}, centers_per_class={self.centers_per_class}, eps={self.eps}"
