"""The classifier stage: a softmax classifier on latent samples of seen and unseen classes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._validation import check_disjoint
from .mlp import cada_init_, reparameterize

__all__ = [
    "ClassifierProtocol",
    "Encoder",
    "build_classifier_training_set",
    "encode_mean",
    "train_softmax_classifier",
]

Encoder = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class ClassifierProtocol:
    r"""How many latent samples train the final classifier, and how it is optimised.

    CADA-VAE's published GZSL protocol (Schonfeld et al., CVPR 2019, https://arxiv.org/abs/1812.01784): 200
    latent samples per seen class drawn from image features, 400 per unseen class drawn from its attributes, a
    linear softmax classifier trained with Adam (lr 1e-3, betas (0.5, 0.999)), batch 32, for a per-dataset
    number of epochs chosen on validation (CUB 23, SUN 21, AWA1 33, AWA2 29); tested on posterior means.
    Disentangled-VAE (Li et al., AAAI 2021) also feeds seen-class :math:`z^t_s` from attributes
    (``seen_semantic_samples > 0``).

    Args:
        seen_visual_samples: latent samples per seen class from its image features. (default: ``200``)
        seen_semantic_samples: latent samples per seen class from its attributes. (default: ``0``)
        unseen_semantic_samples: latent samples per unseen class from its attributes. (default: ``400``)
        epochs: classifier epochs. (default: ``23``)
        batch_size: batch size. (default: ``32``)
        lr: Adam learning rate. (default: ``1e-3``)
        beta1: Adam :math:`\beta_1`. (default: ``0.5``)

    Raises:
        ValueError: for negative sample counts, or non-positive epochs, batch size or learning rate.
    """

    seen_visual_samples: int = 200
    seen_semantic_samples: int = 0
    unseen_semantic_samples: int = 400
    epochs: int = 23
    batch_size: int = 32
    lr: float = 1e-3
    beta1: float = 0.5

    def __post_init__(self) -> None:
        for name in ("seen_visual_samples", "seen_semantic_samples", "unseen_semantic_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr}")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"`beta1` must be in [0, 1), got {self.beta1}")


@torch.no_grad()
def encode_mean(encoder: Encoder, inputs: Tensor, batch_size: int = 1024) -> Tensor:
    """Posterior means of ``inputs`` under ``encoder`` (the test-time latents), in batches."""
    parts = [encoder(inputs[i : i + batch_size])[0] for i in range(0, inputs.shape[0], batch_size)]
    return torch.cat(parts) if parts else inputs.new_zeros((0, 0))


@torch.no_grad()
def _sample_per_class(
    encoder: Encoder,
    inputs: Tensor,
    labels: Tensor,
    classes: Tensor,
    per_class: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    zs, ys = [], []
    for cls in classes.tolist():
        rows = inputs[labels == cls]
        if rows.shape[0] == 0:
            raise ValueError(f"class {cls} has no input rows to draw latent samples from")
        if rows.shape[0] >= per_class:
            device = generator.device if generator is not None else rows.device
            pick = torch.randperm(rows.shape[0], generator=generator, device=device)[:per_class]
            rows = rows[pick.to(rows.device)]
        else:  # CADA-VAE tiles the rows of small classes
            rows = rows.repeat(-(-per_class // rows.shape[0]), 1)[:per_class]
        mu, logvar = encoder(rows)
        zs.append(reparameterize(mu, logvar, generator=generator))
        ys.append(torch.full((per_class,), cls, dtype=torch.long, device=rows.device))
    return torch.cat(zs), torch.cat(ys)


def build_classifier_training_set(
    encode_visual: Encoder,
    encode_semantic: Encoder,
    features: Tensor,
    labels: Tensor,
    class_attributes: Tensor,
    seen_classes: Tensor,
    unseen_classes: Tensor,
    protocol: ClassifierProtocol,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Draw the latent training set of the final classifier.

    Seen classes contribute ``protocol.seen_visual_samples`` samples :math:`z \sim q(z|x)` of their image
    features and ``protocol.seen_semantic_samples`` samples :math:`z \sim q(z|c)` of their attributes; unseen
    classes ``protocol.unseen_semantic_samples`` samples of their attributes (they have no images). For
    Disentangled-VAE pass encoders of :math:`z^t`; ``functools.partial(model.encode_visual, factor="p")``
    gives the :math:`z^p` ablation.

    Args:
        encode_visual: maps features ``(n, D1)`` to posterior ``(mu, logvar)``.
        encode_semantic: maps attributes ``(n, D2)`` to posterior ``(mu, logvar)``.
        features: :math:`(N, D_1)` training features of seen classes.
        labels: :math:`(N,)` their labels, rows of ``class_attributes`` (on ``features``' device).
        class_attributes: :math:`(C, D_2)` attributes of all classes (seen and unseen).
        seen_classes: labels of the seen classes.
        unseen_classes: labels of the unseen classes (disjoint from the seen ones).
        protocol: sample counts.
        generator: CPU RNG for the subsets and the latent noise (global RNG if ``None``). (default: ``None``)

    Returns:
        ``(z, y)``: latent samples :math:`(M, d)` and their labels :math:`(M,)`, on the encoders' device.

    Raises:
        ValueError: if the class sets overlap, a class index is outside ``class_attributes``, or no sample is
            requested at all.
    """
    # class lists are small host-side bookkeeping (one Python loop over classes)
    seen = torch.as_tensor(seen_classes).long().unique().cpu()
    unseen = torch.as_tensor(unseen_classes).long().unique().cpu()
    check_disjoint("seen_classes", seen.numpy(), "unseen_classes", unseen.numpy())
    n_classes = class_attributes.shape[0]
    for name, classes in (("seen_classes", seen), ("unseen_classes", unseen)):
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= n_classes):
            raise ValueError(f"`{name}` must index rows of `class_attributes` (0..{n_classes - 1})")
    all_classes = torch.arange(n_classes, device=class_attributes.device)
    parts = []
    if protocol.seen_visual_samples and seen.numel():
        parts.append(
            _sample_per_class(encode_visual, features, labels, seen, protocol.seen_visual_samples, generator)
        )
    if protocol.seen_semantic_samples and seen.numel():
        parts.append(
            _sample_per_class(
                encode_semantic,
                class_attributes,
                all_classes,
                seen,
                protocol.seen_semantic_samples,
                generator,
            )
        )
    if protocol.unseen_semantic_samples and unseen.numel():
        parts.append(
            _sample_per_class(
                encode_semantic,
                class_attributes,
                all_classes,
                unseen,
                protocol.unseen_semantic_samples,
                generator,
            )
        )
    if not parts:
        raise ValueError("the protocol requests no latent samples for the given classes")
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _fused_ok(t: Tensor) -> bool:
    return t.device.type in ("cpu", "cuda") and t.dtype in (torch.float32, torch.float64)


def train_softmax_classifier(
    z: Tensor,
    y: Tensor,
    num_classes: int,
    protocol: ClassifierProtocol,
    generator: torch.Generator | None = None,
    callback: Callable[[int, nn.Linear], None] | None = None,
) -> nn.Linear:
    r"""Train the linear softmax classifier :math:`p(y|z) = \operatorname{softmax}(Wz + b)` on latent samples.

    Mean cross-entropy, Adam (``protocol.lr``, betas ``(protocol.beta1, 0.999)``), shuffled batches of
    ``protocol.batch_size`` (the last incomplete batch dropped, as in CADA-VAE), ``protocol.epochs`` epochs.
    The gradient of the cross-entropy is written in closed form,
    :math:`\partial L / \partial \text{logits} = (\operatorname{softmax} - \text{onehot}) / B`, which gives
    the same update as autograd without building a graph for each of the many tiny steps.
    The weights start like CADA-VAE's (Xavier-uniform, gain 0.5; zero bias).

    Args:
        z: :math:`(M, d)` latent samples.
        y: :math:`(M,)` labels in ``[0, num_classes)``.
        num_classes: output size (all classes, seen and unseen).
        protocol: optimisation settings.
        generator: RNG for the batch order. (default: ``None``)
        callback: called as ``callback(epoch, classifier)`` after each epoch, e.g. to track a validation
            score. (default: ``None``)

    Returns:
        The trained ``nn.Linear(d, num_classes)`` (logits; take ``argmax`` to predict).

    Raises:
        ValueError: if ``z`` and ``y`` disagree in length or labels fall outside ``[0, num_classes)``.
    """
    if z.dim() != 2 or y.shape != (z.shape[0],):
        raise ValueError(f"expected `z` (M, d) and `y` (M,), got {tuple(z.shape)} and {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"`y` must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    classifier = nn.Linear(z.shape[1], num_classes).to(device=z.device, dtype=z.dtype)
    cada_init_(classifier)
    optimizer = torch.optim.Adam(
        classifier.parameters(), lr=protocol.lr, betas=(protocol.beta1, 0.999), fused=_fused_ok(z)
    )
    weight, bias = classifier.weight, classifier.bias
    n = z.shape[0]
    steps = max(n // protocol.batch_size, 1)
    rows = torch.arange(min(protocol.batch_size, n), device=z.device)
    for epoch in range(protocol.epochs):
        device = generator.device if generator is not None else z.device
        order = torch.randperm(n, generator=generator, device=device).to(z.device)
        for b in range(steps):
            index = order[b * protocol.batch_size : (b + 1) * protocol.batch_size]
            z_b, y_b = z[index], y[index]
            with torch.no_grad():  # closed-form gradient of the mean cross-entropy (no autograd graph)
                residual = torch.softmax(torch.addmm(bias, z_b, weight.t()), dim=1)
                residual[rows[: len(index)], y_b] -= 1.0
                residual /= len(index)
                weight.grad = residual.t() @ z_b
                bias.grad = residual.sum(0)
            optimizer.step()
        if callback is not None:
            callback(epoch, classifier)
    return classifier
