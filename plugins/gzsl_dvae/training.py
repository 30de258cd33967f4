"""The VAE training loop shared by :class:`~gzsl_dvae.DisentangledVAE` and :class:`~gzsl_dvae.CADAVAE`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._validation import check_finite, check_positive

__all__ = ["train_vae"]


def _as_tensor(name: str, value: Tensor | np.ndarray, dtype: torch.dtype) -> Tensor:
    tensor = torch.as_tensor(value)
    if dtype.is_floating_point:
        check_finite(name, tensor)
    return tensor.to(dtype)


def _non_finite(loss: Tensor, epoch: int, step: int, deferred: bool = False) -> FloatingPointError:
    if deferred:
        return FloatingPointError(
            f"train_vae: the loss is non-finite at epoch {epoch}, step {step} (validate_args=False: that "
            "step's gradients were zeroed, so the parameters stayed finite)"
        )
    return FloatingPointError(
        f"train_vae: the loss is {float(loss.detach())} at epoch {epoch}, step {step}; the parameters are "
        "those of the last finite step"
    )


def train_vae(
    model: nn.Module,
    features: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    class_attributes: Tensor | np.ndarray,
    epochs: int = 100,
    batch_size: int = 50,
    lr: float = 1.5e-4,
    device: str | torch.device = "cpu",
    progress: bool = False,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    validate_args: bool = True,
) -> list[dict[str, float]]:
    r"""Train a CADA-VAE or Disentangled-VAE on seen-class features with CADA-VAE's optimiser and epoch count.

    Each epoch draws ``len(features) // batch_size`` batches from a fresh random permutation (CADA-VAE draws
    as many random batches), pairs every feature :math:`x_i` with its class attributes :math:`c_{y_i}`, and
    takes one Adam step (AMSGrad, ``lr=1.5e-4``, as published) on ``model(x, c, y, epoch)["loss"]``; the
    model's linear warm-ups read the 0-based epoch. Seed ``torch.manual_seed`` first for a reproducible run.

    The loop stops at the first non-finite loss, before its backward pass and optimizer step, so the
    parameters are those of the last finite step (docs/reliability.md, rule 5). Everything stays on
    ``device``; the per-step finiteness check is the one host-device synchronisation of a step, and
    ``validate_args=False`` removes it: a non-finite step's gradients are then zeroed on the device (no
    parameter turns non-finite; Adam's moments still move the parameters once) and the error is raised at
    the end of the epoch, naming the first such step.

    Args:
        model: a module whose ``forward(x, c, labels, epoch)`` returns a dict with a scalar ``"loss"``.
        features: :math:`(N, D_1)` visual features of seen classes.
        labels: :math:`(N,)` class indices in ``[0, C)``, rows of ``class_attributes``.
        class_attributes: :math:`(C, D_2)` attributes of the training classes.
        epochs: number of epochs. (default: ``100``)
        batch_size: batch size. (default: ``50``)
        lr: Adam learning rate. (default: ``1.5e-4``)
        device: where to train. (default: ``"cpu"``)
        progress: show a tqdm bar. (default: ``False``)
        callback: called as ``callback(epoch, mean_terms)`` after each epoch. (default: ``None``)
        validate_args: check each step's loss before its optimizer step (see above). (default: ``True``)

    Returns:
        One dict per epoch with the mean of each loss term over the epoch's batches.

    Raises:
        ValueError: for non-finite inputs, mismatched lengths, labels outside ``[0, C)``, fewer samples than
            ``batch_size``, or non-positive ``epochs``/``batch_size``/``lr``.
        FloatingPointError: at the first non-finite loss, naming its epoch and step.
    """
    x_all = _as_tensor("features", features, torch.float32)
    y_all = _as_tensor("labels", labels, torch.int64)
    attributes = _as_tensor("class_attributes", class_attributes, torch.float32)
    if x_all.dim() != 2 or attributes.dim() != 2 or y_all.dim() != 1:
        raise ValueError(
            "expected `features` (N, D1), `labels` (N,), `class_attributes` (C, D2); got shapes "
            f"{tuple(x_all.shape)}, {tuple(y_all.shape)}, {tuple(attributes.shape)}"
        )
    if y_all.shape[0] != x_all.shape[0]:
        raise ValueError(f"`labels` has {y_all.shape[0]} entries but `features` has {x_all.shape[0]} rows")
    if y_all.numel() and (int(y_all.min()) < 0 or int(y_all.max()) >= attributes.shape[0]):
        raise ValueError(
            f"`labels` must index rows of `class_attributes` (0..{attributes.shape[0] - 1}); "
            f"got range [{int(y_all.min())}, {int(y_all.max())}] - is the attribute matrix missing a class?"
        )
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"`epochs` and `batch_size` must be >= 1, got {epochs} and {batch_size}")
    check_positive("lr", lr)
    n_batches = x_all.shape[0] // batch_size
    if n_batches == 0:
        raise ValueError(f"need at least `batch_size`={batch_size} samples, got {x_all.shape[0]}")

    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int) and y_all.numel() and int(y_all.max()) >= num_classes:
        raise ValueError(
            f"`labels` must lie in [0, {num_classes}) for {type(model).__name__}(num_classes={num_classes}); "
            f"got {int(y_all.max())}"
        )

    model.to(device)
    x_all, y_all, attributes = x_all.to(device), y_all.to(device), attributes.to(device)
    # Every input was checked above, once: the model's own per-batch checks would only repeat them.
    model_checks = getattr(model, "validate_args", None)
    if model_checks is not None:
        model.validate_args = False  # type: ignore[assignment]
    try:
        return _train(model, x_all, y_all, attributes, epochs, batch_size, lr, device, progress, callback,
                      validate_args)  # fmt: skip
    finally:
        if model_checks is not None:
            model.validate_args = model_checks  # type: ignore[assignment]


def _train(
    model: nn.Module,
    x_all: Tensor,
    y_all: Tensor,
    attributes: Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    device: str | torch.device,
    progress: bool,
    callback: Callable[[int, dict[str, float]], None] | None,
    validate_args: bool,
) -> list[dict[str, float]]:
    n_batches = x_all.shape[0] // batch_size
    fused = torch.device(device).type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(
        model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, amsgrad=True, fused=fused
    )
    history: list[dict[str, float]] = []
    model.train()
    for epoch in tqdm(
        range(epochs), desc=type(model).__name__, unit="epoch", disable=not progress, leave=False
    ):
        order = torch.randperm(x_all.shape[0], device=device)
        keys: list[str] = []
        total: Tensor | None = None
        finite_steps: list[Tensor] = []
        for b in range(n_batches):
            index = order[b * batch_size : (b + 1) * batch_size]
            y = y_all[index]
            terms = model(x_all[index], attributes[y], y, epoch)
            loss = terms["loss"]
            finite = torch.isfinite(loss)
            if validate_args and not bool(finite):  # the step's one host-device synchronisation
                raise _non_finite(loss, epoch, b)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not validate_args:  # a non-finite step contributes a zero gradient, decided on the device
                finite_steps.append(finite)
                for param in model.parameters():
                    if param.grad is not None:
                        param.grad = torch.where(finite, param.grad, 0.0)
            optimizer.step()
            keys = list(terms)
            stacked = torch.stack([terms[key].detach() for key in keys])  # one op, not one per term
            total = stacked if total is None else total + stacked
        if finite_steps:
            flags = torch.stack(finite_steps)
            if not bool(flags.all()):
                step = int((~flags).nonzero()[0, 0])
                raise _non_finite(torch.tensor(float("nan")), epoch, step, deferred=True)
        assert total is not None
        means = {key: float(value) / n_batches for key, value in zip(keys, total.tolist(), strict=True)}
        history.append(means)
        if callback is not None:
            callback(epoch, means)
    model.eval()
    return history
