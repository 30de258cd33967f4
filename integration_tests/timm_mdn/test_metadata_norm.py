"""MetadataNorm layers against an independent float64 reference written from the paper's formula."""

import pytest
import torch
from timm_mdn import MetadataKernel, MetadataNorm, MetadataNorm1d, MetadataNorm2d, metadata_norm
from timm_mdn.functional import channel_affine
from torch import nn

N, K = 64, 3
REMOVE = [1, 2]


def _training_metadata(n: int = N, seed: int = 0) -> torch.Tensor:
    """X = [label, confounder, 1] with a confounder correlated with the label."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) > 0.5).double()
    cf = torch.rand(n, generator=g, dtype=torch.float64) * 3 + 2 * y
    return torch.stack([y, cf, torch.ones(n, dtype=torch.float64)], 1)


def _reference(
    f: torch.Tensor, x_batch: torch.Tensor, x_train: torch.Tensor, remove: list[int]
) -> torch.Tensor:
    """r = f - X_b[:, R] beta[R] with beta = (N/b) (X^T X)^{-1} X_b^T f, by solving, per flattened element."""
    b = f.shape[0]
    flat = f.reshape(b, -1)
    beta = (x_train.shape[0] / b) * torch.linalg.solve(x_train.T @ x_train, x_batch.T @ flat)
    return (flat - x_batch[:, remove] @ beta[remove]).reshape(f.shape)


LAYOUTS = [
    (MetadataNorm, (5,)),  # pooled (B, C)
    (MetadataNorm, (7, 5)),  # tokens (B, N, C)
    (MetadataNorm1d, (5,)),
    (MetadataNorm1d, (5, 6)),
    (MetadataNorm2d, (5, 3, 4)),
]


def _layer(cls: type, x_train: torch.Tensor, **kwargs: object) -> nn.Module:
    kernel = MetadataKernel.from_design(x_train, remove=REMOVE)
    channels = 5
    return cls(channels, kernel=kernel, dtype=torch.float64, **kwargs)


@pytest.mark.parametrize(("cls", "feature_shape"), LAYOUTS)
def test_values_and_gradients_match_the_float64_reference(cls: type, feature_shape: tuple[int, ...]) -> None:
    x_train = _training_metadata()
    layer = _layer(cls, x_train)
    idx = torch.randperm(N)[:16]
    f = torch.randn(16, *feature_shape, dtype=torch.float64) + x_train[idx, 1].view(
        -1, *[1] * len(feature_shape)
    )
    f.requires_grad_(True)
    f_ref = f.detach().clone().requires_grad_(True)
    weights = torch.randn_like(f)

    layer.metadata = x_train[idx]
    out = layer(f)
    ref = _reference(f_ref, x_train[idx], x_train, REMOVE)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)

    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(f.grad, f_ref.grad, rtol=1e-12, atol=1e-12)


def test_gradient_flows_through_beta() -> None:
    x_train = _training_metadata()
    layer = _layer(MetadataNorm, x_train)
    idx = torch.arange(10)
    layer.metadata = x_train[idx]
    f = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(10, 5, dtype=torch.float64)
    (layer(f) * weights).sum().backward()
    # With beta treated as a constant the gradient would be the identity: weights.
    assert not torch.allclose(f.grad, weights)
    x_b, w = x_train[idx], torch.linalg.inv(x_train.T @ x_train)
    projector = torch.eye(10, dtype=torch.float64) - (N / 10) * x_b[:, REMOVE] @ w[REMOVE] @ x_b.T
    torch.testing.assert_close(f.grad, projector.T @ weights, rtol=1e-12, atol=1e-12)


def test_gradcheck() -> None:
    x_train = _training_metadata(12)
    layer = _layer(MetadataNorm2d, x_train)
    layer.metadata = x_train[:6]
    f = torch.randn(6, 5, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (f,))


def test_full_dataset_as_one_batch_is_the_exact_ols_residual() -> None:
    x_train = _training_metadata()
    f = torch.randn(N, 5, dtype=torch.float64) + 3 * x_train[:, 1:2] - 2 * x_train[:, :1]
    ols = torch.linalg.lstsq(x_train, f).solution

    everything = MetadataNorm(
        5, kernel=MetadataKernel.from_design(x_train, remove=[0, 1, 2]), dtype=torch.float64
    )
    everything.metadata = x_train
    residual = everything(f)
    torch.testing.assert_close(residual, f - x_train @ ols, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        x_train.T @ residual, torch.zeros(K, 5, dtype=torch.float64), rtol=0, atol=1e-9
    )

    confounders_only = _layer(MetadataNorm, x_train)
    confounders_only.metadata = x_train
    out = confounders_only(f)
    # The label's part is kept: out = OLS residual + label column * its coefficient ...
    torch.testing.assert_close(out, f - x_train[:, REMOVE] @ ols[REMOVE], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out - x_train[:, :1] @ ols[:1], f - x_train @ ols, rtol=1e-10, atol=1e-10)
    # ... so the output is orthogonal to the confounder columns once the label is partialled out of them.
    label = x_train[:, :1]
    confounders = x_train[:, REMOVE] - label @ torch.linalg.lstsq(label, x_train[:, REMOVE]).solution
    torch.testing.assert_close(confounders.T @ out, torch.zeros(2, 5, dtype=torch.float64), rtol=0, atol=1e-9)
    assert (x_train[:, 1] @ (f - f.mean(0))).abs().min() > 1.0  # the input was confounded


def test_scale_uses_the_actual_batch_size() -> None:
    x_train = _training_metadata()
    layer = _layer(MetadataNorm, x_train)
    for b in (7, 5, 1):
        f = torch.randn(b, 5, dtype=torch.float64)
        layer.metadata = x_train[:b]
        torch.testing.assert_close(
            layer(f), _reference(f, x_train[:b], x_train, REMOVE), rtol=1e-12, atol=1e-12
        )


def test_running_beta_and_evaluation() -> None:
    x_train = _training_metadata()
    layer = _layer(MetadataNorm2d, x_train, momentum=0.25)
    w = torch.linalg.inv(x_train.T @ x_train)
    betas = []
    for step in range(2):
        idx = torch.arange(8) + 8 * step
        f = torch.randn(8, 5, 3, 4, dtype=torch.float64)
        layer.metadata = x_train[idx]
        layer(f)
        betas.append((N / 8) * w @ x_train[idx].T @ f.reshape(8, -1))
    expected = 0.75 * 0.25 * betas[0] + 0.25 * betas[1]
    torch.testing.assert_close(layer.running_beta, expected.reshape(K, 5, 3, 4), rtol=1e-12, atol=1e-12)

    layer.eval()
    f = torch.randn(4, 5, 3, 4, dtype=torch.float64)
    layer.metadata = x_train[:4]
    out = layer(f)
    ref = f.reshape(4, -1) - x_train[:4, REMOVE] @ expected[REMOVE]
    torch.testing.assert_close(out, ref.reshape(f.shape), rtol=1e-12, atol=1e-12)
    before = layer.running_beta.clone()
    layer.metadata = x_train[:4, REMOVE]  # only the removed columns: labels are not needed at test time
    torch.testing.assert_close(layer(f), out)
    torch.testing.assert_close(layer.running_beta, before)


def test_affine_scale_and_shift_per_channel() -> None:
    x_train = _training_metadata()
    layer = _layer(MetadataNorm2d, x_train, affine=True)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 6.0))
        layer.bias.copy_(torch.arange(5.0))
    layer.metadata = x_train[:8]
    f = torch.randn(8, 5, 2, 2, dtype=torch.float64)
    out = layer(f)
    ref = _reference(f, x_train[:8], x_train, REMOVE)
    torch.testing.assert_close(
        out, ref * torch.arange(1.0, 6.0).view(1, 5, 1, 1) + torch.arange(5.0).view(1, 5, 1, 1)
    )
    out.sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None


@pytest.mark.parametrize("channels_last", [False, True])
def test_affine_layer_gradcheck_fused_and_not(channels_last: bool) -> None:
    x_train = _training_metadata(12)
    layer = _layer(MetadataNorm2d, x_train, affine=True)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1.0, 1.0)
    layer.metadata = x_train[:6]
    f = torch.randn(6, 5, 2, 3, dtype=torch.float64)
    if channels_last:
        f = f.to(memory_format=torch.channels_last)
    f.requires_grad_(True)
    assert torch.autograd.gradcheck(layer, (f,))
    reference = _reference(f.detach(), x_train[:6], x_train, REMOVE)
    expected = reference * layer.weight.view(1, 5, 1, 1) + layer.bias.view(1, 5, 1, 1)
    torch.testing.assert_close(layer(f), expected, rtol=1e-12, atol=1e-12)
    weight, bias = layer.weight, layer.bias
    assert torch.autograd.gradcheck(
        lambda w, b: metadata_norm(
            f.detach(),
            x_train[:6],
            N * torch.linalg.inv(x_train.T @ x_train),
            torch.tensor(REMOVE),
            None,
            True,
            0.1,
            weight=w,
            bias=b,
        ),
        (weight.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)),
    )


@pytest.mark.parametrize(
    ("make", "channel_dim"),
    [
        (lambda: torch.randn(4, 3, 2, 5, dtype=torch.float64), 1),
        (lambda: torch.randn(4, 3, 2, 5, dtype=torch.float64).to(memory_format=torch.channels_last), 1),
        (lambda: torch.randn(4, 6, 3, dtype=torch.float64), -1),
        (lambda: torch.randn(4, 3, dtype=torch.float64), 1),
    ],
)
def test_channel_affine_gradcheck(make: object, channel_dim: int) -> None:
    x = make().requires_grad_(True)  # type: ignore[operator]
    c = x.shape[channel_dim]
    weight = torch.randn(c, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: channel_affine(*a, channel_dim), (x, weight, bias))


def test_functional_matches_module() -> None:
    x_train = _training_metadata()
    kernel = MetadataKernel.from_design(x_train, remove=REMOVE)
    layer = MetadataNorm1d(5, kernel=kernel, dtype=torch.float64)
    f = torch.randn(9, 5, dtype=torch.float64)
    layer.metadata = x_train[:9]
    running = torch.zeros(K, 5, dtype=torch.float64)
    out = metadata_norm(f, x_train[:9], N * kernel.inverse, torch.tensor(REMOVE), running, True, 0.1)
    torch.testing.assert_close(out, layer(f))
    torch.testing.assert_close(running, layer.running_beta)


def test_channels_last_input_gives_the_same_result_without_copies() -> None:
    x_train = _training_metadata()
    layer, twin = _layer(MetadataNorm2d, x_train), _layer(MetadataNorm2d, x_train)
    f = torch.randn(6, 5, 3, 4, dtype=torch.float64)
    layer.metadata = twin.metadata = x_train[:6]
    out = layer(f.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, twin(f))
    assert out.is_contiguous(memory_format=torch.channels_last)  # the layout is kept, as BatchNorm2d does
    torch.testing.assert_close(layer.running_beta, twin.running_beta)
    layer.eval()
    twin.eval()
    torch.testing.assert_close(layer(f.to(memory_format=torch.channels_last)), twin(f))


def test_bfloat16_autocast_keeps_dtypes_and_accuracy() -> None:
    x_train = _training_metadata().float()
    layer = MetadataNorm2d(5, kernel=MetadataKernel.from_design(x_train, remove=REMOVE), affine=True)
    conv = nn.Conv2d(3, 5, 1)
    layer.metadata = x_train[:8]
    image = torch.randn(8, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(conv(image))
    assert out.dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float32 and layer.running_beta.dtype == torch.float32
    with torch.no_grad():
        expected = _reference(conv(image).double(), x_train[:8].double(), x_train.double(), REMOVE)
    torch.testing.assert_close(out.double(), expected, rtol=0.05, atol=0.05)


def test_state_dict_round_trip_into_a_fresh_layer() -> None:
    x_train = _training_metadata()
    layer = _layer(MetadataNorm2d, x_train)
    for step in range(3):
        layer.metadata = x_train[8 * step : 8 * step + 8]
        layer(torch.randn(8, 5, 2, 3, dtype=torch.float64))
    fresh = MetadataNorm2d(5, dtype=torch.float64)  # no kernel, no running beta yet
    fresh.load_state_dict(layer.state_dict(), strict=True)
    layer.eval()
    fresh.eval()
    f = torch.randn(4, 5, 2, 3, dtype=torch.float64)
    layer.metadata = fresh.metadata = x_train[:4]
    torch.testing.assert_close(fresh(f), layer(f), rtol=0, atol=0)
    assert str(fresh) == str(layer)
    assert "metadata" not in dict(layer.named_buffers()) and not any(
        "metadata" in k for k in layer.state_dict()
    )


def test_plain_checkpoint_without_mdn_state_loads_strictly_and_partial_state_does_not() -> None:
    layer = _layer(MetadataNorm, _training_metadata())
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.load_state_dict({}, strict=True)
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, before[key])
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict({"moment_inverse": before["moment_inverse"]}, strict=True)


def test_repr_shows_hyperparameters() -> None:
    layer = _layer(MetadataNorm2d, _training_metadata(), momentum=0.2)
    assert str(layer) == "MetadataNorm2d(5, momentum=0.2, affine=False, num_columns=3, remove=[1, 2])"
    assert str(MetadataNorm(8)) == "MetadataNorm(8, momentum=0.1, affine=False)"


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_layer_matches_eager_without_graph_breaks(backend: str) -> None:
    x_train = _training_metadata()
    eager, compiled_layer = _layer(MetadataNorm2d, x_train), _layer(MetadataNorm2d, x_train)
    # The running beta is sized by the first batch, as torch's Lazy modules: one eager step before fullgraph.
    first = torch.randn(8, 5, 2, 2, dtype=torch.float64)
    for layer in (eager, compiled_layer):
        layer.metadata = x_train[:8]
        layer(first)
    compiled = torch.compile(compiled_layer, fullgraph=True, dynamic=False, backend=backend)
    for step in range(1, 3):
        f = torch.randn(8, 5, 2, 2, dtype=torch.float64, requires_grad=True)
        f2 = f.detach().clone().requires_grad_(True)
        eager.metadata = compiled_layer.metadata = x_train[8 * step : 8 * step + 8]
        out, out2 = eager(f), compiled(f2)
        torch.testing.assert_close(out2, out)
        out.square().sum().backward()
        out2.square().sum().backward()
        torch.testing.assert_close(f2.grad, f.grad)
    torch.testing.assert_close(compiled_layer.running_beta, eager.running_beta)
    eager.eval()
    compiled_layer.eval()
    f = torch.randn(8, 5, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(compiled(f), eager(f))


@pytest.mark.parametrize(
    ("make_input", "metadata", "match"),
    [
        (lambda: torch.randn(4, 5), None, "needs the batch's metadata"),
        (lambda: torch.randn(4, 5), torch.ones(3, 3), "has 3 rows but the batch has 4"),
        (lambda: torch.randn(4, 5), torch.ones(4, 2), r"shape \(B, 3\)"),
        (lambda: torch.randn(4, 5), torch.full((4, 3), float("nan")), "inf or NaN"),
        (lambda: torch.randn(4, 6), torch.ones(4, 3), "C=5"),
    ],
)
def test_forward_errors(make_input: object, metadata: torch.Tensor | None, match: str) -> None:
    layer = MetadataNorm(5, kernel=MetadataKernel.from_design(_training_metadata().float(), remove=REMOVE))
    layer.metadata = metadata
    with pytest.raises(ValueError, match=match):
        layer(make_input())  # type: ignore[operator]


def test_layout_kernel_and_evaluation_errors() -> None:
    kernel = MetadataKernel.from_design(_training_metadata().float(), remove=REMOVE)
    with pytest.raises(ValueError, match="no metadata kernel"):
        MetadataNorm2d(5)(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="4-D input"):
        MetadataNorm2d(5, kernel=kernel)(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="2-D or 3-D"):
        MetadataNorm1d(5, kernel=kernel)(torch.randn(2, 5, 3, 3))
    layer = MetadataNorm2d(5, kernel=kernel)
    layer.metadata = torch.ones(2, 3)
    layer.eval()
    with pytest.raises(ValueError, match="no running beta yet"):
        layer(torch.randn(2, 5, 3, 3))
    layer.train()
    layer(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="estimated for features of shape"):
        layer(torch.randn(2, 5, 4, 4))
    layer.reset_running_stats()
    layer(torch.randn(2, 5, 4, 4))
    with pytest.raises(TypeError, match="MetadataKernel"):
        layer.set_kernel(torch.eye(3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="momentum"):
        MetadataNorm(5, momentum=0.0)
    with pytest.raises(ValueError, match="num_features"):
        MetadataNorm(0)
