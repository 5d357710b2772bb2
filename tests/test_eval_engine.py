"""The faiss engine of the evaluation gives the torch reference's results: kNN, Recall@K, MAP@R and k-means.

Each metric runs both engines on random data (where faiss's candidates decide almost every query), on data full of
exact ties (quantised features, duplicated rows: where many queries are handed back to the reference), and on
ragged chunks; where the data make every dot product exact, also against a naive float64 reference. A counter on
``reference_batches`` shows which path answered. The seeding is checked against the code it replaced.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import isif.evaluate.kmeans as km
import isif.evaluate.knn as knn_mod
import isif.evaluate.retrieval as ret
from isif.base.errors import UserError
from isif.evaluate.engine import reference_batches, resolve_engine
from isif.evaluate.kmeans import kmeans, kmeans_pp
from isif.evaluate.knn import knn_scores
from isif.evaluate.retrieval import map_at_r, nmi, recall_at_k
from isif.training.config import Config

try:
    import faiss  # noqa: F401
except ImportError:
    faiss = None
needs_faiss = pytest.mark.skipif(faiss is None, reason="faiss is not installed (pip install faiss-cpu)")


@pytest.fixture
def handed_back(monkeypatch):
    """{"rows": queries handed back to the reference} over the faiss paths of knn, retrieval and kmeans."""
    seen = {"rows": 0}

    def counting(rows, n, chunk):
        seen["rows"] += int(rows.numel())
        return reference_batches(rows, n, chunk)

    for mod in (km, knn_mod, ret):
        monkeypatch.setattr(mod, "reference_batches", counting)
    return seen


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def tied(n, d, seed, dup_every=3):
    """Quantised features (entries -1, 0, 1: every dot product exact, ties everywhere), every dup_every-th row a
    copy of the row before."""
    x = torch.randint(-1, 2, (n, d), generator=torch.Generator().manual_seed(seed)).float()
    x[1::dup_every] = x[0::dup_every][: x[1::dup_every].shape[0]]
    return x


def labels(n, classes, seed):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed + 100))


# ----------------------------------------------------------------------------- Recall@K and MAP@R


@needs_faiss
@pytest.mark.parametrize("chunk", [97, 1024])
def test_recall_and_map_are_the_references_on_random_data(chunk, handed_back):
    x, y = unit(1500, 16, 0), labels(1500, 150, 0)
    for ks in ((1, 2, 4, 8), (1, 10, 100)):
        assert recall_at_k(x, y, ks, chunk, engine="faiss") == recall_at_k(x, y, ks, chunk, engine="torch")
    assert map_at_r(x, y, chunk, engine="faiss") == map_at_r(x, y, chunk, engine="torch")
    assert handed_back["rows"] < 30  # faiss's candidates answered nearly every query


def naive_ranks(x, y):
    """(N, N-1) other items by (-similarity in float64, index), and whether each is of the query's class."""
    s = x.double() @ x.double().t()
    s.fill_diagonal_(float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :-1]
    return order, y[order] == y[:, None]


@needs_faiss
def test_recall_and_map_with_exact_ties_are_the_references_and_the_naive_ones(handed_back):
    x, y = tied(700, 4, 1), labels(700, 40, 1)
    ks = (1, 3, 10, 30)
    got = recall_at_k(x, y, ks, 64, engine="faiss")
    assert got == recall_at_k(x, y, ks, 64, engine="torch")
    _, same = naive_ranks(x, y)
    assert got == {k: 100.0 * same[:, :k].any(1).sum().item() / 700 for k in ks}
    assert map_at_r(x, y, 50, engine="faiss") == map_at_r(x, y, 50, engine="torch")
    assert handed_back["rows"] > 100  # the ties sent many queries to the reference


@needs_faiss
def test_map_at_r_matches_a_naive_float64_one_on_exact_data():
    x, y = tied(500, 5, 2, dup_every=4), labels(500, 30, 2)
    _, same = naive_ranks(x, y)
    r = (y[:, None] == y[None, :]).sum(1) - 1
    aps = []
    for i in range(500):
        rel = same[i, : int(r[i])].double()
        if r[i] > 0:
            aps.append(float((torch.cumsum(rel, 0) / torch.arange(1, int(r[i]) + 1) * rel).sum() / r[i]))
    assert map_at_r(x, y, 77, engine="faiss") == pytest.approx(100 * sum(aps) / len(aps), abs=1e-4)


# ----------------------------------------------------------------------------- kNN


@needs_faiss
@pytest.mark.parametrize("make, k, sigma, chunk, dtype", [
    ("random", 20, 0.1, 1024, torch.float32),
    ("random", 50, 0.05, 37, torch.float32),
    ("random", 20, 0.1, 100, torch.float64),
    ("tied", 15, 0.1, 64, torch.float32),
    ("tied", 40, 1.0, 1000, torch.float32),
])
def test_knn_predictions_are_the_references_and_scores_agree(make, k, sigma, chunk, dtype, handed_back):
    x = unit(1400, 16, 3) if make == "random" else tied(1400, 4, 3)
    q, bank = x[:400].to(dtype), x[400:].to(dtype)
    lab = labels(1000, 10, 3)
    ref = knn_scores(q, bank, lab, 10, k, sigma, chunk, engine="torch")
    got = knn_scores(q, bank, lab, 10, k, sigma, chunk, engine="faiss")
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.equal(got.argmax(1), ref.argmax(1))
    assert (got - ref).abs().max() <= 1e-6
    if make == "tied":
        assert handed_back["rows"] > 0


@needs_faiss
def test_knn_takes_the_reference_where_faiss_cannot_help():
    x = unit(60, 8, 4)
    lab = labels(50, 3, 4)
    # k reaches the whole bank: no candidates to propose
    assert torch.equal(knn_scores(x[:10], x[10:], lab, 3, 45, engine="faiss"),
                       knn_scores(x[:10], x[10:], lab, 3, 45, engine="torch"))


# ----------------------------------------------------------------------------- k-means


def kmeans_before(x, k, iters=20, seed=0, chunk=8192, tol=0.0):
    """isif.evaluate.kmeans.kmeans as it was before the engines (commit 9d4f58f), seeding included."""
    n = x.shape[0]
    x = x.float()
    g = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=g))
    centroids = x[first : first + 1].clone()
    d2 = ((x - centroids[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2.double().cpu()
        nxt = int(torch.multinomial(p / p.sum(), 1, generator=g)) if p.sum() > 0 else int(
            torch.randint(n, (1,), generator=g))
        centroids = torch.cat([centroids, x[nxt : nxt + 1]])
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    for _ in range(iters):
        labels_, dist = km._nearest(x, centroids, chunk)
        counts = torch.bincount(labels_, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels_, x)
        new = sums / counts.clamp_min(1)[:, None]
        empty = torch.nonzero(counts == 0).squeeze(1)
        if empty.numel():
            new[empty] = x[torch.topk(dist, empty.numel()).indices]
        shift = (new - centroids).abs().max()
        centroids = new
        if shift <= tol and not empty.numel():
            break
    return km._nearest(x, centroids, chunk)[0], centroids


@pytest.mark.parametrize("make", ["random", "tied", "constant"])
def test_seeding_and_torch_kmeans_are_what_they_were(make):
    x = {"random": unit(5000, 16, 5), "tied": tied(5000, 6, 5), "constant": torch.ones(300, 4)}[make]
    k = 40 if make == "constant" else 300
    old_labels, old_centroids = kmeans_before(x, k, iters=3, seed=7)
    assert torch.equal(kmeans_pp(x, k, torch.Generator().manual_seed(7)), kmeans_before(x, k, iters=0, seed=7)[1])
    labels_, centroids = kmeans(x, k, iters=3, seed=7)
    assert torch.equal(labels_, old_labels) and torch.equal(centroids, old_centroids)


@needs_faiss
@pytest.mark.parametrize("make, k, chunk", [("random", 200, 8192), ("random", 150, 333), ("tied", 120, 500),
                                             ("planted", 12, 8192), ("repeated", 350, 8192), ("few", 40, 256)])
def test_faiss_kmeans_is_the_torch_one_bit_for_bit(make, k, chunk, handed_back, monkeypatch):
    farthest = {"calls": 0}

    def counting(*a):
        farthest["calls"] += 1
        return _farthest(*a)

    _farthest = km._farthest
    monkeypatch.setattr(km, "_farthest", counting)
    if make == "planted":
        centres = unit(12, 8, 6) * 10
        x = centres[torch.arange(1200) % 12] + 0.05 * unit(1200, 8, 7)
    elif make in ("random", "tied"):
        x = unit(2000, 16, 6) if make == "random" else tied(2000, 5, 6, dup_every=2)
    else:  # fewer distinct points than clusters: empty clusters every iteration, re-seeded with the farthest
        x = unit(300, 16, 6).repeat(3, 1) if make == "repeated" else tied(600, 3, 6)
    ref = kmeans(x, k, iters=8, seed=1, chunk=chunk, engine="torch")
    got = kmeans(x, k, iters=8, seed=1, chunk=chunk, engine="faiss")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    if make == "planted":
        assert len({(int(t), int(c)) for t, c in zip(torch.arange(1200) % 12, got[0], strict=True)}) == 12
    if make == "tied":
        assert handed_back["rows"] > 0
    assert (farthest["calls"] > 0) == (make in ("repeated", "few"))


@needs_faiss
def test_farthest_points_for_empty_clusters_follow_the_reference_through_ties():
    # points on the axes around a centroid at the origin: equal distances, different points
    x = torch.cat([torch.eye(4), -torch.eye(4), 0.5 * torch.eye(4), torch.zeros(3, 4)])
    centroids = torch.zeros(2, 4)
    centroids[1, 0] = 100.0
    xnorm = x.double().norm(dim=1)
    _, dist, slack = km._nearest_faiss(x, centroids, 8192, xnorm)
    ref = km._nearest(x, centroids, 8192)[1]
    for m in (1, 3, 9):
        got = km._farthest(x, centroids, 8192, dist, slack, m)
        assert torch.equal(x[got], x[torch.topk(ref, m).indices])


@needs_faiss
def test_nmi_is_the_same_with_either_engine():
    x, y = unit(1500, 16, 8), torch.arange(1500) % 300
    assert nmi(x, y, iters=5, engine="faiss") == nmi(x, y, iters=5, engine="torch")


# ----------------------------------------------------------------------------- the setting


@needs_faiss
def test_auto_is_faiss_on_the_cpu():
    x = torch.zeros(3, 2)
    assert resolve_engine("auto", x) == "faiss" and resolve_engine("faiss", x) == "faiss"


def test_without_faiss_auto_is_torch_and_faiss_names_the_install(monkeypatch):
    x = torch.zeros(3, 2)
    assert resolve_engine("torch", x) == "torch"
    with pytest.raises(ValueError, match="engine must be one of auto, torch, faiss"):
        resolve_engine("gpu", x)
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if it were not installed
    assert resolve_engine("auto", x) == "torch"
    with pytest.raises(UserError, match="pip install"):
        resolve_engine("faiss", x)
    with pytest.raises(UserError, match="pip install"):
        recall_at_k(unit(20, 4, 0), torch.arange(20) % 4, (1,), engine="faiss")


def test_eval_engine_is_a_setting_and_old_configs_load_without_it(tmp_path, image_tree, capsys):
    import json

    from isif.cli import main

    d = Config().to_dict()
    assert d["eval"]["engine"] == "auto"
    del d["eval"]["engine"]  # a run saved before the setting existed
    assert Config.from_dict(d).eval.engine == "auto"
    cfg = Config()
    cfg.eval.engine = "cuda"
    with pytest.raises(UserError, match="--eval-engine must be one of auto, torch, faiss"):
        cfg.validate()
    assert main(["train", "--dataset", "folder", "--data", str(image_tree), "--batch-size", "8", "--knn-k", "5",
                 "--dry-run", "--eval-engine", "torch", "--out", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["eval"]["engine"] == "torch"


@needs_faiss
def test_deepcluster_pseudo_labels_do_not_depend_on_the_engine():
    from isif.objectives import EpochContext, build_objective

    feats = unit(400, 8, 9)
    got = []
    for engine in ("torch", "faiss"):
        crit = build_objective("deepcluster", num_instances=400, dim=8, seed=3, engine=engine, clusters=30)
        crit.on_epoch_start(EpochContext(2, lambda: feats, torch.optim.SGD(crit.parameters(), lr=0.1)))
        got.append(crit.pseudo_labels.clone())
    assert torch.equal(got[0], got[1])
