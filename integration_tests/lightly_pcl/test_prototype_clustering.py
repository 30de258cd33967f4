from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightly_pcl import IndexedDataset, PrototypeClustering, concentration, faiss_available, kmeans
from torch.utils.data import DataLoader, Subset, TensorDataset

from integration_tests.lightly_pcl.toy import blobs

BACKENDS = [
    "torch",
    pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="no faiss")),
]


def _clustering(**kwargs) -> PrototypeClustering:
    defaults = dict(num_clusters=(3, 6), num_redo=2, min_points_per_centroid=1, progress=False)
    return PrototypeClustering(**{**defaults, **kwargs})


class TestPrototypeClustering:
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_fit_stores_labels_normalised_centroids_and_phi(self, backend):
        features = blobs(num_per_blob=12, num_blobs=3, dim=8)
        clustering = _clustering(backend=backend, temperature=0.3).fit(features, epoch=4)
        assert (
            clustering.labels.shape == (2, 36) and clustering.num_samples == 36 and int(clustering.epoch) == 4
        )
        for m, k in enumerate((3, 6)):
            centroids, phi = clustering.centroids[m], clustering.concentrations[m]
            assert centroids.shape == (k, 8)
            torch.testing.assert_close(centroids.norm(dim=1), torch.ones(k))
            assert phi.shape == (k,) and (phi > 0).all()
            assert phi.mean().item() == pytest.approx(0.3, rel=1e-5)

    def test_fit_equals_kmeans_then_concentration_with_seed_per_granularity(self):
        features = F.normalize(torch.randn(60, 5), dim=1)
        clustering = _clustering(backend="torch", seed=10, alpha=5.0).fit(features)
        for m, k in enumerate((3, 6)):
            result = kmeans(features, k, num_redo=2, seed=10 + m, min_points_per_centroid=1, backend="torch")
            assert torch.equal(clustering.labels[m], result.assignments)
            torch.testing.assert_close(clustering.centroids[m], F.normalize(result.centroids, dim=1))
            expected_phi = concentration(result.distances, result.assignments, k, temperature=0.2, alpha=5.0)
            torch.testing.assert_close(clustering.concentrations[m], expected_phi)

    def test_forward_looks_up_a_batch(self):
        clustering = _clustering().fit(blobs(num_per_blob=10, num_blobs=3))
        indices = torch.tensor([5, 0, 29])
        prototypes = clustering(indices)
        assert torch.equal(prototypes.labels, clustering.labels[:, indices])
        assert prototypes.num_clusterings == 2

    def test_compute_features_places_features_by_index(self):
        x = torch.randn(23, 4)
        encoder = torch.nn.Linear(4, 3)
        loader = DataLoader(IndexedDataset(TensorDataset(x)), batch_size=5, shuffle=True)
        features = _clustering().compute_features(encoder, loader)
        torch.testing.assert_close(features, F.normalize(encoder(x), dim=1).detach())

    def test_update_runs_the_e_step_and_times_it(self):
        x = blobs(num_per_blob=8, num_blobs=3, dim=6)
        loader = DataLoader(IndexedDataset(TensorDataset(x)), batch_size=7)
        clustering = _clustering().update(torch.nn.Identity(), loader, epoch=2)
        assert clustering.is_fitted and int(clustering.epoch) == 2
        assert set(clustering.last_timing) == {"features", "kmeans", "total"}

    def test_state_dict_round_trip_resizes_buffers(self):
        fitted = _clustering().fit(blobs(num_per_blob=10, num_blobs=3), epoch=7)
        fresh = _clustering()
        assert not fresh.is_fitted
        fresh.load_state_dict(fitted.state_dict())
        assert fresh.num_samples == 30 and int(fresh.epoch) == 7
        assert torch.equal(fresh.labels, fitted.labels)
        for a, b in zip(
            fresh.centroids + fresh.concentrations, fitted.centroids + fitted.concentrations, strict=True
        ):
            assert torch.equal(a, b)

    def test_repr_shows_hyperparameters(self):
        text = str(_clustering(num_clusters=(4, 8, 16), alpha=7.0))
        assert "num_clusters=(4, 8, 16)" in text and "alpha=7.0" in text and "num_samples=0" in text

    def test_errors_name_the_problem(self):
        clustering = _clustering()
        with pytest.raises(RuntimeError, match="run update"):
            clustering(torch.tensor([0]))
        clustering.fit(blobs(num_per_blob=10, num_blobs=3))
        with pytest.raises(ValueError, match="older than the dataset"):
            clustering(torch.tensor([3, 30]))
        with pytest.raises(TypeError, match="integer tensor"):
            clustering(torch.tensor([0.0]))
        with pytest.raises(ValueError, match="1-D integer tensor"):
            clustering(torch.tensor([[0]]))
        with pytest.raises(ValueError, match="more clusters than the 5 samples"):
            clustering.fit(torch.randn(5, 3))
        plain = DataLoader(TensorDataset(torch.randn(6, 3)), batch_size=3)
        with pytest.raises(ValueError, match="IndexedDataset"):
            clustering.compute_features(torch.nn.Identity(), plain)
        partial = DataLoader(
            Subset(IndexedDataset(TensorDataset(torch.randn(6, 3))), [0, 1, 2]), batch_size=3
        )
        with pytest.raises(ValueError, match="visited 3 of 6 samples"):
            clustering.compute_features(torch.nn.Identity(), partial, num_samples=6)

    @pytest.mark.parametrize(
        "kwargs,match",
        [
            ({"num_clusters": ()}, "num_clusters"),
            ({"num_clusters": (4, 0)}, "num_clusters"),
            ({"temperature": 0.0}, "temperature"),
            ({"num_iters": 0}, "num_iters"),
            ({"backend": "cuml"}, "backend"),
        ],
    )
    def test_rejects_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            PrototypeClustering(**kwargs)
