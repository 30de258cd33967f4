"""Generated GZSL features with known nuisance factors, on real or synthetic class attributes.

Used by ``examples/gzsl_benchmark.py``. The generative model (ground truth known, fixed before any method was
run) mimics pooled CNN features of images:

    a_i = standardise(A)[y_i] + sigma_a * eps_a              (instance attributes: not every image shows all)
    n_i ~ N(0, I_q)                                          (nuisance: pose, background, light, ...)
    h_i = relu(W_a a_i / sqrt(A) + s_n * W_n n_i / sqrt(q) + b_1)
    x_i = relu(W_2 h_i / sqrt(H) + b_2)                      (non-negative, like ResNet pool features)

so the class information lives in the attributes and the nuisance ``n_i`` is independent of the class: exactly
the category-dispersing variation Disentangled-VAE should move into ``z^p``. The nuisance of every sample is
returned, so how much of it a latent still encodes can be measured.

``split_from_att_splits`` recovers the real seen/unseen class partition from an xlsa17 ``att_splits.mat`` (the
per-image labels, ``res101.mat``, are not available offline): images are stored class by class in sorted
class-name order, so ``test_unseen_loc`` forms runs of whole unseen classes. With a known largest class size
(CUB 60, SUN 20 images) the number of classes in each run is exact; for AWA1/AWA2 (class sizes 100-1645) the
unseen classes of the proposed split (Xian et al., TPAMI 2018) are listed and checked against the runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gzsl_dvae import AttSplits, GZSLData

__all__ = [
    "AWA_PROPOSED_SPLIT_UNSEEN",
    "MAX_IMAGES_PER_CLASS",
    "NuisanceFeatureGenerator",
    "make_benchmark",
    "split_from_att_splits",
    "synthetic_attributes",
]

# Unseen (test) classes of the AWA1/AWA2 proposed split, Xian et al., "Zero-Shot Learning - A Comprehensive
# Evaluation of the Good, the Bad and the Ugly", TPAMI 2018.
AWA_PROPOSED_SPLIT_UNSEEN = (
    "bat",
    "blue+whale",
    "bobcat",
    "dolphin",
    "giraffe",
    "horse",
    "rat",
    "seal",
    "sheep",
    "walrus",
)
MAX_IMAGES_PER_CLASS = {"CUB": 60, "SUN": 20}


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lengths and values of the runs of equal entries in a 0/1 vector."""
    change = np.flatnonzero(np.diff(mask)) + 1
    starts = np.r_[0, change]
    ends = np.r_[change, mask.size]
    return ends - starts, mask[starts]


def split_from_att_splits(splits: AttSplits, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Seen and unseen class indices (rows of ``splits.attributes``) of an xlsa17 proposed split.

    Raises:
        ValueError: if the recovered partition is inconsistent with the file's location runs.
    """
    is_unseen = np.zeros(splits.num_images, dtype=np.int64)
    is_unseen[splits.test_unseen_loc] = 1
    lengths, values = _runs(is_unseen)
    order = np.argsort(splits.class_names, kind="stable")  # image order = sorted class-name order
    n_classes = len(splits.class_names)
    if dataset.upper() in MAX_IMAGES_PER_CLASS:
        per_run = -(-lengths // MAX_IMAGES_PER_CLASS[dataset.upper()])  # ceil: fewest classes that fit
        if per_run.sum() != n_classes:
            raise ValueError(f"{dataset}: runs imply {per_run.sum()} classes, the file has {n_classes}")
        unseen_mask = np.repeat(values, per_run).astype(bool)
        unseen = np.sort(order[unseen_mask])
    elif dataset.upper() in ("AWA1", "AWA2"):
        name_to_row = {name: i for i, name in enumerate(splits.class_names)}
        unseen = np.sort([name_to_row[name] for name in AWA_PROPOSED_SPLIT_UNSEEN])
        pattern = np.isin(order, unseen).astype(np.int64)  # seen/unseen along the image order
        _, class_runs = _runs(pattern)
        if not np.array_equal(class_runs, values):
            raise ValueError(f"{dataset}: the listed unseen classes do not match the runs of test_unseen_loc")
    else:
        raise ValueError(f"`dataset` must be one of AWA1, AWA2, CUB, SUN; got {dataset!r}")
    seen = np.setdiff1d(np.arange(n_classes), unseen)
    return seen, unseen


def synthetic_attributes(
    num_classes: int, num_attributes: int, density: float = 0.3, seed: int = 0
) -> np.ndarray:
    """Binary class attributes (each class a random subset), L2-normalised per class like xlsa17's ``att``."""
    rng = np.random.default_rng(seed)
    while True:
        binary = (rng.random((num_classes, num_attributes)) < density).astype(np.float64)
        if binary.sum(axis=1).min() > 0 and len({row.tobytes() for row in binary}) == num_classes:
            break
    return binary / np.linalg.norm(binary, axis=1, keepdims=True)


@dataclass(frozen=True)
class NuisanceFeatureGenerator:
    """A fixed random 2-layer ReLU map from (instance attributes, nuisance) to non-negative features."""

    class_attributes: np.ndarray
    feature_dim: int = 512
    hidden_dim: int = 512
    num_nuisance: int = 8
    nuisance_scale: float = 1.5
    attribute_noise: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        attrs = self.class_attributes
        std = attrs.std(axis=0)
        object.__setattr__(self, "_mean", attrs.mean(axis=0))
        object.__setattr__(self, "_std", np.where(std > 0, std, 1.0))
        a_dim = attrs.shape[1]
        object.__setattr__(self, "_w_a", rng.standard_normal((a_dim, self.hidden_dim)) / np.sqrt(a_dim))
        object.__setattr__(
            self,
            "_w_n",
            rng.standard_normal((self.num_nuisance, self.hidden_dim)) / np.sqrt(self.num_nuisance),
        )
        object.__setattr__(self, "_b1", 0.5 * rng.standard_normal(self.hidden_dim))
        object.__setattr__(
            self, "_w_2", rng.standard_normal((self.hidden_dim, self.feature_dim)) / np.sqrt(self.hidden_dim)
        )
        object.__setattr__(self, "_b2", 0.5 * rng.standard_normal(self.feature_dim))

    def __call__(self, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Features ``(N, feature_dim)`` and the nuisance ``(N, num_nuisance)`` of samples of ``labels``."""
        a = (self.class_attributes[labels] - self._mean) / self._std  # type: ignore[attr-defined]
        a = a + self.attribute_noise * rng.standard_normal(a.shape)
        nuisance = rng.standard_normal((labels.size, self.num_nuisance))
        pre = a @ self._w_a + self.nuisance_scale * nuisance @ self._w_n + self._b1  # type: ignore[attr-defined]
        h = np.maximum(pre, 0.0)
        x = np.maximum(h @ self._w_2 + self._b2, 0.0)  # type: ignore[attr-defined]
        return x.astype(np.float32), nuisance


def make_benchmark(
    class_attributes: np.ndarray,
    seen: np.ndarray,
    unseen: np.ndarray,
    train_per_class: int,
    test_seen_per_class: int,
    test_unseen_per_class: int,
    generator_seed: int = 0,
    sample_seed: int = 0,
    class_names: list[str] | None = None,
    **generator_kwargs: float,
) -> tuple[GZSLData, dict[str, np.ndarray]]:
    """A generated GZSL split and the ground-truth nuisance of each of its three parts."""
    gen = NuisanceFeatureGenerator(class_attributes, seed=generator_seed, **generator_kwargs)  # type: ignore[arg-type]
    rng = np.random.default_rng(sample_seed)
    parts = {}
    for name, classes, per_class in (
        ("train", seen, train_per_class),
        ("test_seen", seen, test_seen_per_class),
        ("test_unseen", unseen, test_unseen_per_class),
    ):
        labels = np.repeat(np.asarray(classes), per_class)
        feats, nuisance = gen(labels, rng)
        parts[name] = (feats, labels, nuisance)
    data = GZSLData(
        train_features=parts["train"][0],
        train_labels=parts["train"][1],
        test_seen_features=parts["test_seen"][0],
        test_seen_labels=parts["test_seen"][1],
        test_unseen_features=parts["test_unseen"][0],
        test_unseen_labels=parts["test_unseen"][1],
        class_attributes=class_attributes,
        class_names=class_names,
    )
    return data, {name: part[2] for name, part in parts.items()}
