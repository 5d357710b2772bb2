"""Weighted kNN against a brute-force reference written from the formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from isif.evaluate import knn_accuracy, knn_predict, knn_scores


def ref_scores(q, bank, labels, c, k, sigma):
    """For each query: sort the bank by similarity (ties: lower index first), take k, vote exp(s/sigma)."""
    out = torch.zeros(q.shape[0], c, dtype=torch.float64)
    for i in range(q.shape[0]):
        sims = [float(q[i].double() @ bank[j].double()) for j in range(bank.shape[0])]
        order = sorted(range(len(sims)), key=lambda j: (-sims[j], j))[:k]
        for j in order:
            out[i, int(labels[j])] += math.exp(sims[j] / sigma)
    return out / out.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("k", [1, 7, 50])
def test_matches_brute_force_on_random_features(k):
    g = torch.Generator().manual_seed(k)
    bank = F.normalize(torch.randn(60, 8, generator=g, dtype=torch.float64), dim=1)
    q = F.normalize(torch.randn(13, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 4, (60,), generator=g)
    got = knn_scores(q, bank, labels, 4, k=k, sigma=0.1, chunk_size=5)
    ref = ref_scores(q, bank, labels, 4, k, 0.1)
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)
    assert torch.equal(knn_predict(q, bank, labels, 4, k=k, sigma=0.1, chunk_size=5), ref.argmax(1))


def test_ties_at_the_kth_neighbour_take_lower_bank_indices():
    # integer vectors: every dot product is exact, so ties are exact
    g = torch.Generator().manual_seed(0)
    bank = torch.randint(-1, 2, (40, 4), generator=g).double()
    q = torch.randint(-1, 2, (25, 4), generator=g).double()
    labels = torch.randint(0, 3, (40,), generator=g)
    for k in (1, 3, 10, 17):
        got = knn_scores(q, bank, labels, 3, k=k, sigma=1.0, chunk_size=7)
        ref = ref_scores(q, bank, labels, 3, k, 1.0)
        assert torch.allclose(got, ref, rtol=1e-12, atol=0), k
    # the tie rule matters: with only the lower-index tied neighbour taken, its label wins
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([2, 0, 1])
    assert knn_predict(torch.tensor([[1.0, 0.0]]), bank, labels, 3, k=1, sigma=0.1).item() == 2


def test_vote_ties_go_to_the_lowest_class():
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([3, 1])
    assert knn_predict(torch.tensor([[1.0, 0.0]]), bank, labels, 4, k=2, sigma=0.1).item() == 1


def test_k_larger_than_bank_uses_the_whole_bank():
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1)
    q = F.normalize(torch.randn(4, 5, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 3, (9,), generator=g)
    got = knn_scores(q, bank, labels, 3, k=200, sigma=0.1)
    assert torch.allclose(got, ref_scores(q, bank, labels, 3, 9, 0.1), rtol=1e-12, atol=0)


def test_sigma_weights_close_neighbours_more():
    # one close neighbour of class 0 against two farther ones of class 1
    bank = F.normalize(torch.tensor([[1.0, 0.05], [1.0, 0.6], [1.0, -0.6]]), dim=1)
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    assert knn_predict(q, bank, labels, 2, k=3, sigma=0.01).item() == 0  # sharp: the closest decides
    assert knn_predict(q, bank, labels, 2, k=3, sigma=10.0).item() == 1  # flat: the majority decides


def test_accuracy_and_chunking_do_not_change_results():
    g = torch.Generator().manual_seed(2)
    centers = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    labels = torch.randint(0, 5, (300,), generator=g)
    bank = F.normalize(centers[labels] + 0.3 * torch.randn(300, 16, generator=g), dim=1)
    ql = torch.randint(0, 5, (100,), generator=g)
    q = F.normalize(centers[ql] + 0.3 * torch.randn(100, 16, generator=g), dim=1)
    a = knn_accuracy(q, ql, bank, labels, 5, k=20, sigma=0.1, chunk_size=1)
    b = knn_accuracy(q, ql, bank, labels, 5, k=20, sigma=0.1, chunk_size=1000)
    assert a == b and a > 90.0


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        knn_scores(torch.zeros(2, 3), torch.zeros(4, 5), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError):
        knn_scores(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), 2)
    with pytest.raises(ValueError):
        knn_scores(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), 2, k=0)
