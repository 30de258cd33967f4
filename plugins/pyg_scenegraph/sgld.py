r"""Stochastic Gradient Langevin Dynamics over scene-graph states (energy-based scene-graph learning)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["SGLDSampler", "minmax_normalize"]

_TASKS = ("predcls", "sgcls", "sgdet")


def minmax_normalize(states: Tensor, eps: float = 1e-12) -> Tensor:
    r"""Rescale each row to :math:`[0, 1]`.

    .. math::
        \mathbf{s} \mapsto (\mathbf{s} - \min\mathbf{s}) / \max(\mathbf{s} - \min\mathbf{s})


    This is the official code's ``normalize_states``. A constant row would divide by zero there; here the
    denominator is clamped to ``eps`` so the row becomes zeros instead of NaN.

    Args:
        states: ``[M, K]`` scores (logits or states).
        eps: Lower bound of the denominator. (default: ``1e-12``)

    Returns:
        ``[M, K]`` rows in :math:`[0, 1]`, differentiable w.r.t. ``states``.
    """
    shifted = states - states.min(dim=-1, keepdim=True).values
    return shifted / shifted.max(dim=-1, keepdim=True).values.clamp(min=eps)


class SGLDSampler:
    r"""Stochastic Gradient Langevin Dynamics on the scene-graph states of an energy model.

    From
    `"Energy-Based Learning for Scene Graph Generation" <https://arxiv.org/abs/2103.02221>`_
    (Suhail et al., CVPR 2021), following its official sampler step by step:

    .. math::
        \tilde{\mathbf{s}} &= \mathbf{s}^{(\tau)} + \boldsymbol{\epsilon}, \quad
            \boldsymbol{\epsilon} \sim \mathcal{N}(0, \sigma^2)

        \mathbf{s}^{(\tau+1)} &= \mathrm{minmax}\Big(\tilde{\mathbf{s}} - \lambda\,
            \mathrm{clip}\big(\nabla_{\mathbf{s}} E_\theta(\tilde{\mathbf{s}}),\ \pm c\big)\Big)

    for :math:`\tau = 0, \dots, K - 1`. The noise and gradient steps are constants to autograd (the official
    code writes them into ``.data``), but the min-max re-normalisation is tracked, so a loss on the sampled
    states still sends gradient to the model that produced :math:`\mathbf{s}^{(0)}`. In ``"predcls"`` only
    the edge (predicate) states are sampled; in ``"sgcls"``/``"sgdet"`` node (object) states are sampled too.
    Sampling never accumulates gradients in the energy model's parameters.

    Symbols → arguments: :math:`\lambda` = ``step_size``, :math:`K` = ``num_steps``, :math:`\sigma` =
    ``noise_std``, :math:`c` = ``grad_clip``. Defaults are the paper's (the official config file uses
    ``step_size=0.1, num_steps=10``).

    Args:
        step_size: Langevin step size :math:`\lambda`. (default: ``1.0``)
        num_steps: Number of steps :math:`K`. (default: ``20``)
        noise_std: Standard deviation :math:`\sigma` of the injected noise. (default: ``1e-3``)
        grad_clip: Element-wise gradient clip :math:`c`. (default: ``0.01``)
        generator: Optional :class:`torch.Generator` for the noise (reproducible sampling). The noise is
            drawn on the generator's device and moved to the states' device, so a CPU generator also seeds
            sampling on a GPU (at the cost of a copy per step).
        validate_args: Refuse non-finite initial states and non-finite energy gradients with a
            :class:`ValueError` (one host-device synchronisation per step). With ``False`` the checks are
            skipped; the sampler keeps no state, so a non-finite sample is the caller's to handle.
            (default: ``True``)

    Raises:
        ValueError: for a negative or non-finite step size, noise or clip, or ``num_steps < 0``.
    """

    def __init__(
        self,
        step_size: float = 1.0,
        num_steps: int = 20,
        noise_std: float = 1e-3,
        grad_clip: float = 0.01,
        generator: torch.Generator | None = None,
        validate_args: bool = True,
    ) -> None:
        for name, value, low, strict in (
            ("step_size", step_size, 0.0, False),
            ("noise_std", noise_std, 0.0, False),
            ("grad_clip", grad_clip, 0.0, True),
        ):
            if not math.isfinite(value) or value < low or (strict and value == low):
                raise ValueError(
                    f"SGLDSampler needs a finite '{name}' {'>' if strict else '>='} {low:g} (got {value})"
                )
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"SGLDSampler needs an integer 'num_steps' >= 0 (got {num_steps!r})")
        self.validate_args = validate_args
        self.step_size = step_size
        self.num_steps = num_steps
        self.noise_std = noise_std
        self.grad_clip = grad_clip
        self.generator = generator

    def _noise(self, like: Tensor) -> Tensor:
        if self.noise_std == 0:
            return torch.zeros_like(like)
        device = like.device if self.generator is None else self.generator.device
        noise = torch.randn(like.shape, generator=self.generator, dtype=like.dtype, device=device)
        return noise.to(like.device) * self.noise_std

    def sample(
        self,
        energy: Callable[[Tensor, Tensor], Tensor],
        node_states: Tensor,
        edge_states: Tensor,
        task: str = "predcls",
    ) -> tuple[Tensor, Tensor]:
        r"""Run :math:`K` Langevin steps from ``(node_states, edge_states)``.

        Args:
            energy: ``energy(node_states, edge_states) -> [B]`` energies, e.g.
                ``lambda n, e: model(x, n, edge_index, e, code, batch)``.
            node_states: ``[N, C]`` initial node states (returned unchanged in ``"predcls"``).
            edge_states: ``[E, P]`` initial edge states (e.g. min-max normalised relation logits).
            task: ``"predcls"``, ``"sgcls"`` or ``"sgdet"``.

        Returns:
            The sampled ``(node_states, edge_states)``.

        Raises:
            ValueError: for an unknown task, non-2-D states, or (``validate_args``) non-finite initial
                states or a non-finite energy gradient.
            TypeError: for states that are not floating tensors.
        """
        if task not in _TASKS:
            raise ValueError(f"SGLDSampler.sample: 'task' must be one of {_TASKS} (got {task!r})")
        if node_states.dim() != 2 or edge_states.dim() != 2:
            raise ValueError(
                "SGLDSampler.sample: 'node_states' and 'edge_states' must be 2-D [rows, classes] "
                f"(got {list(node_states.shape)} and {list(edge_states.shape)})"
            )
        for name, value in (("node_states", node_states), ("edge_states", edge_states)):
            if not value.is_floating_point():
                raise TypeError(f"SGLDSampler.sample: '{name}' must be a floating tensor (got {value.dtype})")
            if self.validate_args and not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"SGLDSampler.sample: '{name}' contains non-finite values (nan or inf); expected finite "
                    "states (validate_args=False skips this check)"
                )
        sample_nodes = task != "predcls"
        with torch.enable_grad():
            for _ in range(self.num_steps):
                edge_noise = self._noise(edge_states)
                node_noise = self._noise(node_states) if sample_nodes else torch.zeros(())
                edge_leaf = (edge_states.detach() + edge_noise).requires_grad_(True)
                if sample_nodes:
                    node_leaf = (node_states.detach() + node_noise).requires_grad_(True)
                    value = energy(node_leaf, edge_leaf).sum()
                    edge_grad, node_grad = torch.autograd.grad(value, [edge_leaf, node_leaf])
                    if self.validate_args and not bool(torch.isfinite(node_grad).all()):
                        raise ValueError(
                            "SGLDSampler.sample: the energy's gradient w.r.t. the node states is not finite; "
                            "check the energy model (validate_args=False skips this check)"
                        )
                    node_step = node_noise - self.step_size * node_grad.clamp(-self.grad_clip, self.grad_clip)
                    node_states = minmax_normalize(node_states + node_step.detach())
                else:
                    (edge_grad,) = torch.autograd.grad(
                        energy(node_states.detach(), edge_leaf).sum(), [edge_leaf]
                    )
                if self.validate_args and not bool(torch.isfinite(edge_grad).all()):
                    raise ValueError(
                        "SGLDSampler.sample: the energy's gradient w.r.t. the edge states is not finite; "
                        "check the energy model (validate_args=False skips this check)"
                    )
                edge_step = edge_noise - self.step_size * edge_grad.clamp(-self.grad_clip, self.grad_clip)
                edge_states = minmax_normalize(edge_states + edge_step.detach())
        return node_states, edge_states

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(step_size={self.step_size}, num_steps={self.num_steps}, "
            f"noise_std={self.noise_std}, grad_clip={self.grad_clip}, validate_args={self.validate_args})"
        )
