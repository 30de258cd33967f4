"""ProtoNCE: the InfoNCE instance term plus the prototype term of Prototypical Contrastive Learning."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch import distributed as torch_dist

from . import _distributed as ddp
from ._distributed import all_gather_with_sizes, rank
from ._memory_bank import KeyMemoryBank
from .prototypes import Prototypes, negative_prototype_columns

__all__ = ["ProtoNCELoss"]


def _all_finite(tensor: Tensor) -> bool:
    """Whether every entry is finite: one reduction (a finite sum means finite entries), exact on overflow."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


class ProtoNCELoss(nn.Module):
    r"""ProtoNCE loss of Prototypical Contrastive Learning [0].

    The instance term is MoCo's InfoNCE [1] with a memory bank of negatives, computed exactly like Lightly's
    ``NTXentLoss(temperature, memory_bank_size)``. The prototype term adds, for each of the ``M`` clusterings
    found by the E-step (:class:`~lightly_pcl.PrototypeClustering`), a contrast between the query and the
    centroid of its own cluster against other centroids, each logit column scaled by its cluster's
    concentration :math:`\phi`:

    .. math::
        \mathcal{L} = -\frac{1}{B}\sum_{i=1}^{B}\Bigg[
            \log\frac{\exp(q_i\cdot k_i/\tau)}
                     {\exp(q_i\cdot k_i/\tau)+\sum_{n\in\mathcal{Q}}\exp(q_i\cdot n/\tau)}
            + \frac{1}{M}\sum_{m=1}^{M}
            \log\frac{\exp(q_i\cdot c^m_{s^m_i}/\phi^m_{s^m_i})}
                     {\sum_{j\in\mathcal{P}^m\cup\mathcal{N}^m}\exp(q_i\cdot c^m_j/\phi^m_j)}\Bigg]

    with :math:`q_i, k_i` the L2-normalised query and key, :math:`\mathcal{Q}` the memory bank,
    :math:`s^m_i` the cluster of sample ``i`` in clustering ``m``,
    :math:`\mathcal{P}^m = \{s^m_1..s^m_B\}` the positive clusters of the batch (one column per sample, as
    in the official code) and :math:`\mathcal{N}^m` ``r`` clusters sampled uniformly without replacement
    from the clusters outside :math:`\mathcal{P}^m`.

    Symbols to arguments: :math:`\tau` = ``temperature``, :math:`|\mathcal{Q}|` = ``memory_bank_size[0]``,
    ``r`` = ``num_negative_prototypes``, :math:`M, s, c, \phi` = the fields of
    :class:`~lightly_pcl.Prototypes`.

    Two details the paper leaves open are explicit here. The official code puts one positive column per
    sample, so when two samples of a batch share a cluster the duplicate column of the *same* prototype
    acts as a negative for both; with ``mask_duplicate_positives=True`` (default) those duplicate columns
    are masked, so every denominator holds the positive once, as in the paper's formula. ``False``
    reproduces the official code.

    Distributed: the official code gathers the keys of all ranks before it enqueues them, so every rank's
    memory bank holds every rank's keys. ``gather_distributed=None`` (default) does the same whenever a
    ``torch.distributed`` group of more than one rank is initialised; this differs from the default
    ``False`` of Lightly's ``NTXentLoss``, whose per-rank bank under DDP is overwritten by rank 0's when the
    loss sits inside a ``DistributedDataParallel`` module (its buffers are broadcast before each forward).
    ``False`` keeps a per-rank bank, with a warning under ``torch.distributed``. When gathering, the
    prototype columns are the positives of the global batch; all ranks draw the same negatives from
    generators that start from the same ``seed``, so the average of the per-rank losses equals the
    single-process loss on the concatenated batch (the official code contrasts each rank's batch alone).

    Bad input (docs/reliability.md): with ``validate_args=True`` (default) non-finite queries, keys, centroids
    or concentrations, concentrations that are not positive, and cluster labels out of range raise a
    ``ValueError`` before anything is computed or stored; these checks synchronise with the device. With
    ``validate_args=False`` nothing is checked and nothing waits for the device, and the memory bank is
    still never written from a non-finite batch (the update is masked on the device); the returned loss is
    then the caller's to check (``GradScaler`` skips the step on a non-finite gradient). Shapes and dtypes
    are always checked.

    - [0] PCL, 2021, https://arxiv.org/abs/2005.04966
    - [1] MoCo, 2020, https://arxiv.org/abs/1911.05722

    Args:
        temperature: Instance temperature :math:`\tau` (default: ``0.2``, as in PCL). It must equal the mean
            concentration of the prototypes (``PrototypeClustering(temperature=...)``), which is checked when
            the prototypes carry their temperature.
        memory_bank_size: ``(num_negatives, dim)`` of the memory bank (default: ``(16384, 128)``).
        num_negative_prototypes: Number ``r`` of sampled negative prototypes per clustering
            (default: ``16384``). If fewer clusters are available, all of them are used.
        mask_duplicate_positives: Mask positive columns that repeat a sample's own prototype (default:
            ``True``). ``False`` gives the official code's behaviour.
        gather_distributed: Gather keys (memory bank) and positive clusters from all ranks: ``None``
            (default) whenever ``torch.distributed`` is initialised with more than one rank, as the official
            code; ``True`` or ``False`` to force it.
        seed: Seed of the CPU generator that samples negative prototypes (default: ``0``). Its state is part
            of the ``state_dict``, like the memory bank, so a resumed run draws the same negatives.
        validate_args: Check the values of the inputs (default: ``True``); see above.

    Shapes:
        - out0 (queries): ``(B, D)``; out1 (keys): ``(B, D)``; ``D == memory_bank_size[1]``; ``B >= 1``.
        - prototypes: :class:`~lightly_pcl.Prototypes` with ``labels`` ``(M, B)``; or ``None`` for the
          instance term only (the warm-up epochs).
        - output: scalar.

    Raises:
        ValueError: If ``abs(temperature) < 1e-8``, the memory bank size is not a positive
            ``(num_negatives, dim)`` pair, ``num_negative_prototypes < 0``, or ``gather_distributed`` is set
            without ``torch.distributed``; in ``forward`` for inputs of the wrong shape, an empty batch, and
            (``validate_args``) non-finite values, non-positive concentrations or labels out of range.
        TypeError: In ``forward`` for integer embeddings or floating cluster labels.

    Examples:
        >>> criterion = ProtoNCELoss(memory_bank_size=(4096, 128), num_negative_prototypes=1024)
        >>> query, key = model(x0), model.forward_momentum(x1)
        >>> loss = criterion(query, key)  # warm-up: instance term only
        >>> loss = criterion(query, key, clustering(indices))  # after the first E-step
    """

    def __init__(
        self,
        temperature: float = 0.2,
        memory_bank_size: Sequence[int] = (16384, 128),
        num_negative_prototypes: int = 16384,
        mask_duplicate_positives: bool = True,
        gather_distributed: bool | None = None,
        seed: int = 0,
        validate_args: bool = True,
    ) -> None:
        super().__init__()
        if abs(temperature) < 1e-8:
            raise ValueError(f"Illegal temperature: abs({temperature}) < 1e-8")
        size = tuple(int(s) for s in memory_bank_size) if isinstance(memory_bank_size, Sequence) else ()
        if len(size) != 2 or size[0] <= 0 or size[1] <= 0:
            raise ValueError(
                "memory_bank_size must be a (num_negatives, dim) pair of positive integers, got "
                f"{memory_bank_size!r}"
            )
        if num_negative_prototypes < 0:
            raise ValueError(f"num_negative_prototypes must be >= 0, got {num_negative_prototypes}")
        if gather_distributed and not torch_dist.is_available():
            raise ValueError(
                "gather_distributed is True but torch.distributed is not available. Set "
                "gather_distributed=False or install a torch build with distributed support."
            )
        self.temperature = float(temperature)
        self.memory_bank_size = size
        self.num_negative_prototypes = int(num_negative_prototypes)
        self.mask_duplicate_positives = bool(mask_duplicate_positives)
        self.gather_distributed = (
            gather_distributed if gather_distributed is None else bool(gather_distributed)
        )
        self.seed = int(seed)
        self.validate_args = bool(validate_args)
        self.memory_bank = KeyMemoryBank(size=size, gather_distributed=False)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._warned_per_rank_bank = False

    @property
    def gathers(self) -> bool:
        """Whether this call gathers across ranks (``gather_distributed``, or ``None`` under DDP)."""
        if not ddp.is_distributed():
            return False
        if self.gather_distributed is False and not self._warned_per_rank_bank:
            self._warned_per_rank_bank = True
            warnings.warn(
                "ProtoNCELoss(gather_distributed=False) under torch.distributed keeps only this rank's keys "
                "in its memory bank, unlike the official PCL code, and inside a DistributedDataParallel "
                "module with broadcast_buffers=True rank 0's bank overwrites the others' before each "
                "forward; leave gather_distributed=None (default) to gather the keys of all ranks",
                stacklevel=3,
            )
        return self.gather_distributed is not False

    def forward(self, out0: Tensor, out1: Tensor, prototypes: Prototypes | None = None) -> Tensor:
        """Compute the ProtoNCE loss; also pushes the keys ``out1`` into the memory bank when training.

        Args:
            out0: Query projections, shape ``(B, D)``; normalised here.
            out1: Key projections from the momentum encoder, shape ``(B, D)``; normalised here.
            prototypes: The batch's prototypes from the E-step, or ``None`` for the instance term only.

        Returns:
            The scalar loss: instance term + mean over clusterings of the prototype terms.
        """
        instance, prototype = self.terms(out0, out1, prototypes)
        return instance if prototype is None else instance + prototype

    def terms(
        self, out0: Tensor, out1: Tensor, prototypes: Prototypes | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """The instance term and the prototype term (``None`` without prototypes) of :meth:`forward`.

        Every input is checked before the memory bank or the generator changes, so a rejected batch leaves
        the loss's state as it was.
        """
        self._check_embeddings(out0, out1)
        if prototypes is None:
            return self._instance_term(out0, out1), None
        self._check_prototypes(out0, prototypes)
        instance = self._instance_term(out0, out1)
        return instance, self._prototype_term(out0, prototypes)

    def instance_term(self, out0: Tensor, out1: Tensor) -> Tensor:
        """InfoNCE against the memory bank, identical to ``NTXentLoss(temperature, memory_bank_size)``.

        Updates the memory bank with ``out1`` when ``out0`` requires a gradient (Lightly's rule), never from a
        non-finite batch. The bank moves to the inputs' device on first use.

        Args:
            out0: Queries ``(B, D)``, L2-normalised here.
            out1: Keys ``(B, D)``, L2-normalised here.

        Returns:
            Scalar mean cross-entropy with the key at column 0.
        """
        self._check_embeddings(out0, out1)
        return self._instance_term(out0, out1)

    def _instance_term(self, out0: Tensor, out1: Tensor) -> Tensor:
        query = F.normalize(out0, dim=1)
        key = F.normalize(out1, dim=1).to(query.dtype)
        self.memory_bank.follow(key.device)
        negatives = self.memory_bank.bank.detach().clone()  # before this batch's keys, as in Lightly
        if query.requires_grad:
            accept = None if self.validate_args else torch.isfinite(out0).all() & torch.isfinite(out1).all()
            self.memory_bank.enqueue(key, accept, gather=self.gathers)
        sim_pos = torch.einsum("nc,nc->n", query, key).unsqueeze(-1)
        sim_neg = query @ negatives.to(query).t()
        logits = torch.cat([sim_pos, sim_neg], dim=1) / self.temperature
        labels = torch.zeros(logits.shape[0], device=logits.device, dtype=torch.long)
        return F.cross_entropy(logits, labels)

    def prototype_term(self, out0: Tensor, prototypes: Prototypes) -> Tensor:
        """Mean over the ``M`` clusterings of the concentration-scaled prototype cross-entropy.

        Draws ``r`` negatives per clustering from this module's generator, with no host-device
        synchronisation (the draw has a fixed size; clusters that are not allowed are masked).

        Args:
            out0: Queries ``(B, D)``, L2-normalised here.
            prototypes: Cluster labels ``(M, B)``, centroids and concentrations of ``M`` clusterings.

        Returns:
            Scalar; zero-dimensional.
        """
        self._check_embeddings(out0)
        self._check_prototypes(out0, prototypes)
        return self._prototype_term(out0, prototypes)

    def _prototype_term(self, out0: Tensor, prototypes: Prototypes) -> Tensor:
        query = F.normalize(out0, dim=1)
        labels = prototypes.labels.to(query.device).long()
        gathers = self.gathers
        all_labels, sizes = all_gather_with_sizes(labels.t().contiguous()) if gathers else (labels.t(), [])
        all_labels = all_labels.t()  # (M, B_global)
        offset = sum(sizes[: rank()]) if gathers else 0
        batch = query.shape[0]
        rows = torch.arange(batch, device=query.device)
        targets = rows + offset
        terms = []
        for m, (centroids, phi) in enumerate(
            zip(prototypes.centroids, prototypes.concentrations, strict=True)
        ):
            positives = all_labels[m]
            excluded = torch.zeros(centroids.shape[0], dtype=torch.bool, device=query.device)
            excluded[positives] = True
            negatives, allowed = negative_prototype_columns(
                excluded, self.num_negative_prototypes, self.generator
            )
            columns = torch.cat([positives, negatives])
            selected = centroids.to(query.device)[columns].to(query.dtype)  # (B_global + r, D), then cast
            logits = query @ selected.t() / phi.to(query.device)[columns].to(query.dtype)
            masked = ~allowed.unsqueeze(0).expand(batch, -1)
            if self.mask_duplicate_positives:
                duplicate = labels[m].unsqueeze(1) == positives.unsqueeze(0)
                duplicate[rows, targets] = False
            else:
                duplicate = torch.zeros(batch, positives.shape[0], dtype=torch.bool, device=query.device)
            logits = logits.masked_fill(torch.cat([duplicate, masked], dim=1), -math.inf)
            terms.append(F.cross_entropy(logits, targets))
        return torch.stack(terms).mean()

    def _check_embeddings(self, out0: Tensor, out1: Tensor | None = None) -> None:
        names = ("out0", "out1") if out1 is not None else ("out0",)
        tensors = (out0, out1) if out1 is not None else (out0,)
        for name, tensor in zip(names, tensors, strict=True):
            if not isinstance(tensor, Tensor):
                raise TypeError(f"ProtoNCELoss: {name} must be a torch.Tensor, got {type(tensor).__name__}")
            if not tensor.is_floating_point():
                raise TypeError(
                    f"ProtoNCELoss: {name} must be a floating tensor of embeddings, got dtype {tensor.dtype}"
                )
            if tensor.dim() != 2 or tensor.shape[1] != self.memory_bank_size[1]:
                raise ValueError(
                    f"ProtoNCELoss: {name} must have shape (batch_size, {self.memory_bank_size[1]}) "
                    f"(memory_bank_size expects dim {self.memory_bank_size[1]}), got {tuple(tensor.shape)}"
                )
        if out1 is not None and out0.shape != out1.shape:
            raise ValueError(
                "ProtoNCELoss: out0 and out1 must both have shape (batch_size, dim), got "
                f"{tuple(out0.shape)} and {tuple(out1.shape)}"
            )
        if out0.shape[0] == 0:
            raise ValueError(
                f"ProtoNCELoss: out0 is an empty batch, shape {tuple(out0.shape)}; expected at least one "
                "sample"
            )
        if self.validate_args:
            for name, tensor in zip(names, tensors, strict=True):
                if not _all_finite(tensor):
                    raise ValueError(
                        f"ProtoNCELoss: {name} contains non-finite values (nan or inf); expected finite "
                        "embeddings"
                    )

    def _check_prototypes(self, query: Tensor, prototypes: Prototypes) -> None:
        labels = prototypes.labels
        num = len(prototypes.centroids)
        if num == 0 or len(prototypes.concentrations) != num:
            raise ValueError(
                "prototypes needs the same non-zero number of centroids and concentrations, got "
                f"{num} and {len(prototypes.concentrations)}"
            )
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(
                f"prototypes.labels must be an integer tensor of cluster indices, got {labels.dtype}"
            )
        if labels.shape != (num, query.shape[0]):
            raise ValueError(
                f"prototypes.labels must be an integer tensor of shape (M, batch_size) = "
                f"({num}, {query.shape[0]}), got dtype {labels.dtype} and shape {tuple(labels.shape)}"
            )
        if prototypes.temperature is not None and not math.isclose(
            prototypes.temperature, self.temperature, rel_tol=1e-6
        ):
            raise ValueError(
                "the prototypes' concentrations were rescaled to mean "
                f"{prototypes.temperature} but the instance temperature is {self.temperature}; PCL has one "
                "temperature: build "
                f"PrototypeClustering(temperature={self.temperature})"
            )
        for m, (centroids, phi) in enumerate(
            zip(prototypes.centroids, prototypes.concentrations, strict=True)
        ):
            if centroids.dim() != 2 or centroids.shape[1] != query.shape[1]:
                raise ValueError(
                    f"prototypes.centroids[{m}] must have shape (K, {query.shape[1]}), got "
                    f"{tuple(centroids.shape)}"
                )
            if phi.shape != (centroids.shape[0],):
                raise ValueError(
                    f"prototypes.concentrations[{m}] must have shape ({centroids.shape[0]},), got "
                    f"{tuple(phi.shape)}"
                )
            if not self.validate_args:
                continue
            outside = (labels[m] < 0) | (labels[m] >= centroids.shape[0])
            if bool(outside.any()):
                first = int(labels[m][outside][0])
                raise ValueError(f"prototypes.labels[{m}] must lie in [0, {centroids.shape[0]}), got {first}")
            if not _all_finite(centroids):
                raise ValueError(f"prototypes.centroids[{m}] contains non-finite values (nan or inf)")
            if not bool(((phi > 0) & torch.isfinite(phi)).all()):
                raise ValueError(
                    f"prototypes.concentrations[{m}] must be positive and finite (phi divides the logits), "
                    f"got values in [{float(phi.min())}, {float(phi.max())}]"
                )

    def get_extra_state(self) -> dict[str, Any]:
        """The memory bank (non-persistent in Lightly) and the sampler's generator state, for resuming."""
        return {
            "bank": self.memory_bank.bank.detach().clone(),
            "bank_ptr": self.memory_bank.bank_ptr.detach().clone(),
            "generator": self.generator.get_state(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_extra_state` saved."""
        bank = state["bank"]
        if tuple(bank.shape) != tuple(self.memory_bank.bank.shape):
            raise ValueError(
                f"checkpoint memory bank has shape {tuple(bank.shape)}, this loss expects "
                f"{tuple(self.memory_bank.bank.shape)}"
            )
        with torch.no_grad():
            self.memory_bank.bank.copy_(bank)
            self.memory_bank.bank_ptr.copy_(state["bank_ptr"])
        self.generator.set_state(state["generator"].cpu())

    def extra_repr(self) -> str:
        """The loss hyperparameters."""
        return (
            f"temperature={self.temperature}, memory_bank_size={self.memory_bank_size}, "
            f"num_negative_prototypes={self.num_negative_prototypes}, "
            f"mask_duplicate_positives={self.mask_duplicate_positives}, "
            f"gather_distributed={self.gather_distributed}, seed={self.seed}, "
            f"validate_args={self.validate_args}"
        )
