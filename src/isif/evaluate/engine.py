"""The engine of the evaluation's nearest-neighbour searches: torch (the reference) or faiss, with equal results.

faiss proposes, torch confirms. faiss's exact (flat) search finds each query's candidates, a few more than the
metric reads (``spare``); a query's answer (its hit at K, its pattern of hits up to R, its k neighbours and
winning class, its nearest centroid) is taken from them only where float rounding cannot have changed it: where
every comparison the answer rests on differs by more than the rounding error faiss and the reference's float32
matrix product can make between them (``slack``), and every item faiss did not return lies below by as much
(``ceiling``). Every other query is handed to the reference code itself. So the answers are the reference's,
not an approximation of them; kNN's scores, computed from float64 similarities, agree with the reference's to
its rounding (under 1e-6 in the tests).

The bound is Higham's: a dot product of n terms summed in any order, with or without fused multiply-adds, is
within gamma_n * sum_i |a_i b_i| <= gamma_n * |a| |b| of the exact value, gamma_n = n u / (1 - n u) and u the
unit roundoff (2^-24 in float32); n = D + 2 covers rounding the inputs to float32. Queries handed back to the
reference are recomputed within their own chunk and at least ``MIN_GEMM_ROWS`` rows at a time: torch's CPU
matrix product rounds an element the same way for 16 rows as for 1,024 (measured with MKL), but not always for
1 to 5, so a recomputed row is the reference's to the bit. Non-finite features take the reference path.

    auto   faiss when it is installed and the features are on the CPU, torch otherwise
    torch  the reference everywhere
    faiss  faiss on the CPU (features elsewhere are copied there; the results are the CPU reference's); a
           UserError naming the install when faiss is missing
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ENGINES = ("auto", "torch", "faiss")
MIN_GEMM_ROWS = 16


def spare(length: int) -> int:
    """Candidates to fetch beyond the ``length`` a metric reads: the bound on the items faiss left out then lies
    a few ranks further down, so that it rarely comes within the slack of the last rank read."""
    return 8 + length // 8


def resolve_engine(engine: str, *tensors: torch.Tensor) -> str:
    """"torch" or "faiss" for ``engine`` in ENGINES, given the tensors it would search."""
    from ..base.extras import faiss_module

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "torch":
        return "torch"
    if engine == "faiss":
        faiss_module()  # the install message when it is missing
        return "faiss"
    if any(t.device.type != "cpu" for t in tensors):
        return "torch"
    try:
        faiss_module()
    except Exception:
        return "torch"
    return "faiss"


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's gamma_n = n u / (1 - n u) of ``dtype``: the relative error bound of an n-term dot product."""
    u = torch.finfo(dtype).eps / 2
    return n * u / (1 - n * u)


def faiss_knn(query: torch.Tensor, base: torch.Tensor, k: int, metric: str = "ip") -> tuple[torch.Tensor, torch.Tensor]:
    """faiss's exact search: the k largest inner products (``"ip"``) or smallest squared L2 distances (``"l2"``).

    Shape: query (Q, D), base (N, D), k <= N -> (values (Q, k) float32, ids (Q, k) int64), sorted best first, on
    the CPU.
    """
    from ..base.extras import faiss_module

    faiss = faiss_module()
    m = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    q = np.ascontiguousarray(query.detach().cpu().numpy(), dtype=np.float32)
    b = np.ascontiguousarray(base.detach().cpu().numpy(), dtype=np.float32)
    # faiss keeps small k in heaps, large k in a reservoir it sorts at the end; both exact, the reservoir 3.5 times
    # faster here for inner products at SOP's size (k 2 to 64, 60,502 x 60,502, 2 cores: 20.7 s against 5.8 s)
    old = faiss.cvar.distance_compute_min_k_reservoir
    faiss.cvar.distance_compute_min_k_reservoir = 1
    try:
        vals, ids = faiss.knn(q, b, k, metric=m)
    finally:
        faiss.cvar.distance_compute_min_k_reservoir = old
    return torch.from_numpy(vals), torch.from_numpy(ids)


def dots64(query: torch.Tensor, base: torch.Tensor, ids: torch.Tensor, block: int = 1 << 22) -> torch.Tensor:
    """Inner products of each query with its candidates, in float64, at most ``block`` gathered values at once.

    Shape: query (Q, D), base (N, D), ids (Q, L) -> (Q, L) float64.
    """
    q64, out = query.double(), torch.empty(ids.shape, dtype=torch.float64)
    step = max(1, block // max(1, ids.shape[1] * query.shape[1]))
    for s in range(0, ids.shape[0], step):
        cand = base[ids[s : s + step]].double()  # (b, L, D)
        out[s : s + step] = torch.bmm(cand, q64[s : s + step, :, None]).squeeze(2)
    return out


def order_candidates(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates ordered by (-value, id), as a stable descending sort of the full row orders them.

    Shape: values (Q, L), ids (Q, L) -> both (Q, L).
    """
    by_id = torch.sort(ids, dim=1)
    v = torch.gather(values, 1, by_id.indices)
    order = torch.sort(v, dim=1, descending=True, stable=True).indices
    return torch.gather(v, 1, order), torch.gather(by_id.values, 1, order)


def reference_batches(rows: torch.Tensor, n: int, chunk: int) -> list[torch.Tensor]:
    """The rows to recompute so that each of ``rows`` comes out as the reference computes it, the reference
    computing rows [s, s + chunk) of n together: one batch per chunk that holds some of ``rows``, made up with other
    rows of that chunk to ``MIN_GEMM_ROWS`` (or the whole chunk, when it is smaller).

    Shape: rows (r,) int64 -> sorted (m_i,) int64 batches, together a superset of rows.
    """
    out: list[torch.Tensor] = []
    rows = torch.unique(rows.cpu())  # sorted
    which = rows // chunk
    for c in torch.unique(which).tolist():
        mine, start, stop = rows[which == c], c * chunk, min(n, (c + 1) * chunk)
        want = min(MIN_GEMM_ROWS, stop - start)
        if mine.numel() < want:
            free = torch.ones(stop - start, dtype=torch.bool)
            free[mine - start] = False
            fill = torch.nonzero(free).squeeze(1)[: want - mine.numel()] + start
            mine = torch.sort(torch.cat([mine, fill])).values
        out.append(mine)
    return out


@dataclass
class Candidates:
    """Each query's best candidates by faiss, with what the reference could make of them.

    ids (Q, L) int64 and sims (Q, L) float64, ordered as a stable descending sort orders them (by -sim, then
    id); slack (Q,): the reference's similarity of every candidate is within slack of ``sims``; ceiling (Q,): the
    reference's similarity of every item not among the candidates (the query's own item aside) is at most this.
    """

    ids: torch.Tensor
    sims: torch.Tensor
    slack: torch.Tensor
    ceiling: torch.Tensor


def propose(query: torch.Tensor, base: torch.Tensor, length: int, ref_dtype: torch.dtype, base_norm: float,
            own: torch.Tensor | None = None, recompute: bool = False) -> Candidates:
    """The ``length`` best of ``base`` for each query by faiss's exact inner-product search; with ``own`` (each
    query's index in ``base``), ``length - 1`` of them, the query's own item left out.

    Shape: query (Q, D), base (N, D) on the CPU, length <= N, own (Q,) -> Candidates of L = length (- 1) columns.
    ``ref_dtype`` is the dtype the reference multiplies in; ``base_norm`` the largest row norm of base. The
    similarities are faiss's float32 ones, or with ``recompute`` float64 ones (a slack of about half; costs a
    gather of Q x L x D).
    """
    d = query.shape[1]
    vals, ids = faiss_knn(query, base, length)
    if own is not None:
        drop = ids == own[:, None]
        drop[:, -1] |= ~drop.any(1)  # the query was not returned: the last one goes instead
        keep = ~drop
        vals, ids = vals[keep].view(ids.shape[0], length - 1), ids[keep].view(ids.shape[0], length - 1)
    scale = query.double().norm(dim=1) * base_norm * (1 + 1e-6) + 1e-30  # (Q,) >= |q| |b| for every b
    ref_err, faiss_err = gamma(d + 2, ref_dtype) * scale, gamma(d + 2) * scale  # faiss reads float32 copies
    # every item faiss did not return is exactly at most its last value + faiss_err; to the reference, + ref_err
    ceiling = vals[:, -1].double() + faiss_err + ref_err
    if recompute:
        sims, slack = dots64(query, base, ids), ref_err + gamma(d + 2, torch.float64) * scale
    else:
        sims, slack = vals.double(), ref_err + faiss_err
    sims, ids = order_candidates(sims, ids)
    return Candidates(ids, sims, slack, ceiling)
