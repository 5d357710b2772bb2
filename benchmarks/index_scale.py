"""Exact, IVF and HNSW search over synthetic embeddings that have neighbourhoods: build time, memory, latency
and Recall@10 against exact search, in one run.

    python benchmarks/index_scale.py [--n 1000000] [--dim 128] [--clusters 10000] [--queries 1000]

The embeddings are drawn from a seeded mixture of --clusters Gaussian clusters on the unit sphere (so the
nearest neighbours are meaningful, unlike uniform noise), made here and never stored. Queries are fresh draws
from the same mixture. For each kind: build seconds, the index's size in memory (its serialised bytes), the
latency of single queries (p50, p99 over --queries one-row searches) and of one batch of --queries rows, and
Recall@10 against brute force (float32 matrix products, ``isif.collection.index.exact_topk``).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def mixture(n: int, d: int, clusters: int, seed: int, spread: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = centres[rng.integers(0, clusters, m)] + spread / np.sqrt(d) * rng.normal(size=(m, d)).astype(np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--kinds", default="exact,ivf,hnsw")
    args = ap.parse_args()
    import faiss

    from isif.collection.index import build, exact_topk

    t0 = time.perf_counter()
    both = mixture(args.n + args.queries, args.dim, args.clusters, 0)
    z, q = both[: args.n], both[args.n:]  # the queries: fresh draws from the same mixture
    print(f"{args.n:,} x {args.dim} embeddings from {args.clusters:,} clusters in {time.perf_counter() - t0:.1f} s; "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads", file=sys.stderr)
    t0 = time.perf_counter()
    _, truth = exact_topk(q, z, 10)
    print(f"brute-force truth for {args.queries} queries: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print("| index | parameters | build s | memory MiB | single query p50 ms | p99 ms | batch of "
          f"{args.queries} ms | Recall@10 |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for kind in args.kinds.split(","):
        t0 = time.perf_counter()
        index, params = build(z, kind)
        build_s = time.perf_counter() - t0
        mem = faiss.serialize_index(index).nbytes / 2**20
        lat = []
        for i in range(len(q)):
            t = time.perf_counter()
            index.search(q[i:i + 1], 10)
            lat.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        _, got = index.search(q, 10)
        batch_ms = (time.perf_counter() - t) * 1000
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), truth.tolist(), strict=True)])
        p50, p99 = np.percentile(lat, [50, 99])
        print(f"| {kind} | {params} | {build_s:.1f} | {mem:.0f} | {p50:.2f} | {p99:.2f} | {batch_ms:.0f} | "
              f"{recall:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
