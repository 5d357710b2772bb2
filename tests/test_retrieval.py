"""Retrieval metrics against brute-force references written from their definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from isif.evaluate.retrieval import map_at_r, nmi, normalized_mutual_information, recall_at_k


def ranking(x, i):
    """Other items, by similarity to item i descending; ties by lower index."""
    sims = [(float(x[i].double() @ x[j].double()), j) for j in range(x.shape[0]) if j != i]
    return [j for s, j in sorted(sims, key=lambda t: (-t[0], t[1]))]


def ref_recall(x, y, ks):
    out = {}
    for k in ks:
        hit = sum(any(int(y[j]) == int(y[i]) for j in ranking(x, i)[:k]) for i in range(x.shape[0]))
        out[k] = 100.0 * hit / x.shape[0]
    return out


def ref_map_at_r(x, y):
    aps = []
    for i in range(x.shape[0]):
        r = sum(int(y[j]) == int(y[i]) for j in range(x.shape[0]) if j != i)
        if r == 0:
            continue
        rel = [int(y[j]) == int(y[i]) for j in ranking(x, i)[:r]]
        aps.append(sum(sum(rel[: m + 1]) / (m + 1) for m in range(r) if rel[m]) / r)
    return 100.0 * sum(aps) / len(aps)


def ref_nmi(a, b):
    n = len(a)
    ca, cb = {}, {}
    joint = {}
    for u, v in zip(a, b, strict=True):
        ca[u] = ca.get(u, 0) + 1
        cb[v] = cb.get(v, 0) + 1
        joint[(u, v)] = joint.get((u, v), 0) + 1
    mi = sum(c / n * math.log((c / n) / (ca[u] / n * cb[v] / n)) for (u, v), c in joint.items())
    ha = -sum(c / n * math.log(c / n) for c in ca.values())
    hb = -sum(c / n * math.log(c / n) for c in cb.values())
    return mi / ((ha + hb) / 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_recall_and_map_match_brute_force_on_random_data(seed):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(40, 6, generator=g), dim=1)
    y = torch.randint(0, 7, (40,), generator=g)
    y[0] = 99  # a class of one image: never a hit, left out of MAP@R
    got = recall_at_k(x, y, (1, 2, 4, 8), chunk_size=7)
    ref = ref_recall(x, y, (1, 2, 4, 8))
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-9)
    assert map_at_r(x, y, chunk_size=9) == pytest.approx(ref_map_at_r(x, y), abs=1e-5)


def test_ties_rank_lower_index_first():
    # integer vectors: exact ties everywhere
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-1, 2, (30, 3), generator=g).float()
    y = torch.randint(0, 4, (30,), generator=g)
    got = recall_at_k(x, y, (1, 3, 10), chunk_size=4)
    ref = ref_recall(x, y, (1, 3, 10))
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-9)
    assert map_at_r(x, y, chunk_size=4) == pytest.approx(ref_map_at_r(x, y), abs=1e-5)
    # the tie rule decides: query 0 ties with items 1 (other class) and 2 (same class)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert recall_at_k(x, torch.tensor([0, 1, 0]), (1,))[1] == pytest.approx(100 / 3)


def test_perfect_and_k_larger_than_set():
    x = F.normalize(torch.eye(4).repeat_interleave(3, 0) + 0.01 * torch.randn(12, 4), dim=1)
    y = torch.arange(4).repeat_interleave(3)
    assert recall_at_k(x, y, (1, 100)) == {1: 100.0, 100: 100.0}
    assert map_at_r(x, y) == pytest.approx(100.0)


def test_nmi_matches_reference_and_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (200,), generator=g)
    b = torch.randint(0, 4, (200,), generator=g)
    assert normalized_mutual_information(a, b) == pytest.approx(ref_nmi(a.tolist(), b.tolist()), abs=1e-12)
    assert normalized_mutual_information(a, (a + 3) * 7) == pytest.approx(1.0)  # a renaming
    x = F.normalize(torch.eye(5).repeat_interleave(20, 0) + 0.01 * torch.randn(100, 5, generator=g), dim=1)
    y = torch.arange(5).repeat_interleave(20)
    assert nmi(x, y, seed=0) == pytest.approx(100.0)


def test_eval_retrieval_command_on_a_folder_run(tmp_path, image_tree, capsys):
    import json

    from isif.cli import main

    run = tmp_path / "run"
    assert main(["train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data", str(image_tree), "--width",
                 "0.03125", "--batch-size", "8", "--knn-k", "5", "--epochs", "1", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "retrieval", "--checkpoint", str(run), "--ks", "1,2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 24 and res["classes"] == 4
    assert 0 <= res["recall@1"] <= res["recall@2"] <= 100 and 0 <= res["nmi"] <= 100 and 0 <= res["map@r"] <= 100
    assert main(["eval", "retrieval", "--checkpoint", str(run), "--ks", "a,b"]) == 2
    assert "expected comma-separated integers" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_ranking_equals_the_full_stable_sort(seed):
    """The top-(k+1) shortcut gives exactly the stable sort's first k columns, ties included."""
    from isif.evaluate.retrieval import ranked

    g = torch.Generator().manual_seed(seed)
    sim = torch.randint(-3, 4, (50, 40), generator=g).float()  # many exact ties, at every boundary
    sim[:, 5] = float("-inf")
    cont = torch.randn(50, 40, generator=g)  # no ties
    for s in (sim, cont):
        for k in (1, 2, 5, 17, 38, 39, 40):
            want = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
            assert torch.equal(ranked(s, k), want), k
