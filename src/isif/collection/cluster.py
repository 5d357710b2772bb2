"""``isif cluster``: seeded k-means of an embed folder, clusters.csv, clusters.json and a contact sheet per cluster.

Euclidean k-means (``isif.evaluate.kmeans``: k-means++ seeding, Lloyd iterations to convergence) on the unit-norm
features. On unit vectors ||x - y||^2 = 2 - 2 cos(x, y); the centres are the plain means of their members (not
re-normalised, so this is not spherical k-means), and ``distance_to_centre`` is the Euclidean distance to that mean.
Clusters are renumbered by size: cluster 0 is the largest.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base.errors import UserError
from ..data.decode import report_skipped
from .embed_dir import EmbedDir, load_embed_dir, output_dir, require_images
from .render import read_csv, rows_image, thumbnails, write_bytes, write_csv, write_png


@dataclass
class Clustering:
    labels: np.ndarray  # (N,) int64, cluster 0 the largest
    distances: np.ndarray  # (N,) float64, Euclidean distance to the own centre
    centres: np.ndarray  # (k, D) float64, the means of the members
    inertia: float  # sum of squared distances


def cluster_features(z: np.ndarray, k: int, seed: int = 0, iters: int = 100, engine: str = "auto") -> Clustering:
    """Seeded k-means of the rows of z (see the module docstring); depends only on z, k, seed and iters (the
    engine, ``isif.evaluate.engine``, changes the speed only)."""
    import torch

    from ..evaluate.kmeans import kmeans

    n = z.shape[0]
    labels_t, centres_t = kmeans(torch.from_numpy(np.ascontiguousarray(z, np.float32)), k, iters=iters, seed=seed,
                                 engine=engine)
    labels, centres = labels_t.numpy().astype(np.int64), centres_t.numpy().astype(np.float64)
    sizes = np.bincount(labels, minlength=k)
    first = np.full(k, n)
    np.minimum.at(first, labels, np.arange(n))
    order = np.lexsort((first, -sizes))  # old ids, largest first; ties by the earliest member
    new = np.empty(k, np.int64)
    new[order] = np.arange(k)
    labels, centres = new[labels], centres[order]
    dist = np.linalg.norm(z.astype(np.float64) - centres[labels], axis=1)
    return Clustering(labels, dist, centres, float((dist**2).sum()))


def cluster_order(c: Clustering) -> np.ndarray:
    """Row indices sorted by cluster, then distance to the centre, then index."""
    return np.lexsort((np.arange(len(c.labels)), c.distances, c.labels))


def cluster_folder(embed_dir: str, k: int, seed: int = 0, out: str | None = None, per_sheet: int = 64,
                   tile: int = 64) -> dict:
    """clusters.csv, clusters.json and clusters/cluster-NNN.png (most central images first)."""
    ed = load_embed_dir(embed_dir)
    n = len(ed.paths)
    if not 1 <= k <= n:
        raise UserError(f"--k {k}: must be between 1 and the number of images ({n})")
    if per_sheet < 1 or tile < 16:
        raise UserError("--per-sheet must be >= 1 and --tile >= 16 pixels")
    require_images(ed)
    dest = output_dir(ed, out)
    c = cluster_features(np.asarray(ed.features), k, seed)  # k-means holds the collection in memory
    order = cluster_order(c)
    write_csv(dest / "clusters.csv", ("path", "cluster", "distance_to_centre"),
              ((ed.paths[i], int(c.labels[i]), f"{c.distances[i]:.6f}") for i in order))
    sizes = np.bincount(c.labels, minlength=k)
    meta = {"k": k, "seed": seed, "sizes": sizes.tolist(), "inertia": c.inertia, "images": n,
            "method": "Euclidean k-means (k-means++ seeding) on the unit-norm features; clusters by size",
            "embed_dir": str(ed.folder.resolve())}
    write_bytes(dest / "clusters.json", (json.dumps(meta, indent=2) + "\n").encode())
    sheets = cluster_sheets(ed, c, order, dest / "clusters", per_sheet, tile)
    return {"k": k, "sizes": sizes.tolist(), "inertia": c.inertia, "out": str(dest), "sheets": len(sheets)}


def cluster_sheets(ed: EmbedDir, c: Clustering, order: np.ndarray, folder: Path, per_sheet: int,
                   tile: int) -> list[Path]:
    """One contact sheet per non-empty cluster; stale cluster-NNN.png sheets of a larger k are removed."""
    k = len(c.centres)
    width = max(3, len(str(k - 1)))
    sorted_labels = c.labels[order]
    written, bad = [], []
    for j in range(k):
        lo, hi = np.searchsorted(sorted_labels, [j, j + 1])
        if hi == lo:
            continue
        members = order[lo:min(hi, lo + per_sheet)]
        tiles = thumbnails([ed.image(i) for i in members], tile, bad)
        cols = max(1, math.ceil(math.sqrt(len(tiles))))
        rows = [("", tiles[s:s + cols], []) for s in range(0, len(tiles), cols)]
        shown = f", the {len(members)} most central" if hi - lo > len(members) else ""
        img = rows_image(f"cluster {j}: {hi - lo} images{shown}", rows, tile)
        written.append(folder / f"cluster-{j:0{width}d}.png")
        write_png(written[-1], img)
    keep = {p.name for p in written}
    for p in folder.glob("cluster-*.png"):
        if re.fullmatch(r"cluster-\d+\.png", p.name) and p.name not in keep:
            p.unlink()
    report_skipped(bad, "the contact sheets")
    return written


@dataclass
class ClusterTable:
    """clusters.csv read back: ``k`` clusters, ``of[i]`` the cluster of paths.txt's row i, and ``rows`` the
    (row, cluster, distance to the centre) of every image in the file's order (by cluster, most central first)."""

    k: int
    of: np.ndarray
    rows: list[tuple[int, int, float]]


def read_clusters(ed: EmbedDir, shown: str) -> ClusterTable | None:
    """The embed folder's clusters.csv (``isif cluster``) for exactly the images of its paths.txt, or None when there
    is none; None and one warning line naming the fix (``shown``: what goes without them) when it is unreadable or
    made for other images (before the last ``isif embed``)."""
    import sys

    path = ed.folder / "clusters.csv"
    if not path.is_file():
        return None
    fix = f"{shown} (re-run `isif cluster {ed.folder} --k K`)"
    where = {p: i for i, p in enumerate(ed.paths)}
    rows = read_csv(path, lambda r: (r["path"], int(r["cluster"]), float(r["distance_to_centre"])), fix)
    if rows is None:
        return None
    named = {p for p, _, _ in rows}
    if len(rows) != len(ed.paths) or named != set(where) or any(c < 0 for _, c, _ in rows):
        print(f"isif: warning: {path} was made before the last `isif embed` (not for the images of {ed.folder}); {fix}",
              file=sys.stderr)
        return None
    of = np.full(len(ed.paths), -1, dtype=np.int64)
    for p, c, _ in rows:
        of[where[p]] = c
    return ClusterTable(int(of.max()) + 1, of, [(where[p], c, d) for p, c, d in rows])
