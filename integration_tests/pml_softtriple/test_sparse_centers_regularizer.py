import pytest
import torch
from pml_softtriple import SparseCentersRegularizer
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.regularizers import SparseCentersRegularizer as PMLSparseCentersRegularizer

from . import _reference as ref


def _weights(num_classes, k, dim=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_classes * k, dim, generator=gen, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("k", [2, 3, 7])
def test_matches_pml_values_gradients_and_stats(k):
    num_classes = 5
    w = _weights(num_classes, k)
    ours = SparseCentersRegularizer(num_classes, k, collect_stats=True)
    anchor = PMLSparseCentersRegularizer(num_classes, k, collect_stats=True)
    value, expected = ours(w), anchor(w)
    (g,) = torch.autograd.grad(value, w)
    (e,) = torch.autograd.grad(expected, w)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-14)
    assert ours.same_class_center_sim == pytest.approx(anchor.same_class_center_sim, rel=1e-10)
    assert ours.diff_class_center_sim == pytest.approx(anchor.diff_class_center_sim, rel=1e-8)
    assert ours.reducer.divisor == anchor.reducer.divisor == num_classes * k * (k - 1)


def test_matches_formula_reference_on_transposed_fc():
    # What the loss passes: fc.t(), a non-contiguous (C*K, d) view.
    fc = torch.randn(4, 3 * 5, dtype=torch.float64, requires_grad=True)
    value = SparseCentersRegularizer(3, 5)(fc.t())
    (g,) = torch.autograd.grad(value, fc)
    fc2 = fc.detach().clone().requires_grad_(True)
    expected = ref.center_regularizer(fc2, 5)
    (e,) = torch.autograd.grad(expected, fc2)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-14)


def test_eps_enters_inside_the_square_root():
    w = _weights(2, 2)
    with_eps = SparseCentersRegularizer(2, 2, eps=1e-2)(w)
    cos = torch.nn.functional.cosine_similarity(w[0::2], w[1::2], dim=1)
    torch.testing.assert_close(with_eps, torch.sqrt(2.0 + 1e-2 - 2.0 * cos).sum() / 4)


def test_merged_centres_give_zero_loss_and_finite_zero_gradient():
    base = torch.randn(3, 1, 4, dtype=torch.float64)
    w = (base.repeat(1, 3, 1) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)[None, :, None]).reshape(
        9, 4
    )
    w.requires_grad_(True)
    value = SparseCentersRegularizer(3, 3, eps=0.0)(w)
    (g,) = torch.autograd.grad(value, w)
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-7)
    assert torch.isfinite(g).all()


def test_opposite_centres_give_the_maximum():
    w = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert float(SparseCentersRegularizer(1, 2, eps=0.0)(w)) == pytest.approx(2.0 / 2)


def test_scales_linearly_in_classes_no_quadratic_matrix():
    # 200,000 centres: a (C*K)^2 similarity matrix would need 320 GB in float64. Block-wise it is instant.
    num_classes, k = 100_000, 2
    w = torch.randn(num_classes * k, 4, requires_grad=True)
    value = SparseCentersRegularizer(num_classes, k)(w)
    value.backward()
    assert torch.isfinite(value) and w.grad.shape == w.shape
    assert 0.0 < float(value.detach()) < 2.0


def test_repr():
    assert str(SparseCentersRegularizer(10, 3)).startswith(
        "SparseCentersRegularizer(\n  num_classes=10, centers_per_class=3, eps=None"
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((0, 2), {}, "num_classes must be an int >= 1"),
        ((3, 1), {}, "centers_per_class must be an int >= 2"),
        ((3, 2), {"eps": -1.0}, "eps must be >= 0"),
        ((3, 2), {"distance": LpDistance()}, "only CosineSimilarity is supported"),
    ],
)
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseCentersRegularizer(*args, **kwargs)


def test_wrong_weight_shape():
    with pytest.raises(ValueError, match=r"weights must have shape \(6, embedding_size\)"):
        SparseCentersRegularizer(3, 2)(torch.randn(5, 4))
