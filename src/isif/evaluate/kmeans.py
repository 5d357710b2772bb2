"""Seeded k-means in torch, chunked so memory stays bounded, on any device; faiss may do the assignments.

The torch code is the reference. ``engine="faiss"`` (see ``engine.py``) gives the same labels and centroids,
bit for bit: faiss proposes each point's two nearest centroids, and a point takes faiss's nearest only when the
second is farther by more than the rounding error faiss and the reference can make (gamma_{D+3} (|x| + |c|)^2
each); the other points, and the farthest points that re-seed empty clusters whenever their order is in doubt,
are computed by the reference code. The seeding is shared by both engines.
"""

from __future__ import annotations

import torch

from .engine import faiss_knn, gamma, reference_batches, resolve_engine

_SEED_BLOCK = 4096  # rows per block of the seeding's distance update: small enough to stay in cache


def _nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest centroid, for every row of x."""
    c2 = (centroids * centroids).sum(1)  # (k,)
    labels, dists = [], []
    for s in range(0, x.shape[0], chunk):
        xb = x[s : s + chunk]
        d = c2[None, :] - 2 * xb @ centroids.t() + (xb * xb).sum(1, keepdim=True)  # (c, k)
        v, i = d.min(dim=1)
        labels.append(i)
        dists.append(v.clamp_min(0))
    return torch.cat(labels), torch.cat(dists)


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """(N,) int64 index of the nearest centroid of every row of x, as ``kmeans`` assigns its own rows (the torch
    reference); for rows k-means did not train on."""
    return _nearest(x.float(), centroids.float(), chunk)[0]


def _nearest_rows(x: torch.Tensor, centroids: torch.Tensor, chunk: int, rows: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's ``_nearest`` for some rows, each computed among rows of its own chunk (see engine.py).

    Shape: rows (r,) -> (the rows computed (m,), m >= r, a superset of rows; their labels (m,); distances (m,)).
    """
    batches = reference_batches(rows, x.shape[0], chunk)
    if not batches:
        return rows, rows.new_zeros(0), x.new_zeros(0)
    out = [_nearest(x[b], centroids, chunk) for b in batches]
    return torch.cat(batches), torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def _sq_dist64(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """(N,) float64 squared distance of each row to centroid ``labels[i]``, ``chunk`` rows at a time."""
    out = torch.empty(x.shape[0], dtype=torch.float64)
    for s in range(0, x.shape[0], chunk):
        diff = x[s : s + chunk].double() - centroids[labels[s : s + chunk]].double()
        out[s : s + chunk] = (diff * diff).sum(1)
    return out


def _nearest_faiss(x: torch.Tensor, centroids: torch.Tensor, chunk: int, xnorm: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_nearest``'s labels exactly, and its distances within a stated slack, by faiss.

    Shape: x (N, D) float32 on the CPU, centroids (k, D) with k >= 2, xnorm (N,) float64 -> labels (N,) int64
    (the reference's), dist (N,) float64, slack (N,) float64: |dist - reference distance| <= slack (0 where dist
    is the reference's own value).
    """
    d = x.shape[1]
    vals, ids = faiss_knn(x, centroids, 2, metric="l2")  # (N, 2)
    scale = (xnorm + float(centroids.double().norm(dim=1).max())) ** 2  # (N,) >= (|x| + |c|)^2 for every c
    err = gamma(d + 3) * scale * (1 + 1e-6) + 1e-30  # faiss's bound, and the reference's, on a squared distance
    labels = ids[:, 0].clone()
    dist = _sq_dist64(x, centroids, labels, chunk)
    slack = err + gamma(d + 2, torch.float64) * scale
    # every other centroid is at least vals[:, 1] - err (faiss), so at least vals[:, 1] - 2 err to the reference
    doubt = ~(vals[:, 1].double() - 2 * err > dist + slack)
    if bool(doubt.any()):
        rows, lab, dst = _nearest_rows(x, centroids, chunk, torch.nonzero(doubt).squeeze(1))
        labels[rows], dist[rows], slack[rows] = lab, dst.double(), 0.0
    return labels, dist, slack


def _farthest(x: torch.Tensor, centroids: torch.Tensor, chunk: int, dist: torch.Tensor, slack: torch.Tensor,
              m: int) -> torch.Tensor:
    """``torch.topk(reference distances, m).indices`` from estimates ``dist`` within ``slack`` of them.

    Points that may be among the m farthest get their reference distance; when two different points tie there,
    the whole reference vector is computed, so the order of tied points is torch's own.
    """
    lower, upper = dist - slack, dist + slack
    floor = torch.topk(lower, m).values[-1]
    maybe = torch.nonzero(upper >= floor).squeeze(1)  # every point of the reference's m farthest is here
    rows, _, ref = _nearest_rows(x, centroids, chunk, maybe)
    keep = torch.isin(rows, maybe)
    rows, ref = rows[keep], ref[keep]
    top = torch.topk(ref, min(m + 1, ref.numel()))
    vals, pick = top.values, rows[top.indices]
    tied = vals[:-1] == vals[1:]
    if bool(tied.any()) and not all(torch.equal(x[pick[i]], x[pick[i + 1]]) for i in torch.nonzero(tied)[:, 0]):
        _, full = _nearest(x, centroids, chunk)
        return torch.topk(full, m).indices
    return pick[:m]


def kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to the squared distance to the
    nearest centre so far.

    Shape: x (N, D) float32 -> centroids (k, D). The distance update runs in cache-sized blocks into reused
    buffers; each element is computed by the same torch operations as ``((x - c) ** 2).sum(1)``, so the draws
    are those of that plain form (tested).
    """
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=g))
    picks = [first]
    d2 = ((x - x[first]) ** 2).sum(1)  # (N,)
    block = min(n, _SEED_BLOCK) if x.device.type == "cpu" else n
    buf, new = torch.empty(block, x.shape[1], dtype=x.dtype, device=x.device), torch.empty_like(d2)
    p = torch.empty(n, dtype=torch.float64)
    for _ in range(1, k):
        p.copy_(d2)
        total = p.sum()
        nxt = int(torch.multinomial(p / total, 1, generator=g)) if total > 0 else int(
            torch.randint(n, (1,), generator=g))
        picks.append(nxt)
        c = x[nxt]
        for s in range(0, n, block):
            b = buf[: min(block, n - s)]
            torch.sub(x[s : s + block], c, out=b)
            b.mul_(b)
            torch.sum(b, 1, out=new[s : s + block])
        torch.minimum(d2, new, out=d2)
    return x[torch.tensor(picks, device=x.device)].clone()


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, chunk: int = 8192,
           tol: float = 0.0, engine: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding.

    Shape: x (N, D) -> labels (N,) int64, centroids (k, D). Empty clusters are
    re-seeded with the points farthest from their centroids. The result depends
    only on ``x``, ``k``, ``iters`` and ``seed``: ``engine`` (auto, torch, faiss;
    see ``engine.py``) changes the speed, not the result.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} points, got {k}")
    device = x.device
    use_faiss = resolve_engine(engine, x) == "faiss" and k >= 2 and bool(torch.isfinite(x).all())
    x = x.float().cpu() if use_faiss else x.float()
    xnorm = x.double().norm(dim=1) if use_faiss else None
    g = torch.Generator().manual_seed(seed)
    centroids = kmeans_pp(x, k, g)
    labels = torch.zeros(n, dtype=torch.long, device=x.device)
    for _ in range(iters):
        if use_faiss:
            labels, dist, slack = _nearest_faiss(x, centroids, chunk, xnorm)
        else:
            labels, dist = _nearest(x, centroids, chunk)
        counts = torch.bincount(labels, minlength=k)  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        new = sums / counts.clamp_min(1)[:, None]
        empty = torch.nonzero(counts == 0).squeeze(1)
        if empty.numel():
            far = (_farthest(x, centroids, chunk, dist, slack, empty.numel()) if use_faiss
                   else torch.topk(dist, empty.numel()).indices)
            new[empty] = x[far]
        shift = (new - centroids).abs().max()
        centroids = new
        if shift <= tol and not empty.numel():
            break
    labels = _nearest_faiss(x, centroids, chunk, xnorm)[0] if use_faiss else _nearest(x, centroids, chunk)[0]
    return labels.to(device), centroids.to(device)

