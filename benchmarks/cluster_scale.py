"""``isif cluster``'s k-means on a collection larger than its training sample: time, peak memory and quality.

    python benchmarks/cluster_scale.py [--n 5000000] [--k 100] [--clusters 1000] [--train-rows 1000000]
        --shards DIR [--compare 2000000]

The rows are the seeded mixture of ``index_scale.py`` (--clusters Gaussian clusters on the unit sphere), written
to --shards as .npy shards and read back memory-mapped (``isif.collection.rows.Rows``), as an embed folder's are.
``cluster_features`` then trains on a seeded sample of --train-rows and gives every row its nearest centre a
block at a time. Printed: the seconds, the process's anonymous memory before and at its peak during k-means
(RssAnon, Linux; the memory maps' file pages are not counted: the kernel drops them under pressure) against the
bytes of the float rows (what reading them into memory would take, before any copy), and the inertia per row.
With --compare M, the first M rows are also clustered with every row training (train_rows = M, in memory) and
with the sample, and the two inertias per row are printed side by side: what the sample costs in quality.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from index_scale import collection  # noqa: E402


class AnonPeak:
    """The most anonymous resident memory (RssAnon: the process's own pages, not the file pages of the memory maps,
    which the kernel can drop) seen while the block runs, polled every 20 ms from a thread."""

    def __enter__(self) -> AnonPeak:
        self.mib, self._stop = anon_mib(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.mib = max(self.mib, anon_mib())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.mib = max(self.mib, anon_mib())


def anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--train-rows", type=int, default=1_000_000)
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--shard-rows", type=int, default=1_000_000)
    ap.add_argument("--compare", type=int, default=0)
    args = ap.parse_args(argv)
    from isif.collection.cluster import cluster_features

    t = time.perf_counter()
    rows = collection(args.n, args.dim, args.clusters, args.shards, args.shard_rows)
    print(f"{args.n:,} x {args.dim} rows as memory-mapped shards in {args.shards} ({time.perf_counter() - t:.0f} s "
          f"to write or open; {args.n * args.dim * 4 / 2**30:.2f} GiB of float32)", flush=True)
    t = time.perf_counter()
    with AnonPeak() as mem:
        before = mem.mib
        c = cluster_features(rows, args.k, seed=0, train_rows=args.train_rows)
    trained = f"every one of {args.n:,} rows" if args.train_rows >= args.n else f"{args.train_rows:,} sampled rows"
    print(f"k-means k={args.k}, trained on {trained}, all {args.n:,} assigned: "
          f"{time.perf_counter() - t:.0f} s, anonymous memory {before:,.0f} MiB before, {mem.mib:,.0f} MiB at the "
          f"peak (+{mem.mib - before:,.0f}), inertia/row "
          f"{c.inertia / args.n:.5f}, largest cluster {np.bincount(c.labels).max():,} rows",
          flush=True)
    if args.compare:
        m = args.compare
        z = rows[:m]
        t = time.perf_counter()
        full = cluster_features(z, args.k, seed=0, train_rows=m)
        tf = time.perf_counter() - t
        t = time.perf_counter()
        part = cluster_features(z, args.k, seed=0, train_rows=args.train_rows)
        tp = time.perf_counter() - t
        print(f"first {m:,} rows: every row training {tf:.0f} s, inertia/row {full.inertia / m:.5f}; "
              f"{args.train_rows:,} sampled {tp:.0f} s, inertia/row {part.inertia / m:.5f} "
              f"({part.inertia / full.inertia - 1:+.2%})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
