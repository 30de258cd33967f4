"""A scikit-learn estimator around the two stages: VAE training, then the latent softmax classifier."""

from __future__ import annotations

import functools
from typing import Any, Literal

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor, nn

from ._class_table import build_class_table
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
from .metrics import GZSLScores, evaluate_gzsl, harmonic_mean
from .training import train_vae
from .warmup import LinearWarmup

__all__ = ["GZSLClassifier"]


class GZSLClassifier(ClassNamePrefixFeaturesOutMixin, ClassifierMixin, TransformerMixin, BaseEstimator):  # type: ignore[misc]
    r"""Generalized zero-shot classifier: fit on seen-class features, predict among seen and unseen classes.

    ``GZSLClassifier(class_attributes=A, classes=labels).fit(X, y)`` trains a Disentangled-VAE (Li et al.,
    AAAI 2021, https://ojs.aaai.org/index.php/AAAI/article/view/16292; ``method="dvae"``) or CADA-VAE
    (Schonfeld et al., CVPR 2019, https://arxiv.org/abs/1812.01784; ``method="cada"``) on the seen classes
    (those in ``y``), then a linear softmax classifier on latent samples: :math:`z^t` of seen images (and, for
    Disentangled-VAE, of seen attributes) and of the attributes of every class absent from ``y`` (the unseen
    classes). ``predict`` encodes images to their posterior mean and picks among seen ∪ unseen classes;
    ``transform`` returns that latent (as ``LinearDiscriminantAnalysis`` is a classifier and a transformer).

    The class attributes are a constructor parameter, scikit-learn's place for side information that is not
    per-sample, so ``clone``, ``GridSearchCV`` and ``cross_val_score`` carry them to every fit. The older
    ``fit(X, y, class_attributes, classes=None)`` still works (fit arguments override the constructor's);
    avoid it inside cross-validation, which slices fit parameters whose length equals ``len(X)``.

    Labels may be any sortable labels (integers, strings): row ``k`` of ``class_attributes`` belongs to
    ``classes[k]`` (``None``: to label ``k``); ``classes_`` is their sorted set, the columns of
    ``predict_proba``. ``class_attributes="onehot"`` gives every class of ``y`` a one-hot row and no unseen
    class: the seen-only control, a VAE classifier of the classes in ``y``.

    ``score(X, y)`` is the GZSL harmonic mean of per-class accuracies: with :math:`S` (:math:`U`) the mean
    per-class accuracy over the seen (unseen) classes present in ``y``, it is :math:`H = 2US/(U+S)` when both
    groups are present, and :math:`S` (or :math:`U`) when ``y`` holds one group only — e.g. a
    cross-validation fold of seen classes, where it is the balanced accuracy. Labels unknown to the fitted
    estimator raise ``ValueError``.

    Args:
        class_attributes: :math:`(C, A)` one attribute row per class, seen and unseen, or ``"onehot"``.
            Required (here or in ``fit``). (default: ``None``)
        classes: :math:`(C,)` the label of each row of ``class_attributes``. (default: ``None``, i.e.
            ``0 .. C-1``)
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
        random_state: seed (an int or a ``numpy.random.RandomState``) for a reproducible fit; the global torch
            RNG is left untouched. (default: ``None``)
        device: torch device of the models and of every tensor of fit and predict. (default: ``"cpu"``)
        verbose: show progress bars. (default: ``False``)

    Attributes:
        classes_: sorted labels of all classes (seen and unseen); unseen_classes_, seen_classes_: those absent
            from / present in ``y``.
        n_features_in_, feature_names_in_: as in scikit-learn.
        model_: the trained VAE; classifier_: the trained ``nn.Linear``; history_: per-epoch VAE losses.

    Raises:
        ValueError: from ``fit`` for a missing or non-finite attribute table, non-finite features, labels with
            no attribute row, fewer than two seen classes; from ``predict`` for a wrong feature width.
        FloatingPointError: from ``fit`` at the first non-finite VAE loss, naming epoch and step.
        sklearn.exceptions.NotFittedError: from ``predict``, ``transform``, ``score``... before ``fit``.
    """

    def __init__(
        self,
        class_attributes: Any = None,
        classes: Any = None,
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
        random_state: int | np.random.RandomState | None = None,
        device: str | torch.device = "cpu",
        verbose: bool = False,
    ) -> None:
        self.class_attributes = class_attributes
        self.classes = classes
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

    def __sklearn_tags__(self) -> Any:
        """Classifier and transformer (the latent :math:`z^t`); dense finite float input; no multi-output."""
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.input_tags.sparse = False
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]  # transform returns X's float dtype
        tags.non_deterministic = torch.device(self.device).type != "cpu"  # CUDA kernels are not bitwise
        # The checks' make_blobs problem (2 features) is far from GZSL's: both VAEs' visual posteriors
        # collapse on it (measured: 0.33-0.65 training accuracy with 5-30 epochs), below the checks' 0.83.
        tags.classifier_tags.poor_score = True
        return tags

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

    def _scale(self, X: np.ndarray, low: np.ndarray | None = None, span: np.ndarray | None = None) -> Tensor:
        if self.feature_scaling == "minmax":
            low = self.scale_min_ if low is None else low
            X = (X - low) / (self.scale_span_ if span is None else span)
        return torch.as_tensor(X, dtype=torch.float32, device=self.device)

    def _check_X(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "classifier_")
        X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        return X  # type: ignore[no-any-return]

    @property
    def _n_features_out(self) -> int:
        """Width of ``transform``'s output (``get_feature_names_out``)."""
        return int(self.classifier_.in_features)

    # ---------------------------------------------------------------------- API
    def fit(self, X: Any, y: Any, class_attributes: Any = None, classes: Any = None) -> GZSLClassifier:
        """Train on seen-class features ``X`` (N, D) with labels ``y``.

        Args:
            X: :math:`(N, D)` visual features of seen classes.
            y: :math:`(N,)` labels.
            class_attributes: overrides the constructor's ``class_attributes`` (the older call,
                ``fit(X, y, class_attributes)``, kept working). (default: ``None``)
            classes: overrides the constructor's ``classes``. (default: ``None``)

        Returns:
            ``self``.
        """
        if self.feature_scaling not in ("minmax", None):
            raise ValueError(f"`feature_scaling` must be 'minmax' or None, got {self.feature_scaling!r}")
        X, y = validate_data(self, X, y, dtype=(np.float64, np.float32))
        check_classification_targets(y)
        table = build_class_table(
            y,
            self.class_attributes if class_attributes is None else class_attributes,
            self.classes if classes is None else classes,
        )
        seen_rows = np.unique(table.rows)
        if seen_rows.size < 2:
            raise ValueError(
                "`y` must contain at least 2 classes to train the VAE's classifiers, got "
                f"{seen_rows.size} class"
            )
        labels = table.classes
        unseen_rows = np.setdiff1d(np.arange(labels.size), seen_rows)
        scale_min = X.min(axis=0)
        span = X.max(axis=0) - scale_min
        scale_span = np.where(span == 0, 1.0, span)

        protocol = self._protocol()
        device = torch.device(self.device)
        seed = self.random_state
        if seed is not None and not isinstance(seed, int | np.integer):
            seed = int(check_random_state(seed).randint(np.iinfo(np.int32).max))
        cuda = (
            [torch.cuda.current_device() if device.index is None else device.index]
            if device.type == "cuda"
            else []
        )
        with torch.random.fork_rng(devices=cuda):
            if seed is not None:
                torch.manual_seed(int(seed))
            features = self._scale(X, scale_min, scale_span)
            attr = torch.as_tensor(table.attributes, dtype=torch.float32, device=device)
            rows = torch.as_tensor(table.rows, device=device)
            seen_index = torch.as_tensor(np.searchsorted(seen_rows, table.rows), device=device)
            model = self._build_model(X.shape[1], attr.shape[1], seen_rows.size)
            history = train_vae(
                model,
                features,
                seen_index,  # 0..n_seen-1, for F_m of Disentangled-VAE
                attr[torch.as_tensor(seen_rows, device=device)],
                epochs=self.epochs,
                batch_size=min(self.batch_size, X.shape[0]),
                lr=self.lr,
                device=device,
                progress=self.verbose,
            )
            encode_visual, encode_semantic = self._encoders(model)
            z, z_labels = build_classifier_training_set(
                encode_visual,
                encode_semantic,
                features,
                rows,
                attr,
                torch.as_tensor(seen_rows),
                torch.as_tensor(unseen_rows),
                protocol,
            )
            classifier = train_softmax_classifier(z, z_labels, labels.size, protocol)
        # fitted state is written only now: a fit that raised leaves a fitted estimator as it was
        self.classes_ = labels
        self.seen_classes_ = labels[seen_rows]
        self.unseen_classes_ = labels[unseen_rows]
        self.scale_min_, self.scale_span_ = scale_min, scale_span
        self.model_, self.classifier_, self.history_ = model, classifier, history
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
    def _latent(self, X: np.ndarray) -> Tensor:
        encode_visual, _ = self._encoders(self.model_)
        return encode_mean(encode_visual, self._scale(X))

    def transform(self, X: Any) -> np.ndarray:
        """Posterior means ``(N, d)`` of the latent the classifier reads (:math:`z^t_v` for DVAE)."""
        X = self._check_X(X)
        return self._latent(X).cpu().numpy().astype(X.dtype, copy=False)

    @torch.no_grad()
    def _logits(self, X: Any) -> np.ndarray:
        z = self._latent(self._check_X(X))  # checks fitted-ness first
        return self.classifier_(z).cpu().numpy()  # type: ignore[no-any-return]

    def decision_function(self, X: Any) -> np.ndarray:
        """Classifier logits ``(N, C)`` in the order of ``classes_``.

        For two classes, ``(N,)``: the logit difference, > 0 for ``classes_[1]`` (scikit-learn's convention).
        """
        logits = self._logits(X)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax probabilities over all classes, ``(N, C)``."""
        logits = self._logits(X)
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Log of :meth:`predict_proba`, ``(N, C)``."""
        logits = self._logits(X)
        logits = logits - logits.max(axis=1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))  # type: ignore[no-any-return]

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels among seen ∪ unseen classes, ``(N,)``."""
        index = self._logits(X).argmax(axis=1)  # checks fitted-ness first
        return self.classes_[index]  # type: ignore[no-any-return]

    def _encode_labels(self, y: Any) -> np.ndarray:
        y = np.asarray(y).reshape(-1) if not isinstance(y, np.ndarray) else y.reshape(-1)
        known = np.isin(y, self.classes_)
        if not known.all():
            unknown = list(dict.fromkeys(y[~known].tolist()))[:10]
            raise ValueError(f"`y` holds labels unknown to the fitted classifier: {unknown}")
        return np.searchsorted(self.classes_, y)  # type: ignore[no-any-return]

    def evaluate(self, X: Any, y: Any) -> GZSLScores:
        """:func:`~gzsl_dvae.evaluate_gzsl` of ``predict(X)`` against ``y`` (fitted seen/unseen classes).

        ``per_class`` is keyed by the labels themselves (``classes_`` entries).
        """
        check_is_fitted(self, "classifier_")
        true = self._encode_labels(y)
        pred = self._logits(X).argmax(axis=1)
        seen = np.searchsorted(self.classes_, self.seen_classes_)
        unseen = np.searchsorted(self.classes_, self.unseen_classes_)
        scores = evaluate_gzsl(true, pred, seen, unseen)
        labels = self.classes_.tolist()  # numpy scalars to Python labels
        per_class = {labels[k]: acc for k, acc in scores.per_class.items()}
        return GZSLScores(scores.seen, scores.unseen, scores.harmonic, per_class)

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """GZSL harmonic mean of per-class accuracy over the class groups (seen, unseen) present in ``y``.

        :math:`H = 2US/(U+S)` when ``y`` holds seen and unseen classes; :math:`S` (or :math:`U`), the mean
        per-class accuracy, when it holds one group only.
        """
        if sample_weight is not None:
            raise ValueError("`sample_weight` is not supported: GZSL accuracy is averaged per class")
        scores = self.evaluate(X, y)
        if np.isnan(scores.unseen):
            return scores.seen
        if np.isnan(scores.seen):
            return scores.unseen
        return harmonic_mean(scores.unseen, scores.seen)
