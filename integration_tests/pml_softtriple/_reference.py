"""Independent float64 references written from the SoftTriple paper's formulas with plain loops.

Nothing here shares code with the plugin: normalisation, the soft assignment over centres, the margin
softmax and the regulariser are spelled out term by term (Qian et al., ICCV 2019, Eq. 8, 9 and 11).
Gradients come from autograd through these loops.
"""

from __future__ import annotations

import math

import torch


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt(torch.sum(v * v))


def relaxed_similarity(x: torch.Tensor, centers: list[torch.Tensor], gamma: float) -> torch.Tensor:
    """S'_c = sum_k q_k <x, w_k>, q = softmax(<x, w_k> / gamma), for one embedding and one class."""
    sims = [torch.dot(x, w) for w in centers]
    top = max(float(s.detach()) for s in sims)  # only for numerical range; cancels in q
    weights = [torch.exp((s - top) / gamma) for s in sims]
    total = sum(weights)
    return sum(w / total * s for w, s in zip(weights, sims, strict=True))


def soft_triple_loss(
    embeddings: torch.Tensor,
    fc: torch.Tensor,
    labels: torch.Tensor,
    centers_per_class: int,
    la: float = 20.0,
    gamma: float = 0.1,
    margin: float = 0.01,
    tau: float = 0.2,
    reg_eps: float | None = None,
) -> torch.Tensor:
    """mean_i l_i + tau * R, with fc of shape (d, C*K) and column c*K + k = centre k of class c."""
    num_classes = fc.shape[1] // centers_per_class
    centers = [
        [unit(fc[:, c * centers_per_class + k]) for k in range(centers_per_class)] for c in range(num_classes)
    ]
    losses = []
    for i in range(embeddings.shape[0]):
        x = unit(embeddings[i])
        y = int(labels[i])
        logits = [
            la * (relaxed_similarity(x, centers[c], gamma) - (margin if c == y else 0.0))
            for c in range(num_classes)
        ]
        top = max(float(v.detach()) for v in logits)
        log_denominator = top + torch.log(sum(torch.exp(v - top) for v in logits))
        losses.append(log_denominator - logits[y])
    loss = sum(losses) / len(losses)
    if tau > 0 and centers_per_class > 1:
        loss = loss + tau * center_regularizer(fc, centers_per_class, reg_eps)
    return loss


def center_regularizer(fc: torch.Tensor, centers_per_class: int, eps: float | None = None) -> torch.Tensor:
    """R = sum_c sum_{t<s} sqrt(2 + eps - 2 <w_c^t, w_c^s>) / (C K (K - 1)); fc is (d, C*K)."""
    eps = torch.finfo(fc.dtype).tiny if eps is None else eps
    k = centers_per_class
    num_classes = fc.shape[1] // k
    total = fc.new_zeros(())
    for c in range(num_classes):
        for t in range(k):
            for s in range(t + 1, k):
                cos = torch.dot(unit(fc[:, c * k + t]), unit(fc[:, c * k + s]))
                total = total + torch.sqrt(2.0 + eps - torch.clamp(2.0 * cos, max=2.0))
    return total / (num_classes * k * (k - 1))


def hard_triple_loss(
    embeddings: torch.Tensor,
    fc: torch.Tensor,
    labels: torch.Tensor,
    centers_per_class: int,
    la: float,
    margin: float,
) -> torch.Tensor:
    """The gamma -> 0 limit (HardTriple): class similarity = max over the class's centres."""
    num_classes = fc.shape[1] // centers_per_class
    losses = []
    for i in range(embeddings.shape[0]):
        x = unit(embeddings[i])
        y = int(labels[i])
        sims = [
            max(float(torch.dot(x, unit(fc[:, c * centers_per_class + k]))) for k in range(centers_per_class))
            for c in range(num_classes)
        ]
        logits = [la * (s - (margin if c == y else 0.0)) for c, s in enumerate(sims)]
        top = max(logits)
        losses.append(top + math.log(sum(math.exp(v - top) for v in logits)) - logits[y])
    return torch.tensor(sum(losses) / len(losses), dtype=torch.float64)


def angle_embeddings(num: int = 180, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """PML's test convention: deterministic 2-D unit embeddings at angles 0, 1, ..., num - 1 degrees."""
    radians = torch.arange(num, dtype=torch.float64) * math.pi / 180.0
    return torch.stack([torch.cos(radians), torch.sin(radians)], dim=1).to(dtype)
