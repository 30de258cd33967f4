r"""The energy-based (contrastive-divergence) loss of energy-based scene-graph learning."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["EBMLoss"]


class EBMLoss(torch.nn.Module):
    r"""Contrastive divergence with an energy regulariser.

    From `"Energy-Based Learning for Scene Graph
    Generation" <https://arxiv.org/abs/2103.02221>`_ (Suhail et al., CVPR 2021):

    .. math::
        \mathcal{L}_e = \frac{T}{|B^+|}\sum_{G \in B^+} E_\theta(G)
            - \frac{T}{|B^-|}\sum_{G \in B^-} E_\theta(G)
            + \lambda \Big(\sum_{G \in B^+} E_\theta(G)^2 + \sum_{G \in B^-} E_\theta(G)^2\Big)

    Ground-truth graphs :math:`B^+` are pushed to low energy, sampled graphs :math:`B^-` to high energy; the
    regulariser is a **sum** over the batch, as in the official code. The paper adds it to the base model's
    cross-entropy with weight 1: ``loss = ce + EBMLoss()(e_pos, e_neg)``.

    Symbols → arguments: :math:`T` = ``temperature``, :math:`\lambda` = ``regularization``.

    Args:
        temperature: Scale :math:`T` of the contrastive term. (default: ``1.0``)
        regularization: Weight :math:`\lambda` of the squared-energy regulariser. (default: ``1.0``)
        validate_args: Refuse non-finite energies with a :class:`ValueError` (one host-device
            synchronisation per call). With ``False`` the check is skipped and a non-finite loss is returned
            for the caller to handle (e.g. ``GradScaler`` skips the step); the loss keeps no state.
            (default: ``True``)
        gather_distributed: Under ``torch.distributed``, return this rank's share of the **global**-batch
            loss times the world size, so that DDP's gradient averaging equals one process on the whole
            batch (means use the global counts, the sum is not divided). Without it each rank uses its local
            batch, like the official multi-GPU runs, whose effective :math:`\lambda` shrinks with the world
            size. (default: ``False``)

    Shapes:
        - **input:** positive energies :math:`(B^+)`, negative energies :math:`(B^-)`
        - **output:** scalar

    Raises:
        ValueError: for a non-positive or non-finite temperature, a negative or non-finite regularisation
            weight, non-1-D or empty energies, non-finite energies (``validate_args``), or
            ``gather_distributed=True`` without an initialised process group.
        TypeError: for energies that are not floating tensors.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        regularization: float = 1.0,
        gather_distributed: bool = False,
        validate_args: bool = True,
    ):
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"EBMLoss needs a finite 'temperature' > 0 (got {temperature})")
        if not (math.isfinite(regularization) and regularization >= 0):
            raise ValueError(f"EBMLoss needs a finite 'regularization' >= 0 (got {regularization})")
        self.validate_args = validate_args
        if gather_distributed and not dist.is_available():
            raise ValueError(
                "EBMLoss: 'gather_distributed=True' needs torch.distributed, which is not available"
            )
        self.temperature = temperature
        self.regularization = regularization
        self.gather_distributed = gather_distributed

    def forward(self, positive_energy: Tensor, negative_energy: Tensor) -> Tensor:
        """Loss of a batch of positive and negative energies."""
        for name, value in (("positive_energy", positive_energy), ("negative_energy", negative_energy)):
            if not isinstance(value, Tensor) or not value.is_floating_point():
                got = value.dtype if isinstance(value, Tensor) else type(value).__name__
                raise TypeError(f"EBMLoss: '{name}' must be a floating tensor of energies (got {got})")
            if value.dim() != 1 or value.numel() == 0:
                raise ValueError(
                    f"EBMLoss: '{name}' must be a non-empty 1-D tensor of energies (got {list(value.shape)})"
                )
            if self.validate_args and not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"EBMLoss: '{name}' contains non-finite values (nan or inf); expected finite energies "
                    "(validate_args=False skips this check)"
                )
        num_pos = positive_energy.new_tensor(float(positive_energy.numel()))
        num_neg = negative_energy.new_tensor(float(negative_energy.numel()))
        scale = 1.0
        if self.gather_distributed:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(
                    "EBMLoss: 'gather_distributed=True' needs an initialised torch.distributed group"
                )
            counts = torch.stack([num_pos, num_neg]).detach()
            dist.all_reduce(counts)
            num_pos, num_neg = counts[0], counts[1]
            scale = float(dist.get_world_size())
        contrast = self.temperature * (positive_energy.sum() / num_pos - negative_energy.sum() / num_neg)
        regularizer = self.regularization * (positive_energy.pow(2).sum() + negative_energy.pow(2).sum())
        return scale * (contrast + regularizer)

    def extra_repr(self) -> str:
        r"""The hyperparameters shown by ``repr``."""
        return (
            f"temperature={self.temperature}, regularization={self.regularization}, "
            f"gather_distributed={self.gather_distributed}, validate_args={self.validate_args}"
        )
