"""Retrieval metrics for unseen categories: Recall@K, MAP@R and NMI, chunked, on any device.

Every metric treats the set as both queries and gallery, and leaves the query
itself out of its own neighbours. Similarity is cosine (features are
L2-normalised). Ties are resolved deterministically: among equally similar
gallery items, the lower index ranks first.
"""

from __future__ import annotations

import math

import torch

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


def recall_at_k(features: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 2, 4, 8),
                chunk_size: int = 1024) -> dict[int, float]:
    """Recall@K in percent: the share of queries with at least one same-class item among their K nearest.

    A query whose class has no other image can never hit; it counts as a miss.

    Shape: features (N, D) L2-normalised, labels (N,).
    """
    n = features.shape[0]
    if n < 2:
        raise ValueError("Recall@K needs at least 2 images")
    kmax = min(max(ks), n - 1)
    labels = labels.to(features.device)
    hits_at = {k: 0 for k in ks}
    for s in range(0, n, chunk_size):
        q = features[s : s + chunk_size]
        sim = q.float() @ features.float().t()  # (q, N)
        rows = torch.arange(q.shape[0], device=features.device)
        sim[rows, rows + s] = float("-inf")  # leave the query out
        same = labels[s : s + chunk_size, None] == labels[None, :]  # (q, N)
        hits = _ranked_hits(sim, same, kmax)  # (q, kmax)
        first = torch.where(hits.any(1), hits.float().argmax(1), torch.full_like(rows, kmax))  # rank of 1st hit
        for k in ks:
            hits_at[k] += int((first < min(k, kmax)).sum())
    return {k: 100.0 * hits_at[k] / n for k in ks}


def map_at_r(features: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024) -> float:
    """MAP@R in percent (Musgrave et al.): R = the number of other same-class images;
    AP@R = (1/R) sum_{i<=R} precision@i * rel(i). Queries with R = 0 are left out.
    """
    n = features.shape[0]
    labels = labels.to(features.device)
    counts = torch.bincount(labels - labels.min())
    r_all = counts[labels - labels.min()] - 1  # (N,)
    rmax = int(r_all.max())
    if rmax == 0:
        raise ValueError("MAP@R needs at least one class with two images")
    total, used = 0.0, 0
    for s in range(0, n, chunk_size):
        q = features[s : s + chunk_size]
        r = r_all[s : s + chunk_size]  # (q,)
        sim = q.float() @ features.float().t()
        rows = torch.arange(q.shape[0], device=features.device)
        sim[rows, rows + s] = float("-inf")
        same = labels[s : s + chunk_size, None] == labels[None, :]
        hits = _ranked_hits(sim, same, rmax).float()  # (q, rmax)
        pos = torch.arange(1, rmax + 1, device=features.device, dtype=torch.float32)
        within = pos[None, :] <= r[:, None].float()  # only the first R ranks count
        prec = torch.cumsum(hits, 1) / pos[None, :]
        ap = (prec * hits * within).sum(1) / r.clamp_min(1).float()
        keep = r > 0
        total += float(ap[keep].sum())
        used += int(keep.sum())
    return 100.0 * total / used


def nmi(features: torch.Tensor, labels: torch.Tensor, seed: int = 0, iters: int = 50) -> float:
    """NMI in percent between the classes and seeded k-means with one cluster per class.

    NMI = I(Y; C) / ((H(Y) + H(C)) / 2), the arithmetic normalisation (scikit-learn's default).
    """
    k = int(torch.unique(labels).numel())
    clusters, _ = kmeans(features.float(), k, iters=iters, seed=seed)
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
