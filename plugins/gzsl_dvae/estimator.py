"""A scikit-learn estimator around the two stages: VAE training, then the latent softmax classifier."""

from __future__ import annotations

import functools
from typing import Any, Literal

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted
from torch import Tensor, nn

from ._validation import check_labels, check_matrix
from .cada_vae import (
    CADA_CROSS_RECONSTRUCTION_WARMUP,
    CADA_DISTANCE_WARMUP,
    CADA_KL_WARMUP,
    CADAVAE,
)
from .disentangled_vae import DisentangledVAE
from .final_classifier import (
    ClassifierProtocol,
    build_classifier_training_set,
    encode_mean,
    train_softmax_classifier,
)
from .metrics import GZSLScores, evaluate_gzsl
from .training import train_vae
from .warmup import LinearWarmup

__all__ = ["GZSLClassifier"]


class GZSLClassifier(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    r"""Generalized zero-shot classifier: fit on seen-class features and all class attributes, predict all.

    ``fit(X, y, class_attributes)`` trains a Disentangled-VAE (Li et al., AAAI 2021,
    https://ojs.aaai.org/index.php/AAAI/article/view/16292; ``method="dvae"``) or CADA-VAE (Schonfeld et al.,
    CVPR 2019, https://arxiv.org/abs/1812.01784; ``method="cada"``) on the seen classes (those in ``y``), then
    a linear softmax classifier on latent samples: :math:`z^t` of seen images (and, for Disentangled-VAE, of
    seen attributes) and of the attributes of every class absent from ``y`` (the unseen classes). ``predict``
    encodes images to their posterior mean and picks among seen ∪ unseen classes. ``score`` is the GZSL
    harmonic mean :math:`H` of per-class seen and unseen accuracy (see :func:`~gzsl_dvae.evaluate_gzsl`).

    Args:
        method: ``"dvae"`` or ``"cada"``. (default: ``"dvae"``)
        latent_dim: latent size (per factor). (default: ``64``)
        visual_hidden: ``(encoder, decoder)`` hidden sizes of the visual VAE. (default: ``(1560, 1660)``)
        attribute_hidden: the same for the semantic VAE. (default: ``(1450, 665)``)
        alpha: Disentangled-VAE's KL weight of :math:`z^p`. (default: ``1.0``)
        gamma: Disentangled-VAE's weight of the shuffling classification loss. (default: ``1.0``)
        epochs: VAE epochs; CADA-VAE's warm-up schedules (published for 100 epochs) are stretched or
            compressed in proportion (``LinearWarmup.rescaled(epochs / 100)``). (default: ``100``)
        batch_size: VAE batch size. (default: ``50``)
        lr: VAE Adam learning rate. (default: ``1.5e-4``)
        classifier_epochs: epochs of the final classifier. (default: ``23``)
        seen_visual_samples: latent samples per seen class from images. (default: ``200``)
        seen_semantic_samples: latent samples per seen class from attributes; ``None`` picks 0 for CADA-VAE
            (its protocol) and 50 for Disentangled-VAE (which trains on seen :math:`z^t_s` too).
            (default: ``None``)
        unseen_semantic_samples: latent samples per unseen class. (default: ``400``)
        feature_scaling: ``"minmax"`` (CADA-VAE's [0, 1] scaling, fitted on ``X``) or ``None``.
            (default: ``"minmax"``)
        random_state: seed for a reproducible fit (the global torch RNG is left untouched).
            (default: ``None``)
        device: torch device. (default: ``"cpu"``)
        verbose: show progress bars. (default: ``False``)

    Attributes:
        classes_: labels of all classes (rows of ``class_attributes``).
        seen_classes_, unseen_classes_: labels of the seen (in ``y``) and unseen classes.
        model_: the trained VAE; classifier_: the trained ``nn.Linear``; history_: per-epoch VAE losses.

    Raises:
        ValueError: from ``fit`` for non-finite features or attributes, labels with no attribute row, fewer
            than two seen classes; from ``predict`` for a wrong feature width.
    """

    def __init__(
        self,
        method: Literal["dvae", "cada"] = "dvae",
        latent_dim: int = 64,
        visual_hidden: tuple[int, int] = (1560, 1660),
        attribute_hidden: tuple[int, int] = (1450, 665),
        alpha: float = 1.0,
        gamma: float = 1.0,
        epochs: int = 100,
        batch_size: int = 50,
        lr: float = 1.5e-4,
        classifier_epochs: int = 23,
        seen_visual_samples: int = 200,
        seen_semantic_samples: int | None = None,
        unseen_semantic_samples: int = 400,
        feature_scaling: Literal["minmax"] | None = "minmax",
        random_state: int | None = None,
        device: str = "cpu",
        verbose: bool = False,
    ) -> None:
        self.method = method
        self.latent_dim = latent_dim
        self.visual_hidden = visual_hidden
        self.attribute_hidden = attribute_hidden
        self.alpha = alpha
        self.gamma = gamma
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.classifier_epochs = classifier_epochs
        self.seen_visual_samples = seen_visual_samples
        self.seen_semantic_samples = seen_semantic_samples
        self.unseen_semantic_samples = unseen_semantic_samples
        self.feature_scaling = feature_scaling
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    # ------------------------------------------------------------------ helpers
    def _protocol(self) -> ClassifierProtocol:
        seen_semantic = self.seen_semantic_samples
        if seen_semantic is None:
            seen_semantic = 50 if self.method == "dvae" else 0
        return ClassifierProtocol(
            seen_visual_samples=self.seen_visual_samples,
            seen_semantic_samples=seen_semantic,
            unseen_semantic_samples=self.unseen_semantic_samples,
            epochs=self.classifier_epochs,
        )

    def _warmups(self) -> tuple[LinearWarmup, LinearWarmup, LinearWarmup]:
        """CADA-VAE's KL, cross-reconstruction and distance schedules in proportion to ``epochs``."""
        scale = self.epochs / 100  # identical to the published schedules at 100 epochs
        return (
            CADA_KL_WARMUP.rescaled(scale),
            CADA_CROSS_RECONSTRUCTION_WARMUP.rescaled(scale),
            CADA_DISTANCE_WARMUP.rescaled(scale),
        )

    def _build_model(self, visual_dim: int, attribute_dim: int, num_seen: int) -> nn.Module:
        if self.epochs < 1:
            raise ValueError(f"`epochs` must be >= 1, got {self.epochs}")
        kl, cross_reconstruction, distance = self._warmups()
        if self.method == "dvae":
            return DisentangledVAE(
                visual_dim,
                attribute_dim,
                num_seen,
                latent_dim=self.latent_dim,
                visual_hidden=tuple(self.visual_hidden),  # type: ignore[arg-type]
                attribute_hidden=tuple(self.attribute_hidden),  # type: ignore[arg-type]
                alpha=self.alpha,
                gamma=self.gamma,
                kl_warmup=kl,
                cross_reconstruction_warmup=cross_reconstruction,
                distance_warmup=distance,
            )
        if self.method == "cada":
            return CADAVAE(
                visual_dim,
                attribute_dim,
                latent_dim=self.latent_dim,
                visual_hidden=tuple(self.visual_hidden),  # type: ignore[arg-type]
                attribute_hidden=tuple(self.attribute_hidden),  # type: ignore[arg-type]
                kl_warmup=kl,
                cross_reconstruction_warmup=cross_reconstruction,
                distance_warmup=distance,
            )
        raise ValueError(f"`method` must be 'dvae' or 'cada', got {self.method!r}")

    def _scale(self, X: np.ndarray) -> Tensor:
        if self.feature_scaling == "minmax":
            X = (X - self.scale_min_) / self.scale_span_
        return torch.as_tensor(X, dtype=torch.float32, device=self.device)

    def _check_X(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "classifier_")
        return check_matrix("X", X, columns=self.n_features_in_)

    # ---------------------------------------------------------------------- API
    def fit(self, X: Any, y: Any, class_attributes: Any, classes: Any = None) -> GZSLClassifier:
        """Train on seen-class features ``X`` (N, D) with labels ``y`` and the attributes of every class.

        Args:
            X: :math:`(N, D)` visual features of seen classes.
            y: :math:`(N,)` labels.
            class_attributes: :math:`(C, A)` one attribute row per class, seen and unseen.
            classes: the label of each attribute row. (default: ``None``, i.e. ``0 .. C-1``)

        Returns:
            ``self``.
        """
        if self.feature_scaling not in ("minmax", None):
            raise ValueError(f"`feature_scaling` must be 'minmax' or None, got {self.feature_scaling!r}")
        X = check_matrix("X", X)
        y = check_labels("y", y, n_samples=X.shape[0])
        attributes = check_matrix("class_attributes", class_attributes)
        labels = np.arange(attributes.shape[0]) if classes is None else check_labels("classes", classes)
        if labels.shape[0] != attributes.shape[0] or np.unique(labels).size != labels.size:
            raise ValueError("`classes` must hold one distinct label per row of `class_attributes`")
        missing = np.setdiff1d(y, labels)
        if missing.size:
            raise ValueError(
                f"`class_attributes` is missing class(es) {missing[:10].tolist()} that occur in `y`; "
                "every class needs an attribute row"
            )
        rows = np.searchsorted(labels, y, sorter=np.argsort(labels))
        rows = np.argsort(labels)[rows]
        seen_rows = np.unique(rows)
        if seen_rows.size < 2:
            raise ValueError(f"`y` must contain at least 2 seen classes, got {seen_rows.size}")
        self.classes_ = labels
        self.seen_classes_ = labels[seen_rows]
        self.unseen_classes_ = labels[np.setdiff1d(np.arange(labels.size), seen_rows)]
        self.n_features_in_ = X.shape[1]
        self.scale_min_ = X.min(axis=0)
        span = X.max(axis=0) - self.scale_min_
        self.scale_span_ = np.where(span == 0, 1.0, span)

        protocol = self._protocol()
        with torch.random.fork_rng(devices=[]):
            if self.random_state is not None:
                torch.manual_seed(self.random_state)
            features = self._scale(X)
            attr = torch.as_tensor(attributes, dtype=torch.float32, device=self.device)
            seen_index = np.searchsorted(seen_rows, rows)  # 0..n_seen-1, for F_m of Disentangled-VAE
            model = self._build_model(X.shape[1], attributes.shape[1], seen_rows.size)
            self.history_ = train_vae(
                model,
                features,
                torch.as_tensor(seen_index),
                attr[torch.as_tensor(seen_rows)],
                epochs=self.epochs,
                batch_size=min(self.batch_size, X.shape[0]),
                lr=self.lr,
                device=self.device,
                progress=self.verbose,
            )
            encode_visual, encode_semantic = self._encoders(model)
            z, z_labels = build_classifier_training_set(
                encode_visual,
                encode_semantic,
                features,
                torch.as_tensor(rows),
                attr,
                torch.as_tensor(seen_rows),
                torch.as_tensor(np.setdiff1d(np.arange(labels.size), seen_rows)),
                protocol,
            )
            self.classifier_ = train_softmax_classifier(z, z_labels.to(z.device), labels.size, protocol)
        self.model_ = model
        return self

    @staticmethod
    def _encoders(model: nn.Module, factor: Literal["t", "p"] = "t") -> tuple[Any, Any]:
        if isinstance(model, DisentangledVAE):
            return (
                functools.partial(model.encode_visual, factor=factor),
                functools.partial(model.encode_semantic, factor=factor),
            )
        return model.encode_visual, model.encode_semantic

    @torch.no_grad()
    def transform(self, X: Any) -> np.ndarray:
        """Posterior means ``(N, d)`` of the latent the classifier reads (:math:`z^t_v` for DVAE)."""
        features = self._scale(self._check_X(X))
        encode_visual, _ = self._encoders(self.model_)
        return encode_mean(encode_visual, features).cpu().numpy()

    @torch.no_grad()
    def decision_function(self, X: Any) -> np.ndarray:
        """Classifier logits over all classes, ``(N, C)`` in the order of ``classes_``."""
        z = torch.as_tensor(self.transform(X), device=self.device)
        return self.classifier_(z).cpu().numpy()

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax probabilities over all classes, ``(N, C)``."""
        logits = self.decision_function(X)
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels among seen ∪ unseen classes, ``(N,)``."""
        return self.classes_[self.decision_function(X).argmax(axis=1)]

    def evaluate(self, X: Any, y: Any) -> GZSLScores:
        """:func:`~gzsl_dvae.evaluate_gzsl` of ``predict(X)`` against ``y`` (fitted seen/unseen classes)."""
        return evaluate_gzsl(y, self.predict(X), self.seen_classes_, self.unseen_classes_)

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """The GZSL harmonic mean :math:`H` of per-class seen and unseen accuracy on ``(X, y)``."""
        if sample_weight is not None:
            raise ValueError("`sample_weight` is not supported: GZSL accuracy is averaged per class")
        return self.evaluate(X, y).harmonic
