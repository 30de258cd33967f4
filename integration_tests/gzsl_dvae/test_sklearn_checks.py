"""scikit-learn's own estimator checks on GZSLClassifier (tiny VAE and budget: the checks fit many times).

The checks cannot pass side information, so the checked instance uses ``class_attributes="onehot"``: one-hot
attribute rows of the classes in ``y`` (no unseen class). Everything else — input validation, labels of any
type, cloning, pickling, fitted-state errors, transformer output, dtype handling — is the GZSL path's own
code; the GZSL-specific behaviour (unseen classes in ``classes_``, the H score) is tested in
test_estimator.py.
"""

from __future__ import annotations

import pytest
import sklearn
from gzsl_dvae import GZSLClassifier
from sklearn.utils.estimator_checks import parametrize_with_checks

CHECKED = GZSLClassifier(
    class_attributes="onehot",
    latent_dim=4,
    visual_hidden=(16, 16),
    attribute_hidden=(8, 8),
    epochs=1,
    batch_size=32,
    lr=1e-2,
    classifier_epochs=1,
    seen_visual_samples=16,
    seen_semantic_samples=8,
    random_state=0,
)

EXPECTED_FAILED_CHECKS: dict[str, str] = {}
"""Check name -> reason. Empty: every check that runs passes (``poor_score`` is a tag, see the estimator)."""

if tuple(int(p) for p in sklearn.__version__.split(".")[:2]) < (1, 6):  # pragma: no cover
    pytest.skip("expected_failed_checks needs scikit-learn >= 1.6", allow_module_level=True)


@parametrize_with_checks([CHECKED], expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS)
def test_sklearn_compatible_estimator(estimator: GZSLClassifier, check) -> None:  # type: ignore[no-untyped-def]
    check(estimator)
