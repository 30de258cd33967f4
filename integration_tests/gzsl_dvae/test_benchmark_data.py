"""The benchmark's data builders (examples/gzsl_synthetic.py): the generator and the split recovery."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import gzsl_synthetic as synth
from gzsl_dvae import load_att_splits


def test_synthetic_attributes_are_distinct_and_normalised() -> None:
    attrs = synth.synthetic_attributes(12, 8, seed=3)
    np.testing.assert_allclose(np.linalg.norm(attrs, axis=1), 1.0)
    assert len({row.tobytes() for row in attrs}) == 12


def test_generator_is_seeded_and_nuisance_is_independent_of_class() -> None:
    attrs = synth.synthetic_attributes(10, 8, seed=0)
    seen, unseen = np.arange(2, 10), np.arange(2)
    a, nuis_a = synth.make_benchmark(attrs, seen, unseen, 30, 5, 20, feature_dim=32, hidden_dim=32)
    b, _nuis_b = synth.make_benchmark(attrs, seen, unseen, 30, 5, 20, feature_dim=32, hidden_dim=32)
    np.testing.assert_array_equal(a.train_features, b.train_features)
    assert (a.train_features >= 0).all()
    # class means of the nuisance are ~0: it carries no class information
    means = np.array([nuis_a["train"][a.train_labels == c].mean(0) for c in seen])
    assert np.abs(means).max() < 4 / np.sqrt(30)
    # without nuisance the same samples differ less within a class
    quiet, _ = synth.make_benchmark(
        attrs, seen, unseen, 30, 5, 20, feature_dim=32, hidden_dim=32, nuisance_scale=0.0
    )
    spread = lambda d: np.mean([d.train_features[d.train_labels == c].std(0).mean() for c in seen])  # noqa: E731
    assert spread(quiet) < spread(a)


@pytest.mark.parametrize(
    ("name", "n_seen", "n_unseen"), [("AWA2", 40, 10), ("CUB", 150, 50), ("SUN", 645, 72)]
)
def test_split_recovered_from_real_att_splits(
    shared_data: Path, name: str, n_seen: int, n_unseen: int
) -> None:
    path = shared_data / "gzsl" / f"{name}_att_splits.mat"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    splits = load_att_splits(path)
    seen, unseen = synth.split_from_att_splits(splits, name)
    assert (len(seen), len(unseen)) == (n_seen, n_unseen)
    assert not set(seen) & set(unseen)
    if name == "AWA2":
        assert {splits.class_names[i] for i in unseen} == set(synth.AWA_PROPOSED_SPLIT_UNSEEN)
