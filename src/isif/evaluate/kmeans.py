"""Seeded k-means in torch, chunked so memory stays bounded, on any device."""

from __future__ import annotations

import torch


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


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, chunk: int = 8192,
           tol: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding.

    Shape: x (N, D) -> labels (N,) int64, centroids (k, D). Empty clusters are
    re-seeded with the points farthest from their centroids. The result depends
    only on ``x``, ``k``, ``iters`` and ``seed``.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} points, got {k}")
    x = x.float()
    g = torch.Generator().manual_seed(seed)
    # k-means++: each next centre drawn with probability proportional to the squared distance
    first = int(torch.randint(n, (1,), generator=g))
    centroids = x[first : first + 1].clone()
    d2 = ((x - centroids[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2.double().cpu()
        nxt = int(torch.multinomial(p / p.sum(), 1, generator=g)) if p.sum() > 0 else int(
            torch.randint(n, (1,), generator=g))
        centroids = torch.cat([centroids, x[nxt : nxt + 1]])
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    labels = torch.zeros(n, dtype=torch.long, device=x.device)
    for _ in range(iters):
        labels, dist = _nearest(x, centroids, chunk)
        counts = torch.bincount(labels, minlength=k)  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        new = sums / counts.clamp_min(1)[:, None]
        empty = torch.nonzero(counts == 0).squeeze(1)
        if empty.numel():
            far = torch.topk(dist, empty.numel()).indices
            new[empty] = x[far]
        shift = (new - centroids).abs().max()
        centroids = new
        if shift <= tol and not empty.numel():
            break
    labels, _ = _nearest(x, centroids, chunk)
    return labels, centroids
