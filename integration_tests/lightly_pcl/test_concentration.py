from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightly_pcl import concentration


def _reference(distances, assignments, num_clusters, temperature=0.2, alpha=10.0):
    """PCL's concentration from the formula, cluster by cluster, with numpy percentiles."""
    density = np.zeros(num_clusters)
    members = [
        [d for d, a in zip(distances, assignments, strict=True) if a == c] for c in range(num_clusters)
    ]
    for c, dist in enumerate(members):
        if len(dist) > 1:
            density[c] = np.mean(dist) / np.log(len(dist) + alpha)
    dmax = density.max()
    for c, dist in enumerate(members):
        if len(dist) <= 1:
            density[c] = dmax
    density = density.clip(np.percentile(density, 10), np.percentile(density, 90))
    return temperature * density / density.mean()


class TestConcentration:
    def test_hand_made_clusters(self):
        # cluster 0: Z=2, mean D 0.2; cluster 1: Z=4, mean D 0.2; cluster 2: singleton; cluster 3: empty.
        distances = torch.tensor([0.1, 0.3, 0.2, 0.2, 0.2, 0.2, 0.5], dtype=torch.float64)
        assignments = torch.tensor([0, 0, 1, 1, 1, 1, 2])
        raw = np.array([0.2 / math.log(12), 0.2 / math.log(14), 0.2 / math.log(12), 0.2 / math.log(12)])
        lo, hi = np.percentile(raw, 10), np.percentile(raw, 90)
        clipped = raw.clip(lo, hi)
        expected = 0.2 * clipped / clipped.mean()
        phi = concentration(distances, assignments, 4)
        np.testing.assert_allclose(phi.numpy(), expected, rtol=1e-6)
        assert phi[1] < phi[0]  # same spread, more members: more concentrated
        assert phi[2] == phi[3] == phi.max()  # singleton and empty clusters take the max
        assert phi.mean().item() == pytest.approx(0.2, rel=1e-6)

    @pytest.mark.parametrize(
        "num_clusters,temperature,alpha", [(7, 0.2, 10.0), (25, 0.1, 10.0), (12, 0.5, 2.0)]
    )
    def test_matches_reference_on_random_clusterings(self, num_clusters, temperature, alpha):
        g = torch.Generator().manual_seed(num_clusters)
        assignments = torch.randint(0, num_clusters, (300,), generator=g)
        distances = torch.rand(300, generator=g, dtype=torch.float64) * (
            1 + assignments.double() / num_clusters
        )
        phi = concentration(distances, assignments, num_clusters, temperature=temperature, alpha=alpha)
        expected = _reference(distances.tolist(), assignments.tolist(), num_clusters, temperature, alpha)
        np.testing.assert_allclose(phi.numpy(), expected, rtol=1e-6)

    def test_tighter_cluster_gets_smaller_phi(self):
        distances = torch.tensor([0.1] * 5 + [0.4] * 5 + [0.2] * 5)
        assignments = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)
        phi = concentration(distances, assignments, 3, percentiles=(0.0, 1.0))
        assert phi[0] < phi[2] < phi[1]

    def test_all_singletons_fall_back_to_temperature(self):
        with pytest.warns(UserWarning, match="all zero"):
            phi = concentration(torch.rand(4), torch.arange(4), 4, temperature=0.3)
        torch.testing.assert_close(phi, torch.full((4,), 0.3))

    @pytest.mark.parametrize(
        "args,kwargs,match",
        [
            ((torch.rand(3), torch.tensor([0, 1]), 2), {}, "1-D of equal length"),
            ((torch.rand(2), torch.tensor([0.0, 1.0]), 2), {}, "integer tensor"),
            ((torch.rand(2), torch.tensor([0, 2]), 2), {}, r"lie in \[0, 2\)"),
            ((torch.tensor([0.1, -0.1]), torch.tensor([0, 1]), 2), {}, "non-negative"),
            ((torch.rand(2), torch.tensor([0, 1]), 2), {"temperature": 0.0}, "temperature and alpha"),
            ((torch.rand(2), torch.tensor([0, 1]), 2), {"alpha": -1.0}, "temperature and alpha"),
            ((torch.rand(2), torch.tensor([0, 1]), 2), {"percentiles": (0.9, 0.1)}, "percentiles"),
            ((torch.rand(2), torch.tensor([0, 1]), 0), {}, "num_clusters"),
        ],
    )
    def test_rejects_bad_inputs(self, args, kwargs, match):
        with pytest.raises(ValueError, match=match):
            concentration(*args, **kwargs)
