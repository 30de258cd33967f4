"""Linear warm-up of a loss weight over epochs (CADA-VAE's schedules)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LinearWarmup"]


@dataclass(frozen=True)
class LinearWarmup:
    r"""A loss weight that grows linearly from 0 to ``factor`` between two epochs.

    CADA-VAE (Schonfeld et al., CVPR 2019, https://arxiv.org/abs/1812.01784) warms up each loss weight:

    .. math::
        w(e) = \min\!\Big(\max\!\Big(f \cdot \frac{e - e_0}{e_1 - e_0},\ 0\Big),\ f\Big),

    with :math:`f` = ``factor``, :math:`e_0` = ``start_epoch``, :math:`e_1` = ``end_epoch`` and :math:`e` the
    0-based epoch (a float, so a schedule may also be advanced per iteration). The published schedules are
    KL :math:`(0.25, 0, 93)`, cross-reconstruction :math:`(2.37, 21, 75)`, distance :math:`(8.13, 6, 22)`.

    Args:
        factor: final weight :math:`f \ge 0`.
        start_epoch: epoch at which the weight starts to grow (it is 0 before). (default: ``0``)
        end_epoch: epoch at which it reaches ``factor``; equal to ``start_epoch`` for a step. (default: ``0``)

    Raises:
        ValueError: for a negative or non-finite ``factor``, a negative ``start_epoch``, or
            ``end_epoch < start_epoch``.
    """

    factor: float
    start_epoch: float = 0
    end_epoch: float = 0

    def __post_init__(self) -> None:
        if not (self.factor >= 0 and self.factor < float("inf")):
            raise ValueError(f"`factor` must be finite and >= 0, got {self.factor}")
        if self.start_epoch < 0:
            raise ValueError(f"`start_epoch` must be >= 0, got {self.start_epoch}")
        if self.end_epoch < self.start_epoch:
            raise ValueError(f"`end_epoch` ({self.end_epoch}) must be >= `start_epoch` ({self.start_epoch})")

    def __call__(self, epoch: float) -> float:
        """Return the weight at (0-based) ``epoch``."""
        if self.end_epoch == self.start_epoch:
            return float(self.factor) if epoch >= self.start_epoch else 0.0
        ramp = self.factor * (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        return float(min(max(ramp, 0.0), self.factor))

    def rescaled(self, epoch_scale: float) -> LinearWarmup:
        """The same schedule on a longer or shorter run: start and end epochs multiplied by ``epoch_scale``.

        CADA-VAE's schedules are published for 100 epochs; ``rescaled(epochs / 100)`` keeps them in
        proportion.

        Raises:
            ValueError: if ``epoch_scale`` is not a positive finite number.
        """
        if not (0 < epoch_scale < float("inf")):
            raise ValueError(f"`epoch_scale` must be a positive finite number, got {epoch_scale}")
        return LinearWarmup(self.factor, self.start_epoch * epoch_scale, self.end_epoch * epoch_scale)

    @classmethod
    def constant(cls, factor: float) -> LinearWarmup:
        """A weight equal to ``factor`` from epoch 0 on."""
        return cls(factor, 0, 0)
