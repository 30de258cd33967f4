from __future__ import annotations

import pytest
import torch
from lightly_pcl import faiss_available, kmeans
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from integration_tests.lightly_pcl.toy import blobs

BACKENDS = [
    "torch",
    pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="no faiss")),
]


@pytest.mark.parametrize("backend", BACKENDS)
class TestKMeans:
    def test_recovers_well_separated_blobs(self, backend):
        # Random-init Lloyd can merge two blobs (a local minimum); 20 restarts: miss ~(1 - 3!/3^3)^20 < 1%.
        x = blobs(num_per_blob=25, num_blobs=3, dim=8)
        truth = torch.arange(3).repeat_interleave(25)
        result = kmeans(x, 3, num_redo=20, seed=0, min_points_per_centroid=1, backend=backend)
        assert adjusted_rand_score(truth.numpy(), result.assignments.numpy()) == 1.0
        assert result.centroids.shape == (3, 8) and result.assignments.dtype == torch.long

    def test_assignment_is_nearest_centroid_and_distances_are_l2(self, backend):
        x = torch.nn.functional.normalize(torch.randn(200, 6), dim=1)
        result = kmeans(x, 7, num_redo=1, seed=1, backend=backend)
        d = torch.cdist(x.double(), result.centroids.double())
        torch.testing.assert_close(result.assignments, d.argmin(1))
        torch.testing.assert_close(result.distances.double(), d.min(1).values, atol=1e-4, rtol=0)
        assert result.objective == pytest.approx(float((d.min(1).values ** 2).sum()), rel=1e-4)

    def test_same_seed_same_result(self, backend):
        x = torch.randn(300, 5)
        a = kmeans(x, 6, num_redo=2, seed=3, backend=backend)
        b = kmeans(x, 6, num_redo=2, seed=3, backend=backend)
        torch.testing.assert_close(a.centroids, b.centroids, rtol=0, atol=0)
        assert torch.equal(a.assignments, b.assignments)

    def test_objective_close_to_sklearn(self, backend):
        x = torch.nn.functional.normalize(
            torch.randn(400, 8, generator=torch.Generator().manual_seed(0)), dim=1
        )
        ours = kmeans(x, 8, num_iters=30, num_redo=5, seed=0, backend=backend).objective
        reference = KMeans(8, init="random", n_init=5, max_iter=30, random_state=0).fit(x.numpy()).inertia_
        assert ours == pytest.approx(reference, rel=0.05)

    def test_duplicate_points_leave_no_empty_or_nan_centroid(self, backend):
        x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]).repeat(10, 1)
        with pytest.warns(UserWarning, match="min_points_per_centroid"):
            result = kmeans(x, 5, num_redo=1, seed=0, backend=backend)
        assert torch.isfinite(result.centroids).all() and torch.isfinite(result.distances).all()
        assert result.distances.max() < 1e-3

    def test_subsamples_beyond_max_points_per_centroid(self, backend):
        x = blobs(num_per_blob=40, num_blobs=3, dim=4)
        result = kmeans(
            x, 3, num_redo=20, max_points_per_centroid=5, min_points_per_centroid=1, backend=backend
        )
        assert result.assignments.shape == (120,)  # every point is still assigned
        assert (
            adjusted_rand_score(torch.arange(3).repeat_interleave(40).numpy(), result.assignments.numpy())
            == 1.0
        )


def test_torch_seeds_differ():
    x = torch.randn(300, 5)
    assert not torch.equal(
        kmeans(x, 6, num_redo=1, seed=0, backend="torch").centroids,
        kmeans(x, 6, num_redo=1, seed=1, backend="torch").centroids,
    )


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.randn(5, 2), 6), {}, r"num_clusters must be in \[1, N=5\]"),
        ((torch.randn(5, 2), 0), {}, "num_clusters"),
        ((torch.randn(5), 2), {}, "2-D float tensor"),
        ((torch.ones(5, 2, dtype=torch.long), 2), {}, "2-D float tensor"),
        ((torch.full((5, 2), float("nan")), 2), {}, "non-finite"),
        ((torch.randn(5, 2), 2), {"backend": "sklearn"}, "backend"),
        ((torch.randn(5, 2), 2), {"num_iters": 0}, "num_iters"),
    ],
)
def test_rejects_bad_inputs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kmeans(*args, **kwargs)
