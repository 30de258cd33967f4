from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly_pcl import ProtoNCELoss, Prototypes, sample_negative_prototypes


def _prototypes(
    batch: int, dim: int, clusters: tuple[int, ...], seed: int = 0, dtype=torch.float64
) -> Prototypes:
    g = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.randint(0, k, (batch,), generator=g) for k in clusters])
    centroids = [F.normalize(torch.randn(k, dim, generator=g, dtype=dtype), dim=1) for k in clusters]
    phis = [0.05 + 0.3 * torch.rand(k, generator=g, dtype=dtype) for k in clusters]
    return Prototypes(labels, centroids, phis)


def _reference(q, k, bank, prototypes, negatives, temperature, mask_duplicates):
    """ProtoNCE written from the formula with explicit loops over samples, float64."""
    q = q / q.norm(dim=1, keepdim=True)
    k = k / k.norm(dim=1, keepdim=True)
    batch = q.shape[0]
    total = q.new_zeros(())
    for i in range(batch):
        pos = (q[i] * k[i]).sum() / temperature
        negs = [(q[i] * n).sum() / temperature for n in bank]
        instance = -(pos - torch.logsumexp(torch.stack([pos, *negs]), 0))
        proto = q.new_zeros(())
        for m, (centroids, phi) in enumerate(
            zip(prototypes.centroids, prototypes.concentrations, strict=True)
        ):
            labels = prototypes.labels[m].tolist()
            own = labels[i]
            terms = []
            for j, c in enumerate(labels):  # one column per sample's positive, as in the official code
                if mask_duplicates and j != i and c == own:
                    continue
                terms.append((q[i] * centroids[c]).sum() / phi[c])
            terms += [(q[i] * centroids[c]).sum() / phi[c] for c in negatives[m].tolist()]
            positive = (q[i] * centroids[own]).sum() / phi[own]
            proto = proto - (positive - torch.logsumexp(torch.stack(terms), 0))
        total = total + instance + proto / len(prototypes.centroids)
    return total / batch


def _negatives(seed: int, prototypes: Prototypes, r: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for m, centroids in enumerate(prototypes.centroids):
        excluded = torch.zeros(centroids.shape[0], dtype=torch.bool)
        excluded[prototypes.labels[m]] = True
        out.append(sample_negative_prototypes(excluded, r, g))
    return out


class TestProtoNCELoss:
    @pytest.mark.parametrize("temperature", [0.2, 0.5])
    @pytest.mark.parametrize("mask_duplicates", [True, False])
    @pytest.mark.parametrize("clusters,r", [((5,), 2), ((6, 9, 12), 4), ((7, 10), 50)])
    def test_matches_float64_reference_values_and_gradients(self, temperature, mask_duplicates, clusters, r):
        batch, dim, bank_size, seed = 6, 5, 7, 3
        torch.manual_seed(1)
        criterion = ProtoNCELoss(
            temperature=temperature,
            memory_bank_size=(bank_size, dim),
            num_negative_prototypes=r,
            mask_duplicate_positives=mask_duplicates,
            seed=seed,
        ).double()
        prototypes = _prototypes(batch, dim, clusters, seed=2)
        q = torch.randn(batch, dim, dtype=torch.float64, requires_grad=True)
        k = torch.randn(batch, dim, dtype=torch.float64, requires_grad=True)
        bank = criterion.memory_bank.bank.clone()
        loss = criterion(q, k, prototypes)
        grad_q, grad_k = torch.autograd.grad(loss, (q, k))

        q_ref = q.detach().clone().requires_grad_()
        k_ref = k.detach().clone().requires_grad_()
        expected = _reference(
            q_ref, k_ref, bank, prototypes, _negatives(seed, prototypes, r), temperature, mask_duplicates
        )
        ref_q, ref_k = torch.autograd.grad(expected, (q_ref, k_ref))
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad_q, ref_q, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad_k, ref_k, rtol=1e-10, atol=1e-12)

    @pytest.mark.parametrize("temperature", [0.1, 0.2, 0.5])
    @pytest.mark.parametrize("bank_size", [8, 16, 64])  # 8: a batch of 12 is larger than the bank
    def test_instance_term_equals_lightly_ntxent_with_memory_bank(self, temperature, bank_size):
        dim = 8
        torch.manual_seed(0)
        ours = ProtoNCELoss(temperature=temperature, memory_bank_size=(bank_size, dim))
        torch.manual_seed(0)
        anchor = NTXentLoss(temperature=temperature, memory_bank_size=(bank_size, dim))
        torch.testing.assert_close(ours.memory_bank.bank, anchor.memory_bank.bank)
        for step in range(5):  # several steps: the bank fills and wraps around identically
            q = torch.randn(12, dim, requires_grad=True)
            k = torch.randn(12, dim)
            loss = ours(q, k)
            grad = torch.autograd.grad(loss, q)[0]
            q2 = q.detach().clone().requires_grad_()
            expected = anchor(q2, k)
            expected_grad = torch.autograd.grad(expected, q2)[0]
            assert abs(loss.item() - expected.item()) < 1e-6, step
            torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
            torch.testing.assert_close(ours.memory_bank.bank, anchor.memory_bank.bank, rtol=0, atol=0)

    def test_forward_is_instance_plus_prototype_term(self):
        torch.manual_seed(0)
        criterion = ProtoNCELoss(memory_bank_size=(10, 4), num_negative_prototypes=3, seed=5)
        prototypes = _prototypes(5, 4, (6, 8), dtype=torch.float32)
        q, k = torch.randn(5, 4), torch.randn(5, 4)
        state = criterion.state_dict()
        total = criterion(q, k, prototypes)
        criterion.load_state_dict(state)
        parts = criterion.instance_term(q, k) + criterion.prototype_term(q, prototypes)
        torch.testing.assert_close(total, parts)
        assert criterion(q, k).item() == pytest.approx(criterion.instance_term(q, k).item(), abs=1e-6)

    def test_closed_form_single_prototype_pair(self):
        # One sample, K=2, r=1: the prototype term is -log softmax([q.c0/phi0, q.c1/phi1])[0].
        criterion = ProtoNCELoss(memory_bank_size=(3, 2), num_negative_prototypes=1)
        q = torch.tensor([[1.0, 0.0]])
        centroids = torch.tensor([[math.cos(0.3), math.sin(0.3)], [0.0, 1.0]])
        phi = torch.tensor([0.5, 0.4])
        term = criterion.prototype_term(q, Prototypes(torch.tensor([[0]]), [centroids], [phi]))
        a, b = math.cos(0.3) / 0.5, 0.0 / 0.4
        assert term.item() == pytest.approx(-(a - math.log(math.exp(a) + math.exp(b))), abs=1e-6)

    def test_smaller_concentration_of_the_positive_sharpens_the_term(self):
        criterion = ProtoNCELoss(memory_bank_size=(3, 2), num_negative_prototypes=1)
        q = torch.tensor([[1.0, 0.0]])
        centroids = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
        loose = criterion.prototype_term(
            q, Prototypes(torch.tensor([[0]]), [centroids], [torch.tensor([0.5, 0.5])])
        )
        tight = criterion.prototype_term(
            q, Prototypes(torch.tensor([[0]]), [centroids], [torch.tensor([0.1, 0.5])])
        )
        assert tight < loose

    def test_gradient_step_pulls_the_query_towards_its_prototype(self):
        torch.manual_seed(0)
        criterion = ProtoNCELoss(memory_bank_size=(4, 6), num_negative_prototypes=5)
        prototypes = _prototypes(8, 6, (10,), dtype=torch.float32)
        q = torch.randn(8, 6, requires_grad=True)
        own = prototypes.centroids[0][prototypes.labels[0]]
        before = F.cosine_similarity(q, own).mean()
        loss = criterion.prototype_term(q, prototypes)
        (grad,) = torch.autograd.grad(loss, q)
        after = F.cosine_similarity(q - 0.5 * grad, own).mean()
        assert after > before

    def test_masking_duplicates_lowers_the_loss_only_when_a_cluster_repeats(self):
        centroids = [F.normalize(torch.randn(6, 4), dim=1)]
        phi = [torch.full((6,), 0.2)]
        q = torch.randn(3, 4)
        masked = ProtoNCELoss(memory_bank_size=(2, 4), num_negative_prototypes=2, seed=1)
        official = ProtoNCELoss(
            memory_bank_size=(2, 4), num_negative_prototypes=2, seed=1, mask_duplicate_positives=False
        )
        distinct = Prototypes(torch.tensor([[0, 1, 2]]), centroids, phi)
        assert masked.prototype_term(q, distinct).item() == pytest.approx(
            official.prototype_term(q, distinct).item()
        )
        repeated = Prototypes(torch.tensor([[0, 0, 2]]), centroids, phi)
        assert masked.prototype_term(q, repeated) < official.prototype_term(q, repeated)

    def test_gather_distributed_is_a_no_op_in_one_process(self):
        torch.manual_seed(0)
        a = ProtoNCELoss(memory_bank_size=(8, 4), num_negative_prototypes=3, gather_distributed=True)
        torch.manual_seed(0)
        b = ProtoNCELoss(memory_bank_size=(8, 4), num_negative_prototypes=3)
        prototypes = _prototypes(5, 4, (7, 9), dtype=torch.float32)
        q, k = torch.randn(5, 4), torch.randn(5, 4)
        torch.testing.assert_close(a(q, k, prototypes), b(q, k, prototypes))

    def test_state_dict_carries_memory_bank_and_sampler(self):
        torch.manual_seed(0)
        a = ProtoNCELoss(memory_bank_size=(8, 4), num_negative_prototypes=2)
        prototypes = _prototypes(3, 4, (9,), dtype=torch.float32)
        a(torch.randn(3, 4, requires_grad=True), torch.randn(3, 4), prototypes)  # advance bank and generator
        torch.manual_seed(123)
        b = ProtoNCELoss(memory_bank_size=(8, 4), num_negative_prototypes=2)
        assert not torch.equal(a.memory_bank.bank, b.memory_bank.bank)
        b.load_state_dict(a.state_dict())
        q, k = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)
        torch.testing.assert_close(a(q, k, prototypes), b(q, k, prototypes), rtol=0, atol=0)
        torch.testing.assert_close(a.memory_bank.bank, b.memory_bank.bank, rtol=0, atol=0)

    def test_bfloat16_autocast_gives_a_finite_loss(self):
        criterion = ProtoNCELoss(memory_bank_size=(8, 4), num_negative_prototypes=3)
        prototypes = _prototypes(4, 4, (6,), dtype=torch.float32)
        layer = torch.nn.Linear(4, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q = layer(torch.randn(4, 4))
            loss = criterion(q, torch.randn(4, 4), prototypes)
        loss.backward()
        assert torch.isfinite(loss)
        assert layer.weight.dtype == torch.float32 and criterion.memory_bank.bank.dtype == torch.float32

    def test_repr_shows_hyperparameters(self):
        text = str(
            ProtoNCELoss(temperature=0.3, memory_bank_size=(32, 16), num_negative_prototypes=7, seed=4)
        )
        assert "temperature=0.3" in text and "memory_bank_size=(32, 16)" in text
        assert "num_negative_prototypes=7" in text and "seed=4" in text

    @pytest.mark.parametrize(
        "kwargs,match",
        [
            ({"temperature": 0.0}, "temperature"),
            ({"memory_bank_size": 0}, "memory_bank_size"),
            ({"memory_bank_size": (16,)}, "memory_bank_size"),
            ({"memory_bank_size": (0, 8)}, "memory_bank_size"),
            ({"num_negative_prototypes": -1}, "num_negative_prototypes"),
        ],
    )
    def test_rejects_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            ProtoNCELoss(**kwargs)

    def test_rejects_bad_inputs(self):
        criterion = ProtoNCELoss(memory_bank_size=(8, 4))
        good = _prototypes(3, 4, (5,), dtype=torch.float32)
        q = torch.randn(3, 4)
        with pytest.raises(ValueError, match="out0 and out1"):
            criterion(q, torch.randn(2, 4))
        with pytest.raises(ValueError, match="memory_bank_size expects dim 4"):
            criterion(torch.randn(3, 5), torch.randn(3, 5))
        with pytest.raises(ValueError, match="labels must be an integer tensor of shape"):
            criterion.prototype_term(q, good._replace(labels=good.labels[:, :2]))
        with pytest.raises(ValueError, match=r"labels\[0\] must lie in \[0, 5\)"):
            criterion.prototype_term(q, good._replace(labels=torch.tensor([[0, 1, 5]])))
        with pytest.raises(ValueError, match=r"centroids\[0\] must have shape"):
            criterion.prototype_term(q, good._replace(centroids=[torch.randn(5, 3)]))
        with pytest.raises(ValueError, match=r"concentrations\[0\] must have shape"):
            criterion.prototype_term(q, good._replace(concentrations=[torch.ones(4)]))
        with pytest.raises(ValueError, match="same non-zero number"):
            criterion.prototype_term(q, good._replace(concentrations=[]))
