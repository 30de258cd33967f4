r"""SoftTriple loss as a pytorch-metric-learning loss function."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from . import _cpu_kernels
from .centers import effective_center_counts
from .functional import Workspace, soft_triple_losses, soft_triple_similarity, uses_cpu_kernels
from .sparse_centers_regularizer import SparseCentersRegularizer

__all__ = ["SoftTripleLoss"]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"SoftTripleLoss: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_float(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"SoftTripleLoss: {name} must be a finite number, got {value!r}")
    if (value <= 0) if positive else (value < 0):
        raise ValueError(f"SoftTripleLoss: {name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


class SoftTripleLoss(WeightRegularizerMixin, BaseMetricLossFunction):
    r"""SoftTriple loss with the adaptive number of centres (Qian et al., ICCV 2019).

    Paper: `SoftTriple Loss: Deep Metric Learning Without Triplet Sampling
    <https://arxiv.org/abs/1909.05235>`_. Each class has :math:`K` centres; an embedding's similarity to a
    class is a softmax-weighted (weight :math:`1/\gamma`) average over the class's centres, and the loss is
    a scaled, margin-shifted softmax over classes plus :math:`\tau` times a regulariser that merges
    redundant centres (:class:`~pml_softtriple.SparseCentersRegularizer`):

    .. math::
        \mathcal{S}'_{i,c} = \sum_{k=1}^{K}
            \frac{\exp(\tfrac{1}{\gamma} \hat x_i^\top \hat w_c^k)}{\sum_{k'} \exp(\tfrac{1}{\gamma}
            \hat x_i^\top \hat w_c^{k'})} \hat x_i^\top \hat w_c^k, \qquad
        \ell_i = -\log \frac{\exp(\lambda (\mathcal{S}'_{i,y_i} - \delta))}
            {\exp(\lambda (\mathcal{S}'_{i,y_i} - \delta))
            + \sum_{j \neq y_i} \exp(\lambda \mathcal{S}'_{i,j})}

    .. math::
        \mathcal{L} = \frac{1}{B} \sum_i \ell_i + \tau \, R(w), \qquad
        R(w) = \frac{1}{C K (K-1)} \sum_c \sum_{t < s} \sqrt{2 - 2 \hat w_c^{t\top} \hat w_c^s}

    :math:`K = 1` is the normalised softmax loss; :math:`\gamma \to 0` is HardTriple (max over centres).

    Symbols → arguments: :math:`C` = ``num_classes``, :math:`d` = ``embedding_size``, :math:`K` =
    ``centers_per_class``, :math:`\lambda` = ``la``, :math:`\gamma` = ``gamma``, :math:`\delta` =
    ``margin``, :math:`\tau` = ``tau``. Defaults are the paper's CUB-200 / Cars196 settings; the paper uses
    ``centers_per_class=2`` on Stanford Online Products and a centre learning rate 100x the model's (see
    :func:`~pml_softtriple.param_groups`).

    Differences from ``pytorch_metric_learning.losses.SoftTripleLoss`` (same constructor, same ``fc``
    parameter and state-dict layout, so a PML checkpoint loads as is):

    - the centre regulariser is on by default, weighted by ``tau`` as in the paper (PML: off unless a
      ``SparseCentersRegularizer`` is passed, then weight 1), and computed per class block;
    - the loss and its gradient are one fused autograd node (about 3x faster than PML on a CPU and within
      a small factor of the three unavoidable matmuls, see ``examples/bench_softtriple.py``);
    - it computes in float32 (or float64) under autocast and with half-precision inputs, and never changes
      the dtype of ``fc`` (PML casts it to the embeddings' dtype);
    - ``gamma`` is stored as given (PML stores ``1 / gamma``) and ``embedding_size`` is recorded;
    - inputs are validated (label range, embedding shape, non-finite values, empty batch).

    Distributed training: the loss has no cross-sample terms, so wrap the loss module in
    ``torch.nn.parallel.DistributedDataParallel`` like the model, and give every rank the same batch size;
    gradients then equal single-process training on the concatenated batch. Do not use PML's
    ``DistributedLossWrapper``: it scales the centre gradient by the world size.

    Args:
        num_classes: :math:`C`, labels must lie in ``[0, C)``.
        embedding_size: :math:`d`.
        centers_per_class: :math:`K` (default: ``10``).
        la: :math:`\lambda`, the scale (default: ``20``).
        gamma: :math:`\gamma`, entropy weight of the soft assignment to centres (default: ``0.1``).
        margin: :math:`\delta` (default: ``0.01``).
        tau: :math:`\tau`, weight of the centre regulariser; ``0`` turns it off, and it is off for
            ``centers_per_class=1`` (default: ``0.2``).
        **kwargs: forwarded to PML's base classes: ``weight_regularizer`` (replaces the default
            regulariser; still weighted by ``tau``), ``weight_init_func``, ``reducer``,
            ``embedding_regularizer``, ``embedding_reg_weight``, ``collect_stats``. ``distance`` must be a
            ``CosineSimilarity``.

    Shapes:
        - embeddings: :math:`(B, d)`, any floating dtype.
        - labels: :math:`(B,)`, integer.
        - output: scalar, float32 (float64 if the embeddings or ``fc`` are float64).

    Raises:
        ValueError: for an invalid hyperparameter; at call time for labels outside ``[0, C)``, embeddings
            not of shape ``(B, d)``, non-finite embeddings, an empty batch, missing labels or ``ref_emb``.
        TypeError: for non-floating embeddings, non-integer labels, or ``weight_reg_weight`` (use ``tau``).

    Example:
        >>> loss_func = SoftTripleLoss(num_classes=100, embedding_size=64)
        >>> loss = loss_func(torch.randn(32, 64), torch.randint(0, 100, (32,)))
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        margin: float = 0.01,
        tau: float = 0.2,
        **kwargs: Any,
    ) -> None:
        num_classes = _check_int("num_classes", num_classes, 1)
        embedding_size = _check_int("embedding_size", embedding_size, 1)
        centers_per_class = _check_int("centers_per_class", centers_per_class, 1)
        la = _check_float("la", la, positive=True)
        gamma = _check_float("gamma", gamma, positive=True)
        margin = _check_float("margin", margin, positive=False)
        tau = _check_float("tau", tau, positive=False)
        if "weight_reg_weight" in kwargs:
            raise TypeError("SoftTripleLoss: pass the regulariser weight as tau=..., not weight_reg_weight")
        regularizer = kwargs.pop("weight_regularizer", None)
        if regularizer is not None and tau == 0:
            raise ValueError("SoftTripleLoss: a weight_regularizer was given but tau=0 would switch it off")
        if regularizer is None and tau > 0 and centers_per_class > 1:
            regularizer = SparseCentersRegularizer(num_classes, centers_per_class)
        super().__init__(weight_regularizer=regularizer, weight_reg_weight=tau, **kwargs)
        if not isinstance(self.distance, CosineSimilarity):
            raise ValueError(
                f"SoftTripleLoss: only CosineSimilarity is supported, got {type(self.distance).__name__}"
            )
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.centers_per_class = centers_per_class
        self.la = la
        self.gamma = gamma
        self.margin = margin
        self.fc = torch.nn.Parameter(torch.empty(embedding_size, num_classes * centers_per_class))
        self._workspace = Workspace()  # scratch buffers reused across calls (not state: never saved)
        self.add_to_recordable_attributes(
            list_of_names=[
                "la",
                "gamma",
                "margin",
                "tau",
                "centers_per_class",
                "num_classes",
                "embedding_size",
            ],
            is_stat=False,
        )
        self.reset_parameters()

    @property
    def tau(self) -> float:
        r""":math:`\tau`, the regulariser weight: an alias of PML's ``weight_reg_weight``."""
        return float(self.weight_reg_weight)

    @tau.setter
    def tau(self, value: float) -> None:
        self.weight_reg_weight = _check_float("tau", value, positive=False)

    def reset_parameters(self) -> None:
        """Initialise the centres with ``weight_init_func`` (PML's default: Kaiming-uniform, a = sqrt(5))."""
        self.weight_init_func(self.fc)

    def get_default_distance(self) -> CosineSimilarity:
        """The only supported distance: cosine similarity of normalised embeddings and centres."""
        return CosineSimilarity()

    def get_default_weight_init_func(self) -> c_f.TorchInitWrapper:
        """Kaiming-uniform with ``a = sqrt(5)``, as in PML and the official code."""
        return c_f.TorchInitWrapper(torch.nn.init.kaiming_uniform_, a=math.sqrt(5))

    def _compute_dtype(self, embeddings: torch.Tensor) -> torch.dtype:
        """float32, or float64 when the embeddings or ``fc`` are: the type promotion, with halves widened."""
        dtype = embeddings.dtype
        if dtype != self.fc.dtype:
            dtype = torch.promote_types(dtype, self.fc.dtype)
        if dtype not in (torch.float32, torch.float64):
            dtype = torch.promote_types(dtype, torch.float32)
        return dtype

    def _validate(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Dtypes and shapes: no pass over the data (see :meth:`_validate_values`)."""
        if not embeddings.is_floating_point():
            raise TypeError(
                f"SoftTripleLoss: embeddings must be a floating tensor, got dtype {embeddings.dtype}"
            )
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                "SoftTripleLoss: embeddings must have shape (batch_size, embedding_size="
                f"{self.embedding_size}), got {tuple(embeddings.shape)}"
            )
        if embeddings.shape[0] == 0:
            raise ValueError("SoftTripleLoss: embeddings is an empty batch (batch_size = 0)")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"SoftTripleLoss: labels must be an integer tensor, got dtype {labels.dtype}")

    def _validate_values(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """The label range and finite embeddings (the fused CPU kernels check both themselves)."""
        # One reduction over the embeddings for the finiteness check: a sum is non-finite whenever an element
        # is (a finite overflow is told apart by the exact check below). One host synchronisation on GPUs.
        checks = [embeddings.detach().sum(), *torch.aminmax(labels)]
        if embeddings.device.type == "cpu":
            total, low, high = (float(c) for c in checks)
        else:
            total, low, high = torch.stack([c.to(torch.float64) for c in checks]).tolist()
        if not math.isfinite(total) and not bool(torch.isfinite(embeddings).all()):
            raise ValueError("SoftTripleLoss: embeddings contain NaN or Inf")
        if low < 0 or high >= self.num_classes:
            raise ValueError(
                f"SoftTripleLoss: labels must lie in [0, num_classes={self.num_classes}), got values in "
                f"[{int(low)}, {int(high)}]"
            )

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: Any = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> Any:
        """PML's forward, with half-precision embeddings first cast to the float32 compute dtype.

        The cast (differentiable) happens before PML's reducers, which would otherwise round the total
        back to the embeddings' dtype.
        """
        if isinstance(embeddings, torch.Tensor) and embeddings.is_floating_point():
            dtype = self._compute_dtype(embeddings)
            if embeddings.dtype != dtype:
                embeddings = embeddings.to(dtype)
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(  # noqa: D102 - PML's hook, documented on the class
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: Any,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor,
    ) -> dict[str, Any]:
        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        self._validate(embeddings, labels)
        weight: torch.Tensor = self.fc
        dtype = self._compute_dtype(embeddings)
        device_type = embeddings.device.type
        # fp32 (or fp64) compute under autocast; outside autocast there is nothing to switch off.
        fp32_region = (
            torch.autocast(device_type=device_type, enabled=False)
            if torch.is_autocast_enabled(device_type)
            else contextlib.nullcontext()
        )
        with fp32_region:
            if embeddings.dtype != dtype:
                embeddings = embeddings.to(dtype)
            if weight.dtype != dtype:
                weight = weight.to(dtype)
            if labels.dtype != torch.int64:
                labels = labels.long()
            if not uses_cpu_kernels(embeddings, weight, labels):  # the kernels check the values themselves
                self._validate_values(embeddings, labels)
            losses = soft_triple_losses(
                embeddings,
                weight,
                labels,
                self.centers_per_class,
                self.la,
                self.gamma,
                self.margin,
                self._workspace,
            )
            if indices_tuple is not None:
                losses = losses * lmu.convert_to_weights(indices_tuple, labels, dtype=dtype)
            loss_dict = {
                "loss": {
                    "losses": losses,
                    "indices": c_f.torch_arange_from_size(embeddings),
                    "reduction_type": "element",
                }
            }
            if self.weight_regularizer is not None:
                self.add_weight_regularization_to_loss_dict(loss_dict, weight.t())
        return loss_dict

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        r"""Relaxed class similarities :math:`\mathcal{S}'`, shape ``(B, C)``, like PML's ``get_logits``.

        They lie in ``[-1, 1]``; ``la * get_logits(x)`` are the logits of the SoftTriple classifier and
        ``get_logits(x).argmax(1)`` is its prediction. Computed in float32 or wider, differentiable.
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"SoftTripleLoss.get_logits: embeddings must have shape (batch_size, {self.embedding_size}), "
                f"got {tuple(embeddings.shape)}"
            )
        dtype = self._compute_dtype(embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return soft_triple_similarity(
                embeddings.to(dtype), self.fc.to(dtype), self.centers_per_class, self.gamma
            )

    def get_centers(self) -> torch.Tensor:
        """The unit-norm centres, detached, shape ``(num_classes, centers_per_class, embedding_size)``."""
        unit = F.normalize(self.fc.detach(), dim=0)
        return unit.t().reshape(self.num_classes, self.centers_per_class, self.embedding_size)

    def release_scratch(self) -> None:
        """Free the scratch arrays kept between calls for speed: this loss's and this thread's kernels'.

        This loss's PyTorch path keeps one ``(C K, B)`` array and one or two ``(C, B)`` ones, the fused CPU
        kernels one ``(C K, B)`` array per thread (23 MB at SOP scale, C = 11,318, K = 2, batch 256,
        float32); the next call allocates them again.
        """
        self._workspace.clear()
        _cpu_kernels.release_scratch()

    def effective_centers_per_class(self, threshold: float = 0.99) -> torch.Tensor:
        """Number of distinct centres per class after merging those with cosine similarity >= ``threshold``.

        See :func:`~pml_softtriple.effective_center_counts`. Shape ``(num_classes,)``, int64.
        """
        return effective_center_counts(self.get_centers(), threshold)

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={self.gamma}, "
            f"margin={self.margin}, tau={self.tau}"
        )
