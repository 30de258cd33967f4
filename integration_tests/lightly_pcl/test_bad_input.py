"""Bad and edge-case input to lightly_pcl (docs/reliability.md): one table.

Each case is a call and what must come of it: a clear error (exception type and a fragment of the message
naming the argument) or a handled result (a check on what the call returned, ``True`` when it holds).
Covered: ``ProtoNCELoss`` (embeddings, prototypes, the memory bank and the sampler's generator as state,
``validate_args``), ``PrototypeClustering`` (indices, features, its buffers as state), ``PCL`` (backbone
features, image dtypes), ``kmeans`` and ``concentration``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly_pcl import PCL, ProtoNCELoss, PrototypeClustering, Prototypes, concentration, kmeans

from integration_tests.helpers.bad_input import Handled, Raises, check_outcome
from integration_tests.lightly_pcl.toy import IMAGE, blobs, tiny_backbone, tiny_pcl

B, D, K = 4, 8, 6
NAN, INF = float("nan"), float("inf")


def _loss(**kwargs: Any) -> ProtoNCELoss:
    torch.manual_seed(0)
    return ProtoNCELoss(memory_bank_size=(16, D), num_negative_prototypes=3, **kwargs)


def _emb(batch: int = B, seed: int = 1, **kwargs: Any) -> torch.Tensor:
    return torch.randn(batch, D, generator=torch.Generator().manual_seed(seed), **kwargs)


def _query(batch: int = B) -> torch.Tensor:
    return _emb(batch).requires_grad_()


def _with(value: float, row: int = 1, seed: int = 1) -> torch.Tensor:
    x = _emb(seed=seed)
    x[row, 2] = value
    return x


def _prototypes(batch: int = B, **replace: Any) -> Prototypes:
    g = torch.Generator().manual_seed(2)
    good = Prototypes(
        labels=torch.randint(0, K, (2, batch), generator=g),
        centroids=[F.normalize(torch.randn(K, D, generator=g), dim=1) for _ in range(2)],
        concentrations=[0.1 + 0.2 * torch.rand(K, generator=g) for _ in range(2)],
        temperature=None,
    )
    return good._replace(**replace)


def _state(loss: ProtoNCELoss) -> list[torch.Tensor]:
    bank = loss.memory_bank
    return [bank.bank.clone(), bank.bank_ptr.clone(), loss.generator.get_state()]


def _unchanged(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) and all(
        bool(torch.isfinite(t).all()) for t in after[:2]
    )


def _rejected_batch_leaves_state(
    out0: torch.Tensor, out1: torch.Tensor, prototypes: Prototypes | None
) -> bool:
    """The call raises ValueError, and the bank, its pointer and the generator are as before."""
    loss = _loss()
    loss(_query(), _emb(seed=5), _prototypes())  # some history
    before = _state(loss)
    with pytest.raises(ValueError, match=r"non-finite|positive and finite"):
        loss(out0, out1, prototypes)
    return _unchanged(before, _state(loss))


def _batch_of_one() -> bool:
    ours = _loss()
    torch.manual_seed(0)
    anchor = NTXentLoss(temperature=0.2, memory_bank_size=(16, D))
    q, k = _query(1), _emb(1, seed=3)
    instance = ours(q, k)
    with_prototypes = ours(q, k, _prototypes(1))
    return bool(torch.allclose(instance, anchor(q, k), atol=1e-6)) and bool(torch.isfinite(with_prototypes))


def _float64_is_cast_like_lightly() -> bool:
    loss = _loss()
    value = loss(_query().double(), _emb(seed=3).double(), _prototypes())
    return value.dtype == torch.float64 and bool(torch.isfinite(value))


def _unchecked_nan_is_masked() -> bool:
    """validate_args=False: the NaN comes back as the loss, the bank and its pointer stay as they were."""
    loss = _loss(validate_args=False)
    loss(_query(), _emb(seed=5))
    bank, ptr = loss.memory_bank.bank.clone(), loss.memory_bank.bank_ptr.clone()
    value = loss(_query(), _with(NAN), _prototypes())
    return (
        bool(torch.isnan(value))
        and torch.equal(loss.memory_bank.bank, bank)
        and torch.equal(loss.memory_bank.bank_ptr, ptr)
    )


def _unchecked_finite_is_the_checked_value() -> bool:
    checked, unchecked = _loss(), _loss(validate_args=False)
    q, k, p = _query(), _emb(seed=3), _prototypes()
    same = torch.allclose(checked(q, k, p), unchecked(q, k, p), rtol=0, atol=0)
    return same and torch.equal(checked.memory_bank.bank, unchecked.memory_bank.bank)


def _step_on_nan_input_never_writes_parameters() -> bool:
    """A step attempted on a NaN image: rejected before backward, the parameters finite and unchanged."""
    model = tiny_pcl(0)
    loss = ProtoNCELoss(memory_bank_size=(16, 8), num_negative_prototypes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(B, *IMAGE)
    x[0, 0, 0, 0] = NAN
    with pytest.raises(ValueError, match="out0 contains non-finite"):
        optimizer.zero_grad()
        loss(model(x), model.forward_momentum(torch.randn(B, *IMAGE)), _prototypes())
        optimizer.step()
    after = list(model.parameters())
    return all(
        torch.equal(a, b) and bool(torch.isfinite(b).all()) for a, b in zip(before, after, strict=True)
    )


def _grad_scaler_skips_an_unchecked_nan() -> bool:
    """validate_args=False: the NaN reaches the gradient, GradScaler skips the step, nothing is written."""
    model = tiny_pcl(0)
    loss = ProtoNCELoss(memory_bank_size=(16, 8), num_negative_prototypes=3, validate_args=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().clone() for p in model.parameters()]
    bank = loss.memory_bank.bank.clone()
    x = torch.randn(B, *IMAGE)
    x[0, 0, 0, 0] = NAN
    value = loss(model(x), model.forward_momentum(torch.randn(B, *IMAGE)))
    scaler.scale(value).backward()
    scaler.step(optimizer)
    scaler.update()
    after = list(model.parameters())
    return (
        bool(torch.isnan(value))
        and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        and torch.equal(loss.memory_bank.bank, bank)
    )


def _fitted() -> PrototypeClustering:
    clustering = PrototypeClustering(
        num_clusters=(3, 5), num_redo=1, min_points_per_centroid=1, backend="torch", progress=False
    )
    return clustering.fit(blobs(num_per_blob=10, num_blobs=3, dim=D), epoch=3)


def _rejected_features_leave_the_clustering() -> bool:
    clustering = _fitted()
    before = {k: v.clone() for k, v in clustering.state_dict().items()}
    features = blobs(num_per_blob=10, num_blobs=3, dim=D)
    features[4, 0] = INF
    with pytest.raises(ValueError, match="features contains non-finite"):
        clustering.fit(features, epoch=4)
    after = clustering.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _unchecked_lookup_is_the_checked_one() -> bool:
    checked = _fitted()
    unchecked = _fitted()
    unchecked.validate_args = False
    indices = torch.tensor([0, 29, 7])
    return torch.equal(checked(indices).labels, unchecked(indices).labels)


CASES: list[tuple[str, Callable[[], Any], Raises | Handled]] = [
    # ---- ProtoNCELoss: embeddings
    (
        "empty_batch",
        lambda: _loss()(_emb(0), _emb(0)),
        Raises(ValueError, r"out0 is an empty batch, shape \(0, 8\)"),
    ),
    ("batch_of_one", _batch_of_one, Handled(bool, "NTXentLoss's value; a finite prototype term")),
    ("nan_query", lambda: _loss()(_with(NAN), _emb()), Raises(ValueError, "out0 contains non-finite")),
    ("inf_key", lambda: _loss()(_emb(), _with(INF)), Raises(ValueError, "out1 contains non-finite")),
    ("neg_inf_query", lambda: _loss()(_with(-INF), _emb()), Raises(ValueError, "out0 contains non-finite")),
    (
        "wrong_rank",
        lambda: _loss()(torch.randn(D), torch.randn(D)),
        Raises(ValueError, r"out0 must have shape \(batch_size, 8\).*got \(8,\)"),
    ),
    (
        "wrong_feature_size",
        lambda: _loss()(torch.randn(B, 5), torch.randn(B, 5)),
        Raises(ValueError, r"memory_bank_size expects dim 8\), got \(4, 5\)"),
    ),
    (
        "mismatched_lengths",
        lambda: _loss()(_emb(4), _emb(3)),
        Raises(ValueError, r"out0 and out1 must both have shape .* got \(4, 8\) and \(3, 8\)"),
    ),
    (
        "integer_embeddings",
        lambda: _loss()(torch.ones(B, D, dtype=torch.long), _emb()),
        Raises(TypeError, "out0 must be a floating tensor of embeddings, got dtype torch.int64"),
    ),
    (
        "float64_embeddings",
        _float64_is_cast_like_lightly,
        Handled(bool, "cast like NTXentLoss, float64 loss"),
    ),
    # ---- ProtoNCELoss: prototypes
    (
        "concentrations_all_zero",
        lambda: _loss()(_emb(), _emb(), _prototypes(concentrations=[torch.zeros(K), torch.zeros(K)])),
        Raises(ValueError, r"concentrations\[0\] must be positive and finite"),
    ),
    (
        "concentrations_nan",
        lambda: _loss()(_emb(), _emb(), _prototypes(concentrations=[torch.ones(K), torch.full((K,), NAN)])),
        Raises(ValueError, r"concentrations\[1\] must be positive and finite"),
    ),
    (
        "centroids_inf",
        lambda: _loss()(_emb(), _emb(), _prototypes(centroids=[torch.full((K, D), INF), torch.ones(K, D)])),
        Raises(ValueError, r"centroids\[0\] contains non-finite"),
    ),
    (
        "labels_out_of_range",
        lambda: _loss()(_emb(), _emb(), _prototypes(labels=torch.tensor([[0, 1, 6, 2], [0, 0, 0, 0]]))),
        Raises(ValueError, r"labels\[0\] must lie in \[0, 6\), got 6"),
    ),
    (
        "labels_negative",
        lambda: _loss()(_emb(), _emb(), _prototypes(labels=torch.tensor([[0, 1, 2, 3], [0, -1, 0, 0]]))),
        Raises(ValueError, r"labels\[1\] must lie in \[0, 6\), got -1"),
    ),
    (
        "labels_float",
        lambda: _loss()(_emb(), _emb(), _prototypes(labels=torch.zeros(2, B))),
        Raises(
            TypeError, "prototypes.labels must be an integer tensor of cluster indices, got torch.float32"
        ),
    ),
    (
        "labels_one_short",
        lambda: _loss()(_emb(), _emb(), _prototypes(batch=B - 1)),
        Raises(ValueError, r"shape \(M, batch_size\) = \(2, 4\), got dtype torch.int64 and shape \(2, 3\)"),
    ),
    (
        "no_clusterings",
        lambda: _loss()(_emb(), _emb(), _prototypes(centroids=[], concentrations=[])),
        Raises(ValueError, "same non-zero number of centroids and concentrations, got 0 and 0"),
    ),
    (
        "two_temperatures",
        lambda: _loss()(_emb(), _emb(), _prototypes(temperature=0.1)),
        Raises(ValueError, r"rescaled to mean 0.1 but the instance temperature is 0.2; PCL has one"),
    ),
    # ---- ProtoNCELoss: state and validate_args
    (
        "state_after_rejected_nan_key",
        lambda: _rejected_batch_leaves_state(_query(), _with(NAN), _prototypes()),
        Handled(bool, "bank, pointer and generator unchanged"),
    ),
    (
        "state_after_rejected_zero_concentrations",
        lambda: _rejected_batch_leaves_state(
            _query(), _emb(), _prototypes(concentrations=[torch.zeros(K), torch.zeros(K)])
        ),
        Handled(bool, "bank, pointer and generator unchanged"),
    ),
    (
        "step_on_nan_input",
        _step_on_nan_input_never_writes_parameters,
        Handled(bool, "rejected before the step; parameters finite and unchanged"),
    ),
    ("unchecked_nan_key_masked", _unchecked_nan_is_masked, Handled(bool, "NaN returned, bank unchanged")),
    ("unchecked_finite_same", _unchecked_finite_is_the_checked_value, Handled(bool, "the checked value")),
    (
        "unchecked_nan_grad_scaler",
        _grad_scaler_skips_an_unchecked_nan,
        Handled(bool, "a NaN loss, the step skipped, parameters and bank unchanged"),
    ),
    # ---- PrototypeClustering
    (
        "index_minus_one",
        lambda: _fitted()(torch.tensor([3, -1, 5])),
        Raises(ValueError, r"indices must lie in \[0, 30\) .*got -1: negative dataset index"),
    ),
    (
        "index_past_the_dataset",
        lambda: _fitted()(torch.tensor([3, 30])),
        Raises(ValueError, r"got 30: the clustering is older than the dataset"),
    ),
    (
        "float_indices",
        lambda: _fitted()(torch.tensor([1.0, 2.0])),
        Raises(TypeError, "indices must be an integer tensor of dataset indices, got dtype torch.float32"),
    ),
    (
        "indices_wrong_rank",
        lambda: _fitted()(torch.tensor([[1, 2]])),
        Raises(ValueError, r"indices must be a 1-D integer tensor .* got shape \(1, 2\)"),
    ),
    (
        "lookup_before_estep",
        lambda: PrototypeClustering((2,))(torch.tensor([0])),
        Raises(RuntimeError, "run update"),
    ),
    (
        "empty_index_batch",
        lambda: _fitted()(torch.tensor([], dtype=torch.long)).labels.shape,
        Handled(lambda shape: shape == (2, 0), "an empty lookup of shape (M, 0)"),
    ),
    (
        "features_nan_state",
        _rejected_features_leave_the_clustering,
        Handled(bool, "ValueError, buffers unchanged"),
    ),
    (
        "features_integer",
        lambda: _fitted().fit(torch.ones(30, D, dtype=torch.long)),
        Raises(TypeError, "features must be a floating tensor, got torch.int64"),
    ),
    (
        "more_clusters_than_samples",
        lambda: _fitted().fit(torch.randn(4, D)),
        Raises(ValueError, r"more clusters than the 4 samples"),
    ),
    ("unchecked_lookup_same", _unchecked_lookup_is_the_checked_one, Handled(bool, "the checked lookup")),
    # ---- PCL, kmeans, concentration
    (
        "input_dim_not_the_backbones",
        lambda: PCL(tiny_backbone(), input_dim=32, hidden_dim=16, output_dim=8)(torch.randn(2, *IMAGE)),
        Raises(
            ValueError, r"returns features of dim 16 .* but input_dim=32; build PCL\(backbone, input_dim=16"
        ),
    ),
    (
        "input_dim_not_the_backbones_momentum",
        lambda: PCL(tiny_backbone(), input_dim=4).forward_momentum(torch.randn(2, *IMAGE)),
        Raises(ValueError, r"returns features of dim 16 .* but input_dim=4"),
    ),
    (
        "float64_images",
        lambda: tiny_pcl()(torch.randn(2, *IMAGE, dtype=torch.float64)),
        Raises(TypeError, r"x has dtype torch.float64 but the parameters are torch.float32; .*model.to"),
    ),
    (
        "uint8_images",
        lambda: tiny_pcl()(torch.zeros(2, *IMAGE, dtype=torch.uint8)),
        Raises(TypeError, "x must be a floating tensor of images, got dtype torch.uint8"),
    ),
    (
        "kmeans_nan",
        lambda: kmeans(torch.full((6, 2), NAN), 2),
        Raises(ValueError, "x contains non-finite values"),
    ),
    (
        "concentration_negative_distance",
        lambda: concentration(torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0, 0, 1]), 2),
        Raises(ValueError, "distances must be non-negative"),
    ),
    (
        "concentration_nan_distance",
        lambda: concentration(torch.tensor([0.1, NAN, 0.3]), torch.tensor([0, 0, 1]), 2),
        Raises(ValueError, "distances contains non-finite values"),
    ),
    (
        "concentration_label_out_of_range",
        lambda: concentration(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 2, 1]), 2),
        Raises(ValueError, r"assignments must lie in \[0, 2\)"),
    ),
]


@pytest.mark.parametrize(("call", "expected"), [pytest.param(c, e, id=i) for i, c, e in CASES])
def test_bad_input(call: Callable[[], Any], expected: Raises | Handled) -> None:
    check_outcome(call, expected)


def test_the_table_covers_the_policy() -> None:
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids)) >= 25
    raises = sum(isinstance(e, Raises) for _, _, e in CASES)
    assert raises >= 20 and len(CASES) - raises >= 5
