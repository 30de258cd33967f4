"""The fused CPU kernels: same values and gradients as the PyTorch implementation, and a safe fallback."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from pml_softtriple import SoftTripleLoss, _cpu_kernels, soft_triple_losses

needs_kernels = pytest.mark.skipif(
    not _cpu_kernels.available(), reason="the fused CPU kernels could not be built on this machine"
)


def _losses_and_grads(x, weight, y, k, gamma, monkeypatch, kernels: bool):
    with monkeypatch.context() as patch:
        if not kernels:
            patch.setattr(_cpu_kernels, "use_for", lambda tensor: False)
        x = x.detach().clone().requires_grad_(True)
        weight = weight.detach().clone().requires_grad_(True)
        losses = soft_triple_losses(x, weight, y, k, gamma=gamma)
        upstream = torch.linspace(0.5, 1.5, len(y), dtype=x.dtype)  # per-sample weights, not just a mean
        grads = torch.autograd.grad((losses * upstream).sum(), (x, weight))
    return losses.detach(), *grads


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [2, 3, 17])
@pytest.mark.parametrize("batch", [1, 5, 37])  # below, between and above the vector widths (tail loops)
@pytest.mark.parametrize("gamma", [0.1, 1e-3])  # 1e-3: exp(s / gamma) overflows without the max shift
def test_kernels_match_the_pytorch_path(dtype, k, batch, gamma, monkeypatch):
    gen = torch.Generator().manual_seed(batch * 100 + k)
    num_classes, dim = 7, 9
    x = torch.randn(batch, dim, generator=gen, dtype=dtype)
    weight = torch.randn(dim, num_classes * k, generator=gen, dtype=dtype)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    fused = _losses_and_grads(x, weight, y, k, gamma, monkeypatch, kernels=True)
    eager = _losses_and_grads(x, weight, y, k, gamma, monkeypatch, kernels=False)
    if dtype == torch.float64:  # the same formula in both: equal to rounding
        for a, b in zip(fused, eager, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        return
    # float32: with gamma = 1e-3 the gradient carries t = s / gamma ~ 1e3, so both paths round visibly; each
    # is held to the float64 result, the kernels to no more than twice the PyTorch path's error.
    truth = _losses_and_grads(x.double(), weight.double(), y, k, gamma, monkeypatch, kernels=False)
    for a, b, exact in zip(fused, eager, truth, strict=True):
        assert torch.isfinite(a).all()
        scale = exact.abs().max()
        err_fused, err_eager = (a.double() - exact).abs().max(), (b.double() - exact).abs().max()
        assert err_fused <= 2 * err_eager + 1e-6 * scale, (float(err_fused), float(err_eager))
        assert err_fused <= (1e-5 if gamma >= 0.1 else 1e-2) * scale


@needs_kernels
def test_kernels_give_the_same_result_on_any_number_of_threads(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 32, generator=gen)
    weight = torch.randn(32, 300 * 4, generator=gen)
    y = torch.randint(0, 300, (64,), generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _losses_and_grads(x, weight, y, 4, 0.1, monkeypatch, kernels=True)
        torch.set_num_threads(2)
        two = _losses_and_grads(x, weight, y, 4, 0.1, monkeypatch, kernels=True)
    finally:
        torch.set_num_threads(threads)
    # The kernels split classes between threads and never sum across them; what differs is BLAS's blocking.
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _forward_op(x, weight, y, k):
    return torch.ops.graftkit_soft_triple.loss_forward(x, weight, y, k, 20.0, 0.1, 0.01, 1e-12)


def _backward_op(grad_losses, x, weight, y, k, saved):
    x_norm, x_hat_t, norm, sim, prob = saved
    tensors = (grad_losses, x, x_norm, x_hat_t, weight, norm, sim, prob, y, torch.empty_like(sim))
    return torch.ops.graftkit_soft_triple.loss_backward(*tensors, k, 20.0, 0.1, 1e-12, True, True)


@needs_kernels
def test_kernel_ops_reject_bad_arguments():
    x, weight, y = torch.randn(4, 3), torch.randn(3, 6), torch.tensor([0, 1, 2, 0])
    with pytest.raises(RuntimeError, match=r"weight must have shape \(d, C \* K\)"):
        _forward_op(x, weight, y, 4)  # 6 centres are not a multiple of K = 4
    with pytest.raises(RuntimeError, match="weight must be a contiguous 2-D CPU tensor"):
        _forward_op(x, weight.t().contiguous().t(), y, 2)
    with pytest.raises(RuntimeError, match="same float dtype"):
        _forward_op(x.double(), weight, y, 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\), got values in \[0, 3\]"):
        _forward_op(x, weight, torch.tensor([0, 1, 3, 0]), 2)  # out of range: an error, never a stray write
    with pytest.raises(ValueError, match=r"got values in \[-1, 2\]"):
        _forward_op(x, weight, torch.tensor([0, -1, 2, 0]), 2)
    with pytest.raises(ValueError, match=r"embeddings contain NaN or Inf \(row 2\)"):
        _forward_op(torch.cat([x[:2], torch.tensor([[0.0, float("inf"), 1.0]]), x[3:]]), weight, y, 2)
    with pytest.raises(RuntimeError, match="labels must be a contiguous int64 CPU vector of 4 elements"):
        _forward_op(x, weight, y[:3], 2)
    _, *saved = _forward_op(x, weight, y, 2)
    with pytest.raises(RuntimeError, match="grad_losses must be a CPU vector of 4 elements"):
        _backward_op(torch.ones(5), x, weight, y, 2, saved)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        _backward_op(torch.ones(4), x, weight, y, 3, saved)  # K = 3, 3 classes: 9 rows, not 6


@needs_kernels
@pytest.mark.parametrize("batch", [1, 17, 40])  # the transposition works in tiles of 16 rows
def test_forward_op_normalises_like_torch(batch):
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 37, generator=gen, dtype=torch.float64)
    x[0] = 0.0  # a zero row: norm 0, normalised to zero as torch.nn.functional.normalize does
    weight = torch.randn(37, 2051, generator=gen, dtype=torch.float64)  # column blocks and a ragged tail
    y = torch.randint(0, 2051, (batch,), generator=gen)
    _, x_norm, x_hat_t, norm, sim, _ = _forward_op(x, weight, y, 1)
    torch.testing.assert_close(x_norm, torch.linalg.vector_norm(x, dim=1), rtol=1e-14, atol=0)
    x_hat = torch.nn.functional.normalize(x, dim=1, eps=1e-12)
    torch.testing.assert_close(x_hat_t, x_hat.t(), rtol=1e-14, atol=0)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(weight, dim=0), rtol=1e-14, atol=0)
    # kept: the products w_j . x_hat_i (the kernels divide by ||w_j|| where they use them)
    torch.testing.assert_close(sim, weight.t() @ x_hat_t, rtol=1e-12, atol=1e-14)


def test_environment_variable_switches_the_kernels_off(monkeypatch):
    monkeypatch.setenv(_cpu_kernels.ENV_VAR, "0")
    _cpu_kernels.available.cache_clear()
    try:
        assert not _cpu_kernels.available()
        assert not _cpu_kernels.use_for(torch.zeros(2, 2))
        loss = SoftTripleLoss(3, 4, centers_per_class=2)
        loss(torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1, 2, 0, 1])).backward()
        assert torch.isfinite(loss.fc.grad).all()
    finally:
        _cpu_kernels.available.cache_clear()


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def broken_load(*args, **kwargs):
        raise OSError("no compiler here")

    monkeypatch.setenv(_cpu_kernels.ENV_VAR, "1")
    monkeypatch.setattr(cpp_extension, "load", broken_load)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    _cpu_kernels.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not build the fused CPU kernels.*no compiler here"):
            assert not _cpu_kernels.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not _cpu_kernels.available()  # cached: no second build attempt, no second warning
    finally:
        _cpu_kernels.available.cache_clear()


def test_only_float_cpu_tensors_use_the_kernels():
    assert not _cpu_kernels.use_for(torch.zeros(2, 2, dtype=torch.float16))
    assert not _cpu_kernels.use_for(torch.zeros(2, 2, dtype=torch.bfloat16))
    assert not _cpu_kernels.use_for(torch.zeros(2, 2, device="meta"))


# ----------------------------------------------------------------------------------- the C++ autograd node
def _problem(seed=0, batch=12, num_classes=5, dim=7, k=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, requires_grad=True)
    weight = torch.randn(dim, num_classes * k, generator=gen, requires_grad=True)
    return x, weight, torch.randint(0, num_classes, (batch,), generator=gen), k


@needs_kernels
def test_the_kernels_record_one_cpp_node_whose_inputs_are_the_leaves():
    x, weight, y, k = _problem()
    losses = soft_triple_losses(x, weight, y, k)
    assert "graftkit::SoftTripleLossFunction" in losses.grad_fn.name()  # no Python autograd.Function
    leaves = [fn.variable for fn, _ in losses.grad_fn.next_functions if fn is not None]
    assert leaves[0] is x and leaves[1] is weight


@needs_kernels
def test_inference_mode_and_no_grad_give_the_recorded_values():
    x, weight, y, k = _problem(seed=1)
    recorded = soft_triple_losses(x, weight, y, k)
    with torch.no_grad():
        no_grad = soft_triple_losses(x, weight, y, k)
    with torch.inference_mode():
        inference = soft_triple_losses(x, weight, y, k)  # below autograd: the forward operator alone
    assert no_grad.grad_fn is None and not inference.requires_grad
    torch.testing.assert_close(no_grad, recorded.detach(), rtol=0, atol=0)
    torch.testing.assert_close(inference, recorded.detach(), rtol=0, atol=0)


def test_double_backward_raises_on_both_implementations(implementation):
    x, weight, y, k = _problem(seed=2)
    scale = torch.tensor(2.0, requires_grad=True)  # makes the upstream gradient differentiable
    (grad_x,) = torch.autograd.grad((soft_triple_losses(x, weight, y, k) * scale).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_x.sum().backward()
    # With a constant upstream gradient the first-order gradient is simply not differentiable (no graph).
    (grad_x,) = torch.autograd.grad(soft_triple_losses(x, weight, y, k).sum(), x, create_graph=True)
    assert not grad_x.requires_grad


@needs_kernels
def test_reused_scratch_gives_identical_gradients_across_calls_and_retained_graphs():
    x, weight, y, k = _problem(seed=3)
    upstream = torch.linspace(0.5, 1.5, len(y))
    losses = soft_triple_losses(x, weight, y, k)
    first = torch.autograd.grad(losses, (x, weight), upstream, retain_graph=True)
    # another problem's backward in between overwrites the per-thread scratch arrays
    other_x, other_w, other_y, _ = _problem(seed=4)
    torch.autograd.grad(soft_triple_losses(other_x, other_w, other_y, k).sum(), (other_x, other_w))
    again = torch.autograd.grad(losses, (x, weight), upstream)
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_kernels
def test_backward_passes_on_concurrent_threads_do_not_share_scratch():
    problems = [_problem(seed=10 + i, batch=64, num_classes=40, dim=32, k=4) for i in range(4)]
    expected = [torch.autograd.grad(soft_triple_losses(x, w, y, k).sum(), (x, w)) for x, w, y, k in problems]
    results: dict[int, tuple[torch.Tensor, ...]] = {}

    def run(i: int) -> None:
        x, w, y, k = problems[i]
        for _ in range(20):
            results[i] = torch.autograd.grad(soft_triple_losses(x, w, y, k).sum(), (x, w))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(problems))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, grads in enumerate(expected):  # BLAS may block differently on another thread: rounding only
        for a, b in zip(results[i], grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_release_scratch_frees_buffers_and_the_next_call_is_unchanged(implementation):
    x, _, y, k = _problem(seed=5)
    loss_func = SoftTripleLoss(5, 7, centers_per_class=k)
    loss_func(x, y).backward()
    first = (x.grad.clone(), loss_func.fc.grad.clone())
    loss_func.release_scratch()
    assert not loss_func._workspace._local.__dict__.get("buffers")
    x.grad = loss_func.fc.grad = None
    loss_func(x, y).backward()
    torch.testing.assert_close(x.grad, first[0], rtol=0, atol=0)
    torch.testing.assert_close(loss_func.fc.grad, first[1], rtol=0, atol=0)


def test_release_scratch_never_builds_the_kernels(monkeypatch):
    _cpu_kernels.available.cache_clear()
    built = []
    monkeypatch.setattr(_cpu_kernels, "_import_cpp_extension_load", lambda: built.append(1))
    try:
        _cpu_kernels.release_scratch()
        assert not built and _cpu_kernels.available.cache_info().currsize == 0
    finally:
        _cpu_kernels.available.cache_clear()


def test_torch_compile_of_model_and_loss_matches_eager(implementation):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    loss_func = SoftTripleLoss(6, 8, centers_per_class=3)
    x, y = torch.randn(20, 12), torch.randint(0, 6, (20,))

    def step(fn):
        model.zero_grad(set_to_none=True)
        loss_func.zero_grad(set_to_none=True)
        loss = fn(x, y)
        loss.backward()
        return loss.detach(), model[0].weight.grad.clone(), loss_func.fc.grad.clone()

    eager = step(lambda a, b: loss_func(model(a), b))
    # On the fused kernels the loss is a graph break (no fake-tensor implementation): it runs eagerly there.
    compiled = step(torch.compile(lambda a, b: loss_func(model(a), b)))
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
