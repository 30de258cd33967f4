from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from lightly_pcl import Prototypes, sample_negative_prototypes


class TestSampleNegativePrototypes:
    @pytest.mark.parametrize(
        "num_clusters,excluded_ids,r", [(10, [0, 3], 4), (6, [1, 2, 3, 4], 5), (5, [], 5)]
    )
    def test_draws_distinct_allowed_clusters(self, num_clusters, excluded_ids, r):
        excluded = torch.zeros(num_clusters, dtype=torch.bool)
        excluded[excluded_ids] = True
        g = torch.Generator().manual_seed(0)
        for _ in range(50):
            drawn = sample_negative_prototypes(excluded, r, g)
            assert drawn.dtype == torch.long
            assert len(drawn) == min(r, num_clusters - len(excluded_ids))
            assert len(set(drawn.tolist())) == len(drawn)
            assert not excluded[drawn].any()

    def test_every_subset_is_equally_likely(self):
        # 8 allowed clusters, r = 3: each of the C(8, 3) = 56 subsets has probability 1/56.
        excluded = torch.zeros(10, dtype=torch.bool)
        excluded[[2, 7]] = True
        g = torch.Generator().manual_seed(1)
        draws = 28000
        counts = Counter(
            tuple(sorted(sample_negative_prototypes(excluded, 3, g).tolist())) for _ in range(draws)
        )
        allowed = [c for c in range(10) if c not in (2, 7)]
        assert set(counts) == set(itertools.combinations(allowed, 3))
        expected = draws / 56  # 500, binomial std ~22
        assert max(abs(n - expected) for n in counts.values()) < 6 * (expected * (1 - 1 / 56)) ** 0.5

    def test_seeded_generator_reproduces_the_draw(self):
        excluded = torch.zeros(100, dtype=torch.bool)
        a = sample_negative_prototypes(excluded, 10, torch.Generator().manual_seed(7))
        b = sample_negative_prototypes(excluded, 10, torch.Generator().manual_seed(7))
        c = sample_negative_prototypes(excluded, 10, torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)

    def test_generator_advances_identically_whatever_the_mask(self):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        sample_negative_prototypes(torch.zeros(20, dtype=torch.bool), 4, g1)
        sample_negative_prototypes(torch.ones(20, dtype=torch.bool), 4, g2)
        assert torch.equal(g1.get_state(), g2.get_state())

    def test_rejects_bad_inputs(self):
        with pytest.raises(ValueError, match="excluded must be a 1-D boolean mask"):
            sample_negative_prototypes(torch.zeros(4), 2)
        with pytest.raises(ValueError, match="num_negatives must be >= 0"):
            sample_negative_prototypes(torch.zeros(4, dtype=torch.bool), -1)


def test_prototypes_counts_clusterings():
    p = Prototypes(torch.zeros(2, 3, dtype=torch.long), [torch.zeros(4, 2)] * 2, [torch.ones(4)] * 2)
    assert p.num_clusterings == 2
