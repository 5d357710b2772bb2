"""faiss index kinds over synthetic embeddings that have neighbourhoods: build time, memory, bytes a vector,
latency and Recall@10 against exact search, with and without exact re-ranking, in one run.

    python benchmarks/index_scale.py [--n 1000000] [--dim 128] [--clusters 10000] [--queries 1000]
        [--kinds exact,ivf,hnsw,ivfpq,ivfpq-hnsw] [--rerank 100] [--nlist N] [--nprobe 32,64,128]
        [--exact-latency 100] [--shards DIR] [--shard-rows 1000000]

The embeddings are drawn from a seeded mixture of --clusters Gaussian clusters on the unit sphere (so the
nearest neighbours are meaningful, unlike uniform noise). With --shards, they are written there as .npy shards of
--shard-rows (the layout of an embed folder) and read back memory-mapped through ``isif.collection.rows.Rows``,
so the float collection is never in memory as a whole (10M x 128 is 5.1 GB on disk); without, they are made in
memory. Queries are fresh draws from the same mixture. For each kind: build seconds (training and adding), the
index's size (its serialised bytes) and bytes a vector, the latency of single queries (p50, p99 over --queries
one-row searches; --exact-latency of them for the exact kind) and of one batch of --queries rows, and Recall@10
against brute force (float32 matrix products, block by block); for the compressed kinds also with the index's
--rerank best re-scored exactly on the (memory-mapped) float features, the way ``isif search`` and ``isif serve``
search with ``isif index --rerank``; with a comma list of --nprobe, each is measured on the one build.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def mixture(n: int, d: int, clusters: int, seed: int, spread: float = 0.35, out: np.ndarray | None = None,
            start: int = 0, block: int = 100_000) -> np.ndarray:
    """Rows [start, start + n) of the seeded mixture: row r is made in block r // ``block`` by that block's own
    generator, so the rows are the same whatever range (a shard) they are asked for in."""
    centres = np.random.default_rng(seed).normal(size=(clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), np.float32) if out is None else out
    for b in range(start // block, -(-(start + n) // block)):
        rng = np.random.default_rng([seed, b])
        x = centres[rng.integers(0, clusters, block)] + spread / np.sqrt(d) * rng.normal(size=(block, d)).astype(
            np.float32)
        lo, hi = max(start, b * block), min(start + n, (b + 1) * block)
        x = x[lo - b * block:hi - b * block]
        out[lo - start:hi - start] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def collection(n: int, d: int, clusters: int, shards: Path | None, shard_rows: int):
    """The n rows: an array, or ``Rows`` over memory-mapped shards written to ``shards`` (kept when present)."""
    if shards is None:
        return mixture(n, d, clusters, 0)
    from isif.collection.rows import Rows

    shards.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, s in enumerate(range(0, n, shard_rows)):
        f = shards / f"{n}-{d}-{clusters}-{i:05d}.npy"
        m = min(shard_rows, n - s)
        if not f.is_file():
            z = np.lib.format.open_memmap(f.with_suffix(".tmp.npy"), mode="w+", dtype=np.float32, shape=(m, d))
            mixture(m, d, clusters, 0, out=z, start=s)
            z.flush()
            del z
            f.with_suffix(".tmp.npy").rename(f)
        parts.append(np.load(f, mmap_mode="r"))
    return Rows(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--kinds", default="exact,ivf,hnsw,ivfpq,ivfpq-hnsw")
    ap.add_argument("--rerank", type=int, default=100)
    ap.add_argument("--nlist", type=int, default=None, help="cells of the IVF kinds (default: isif index's)")
    ap.add_argument("--nprobe", default=None,
                    help="cells a query visits (default: isif index's); a comma list measures each on one build")
    ap.add_argument("--exact-latency", type=int, default=100,
                    help="single queries timed for the exact kind (each scans the whole collection)")
    ap.add_argument("--pq-m", type=int, default=32)
    ap.add_argument("--shards", type=Path, default=None)
    ap.add_argument("--shard-rows", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    import faiss

    from isif.collection.index import build, exact_rescore, exact_topk, quantizer_ef_search, set_search_params
    from isif.collection.rows import Rows

    t0 = time.perf_counter()
    z = collection(args.n, args.dim, args.clusters, args.shards, args.shard_rows)
    q = mixture(args.queries, args.dim, args.clusters, 0, start=10**12)  # fresh draws from the same mixture
    where = f"memory-mapped shards in {args.shards}" if args.shards else "memory"
    print(f"{args.n:,} x {args.dim} embeddings from {args.clusters:,} clusters ({where}) in "
          f"{time.perf_counter() - t0:.1f} s; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    _, truth = exact_topk(q, z, 10)
    print(f"brute-force truth for {args.queries} queries: {time.perf_counter() - t0:.1f} s", file=sys.stderr,
          flush=True)
    rows = z if isinstance(z, Rows) else Rows([z])
    print("| index | parameters | build s | memory MiB | bytes / vector | single query p50 ms | p99 ms | batch of "
          f"{args.queries} ms | Recall@10 |\n|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for kind in args.kinds.split(","):
        extra = {}
        nprobes = [int(p) for p in args.nprobe.split(",")] if args.nprobe else [None]
        if kind != "exact" and kind != "hnsw":
            extra = {"nlist": args.nlist, "nprobe": nprobes[0]}
        if kind.startswith("ivfpq"):
            extra["pq_m"] = args.pq_m
        t0 = time.perf_counter()
        index, params = build(z, kind, **extra)
        build_s = time.perf_counter() - t0
        size = faiss.serialize_index(index).nbytes
        print(f"{kind}: built in {build_s:.1f} s (training {params.get('train_s', 0):.1f} s on "
              f"{params.get('train', 0):,} vectors, adding {build_s - params.get('train_s', 0):.1f} s)",
              file=sys.stderr, flush=True)
        variants = [(kind, 0)] + ([(f"{kind} + re-rank {args.rerank}", args.rerank)] * kind.startswith("ivfpq"))
        sweep = nprobes if "nprobe" in params else [None]
        for (name, rerank), nprobe in [(v, p) for p in sweep for v in variants]:
            if nprobe is not None:
                params["nprobe"] = nprobe
                if "quantizer_efSearch" in params:
                    params["quantizer_efSearch"] = quantizer_ef_search(nprobe)
                set_search_params(index, params)
            shown = {k: v for k, v in params.items() if k not in ("factory", "train_s")}

            def one(x: np.ndarray, rerank=rerank, index=index):
                if not rerank:
                    return index.search(x, 10)[1]
                _, cand = index.search(x, rerank)
                return exact_rescore(x, rows, cand, 10, [None] * len(x))[1]

            lat = []
            for i in range(min(len(q), args.exact_latency) if kind == "exact" else len(q)):
                t = time.perf_counter()
                one(q[i:i + 1])
                lat.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            got = one(q)
            batch_ms = (time.perf_counter() - t) * 1000
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), truth.tolist(), strict=True)])
            p50, p99 = np.percentile(lat, [50, 99])
            print(f"| {name} | {params.get('factory', kind)} {shown} | {build_s:.1f} | {size / 2**20:.0f} | "
                  f"{size / args.n:.1f} | {p50:.2f} | {p99:.2f} | {batch_ms:.0f} | {recall:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
