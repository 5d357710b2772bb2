"""Retrieval metrics for unseen categories: Recall@K, MAP@R and NMI, chunked, on any device.

Every metric treats the set as both queries and gallery, and leaves the query
itself out of its own neighbours. Similarity is cosine (features are
L2-normalised). Ties are resolved deterministically: among equally similar
gallery items, the lower index ranks first.
"""

from __future__ import annotations

import math

import torch

from .engine import propose, reference_batches, resolve_engine, spare
from .kmeans import kmeans


def _ranked_hits(sim: torch.Tensor, same: torch.Tensor, k: int) -> torch.Tensor:
    """(q, k) bool: is the j-th ranked neighbour of the same class? Ties broken by lower index.

    ``sim`` (q, N) has the query itself already at -inf; ``same`` (q, N) marks same-class items.
    """
    return torch.gather(same, 1, ranked(sim, k))


def ranked(sim: torch.Tensor, k: int) -> torch.Tensor:
    """(q, k) indices of each row's k largest entries, ordered by (-value, index): exactly a stable
    descending sort's first k columns.

    Uses top-(k+1) and orders the candidates; rows where the k-th and (k+1)-th values tie (so that the
    set itself depends on the tie rule) fall back to the full stable sort. For SOP (60K gallery, K <= 100)
    this avoids sorting every row.
    """
    n = sim.shape[1]
    if k + 1 >= n:
        return torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
    vals, cand = torch.topk(sim, k + 1, dim=1)  # (q, k+1), ties in unspecified order
    cand = torch.sort(cand, dim=1).values  # by index ...
    cval = torch.gather(sim, 1, cand)
    order = torch.gather(cand, 1, torch.sort(cval, dim=1, descending=True, stable=True).indices)  # ... then value
    order = order[:, :k]
    tied = vals[:, k - 1] == vals[:, k]
    if bool(tied.any()):
        rows = torch.nonzero(tied).squeeze(1)
        order[rows] = torch.sort(sim[rows], dim=1, descending=True, stable=True).indices[:, :k]
    return order


def _self_excluded_sim(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(r, N) float32 similarities of ``rows`` to every item, each row's own item at -inf: the reference's."""
    sim = features[rows].float() @ features.float().t()
    sim[torch.arange(rows.numel(), device=sim.device), rows] = float("-inf")  # leave the query out
    return sim


def _first_hits(features: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, kmax: int) -> torch.Tensor:
    """(r,) rank of each query's first same-class item among its kmax nearest, kmax when there is none."""
    same = labels[rows, None] == labels[None, :]  # (r, N)
    hits = _ranked_hits(_self_excluded_sim(features, rows), same, kmax)  # (r, kmax)
    return torch.where(hits.any(1), hits.float().argmax(1), torch.full_like(rows, kmax))


def _hit_pattern(features: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, rmax: int) -> torch.Tensor:
    """(r, rmax) bool: is the j-th nearest other item of the query's class?"""
    same = labels[rows, None] == labels[None, :]
    return _ranked_hits(_self_excluded_sim(features, rows), same, rmax)


def recall_at_k(features: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 2, 4, 8),
                chunk_size: int = 1024, engine: str = "torch") -> dict[int, float]:
    """Recall@K in percent: the share of queries with at least one same-class item among their K nearest.

    A query whose class has no other image can never hit; it counts as a miss. ``engine`` (auto, torch, faiss;
    see ``engine.py``) changes the speed, not the result.

    Shape: features (N, D) L2-normalised, labels (N,).
    """
    n = features.shape[0]
    if n < 2:
        raise ValueError("Recall@K needs at least 2 images")
    kmax = min(max(ks), n - 1)
    if _use_faiss(engine, features, kmax + 2 + spare(kmax)):
        return _recall_faiss(features, labels, ks, kmax, chunk_size)
    labels = labels.to(features.device)
    hits_at = {k: 0 for k in ks}
    for s in range(0, n, chunk_size):
        first = _first_hits(features, labels, torch.arange(s, min(n, s + chunk_size), device=features.device), kmax)
        for k in ks:
            hits_at[k] += int((first < min(k, kmax)).sum())
    return {k: 100.0 * hits_at[k] / n for k in ks}


def _ap_sum(hits: torch.Tensor, r: torch.Tensor) -> tuple[float, int]:
    """(sum of AP@R, number of queries with R > 0) of a chunk; hits (q, rmax) bool, r (q,) the queries' R."""
    rmax = hits.shape[1]
    hits = hits.float()
    pos = torch.arange(1, rmax + 1, device=hits.device, dtype=torch.float32)
    within = pos[None, :] <= r[:, None].float()  # only the first R ranks count
    prec = torch.cumsum(hits, 1) / pos[None, :]
    ap = (prec * hits * within).sum(1) / r.clamp_min(1).float()
    keep = r > 0
    return float(ap[keep].sum()), int(keep.sum())


def _others_of_class(labels: torch.Tensor) -> torch.Tensor:
    """(N,) the number of other items of each item's class."""
    counts = torch.bincount(labels - labels.min())
    return counts[labels - labels.min()] - 1


def map_at_r(features: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024, engine: str = "torch") -> float:
    """MAP@R in percent (Musgrave et al.): R = the number of other same-class images;
    AP@R = (1/R) sum_{i<=R} precision@i * rel(i). Queries with R = 0 are left out. ``engine`` (auto, torch,
    faiss; see ``engine.py``) changes the speed, not the result.
    """
    n = features.shape[0]
    labels = labels.to(features.device)
    r_all = _others_of_class(labels)  # (N,)
    rmax = int(r_all.max())
    if rmax == 0:
        raise ValueError("MAP@R needs at least one class with two images")
    faiss = _use_faiss(engine, features, rmax + 2 + spare(rmax))
    if faiss:
        features, labels, r_all = features.cpu(), labels.cpu(), r_all.cpu()
        norm = float(features.double().norm(dim=1).max())
    total, used = 0.0, 0
    for s in range(0, n, chunk_size):
        rows = torch.arange(s, min(n, s + chunk_size), device=features.device)
        hits = (_hit_pattern_faiss(features, labels, rows, r_all, norm, chunk_size) if faiss
                else _hit_pattern(features, labels, rows, rmax))
        t, u = _ap_sum(hits, r_all[rows])
        total += t
        used += u
    return 100.0 * total / used


def _use_faiss(engine: str, features: torch.Tensor, length: int) -> bool:
    """Does ``engine`` search with faiss, for ``length`` candidates a query (not when they are the whole set)?"""
    return (resolve_engine(engine, features) == "faiss" and length <= features.shape[0]
            and bool(torch.isfinite(features).all()))


def _recall_faiss(features: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...], kmax: int,
                  chunk_size: int) -> dict[int, float]:
    """``recall_at_k`` by faiss's candidates (see engine.py): a query's hit at K is taken from them when no
    rounding can change it, else from the reference's rows."""
    f, y = features.cpu(), labels.cpu()
    n = f.shape[0]
    r_all, norm = _others_of_class(y), float(f.double().norm(dim=1).max())
    hits_at = {k: 0 for k in ks}
    for s in range(0, n, chunk_size):
        rows = torch.arange(s, min(n, s + chunk_size))
        c = propose(f[rows], f, kmax + 2 + spare(kmax), torch.float32, norm, own=rows)  # (q, L), L > kmax
        hit = y[c.ids] == y[rows, None]  # (q, L)
        first = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(rows, hit.shape[1]))
        top_hit = torch.where(hit.any(1), c.sims.gather(1, first.clamp_max(hit.shape[1] - 1)[:, None])[:, 0],
                              torch.full_like(c.slack, float("-inf")))  # the best candidate of the class
        all_listed = hit.sum(1) == r_all[rows]
        sure = torch.ones(rows.numel(), dtype=torch.bool)
        got = {}
        for k in ks:
            kk = min(k, kmax)
            got[k] = first < kk
            # a hit: the best one is above everything from rank kk on, faiss's leftovers included
            above = top_hit - c.slack > torch.maximum(c.sims[:, kk] + c.slack, c.ceiling)
            # a miss: every item of the class is below the kk-th candidate
            inside = c.sims[:, kk - 1] - c.slack
            below = (inside > top_hit + c.slack) & (all_listed | (inside > c.ceiling))
            sure &= torch.where(got[k], above, below)
        doubt = torch.nonzero(~sure).squeeze(1) + s
        for b in reference_batches(doubt, n, chunk_size):
            first_ref = _first_hits(f, y, b, kmax)
            mine = torch.isin(b, doubt)
            for k in ks:
                got[k][b[mine] - s] = first_ref[mine] < min(k, kmax)
        for k in ks:
            hits_at[k] += int(got[k].sum())
    return {k: 100.0 * hits_at[k] / n for k in ks}


def _hit_pattern_faiss(f: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, r_all: torch.Tensor, norm: float,
                       chunk_size: int) -> torch.Tensor:
    """``_hit_pattern`` of the rows (one chunk of the reference's, on the CPU) up to each query's R, by faiss.

    A query's pattern of hits among its R nearest is taken from the candidates when every candidate it could
    trade places with (similarities within twice the slack) has the same class-or-not; the reference computes
    the others. Past rank R the pattern may differ, where MAP@R does not look.
    """
    n, rmax, r = f.shape[0], int(r_all.max()), r_all[rows]
    c = propose(f[rows], f, rmax + 2 + spare(rmax), torch.float32, norm, own=rows)  # (q, L), L > rmax
    hit = y[c.ids] == y[rows, None]  # (q, L)
    change = torch.cat([torch.zeros_like(rows)[:, None], torch.cumsum((hit[:, 1:] != hit[:, :-1]).long(), 1)], 1)
    floor = c.sims - 2 * c.slack[:, None]  # a candidate can trade places with those down to here
    reach = torch.searchsorted(-c.sims, -floor, right=True) - 1  # (q, L) the last such position
    same = change.gather(1, reach) == change
    # the items faiss did not return are within reach: they are all of other classes only when every class
    # member was returned, and then only a non-member may meet them
    leftovers = c.sims - c.slack[:, None] <= c.ceiling[:, None]
    same &= ~leftovers | ((hit.sum(1) == r)[:, None] & ~hit)
    rank = torch.arange(hit.shape[1])
    sure = (same | (rank[None, :] >= r[:, None])).all(1)
    hits = hit[:, :rmax].clone()
    doubt = rows[~sure]
    for b in reference_batches(doubt, n, chunk_size):
        mine = torch.isin(b, doubt)
        hits[b[mine] - rows[0]] = _hit_pattern(f, y, b, rmax)[mine]
    return hits


def nmi(features: torch.Tensor, labels: torch.Tensor, seed: int = 0, iters: int = 50, engine: str = "torch") -> float:
    """NMI in percent between the classes and seeded k-means with one cluster per class.

    NMI = I(Y; C) / ((H(Y) + H(C)) / 2), the arithmetic normalisation (scikit-learn's default). ``engine``
    (auto, torch, faiss) is k-means's: the same clusters either way.
    """
    k = int(torch.unique(labels).numel())
    clusters, _ = kmeans(features.float(), k, iters=iters, seed=seed, engine=engine)
    return 100.0 * normalized_mutual_information(labels.cpu(), clusters.cpu())


def normalized_mutual_information(a: torch.Tensor, b: torch.Tensor) -> float:
    """NMI of two labelings of the same items, from the contingency table, in float64."""
    _, ai = torch.unique(a, return_inverse=True)
    _, bi = torch.unique(b, return_inverse=True)
    n = a.numel()
    table = torch.zeros(int(ai.max()) + 1, int(bi.max()) + 1, dtype=torch.float64)
    table.index_put_((ai, bi), torch.ones(n, dtype=torch.float64), accumulate=True)
    p = table / n
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * torch.log(p[nz] / (pa[:, None] * pb[None, :])[nz])).sum())
    ha = float(-(pa[pa > 0] * torch.log(pa[pa > 0])).sum())
    hb = float(-(pb[pb > 0] * torch.log(pb[pb > 0])).sum())
    if ha + hb == 0:
        return 1.0  # both labelings put everything in one group
    return max(0.0, mi / ((ha + hb) / 2)) if not math.isnan(mi) else 0.0


def nearest_neighbour(features: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """(N,) index of each row's most similar other row (cosine; ties to the lower index)."""
    n = features.shape[0]
    if n < 2:
        raise ValueError("a nearest neighbour needs at least 2 images")
    out = torch.empty(n, dtype=torch.long, device=features.device)
    f = features.float()
    for s in range(0, n, chunk_size):
        sim = f[s : s + chunk_size] @ f.t()  # (q, N)
        rows = torch.arange(sim.shape[0], device=features.device)
        sim[rows, rows + s] = float("-inf")
        out[s : s + chunk_size] = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, 0]
    return out
