import math

import pytest
import torch
from pml_softtriple import SoftTripleLoss, SparseCentersRegularizer, soft_triple_losses
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners, reducers
from pytorch_metric_learning.regularizers import SparseCentersRegularizer as PMLSparseCentersRegularizer

from . import _reference as ref

RTOL = 1e-6


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _inputs(batch=6, num_classes=4, dim=5, k=3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=dtype, requires_grad=True)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    return x, y


def _ours(num_classes, dim, k, **kwargs):
    return SoftTripleLoss(num_classes, dim, centers_per_class=k, **kwargs).double()


def _pml(num_classes, dim, k, fc, la=20.0, gamma=0.1, margin=0.01, tau=0.2):
    reg = PMLSparseCentersRegularizer(num_classes, k) if (k > 1 and tau > 0) else None
    loss = pml_losses.SoftTripleLoss(
        num_classes,
        dim,
        centers_per_class=k,
        la=la,
        gamma=gamma,
        margin=margin,
        weight_regularizer=reg,
        weight_reg_weight=tau,
    ).double()
    loss.fc.data.copy_(fc)
    return loss


def _skip_kernels_off_cpu(device, implementation):
    if device.type != "cpu" and implementation == "cpu_kernels":
        pytest.skip("the fused kernels are CPU-only; other devices always take the PyTorch path")


@pytest.mark.parametrize(("k", "tau"), [(1, 0.0), (2, 0.0), (2, 0.2), (4, 0.0), (4, 0.2)])
@pytest.mark.parametrize("gamma", [0.1, 1e-3])
def test_matches_formula_reference_values_and_gradients(k, gamma, tau, implementation, device):
    _skip_kernels_off_cpu(device, implementation)
    num_classes, dim = 4, 5
    x, y = _inputs(num_classes=num_classes, dim=dim, k=k, seed=k)
    loss_func = _ours(num_classes, dim, k, gamma=gamma, tau=tau, la=15.0, margin=0.05)  # built on the CPU
    fc = loss_func.fc.detach().clone().requires_grad_(True)

    ours = loss_func(x.to(device), y.to(device))  # the centres follow the embeddings (PML's cast_types)
    assert loss_func.fc.device.type == device.type and ours.device.type == device.type
    g_x, g_fc = (g.cpu() for g in torch.autograd.grad(ours, (x, loss_func.fc)))
    ours = ours.cpu()
    expected = ref.soft_triple_loss(x, fc, y, k, la=15.0, gamma=gamma, margin=0.05, tau=tau)
    e_x, e_fc = torch.autograd.grad(expected, (x, fc))

    assert _rel_err(ours, expected) < RTOL
    assert _rel_err(g_x, e_x) < RTOL
    assert _rel_err(g_fc, e_fc) < RTOL


def test_reference_gradients_are_right():
    # The reference's autograd gradients against finite differences, so it can anchor the parity tests.
    x, y = _inputs(batch=3, num_classes=3, dim=3, k=2, seed=5)
    fc = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ref.soft_triple_loss(a, b, y, 2, la=5.0), (x, fc))


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("gamma", [0.1, 0.01, 1e-3])
def test_matches_pml_with_tau_weighted_sparse_centers_regularizer(k, gamma, implementation, device):
    _skip_kernels_off_cpu(device, implementation)
    num_classes, dim = 6, 8
    x, y = _inputs(batch=16, num_classes=num_classes, dim=dim, k=k, seed=10 + k)
    x, y = x.detach().to(device).requires_grad_(True), y.to(device)
    ours = _ours(num_classes, dim, k, gamma=gamma)
    anchor = _pml(num_classes, dim, k, ours.fc.detach(), gamma=gamma, tau=0.2)

    value = ours(x, y)  # both losses were built on the CPU; both follow the embeddings' device
    g_x, g_fc = torch.autograd.grad(value, (x, ours.fc))
    expected = anchor(x, y)
    e_x, e_fc = torch.autograd.grad(expected, (x, anchor.fc))
    assert ours.fc.device == anchor.fc.device == x.device

    assert _rel_err(value, expected) < RTOL
    assert _rel_err(g_x, e_x) < RTOL
    assert _rel_err(g_fc, e_fc) < RTOL


@pytest.mark.parametrize("k", [1, 2, 4])
def test_large_scale_takes_the_max_shifted_softmax_and_still_matches(k, implementation):
    # la = 60: logits span more than float32's exponent range allows for a constant shift.
    num_classes, dim = 6, 8
    x, y = _inputs(batch=16, num_classes=num_classes, dim=dim, k=k, seed=20 + k)
    ours = SoftTripleLoss(num_classes, dim, centers_per_class=k, la=60.0, gamma=0.05)
    anchor = _pml(num_classes, dim, k, ours.fc.detach().double(), la=60.0, gamma=0.05)
    x32 = x.detach().float().requires_grad_(True)
    value = ours(x32, y)
    expected = anchor(x, y)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5)
    g32 = torch.autograd.grad(value, (x32, ours.fc))
    e64 = torch.autograd.grad(expected, (x, anchor.fc))
    assert all(_rel_err(a.double(), b) < 1e-4 for a, b in zip(g32, e64, strict=True))
    value64 = _ours(num_classes, dim, k, la=60.0, gamma=0.05)
    value64.fc.data.copy_(ours.fc.data.double())
    g = torch.autograd.grad(value64(x, y), (x, value64.fc))
    e = torch.autograd.grad(anchor(x, y), (x, anchor.fc))
    assert all(_rel_err(a, b) < RTOL for a, b in zip(g, e, strict=True))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_many_classes_code_path_matches_pml(k, implementation):
    # 2.56M centre weights: large enough for the centre-gradient GEMM to accumulate onto the radial part.
    num_classes, dim = 40_000 // k, 64
    x, y = _inputs(batch=8, num_classes=num_classes, dim=dim, k=k, seed=4)
    ours = _ours(num_classes, dim, k, tau=0.0)
    anchor = _pml(num_classes, dim, k, ours.fc.detach(), tau=0.0)
    g = torch.autograd.grad(ours(x, y), (x, ours.fc))
    e = torch.autograd.grad(anchor(x, y), (x, anchor.fc))
    assert all(_rel_err(a, b) < RTOL for a, b in zip(g, e, strict=True))


def test_regularizer_actually_contributes_tau_times_r():
    num_classes, dim, k = 5, 6, 3
    x, y = _inputs(batch=8, num_classes=num_classes, dim=dim, k=k)
    with_reg = _ours(num_classes, dim, k, tau=0.7)
    without = _ours(num_classes, dim, k, tau=0.0)
    without.fc.data.copy_(with_reg.fc.data)
    r = ref.center_regularizer(with_reg.fc.detach(), k)
    assert float(r) > 0.1
    torch.testing.assert_close(with_reg(x, y) - without(x, y), 0.7 * r, rtol=1e-9, atol=0)


def test_small_gamma_approaches_hard_triple():
    # 0 <= max_k s_k - S'_c <= gamma * log K, and the margin softmax is 2*la-Lipschitz in S'.
    num_classes, dim, k, la = 5, 4, 3, 20.0
    x, y = _inputs(batch=10, num_classes=num_classes, dim=dim, k=k, seed=3)
    for gamma in (1e-2, 1e-3, 1e-4):
        loss_func = _ours(num_classes, dim, k, gamma=gamma, tau=0.0, la=la)
        hard = ref.hard_triple_loss(x.detach(), loss_func.fc.detach(), y, k, la=la, margin=0.01)
        gap = abs(float(loss_func(x, y).detach()) - float(hard))
        assert gap <= 2 * la * gamma * math.log(k) + 1e-9


def test_k1_is_normalized_softmax():
    num_classes, dim = 5, 4
    x, y = _inputs(batch=10, num_classes=num_classes, dim=dim, k=1)
    loss_func = _ours(num_classes, dim, 1, la=10.0, margin=0.1)
    w = torch.nn.functional.normalize(loss_func.fc.detach(), dim=0)
    logits = 10.0 * (torch.nn.functional.normalize(x, dim=1) @ w)
    logits[torch.arange(10), y] -= 10.0 * 0.1
    expected = torch.nn.functional.cross_entropy(logits, y)
    torch.testing.assert_close(loss_func(x, y), expected, rtol=1e-12, atol=0)
    assert loss_func.weight_regularizer is None


def test_margin_has_the_right_sign():
    # A larger margin must raise the loss (it is subtracted from the true class similarity).
    x, y = _inputs(batch=8, num_classes=4, dim=5, k=2)
    small = _ours(4, 5, 2, margin=0.0, tau=0.0)
    large = _ours(4, 5, 2, margin=0.3, tau=0.0)
    large.fc.data.copy_(small.fc.data)
    assert float(large(x, y).detach()) > float(small(x, y).detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 5, 11])
def test_pml_convention_angle_embeddings_dtype_sweep(dtype, k):
    # PML's own test layout: 2-D unit embeddings at 0..179 degrees, 11 classes, every dtype, backward().
    num_classes, dim = 11, 2
    la, gamma = (1.0, 1.0) if dtype == torch.float16 else (20.0, 0.1)
    torch.manual_seed(k)
    labels = torch.randint(0, 10, (180,))
    embeddings = ref.angle_embeddings(dtype=dtype).requires_grad_(True)
    loss_func = SoftTripleLoss(num_classes, dim, centers_per_class=k, la=la, gamma=gamma)

    loss = loss_func(embeddings, labels)
    loss.backward()
    # PML's cast_types: fc now has the embeddings' dtype; the anchor starts from those (rounded) centres.
    anchor = _pml(num_classes, dim, k, loss_func.fc.detach().double(), la=la, gamma=gamma, tau=0.2)
    expected = anchor(embeddings.detach().double(), labels)

    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss_func.fc.dtype == dtype
    assert embeddings.grad is not None and embeddings.grad.dtype == dtype
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(loss_func.fc.grad).all()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_miner_weights_match_pml():
    num_classes, dim, k = 4, 6, 3
    x, y = _inputs(batch=12, num_classes=num_classes, dim=dim, k=k, seed=7)
    indices = miners.TripletMarginMiner(margin=0.5)(x.detach(), y)
    ours = _ours(num_classes, dim, k)
    anchor = _pml(num_classes, dim, k, ours.fc.detach())
    torch.testing.assert_close(ours(x, y, indices), anchor(x, y, indices), rtol=1e-10, atol=0)


def test_pml_reducers_and_sub_losses_work():
    x, y = _inputs(batch=12, num_classes=4, dim=6, k=3)
    loss_func = _ours(4, 6, 3, reducer=reducers.ThresholdReducer(low=0.0))
    assert loss_func.sub_loss_names() == ["loss", "weight_reg_loss"]
    assert torch.isfinite(loss_func(x, y))
    plain = _ours(4, 6, 3, reducer=reducers.DoNothingReducer())
    plain.fc.data.copy_(loss_func.fc.data)
    loss_dict = plain(x, y)
    assert loss_dict["loss"]["losses"].shape == (12,)
    torch.testing.assert_close(
        loss_dict["weight_reg_loss"]["losses"], 0.2 * ref.center_regularizer(plain.fc.detach(), 3)
    )


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_float32_and_keeps_parameter_dtype(half):
    loss_func = SoftTripleLoss(5, 8, centers_per_class=3)
    model = torch.nn.Linear(8, 8)
    x = torch.randn(16, 8)
    y = torch.randint(0, 5, (16,))
    with torch.autocast("cpu", dtype=half):
        embeddings = model(x)
        loss = loss_func(embeddings, y)
    assert embeddings.dtype == half  # autocast did run the model in half precision
    loss.backward()
    assert loss.dtype == torch.float32
    assert loss_func.fc.dtype == torch.float32 and loss_func.fc.grad.dtype == torch.float32
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
    expected = SoftTripleLoss(5, 8, centers_per_class=3)
    expected.load_state_dict(loss_func.state_dict())
    torch.testing.assert_close(loss, expected(embeddings.detach().float(), y), rtol=1e-6, atol=0)


def test_half_embeddings_outside_autocast_cast_the_centers_like_pml_and_compute_in_float32():
    loss_func = SoftTripleLoss(5, 8, centers_per_class=3)
    pml = pml_losses.SoftTripleLoss(5, 8, centers_per_class=3)
    before = loss_func.fc.detach().clone()
    x, y = torch.randn(16, 8).half(), torch.randint(0, 5, (16,))
    loss = loss_func(x, y)
    pml(x, y)
    assert loss_func.fc.dtype == pml.fc.dtype == torch.float16  # PML's cast_types, in place
    assert torch.equal(loss_func.fc.detach(), before.half())
    assert loss.dtype == torch.float32  # computed in float32 from the half-precision values
    expected = SoftTripleLoss(5, 8, centers_per_class=3)
    expected.fc.data.copy_(before.half().float())
    torch.testing.assert_close(loss, expected(x.float(), y), rtol=1e-6, atol=0)


def test_centers_follow_the_embeddings_dtype_both_ways():
    loss_func = SoftTripleLoss(5, 8, centers_per_class=2).double()
    assert loss_func(torch.randn(4, 8), torch.randint(0, 5, (4,))).dtype == torch.float32
    assert loss_func.fc.dtype == torch.float32
    value = loss_func(torch.randn(4, 8, dtype=torch.float64), torch.randint(0, 5, (4,)))
    assert value.dtype == loss_func.fc.dtype == torch.float64


def test_backward_twice_with_retain_graph_gives_the_same_gradients():
    x, y = _inputs()
    loss_func = _ours(4, 5, 3)
    loss = loss_func(x, y)
    first = torch.autograd.grad(loss, (x, loss_func.fc), retain_graph=True)
    second = torch.autograd.grad(loss, (x, loss_func.fc))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("k", [1, 3])
def test_fused_function_passes_gradcheck(k):
    x, y = _inputs(batch=5, num_classes=3, dim=4, k=k, seed=11)
    fc = torch.randn(4, 3 * k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: soft_triple_losses(a, b, y, k, la=5.0, gamma=0.3), (x, fc))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_scratch_buffers_do_not_leak_between_calls_copies_and_threads(k):
    import copy
    import pickle
    import threading

    torch.manual_seed(0)
    loss_func = SoftTripleLoss(6, 5, centers_per_class=k)
    batches = [(torch.randn(n, 5, requires_grad=True), torch.randint(0, 6, (n,))) for n in (7, 7, 3)]

    def grads(module, x, y):
        return torch.autograd.grad(module(x, y), (x, module.fc))

    fresh = [grads(copy.deepcopy(loss_func), x, y) for x, y in batches]  # each on an empty workspace
    reused = [grads(loss_func, x, y) for x, y in batches]  # one workspace, shapes change
    for a, b in zip(fresh, reused, strict=True):
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v)
    # Two forward passes before one backward (e.g. two views of a batch) share nothing they should not.
    (x1, y1), (x2, y2) = batches[0], batches[1]
    both = torch.autograd.grad(loss_func(x1, y1) + loss_func(x2, y2), (x1, x2, loss_func.fc))
    torch.testing.assert_close(both[2], fresh[0][1] + fresh[1][1])
    torch.testing.assert_close(both[0], fresh[0][0])
    # Threads get their own buffers; pickled and deep-copied losses start with none.
    results = {}

    def work(i):
        x, y = batches[i % 2]
        results[i] = grads(loss_func, x, y)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert all(torch.equal(u, v) for u, v in zip(results[i], fresh[i % 2], strict=True))
    clone = pickle.loads(pickle.dumps(loss_func))
    assert not clone._workspace._local.__dict__ and torch.equal(clone.fc, loss_func.fc)


def test_get_logits_get_centers_and_predictions():
    num_classes, dim, k = 4, 5, 3
    x, _ = _inputs(batch=6, num_classes=num_classes, dim=dim, k=k)
    loss_func = _ours(num_classes, dim, k, gamma=0.2)
    logits = loss_func.get_logits(x)
    assert logits.shape == (6, num_classes)
    centers = loss_func.get_centers()
    assert centers.shape == (num_classes, k, dim)
    torch.testing.assert_close(centers.norm(dim=2), torch.ones(num_classes, k, dtype=torch.float64))
    for i in range(6):
        xi = ref.unit(x[i].detach())
        for c in range(num_classes):
            expected = ref.relaxed_similarity(xi, list(centers[c]), 0.2)
            torch.testing.assert_close(logits[i, c].detach(), expected, rtol=1e-12, atol=1e-12)
    assert logits.requires_grad


def test_repr_shows_hyperparameters():
    text = str(SoftTripleLoss(100, 64))
    assert (
        "num_classes=100, embedding_size=64, centers_per_class=10, la=20.0, gamma=0.1, margin=0.01, tau=0.2"
        in text
    )
    assert (
        "(weight_regularizer): SparseCentersRegularizer(\n    num_classes=100, centers_per_class=10, eps=None"
        in text
    )


def test_recorded_attributes_are_the_real_values():
    loss_func = SoftTripleLoss(10, 64, gamma=0.05)
    assert loss_func.embedding_size == 64 and loss_func.gamma == 0.05 and loss_func.weight_reg_weight == 0.2
    assert set(loss_func._record_these) >= {"la", "gamma", "margin", "tau", "embedding_size"}
    loss_func.tau = 0.5  # one number, two names
    assert loss_func.weight_reg_weight == 0.5 and "tau=0.5" in str(loss_func)
    with pytest.raises(ValueError, match="tau must be >= 0"):
        loss_func.tau = -1.0


def test_state_dict_round_trip_and_pml_checkpoint_loads():
    x, y = _inputs(batch=8, num_classes=4, dim=5, k=3)
    anchor = pml_losses.SoftTripleLoss(4, 5, centers_per_class=3).double()
    ours = SoftTripleLoss(4, 5, centers_per_class=3, tau=0.0).double()
    ours.load_state_dict(anchor.state_dict())
    torch.testing.assert_close(ours(x, y), anchor(x, y), rtol=1e-12, atol=0)
    again = SoftTripleLoss(4, 5, centers_per_class=3, tau=0.0).double()
    again.load_state_dict(ours.state_dict())
    assert torch.equal(again.fc, ours.fc)


def test_seeded_construction_is_reproducible():
    torch.manual_seed(123)
    a = SoftTripleLoss(7, 5)
    torch.manual_seed(123)
    b = SoftTripleLoss(7, 5)
    assert torch.equal(a.fc, b.fc)


def test_custom_weight_regularizer_is_weighted_by_tau():
    x, y = _inputs(batch=8, num_classes=4, dim=5, k=3)
    loss_func = _ours(4, 5, 3, tau=0.5, weight_regularizer=PMLSparseCentersRegularizer(4, 3))
    expected = _ours(4, 5, 3, tau=0.5)
    expected.fc.data.copy_(loss_func.fc.data)
    torch.testing.assert_close(loss_func(x, y), expected(x, y), rtol=1e-10, atol=0)
    assert isinstance(expected.weight_regularizer, SparseCentersRegularizer)
