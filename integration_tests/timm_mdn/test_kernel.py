import numpy as np
import pytest
import torch
from timm_mdn import MetadataKernel


def _design(n: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) > 0.5).double()
    cf = torch.rand(n, generator=g, dtype=torch.float64) * 3 + 2 * y
    return torch.stack([y, cf, torch.ones(n, dtype=torch.float64)], 1)


def test_from_design_inverts_the_gram_matrix_in_float64() -> None:
    x = _design()
    kernel = MetadataKernel.from_design(x.float(), remove=[1, 2])
    expected = np.linalg.inv(x.float().double().numpy().T @ x.float().double().numpy())
    assert kernel.inverse.dtype == torch.float64
    np.testing.assert_allclose(kernel.inverse.numpy(), expected, rtol=1e-10)
    assert kernel.num_samples == 40 and kernel.num_columns == 3 and kernel.remove == (1, 2)
    assert kernel.remove_mask.tolist() == [False, True, True]


def test_from_columns_orders_labels_confounders_intercept() -> None:
    x = _design()
    y, cf = x[:, 0], x[:, 1]
    kernel = MetadataKernel.from_columns(confounders=cf, labels=y)
    assert kernel.remove == (1, 2)  # confounder and intercept removed, the label kept
    torch.testing.assert_close(kernel.design(cf, y), x)
    torch.testing.assert_close(kernel.inverse, torch.linalg.inv(x.T @ x))


def test_categorical_parts_get_treatment_coding() -> None:
    g = torch.Generator().manual_seed(1)
    site = torch.randint(0, 3, (60,), generator=g)
    site[:3] = torch.arange(3)
    labels = torch.randint(0, 4, (60,), generator=g)
    labels[:4] = torch.arange(4)
    kernel = MetadataKernel.from_columns(confounders=site, labels=labels)
    # labels: 4 levels -> 3 kept columns; site: 3 levels -> 2 removed columns; then the removed intercept
    assert kernel.num_columns == 3 + 2 + 1 and kernel.remove == (3, 4, 5)
    design = kernel.design(site, labels)
    one_hot = torch.nn.functional.one_hot
    torch.testing.assert_close(design[:, :3], one_hot(labels, 4)[:, 1:].to(design.dtype))
    torch.testing.assert_close(design[:, 3:5], one_hot(site, 3)[:, 1:].to(design.dtype))
    torch.testing.assert_close(kernel.inverse, torch.linalg.inv(design.double().T @ design.double()))
    binary = MetadataKernel.from_columns(confounders=site % 2)
    assert binary.num_columns == 2 and binary.remove == (0, 1)


def test_design_without_labels_fills_zeros_for_evaluation() -> None:
    x = _design()
    kernel = MetadataKernel.from_columns(confounders=x[:, 1], labels=x[:, 0])
    rows = kernel.design(x[:5, 1])
    assert rows[:, 0].eq(0).all() and rows[:, 2].eq(1).all()


@pytest.mark.parametrize(
    ("design", "match"),
    [
        (
            torch.cat([torch.nn.functional.one_hot(torch.arange(12) % 3, 3).double(), torch.ones(12, 1)], 1),
            "singular",
        ),
        (torch.cat([torch.randn(10, 2), torch.zeros(10, 1)], 1).double(), "all zeros"),
        (torch.randn(2, 3).double(), "at least as many rows"),
        (torch.full((10, 2), float("nan")), "inf or NaN"),
        (torch.randn(4, 2, 2), r"shape \(N,\) or \(N, q\)"),
    ],
)
def test_from_design_rejects_bad_metadata(design: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MetadataKernel.from_design(design, remove=[0])


def test_singular_detection_is_scale_free() -> None:
    x = _design()
    x[:, 1] *= 1e8  # a confounder in large units is not a rank problem
    assert MetadataKernel.from_design(x, remove=[1, 2]).num_columns == 3
    dependent = torch.cat([x, (x[:, :1] * 2 + x[:, 2:])], 1)
    with pytest.raises(ValueError, match="singular"):
        MetadataKernel.from_design(dependent, remove=[1])


@pytest.mark.parametrize(
    ("remove", "match"), [([], "at least one"), ([3], "distinct column"), ([1, 1], "distinct")]
)
def test_remove_must_name_existing_columns(remove: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MetadataKernel.from_design(_design(), remove=remove)


def test_design_rejects_inconsistent_batches() -> None:
    x = _design()
    kernel = MetadataKernel.from_columns(confounders=x[:, 1], labels=x[:, 0])
    with pytest.raises(ValueError, match="rows like confounders"):
        kernel.design(x[:5, 1], x[:4, 0])
    with pytest.raises(ValueError, match="was continuous"):
        kernel.design(torch.ones(5, dtype=torch.long), x[:5, 0])
    with pytest.raises(ValueError, match="1 column"):
        kernel.design(x[:5, :2], x[:5, 0])
    with pytest.raises(ValueError, match="needs a kernel built with"):
        MetadataKernel.from_design(x, remove=[1]).design(x[:5, 1])
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        kernel.design(np.ones(5))  # type: ignore[arg-type]
    site = MetadataKernel.from_columns(confounders=torch.arange(10) % 2)
    with pytest.raises(ValueError, match=r"levels must lie in \[0, 2\)"):
        site.design(torch.tensor([0, 2]))


def test_repr_names_the_columns() -> None:
    kernel = MetadataKernel.from_design(_design(), remove=[1, 2])
    assert repr(kernel) == "MetadataKernel(num_columns=3, remove=[1, 2], num_samples=40)"
