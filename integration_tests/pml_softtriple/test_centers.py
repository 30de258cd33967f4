import itertools

import pytest
import torch
from pml_softtriple import SoftTripleLoss, effective_center_counts


def _union_find_counts(centers: torch.Tensor, threshold: float) -> list[int]:
    unit = torch.nn.functional.normalize(centers.double(), dim=2)
    counts = []
    for block in unit:
        k = block.shape[0]
        parent = list(range(k))

        def find(i, parent=parent):
            while parent[i] != i:
                i = parent[i]
            return i

        for a, b in itertools.combinations(range(k), 2):
            if float(block[a] @ block[b]) >= threshold:
                parent[find(a)] = find(b)
        counts.append(len({find(i) for i in range(k)}))
    return counts


def test_duplicates_merge_and_distinct_centres_do_not():
    e = torch.eye(4)
    centers = torch.stack(
        [
            torch.stack([e[0], e[0] * 3, e[1], e[1]]),  # two groups
            torch.stack([e[0], e[1], e[2], e[3]]),  # all distinct
            torch.stack([e[2], e[2], e[2] * 0.1, e[2]]),  # one group (scale does not matter)
        ]
    )
    assert effective_center_counts(centers, 0.99).tolist() == [2, 4, 1]


def test_merging_is_transitive():
    # a~b and b~c at the threshold, a and c are not: still one group.
    angles = torch.tensor([0.0, 0.1, 0.2])
    chain = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)[None]
    threshold = float(torch.cos(torch.tensor(0.1)) - 1e-6)
    assert float(chain[0, 0] @ chain[0, 2]) < threshold
    assert effective_center_counts(chain, threshold).tolist() == [1]


@pytest.mark.parametrize("threshold", [-0.5, 0.0, 0.3, 0.6, 0.9])
def test_matches_union_find(threshold):
    centers = torch.randn(20, 6, 3)
    assert effective_center_counts(centers, threshold).tolist() == _union_find_counts(centers, threshold)


def test_extreme_thresholds():
    centers = torch.randn(5, 4, 8)
    assert effective_center_counts(centers, -1.0).tolist() == [1] * 5
    assert effective_center_counts(centers, 1.0).tolist() == [4] * 5


def test_loss_helper_counts_its_own_centres():
    loss_func = SoftTripleLoss(3, 4, centers_per_class=5)
    with torch.no_grad():
        loss_func.fc[:, 0:5] = loss_func.fc[:, 0:1]  # class 0: all five centres identical
    counts = loss_func.effective_centers_per_class(0.999)
    assert counts.dtype == torch.int64 and counts.shape == (3,)
    assert counts[0] == 1 and counts[1:].tolist() == _union_find_counts(loss_func.get_centers()[1:], 0.999)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"centers must have shape \(num_classes, centers_per_class, d\)"):
        effective_center_counts(torch.randn(4, 3), 0.9)
    with pytest.raises(ValueError, match=r"threshold must be a cosine similarity in \[-1, 1\]"):
        effective_center_counts(torch.randn(2, 3, 4), 1.5)
