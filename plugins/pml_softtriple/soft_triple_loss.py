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
from pytorch_metric_learning.regularizers import BaseRegularizer
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from . import _cpu_kernels
from ._checks import (
    check_embeddings,
    check_float,
    check_indices_tuple,
    check_int,
    check_labels,
    check_values,
)
from ._distributed import scale_gradient, wrapper_world_size
from .centers import effective_center_counts
from .functional import Workspace, soft_triple_losses, soft_triple_similarity, uses_cpu_kernels
from .sparse_centers_regularizer import SparseCentersRegularizer

__all__ = ["SoftTripleLoss"]

_NAME = "SoftTripleLoss"
_PAPER_TAU = 0.2
_UNSET: Any = object()  # weight_regularizer not passed (None passed means "no regulariser", as in PML)


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
    ``margin``, :math:`\tau` = ``tau`` (= PML's ``weight_reg_weight``). Defaults are the paper's CUB-200 /
    Cars196 settings; the paper uses ``centers_per_class=2`` on Stanford Online Products and a centre
    learning rate 100x the model's (see :func:`~pml_softtriple.param_groups`).

    The regulariser and its weight :math:`\tau`, PML's way or the paper's:

    - ``SoftTripleLoss(C, d)``: the paper's loss, :math:`\tau = 0.2` with the regulariser (PML: none);
    - PML's arguments mean what they mean in PML: ``weight_regularizer=SparseCentersRegularizer(C, K)``
      (PML's class or ours) is multiplied by ``weight_reg_weight`` (default ``1``, as in PML), and
      ``weight_regularizer=None`` switches the regulariser off;
    - ``tau`` and ``weight_reg_weight`` are one number under two names (passing both is a ``TypeError``);
      without a ``weight_regularizer``, a weight :math:`> 0` uses
      :class:`~pml_softtriple.SparseCentersRegularizer` (PML would ignore the weight). Setting
      ``loss.tau`` or ``loss.weight_reg_weight`` later does the same: a positive value on a loss built
      without a regulariser adds the paper's. With ``centers_per_class=1``
      there is no regulariser (:math:`R` divides by :math:`K - 1`): the default weight is then 0 and a
      positive one is a ``ValueError``.

    PML conventions kept: ``fc`` follows the embeddings' device and dtype on every call (PML's
    ``cast_types``; PML trainers never move a loss), except that under autocast it keeps its dtype;
    ``collect_stats=True`` records the regulariser's ``same_class_center_sim`` and ``diff_class_center_sim``
    (on ``loss.weight_regularizer``, as PML's regulariser does), the default regulariser inheriting the loss's
    ``collect_stats``; hyperparameters may be Python or NumPy scalars (``np.int64``, ``np.float32``).

    Differences from ``pytorch_metric_learning.losses.SoftTripleLoss`` (same ``fc`` parameter and
    state-dict layout, so a PML checkpoint loads as is):

    - the centre regulariser is on by default (see above), and computed per class block;
    - the loss and its gradient are one fused autograd node (about 3x faster than PML on a CPU and within
      a small factor of the three unavoidable matmuls, see ``examples/bench_softtriple.py``);
    - it computes in float32 (or float64) under autocast and with half-precision inputs (PML: in the
      embeddings' dtype), and returns a float32 loss for half-precision embeddings;
    - ``gamma`` is stored as given (PML stores ``1 / gamma``) and ``embedding_size`` is recorded;
    - inputs are validated (label range, embedding shape, non-finite values, empty batch, miner indices).

    Distributed training: the loss has no cross-sample terms, so wrap the loss module in
    ``torch.nn.parallel.DistributedDataParallel`` like the model, and give every rank the same batch size;
    gradients then equal single-process training on the concatenated batch. PML's
    ``DistributedLossWrapper(loss)`` works too: it computes the loss on the gathered batch and multiplies it
    by the world size for the model's sake; this loss scales its centres' gradient back, so it equals one
    process's on the gathered batch (PML's own loss gets it world-size times).
    ``DistributedLossWrapper(loss, efficient=True)`` is refused (``ValueError``).

    Args:
        num_classes: :math:`C`, labels must lie in ``[0, C)``.
        embedding_size: :math:`d`.
        centers_per_class: :math:`K` (default: ``10``).
        la: :math:`\lambda`, the scale (default: ``20``).
        gamma: :math:`\gamma`, entropy weight of the soft assignment to centres (default: ``0.1``).
        margin: :math:`\delta` (default: ``0.01``).
        tau: :math:`\tau`, weight of the centre regulariser; ``0`` turns it off (default: ``0.2``, or ``1``
            with a ``weight_regularizer``, ``0`` with ``weight_regularizer=None`` or ``centers_per_class=1``).
        validate_args: check the label range, the embeddings' finiteness and the miner indices on every call
            (default: ``True``). On a GPU these checks cost one host-device synchronisation per call;
            ``False`` skips them (the caller then guarantees valid labels, and checks the loss, e.g. with
            ``GradScaler``). On a CPU the fused kernels make the first two checks in their own pass, always.
        **kwargs: PML's: ``weight_regularizer``, ``weight_reg_weight`` (see above), ``weight_init_func``,
            ``reducer``, ``embedding_regularizer``, ``embedding_reg_weight``, ``collect_stats``.
            ``distance`` must be a ``CosineSimilarity``.

    Shapes:
        - embeddings: :math:`(B, d)`, any floating dtype.
        - labels: :math:`(B,)`, integer.
        - output: scalar, float32 (float64 if the embeddings are float64).

    Raises:
        TypeError: for a hyperparameter of the wrong type (``bool``, a string, a float where an int is
            expected), both ``tau`` and ``weight_reg_weight``; at call time for embeddings or labels that are
            not tensors, non-floating embeddings, non-integer labels or miner indices.
        ValueError: for a hyperparameter out of range (negative, zero where positive, NaN, inf) or
            :math:`\tau > 0` with ``centers_per_class=1``; at call time for labels outside ``[0, C)``,
            embeddings not of shape ``(B, d)``, non-finite embeddings, an empty batch, missing labels,
            ``ref_emb``, or miner indices outside ``[0, B)``.

    Example:
        >>> loss_func = SoftTripleLoss(num_classes=100, embedding_size=64)
        >>> loss = loss_func(torch.randn(32, 64), torch.randint(0, 100, (32,)))
    """

    weight_regularizer: torch.nn.Module | None

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        margin: float = 0.01,
        tau: float | None = None,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        num_classes = check_int(_NAME, "num_classes", num_classes, 1)
        embedding_size = check_int(_NAME, "embedding_size", embedding_size, 1)
        centers_per_class = check_int(_NAME, "centers_per_class", centers_per_class, 1)
        la = check_float(_NAME, "la", la, positive=True)
        gamma = check_float(_NAME, "gamma", gamma, positive=True)
        margin = check_float(_NAME, "margin", margin, positive=False)
        if not isinstance(validate_args, bool):
            raise TypeError(f"{_NAME}: validate_args must be a bool, got {validate_args!r}")
        regularizer = kwargs.pop("weight_regularizer", _UNSET)
        if not (regularizer is _UNSET or regularizer is None or isinstance(regularizer, BaseRegularizer)):
            raise TypeError(
                f"{_NAME}: weight_regularizer must be a pytorch_metric_learning regularizer (e.g. "
                f"SparseCentersRegularizer(num_classes, centers_per_class)) or None, got {regularizer!r}"
            )
        if "weight_reg_weight" in kwargs:
            if tau is not None:
                raise TypeError(
                    f"{_NAME}: tau and weight_reg_weight are two names for the regulariser's weight; pass one"
                )
            tau = check_float(_NAME, "weight_reg_weight", kwargs.pop("weight_reg_weight"), positive=False)
        elif tau is not None:
            tau = check_float(_NAME, "tau", tau, positive=False)
        elif regularizer is _UNSET:
            tau = _PAPER_TAU if centers_per_class > 1 else 0.0
        else:  # PML's default weight with a regulariser; none without
            tau = 1.0 if regularizer is not None else 0.0
        if regularizer is _UNSET:
            regularizer = None
        if regularizer is None and tau > 0:
            regularizer = self._default_regularizer(
                num_classes, centers_per_class, tau, kwargs.get("collect_stats")
            )
        super().__init__(weight_regularizer=regularizer, weight_reg_weight=tau, **kwargs)
        if not isinstance(self.distance, CosineSimilarity):
            raise ValueError(
                f"{_NAME}: only CosineSimilarity is supported, got {type(self.distance).__name__}"
            )
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.centers_per_class = centers_per_class
        self.la = la
        self.gamma = gamma
        self.margin = margin
        self.validate_args = validate_args
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

    @staticmethod
    def _default_regularizer(
        num_classes: int, centers_per_class: int, weight: float, collect_stats: bool | None
    ) -> SparseCentersRegularizer:
        if centers_per_class < 2:
            raise ValueError(
                f"{_NAME}: the centre regulariser needs centers_per_class >= 2 (R divides by K - 1), so its "
                f"weight (tau / weight_reg_weight) must be 0 for centers_per_class=1, got {weight!r}"
            )
        return SparseCentersRegularizer(num_classes, centers_per_class, collect_stats=collect_stats)

    @property
    def weight_reg_weight(self) -> float:
        r""":math:`\tau`, the regulariser's weight (PML's name; :attr:`tau` is the same number).

        Setting a value :math:`> 0` on a loss without a regulariser adds the paper's
        (:class:`~pml_softtriple.SparseCentersRegularizer`, on ``fc``'s device); ``0`` switches it off.
        """
        return self._tau

    @weight_reg_weight.setter
    def weight_reg_weight(self, value: float) -> None:
        self._set_weight("weight_reg_weight", value)

    @property
    def tau(self) -> float:
        r""":math:`\tau`, the regulariser weight: an alias of PML's ``weight_reg_weight``."""
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        self._set_weight("tau", value)

    def _set_weight(self, name: str, value: float) -> None:
        tau = check_float(_NAME, name, value, positive=False)
        if "fc" in self._parameters and tau > 0 and self.weight_regularizer is None:  # built: add R
            regularizer = self._default_regularizer(
                self.num_classes, self.centers_per_class, tau, self.collect_stats
            )
            self.weight_regularizer = regularizer.to(self.fc.device)
            self.add_to_recordable_attributes(list_of_names=["weight_reg_weight"], is_stat=False)
            self.set_reducer(self.reducer)  # PML: one reducer per sub-loss, now "loss" and "weight_reg_loss"
        self.__dict__["_tau"] = tau

    def reset_parameters(self) -> None:
        """Initialise the centres with ``weight_init_func`` (PML's default: Kaiming-uniform, a = sqrt(5))."""
        self.weight_init_func(self.fc)

    def get_default_distance(self) -> CosineSimilarity:
        """The only supported distance: cosine similarity of normalised embeddings and centres."""
        return CosineSimilarity()

    def get_default_weight_init_func(self) -> c_f.TorchInitWrapper:
        """Kaiming-uniform with ``a = sqrt(5)``, as in PML and the official code."""
        return c_f.TorchInitWrapper(torch.nn.init.kaiming_uniform_, a=math.sqrt(5))

    def cast_types(self, dtype: torch.dtype, device: torch.device) -> None:
        """PML's hook: move ``fc`` to ``device`` and, outside autocast, cast it to ``dtype``, in place.

        As in PML, ``fc.data`` is replaced, so optimizers holding ``fc`` keep working. Under autocast on
        ``device`` the embeddings' dtype is autocast's choice, not the model's, and ``fc`` keeps its dtype.
        """
        data = self.fc.data
        if data.dtype == dtype or torch.is_autocast_enabled(torch.device(device).type):
            dtype = data.dtype
        if data.device != device or data.dtype != dtype:
            self.fc.data = data.to(device=device, dtype=dtype)

    def _compute_dtype(self, embeddings: torch.Tensor) -> torch.dtype:
        """float32, or float64 when the embeddings or ``fc`` are: the type promotion, with halves widened."""
        dtype = embeddings.dtype
        if dtype != self.fc.dtype:
            dtype = torch.promote_types(dtype, self.fc.dtype)
        if dtype not in (torch.float32, torch.float64):
            dtype = torch.promote_types(dtype, torch.float32)
        return dtype

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: Any = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> Any:
        """PML's forward: ``fc`` follows the embeddings (:meth:`cast_types`), halves are widened to float32.

        The cast (differentiable) happens before PML's reducers, which would otherwise round the total
        back to the embeddings' dtype.
        """
        check_embeddings(_NAME, embeddings, self.embedding_size)
        if labels is not None:
            check_labels(_NAME, labels, embeddings.shape[0])
        self.cast_types(embeddings.dtype, embeddings.device)
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
        world_size = wrapper_world_size(self)  # 1 unless inside PML's DistributedLossWrapper
        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)  # shapes and dtypes: in forward()
        if indices_tuple is not None:
            check_indices_tuple(_NAME, indices_tuple, embeddings.shape[0], self.validate_args)
        weight: torch.Tensor = self.fc
        if weight.device != embeddings.device:  # called without forward(): follow the device only
            self.cast_types(weight.dtype, embeddings.device)
        if world_size > 1:
            weight = scale_gradient(weight, 1.0 / world_size)
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
            if self.validate_args and not uses_cpu_kernels(embeddings, weight, labels):
                check_values(_NAME, embeddings, labels, self.num_classes)  # the kernels check these
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
            if self.weight_regularizer is not None and self._tau != 0:
                self.add_weight_regularization_to_loss_dict(loss_dict, weight.t())
        return loss_dict

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        r"""Relaxed class similarities :math:`\mathcal{S}'`, shape ``(B, C)``, like PML's ``get_logits``.

        They lie in ``[-1, 1]``; ``la * get_logits(x)`` are the logits of the SoftTriple classifier and
        ``get_logits(x).argmax(1)`` is its prediction. Computed in float32 or wider on the embeddings'
        device (``fc`` is not moved), differentiable.
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"{_NAME}.get_logits: embeddings must have shape (batch_size, {self.embedding_size}), "
                f"got {tuple(embeddings.shape)}"
            )
        dtype = self._compute_dtype(embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            weight = self.fc.to(device=embeddings.device, dtype=dtype)
            return soft_triple_similarity(embeddings.to(dtype), weight, self.centers_per_class, self.gamma)

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
