"""Weighted k-nearest-neighbour classification, as in Wu et al. and Ye et al.

For a query q and a bank of L2-normalised features b_j with labels y_j, take
the k most similar bank entries by cosine similarity s_j = q . b_j; class c
gets the vote sum over those neighbours with y_j = c of exp(s_j / sigma). The
prediction is the class with the largest vote.

Ties are resolved deterministically: neighbours tied at the k-th similarity
are taken in bank order (lowest index first), and tied votes go to the lowest
class index.
"""

from __future__ import annotations

import torch

from .engine import gamma, propose, reference_batches, resolve_engine, spare


def knn_scores(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    sigma: float = 0.1,
    chunk_size: int = 1024,
    engine: str = "torch",
) -> torch.Tensor:
    """Class votes for each query, normalised to sum to 1.

    Shape:
        query: (Q, D), bank: (N, D), both L2-normalised; bank_labels: (N,) int.
        Output: (Q, num_classes), at least float32; row q is
        votes_q / sum(votes_q). Votes are computed as exp((s - s_max) / sigma),
        a per-query constant factor that cancels in the normalisation, so a
        small sigma cannot overflow.

    ``k`` larger than the bank uses the whole bank. Memory is bounded by
    ``chunk_size * N`` similarities at a time. ``engine`` (auto, torch, faiss;
    see ``engine.py``): with faiss, the neighbours and the predicted class are
    the torch reference's, and the scores agree with its to float rounding.
    """
    if query.dim() != 2 or bank.dim() != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(f"query (Q, D) and bank (N, D) must share D; got {tuple(query.shape)}, {tuple(bank.shape)}")
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError(f"bank has {bank.shape[0]} rows but {bank_labels.shape[0]} labels")
    if k < 1 or sigma <= 0:
        raise ValueError(f"k must be >= 1 and sigma > 0; got k={k}, sigma={sigma}")
    n = bank.shape[0]
    k = min(k, n)
    dtype = torch.promote_types(bank.dtype, torch.float32)
    if (k + 1 + spare(k) <= n and resolve_engine(engine, query, bank) == "faiss" and bool(torch.isfinite(bank).all())
            and bool(torch.isfinite(query).all())):
        return _knn_scores_faiss(query, bank, bank_labels, num_classes, k, sigma, chunk_size).to(bank.device)
    bank = bank.to(dtype)
    labels = bank_labels.to(bank.device).long()  # (N,)
    onehot = _onehot(labels, num_classes, dtype)
    out = []
    for start in range(0, query.shape[0], chunk_size):
        votes = _votes(query[start : start + chunk_size].to(bank.device, dtype), bank, labels, onehot, k, sigma)
        out.append(votes / votes.sum(dim=1, keepdim=True))
    return torch.cat(out) if out else torch.zeros(0, num_classes, dtype=dtype)


def _onehot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, C) one-hot rows of ``labels``."""
    n = labels.shape[0]
    onehot = torch.zeros(n, num_classes, dtype=dtype, device=labels.device)
    onehot[torch.arange(n, device=labels.device), labels] = 1
    return onehot


def _votes(q: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, onehot: torch.Tensor, k: int,
           sigma: float) -> torch.Tensor:
    """The reference's votes (q, C) of a chunk of queries q (q, D), in bank's dtype."""
    n = bank.shape[0]
    sim = q @ bank.t()  # (q, N)
    # k + 1 values tell whether the k-th neighbour is tied with the next one
    vals, idx = torch.topk(sim, min(k + 1, n), dim=1)  # (q, k+1), sorted descending
    if k < n:
        tied_rows = vals[:, k - 1] == vals[:, k]  # (q,) the top-k set is ambiguous
        vals, idx = vals[:, :k], idx[:, :k]
    else:
        tied_rows = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
    w = torch.exp((vals - vals[:, :1]) / sigma)  # (q, k); the per-query factor cancels below
    votes = torch.zeros(q.shape[0], onehot.shape[1], dtype=bank.dtype, device=bank.device)
    votes.scatter_add_(1, labels[idx], w)  # (q, C)
    if bool(tied_rows.any()):
        rows = torch.nonzero(tied_rows).squeeze(1)
        votes[rows] = _tied_votes(sim[rows], k, sigma, onehot)
    return votes


def _knn_scores_faiss(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int, k: int,
                      sigma: float, chunk_size: int) -> torch.Tensor:
    """``knn_scores`` by faiss's k + 1 + spare(k) candidates (fewer than N), on the CPU.

    A query is answered from its candidates when rounding can change neither its k nearest (the k-th is above
    the (k+1)-th and every item faiss left out by more than the slack, both ways) nor its winning class: the
    reference's votes are within a factor exp(+-eta) of these, so a winner ahead by more than exp(2 eta) is its
    winner too. The others are the reference's own rows.
    """
    q_all, b = query.cpu(), bank.cpu()
    dtype = torch.promote_types(b.dtype, torch.float32)
    labels = bank_labels.cpu().long()
    b_ref, onehot = b.to(dtype), _onehot(labels, num_classes, dtype)
    norm = float(b.double().norm(dim=1).max())
    out = torch.empty(q_all.shape[0], num_classes, dtype=dtype)
    for start in range(0, q_all.shape[0], chunk_size):
        rows = torch.arange(start, min(q_all.shape[0], start + chunk_size))
        c = propose(q_all[rows], b, k + 1 + spare(k), dtype, norm, recompute=True)  # float64 weights
        sure = c.sims[:, k - 1] - c.slack > torch.maximum(c.sims[:, k] + c.slack, c.ceiling)
        w = torch.exp((c.sims[:, :k] - c.sims[:, :1]) / sigma)  # (q, k) float64
        votes = torch.zeros(rows.numel(), num_classes, dtype=torch.float64).scatter_add_(1, labels[c.ids[:, :k]], w)
        scale = q_all[rows].double().norm(dim=1) * norm
        eta = 4 * c.slack / sigma + gamma(k + 8, dtype) * (1 + 2 * scale / sigma)
        if num_classes > 1:
            two = torch.topk(votes, 2, dim=1).values
            sure &= two[:, 0] > two[:, 1] * torch.exp(2 * eta)
        out[rows] = (votes / votes.sum(dim=1, keepdim=True)).to(dtype)
        doubt = rows[~sure]
        for batch in reference_batches(doubt, q_all.shape[0], chunk_size):
            v = _votes(q_all[batch].to(dtype), b_ref, labels, onehot, k, sigma)
            mine = torch.isin(batch, doubt)
            out[batch[mine]] = (v / v.sum(dim=1, keepdim=True))[mine]
    return out


def _tied_votes(sim: torch.Tensor, k: int, sigma: float, onehot: torch.Tensor) -> torch.Tensor:
    """Exact votes for rows whose k-th similarity is tied: tied entries are taken in bank order."""
    kth = torch.topk(sim, k, dim=1).values[:, -1:]  # (r, 1)
    above = sim > kth
    tied = sim == kth
    room = k - above.sum(dim=1, keepdim=True)  # how many tied entries still fit
    take = above | (tied & (torch.cumsum(tied.to(torch.int32), dim=1) <= room))
    top = sim.max(dim=1, keepdim=True).values
    weights = torch.where(take, torch.exp((sim - top) / sigma), torch.zeros_like(sim))  # (r, N)
    return weights @ onehot  # (r, C)


def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    sigma: float = 0.1,
    chunk_size: int = 1024,
    engine: str = "torch",
) -> torch.Tensor:
    """Predicted labels (Q,) by weighted kNN; see ``knn_scores``."""
    return knn_scores(query, bank, bank_labels, num_classes, k, sigma, chunk_size, engine).argmax(dim=1)


def knn_accuracy(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    sigma: float = 0.1,
    chunk_size: int = 1024,
    engine: str = "torch",
) -> float:
    """Top-1 accuracy in percent."""
    pred = knn_predict(query, bank, bank_labels, num_classes, k, sigma, chunk_size, engine)
    return 100.0 * (pred.cpu() == query_labels.cpu()).double().mean().item()
