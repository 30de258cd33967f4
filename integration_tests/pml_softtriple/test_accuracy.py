import pytest
import torch
from pml_softtriple import RecallAtKAccuracyCalculator
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator


def _naive_recall(query, query_labels, reference, reference_labels, k, same_set):
    hits, counted = 0, 0
    for i in range(len(query)):
        dist = ((reference - query[i]) ** 2).sum(1)
        if same_set:
            dist[i] = float("inf")
        others = (reference_labels == query_labels[i]).sum() - int(same_set)
        if others <= 0:
            continue  # lone query, skipped like PML does
        counted += 1
        nearest = torch.argsort(dist)[:k]
        hits += bool((reference_labels[nearest] == query_labels[i]).any())
    return hits / counted


def _clusters(n=60, classes=6, dim=4, noise=0.8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    means = torch.randn(classes, dim, generator=gen) * 2
    return means[labels] + noise * torch.randn(n, dim, generator=gen), labels


@pytest.mark.parametrize("same_set", [True, False])
def test_recall_at_k_matches_a_naive_loop(same_set):
    query, query_labels = _clusters(seed=1)
    if same_set:
        reference, reference_labels = query, query_labels
    else:
        reference, reference_labels = _clusters(n=50, seed=2)
    calc = RecallAtKAccuracyCalculator(recall_ks=(1, 2, 4, 8), k="max_bin_count", device=torch.device("cpu"))
    if same_set:
        result = calc.get_accuracy(query, query_labels)
    else:
        result = calc.get_accuracy(query, query_labels, reference, reference_labels, ref_includes_query=False)
    for k in (1, 2, 4, 8):
        expected = _naive_recall(query, query_labels, reference, reference_labels, k, same_set)
        assert result[f"recall_at_{k}"] == pytest.approx(expected)
    assert result["recall_at_1"] == pytest.approx(result["precision_at_1"])
    assert result["recall_at_1"] <= result["recall_at_2"] <= result["recall_at_4"] <= result["recall_at_8"]
    assert set(result) >= set(AccuracyCalculator(device=torch.device("cpu")).get_curr_metrics())


def test_k_is_raised_to_the_largest_recall_and_lone_queries_are_skipped():
    x, labels = _clusters(n=24, classes=12)  # 2 per class: max_bin_count k would be 1
    labels = labels.clone()
    labels[0] = 99  # a lone query
    calc = RecallAtKAccuracyCalculator(
        recall_ks=(8,), include=("recall_at_8",), k=1, device=torch.device("cpu")
    )
    result = calc.get_accuracy(x, labels)
    assert result["recall_at_8"] == pytest.approx(_naive_recall(x, labels, x, labels, 8, True))


def test_bad_recall_ks():
    with pytest.raises(ValueError, match="recall_ks must be positive ints"):
        RecallAtKAccuracyCalculator(recall_ks=(0, 1))
    with pytest.raises(ValueError, match="recall_ks must be positive ints"):
        RecallAtKAccuracyCalculator(recall_ks=())
