"""``isif cluster``: seeded k-means of an embed folder, clusters.csv, clusters.json and a contact sheet per cluster.

Euclidean k-means (``isif.evaluate.kmeans``: k-means++ seeding, Lloyd iterations to convergence) on the unit-norm
features. On unit vectors ||x - y||^2 = 2 - 2 cos(x, y); the centres are the plain means of their members (not
re-normalised, so this is not spherical k-means), and ``distance_to_centre`` is the Euclidean distance to that mean.
Clusters are renumbered by size: cluster 0 is the largest. Above ``--train-rows`` images (default a million) k-means
trains on a seeded sample of that many and then gives every image its nearest centre, reading the memory-mapped
features a block at a time, so a collection larger than memory clusters in the memory of its sample.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base.errors import UserError
from ..base.settings import at_least, setting
from ..data.decode import report_skipped
from .embed_dir import EmbedDir, load_embed_dir, output_dir, require_images
from .options import embed_dir_arg, tile_setting
from .render import read_csv, rows_image, thumbnails, write_bytes, write_csv, write_png


@dataclass
class Clustering:
    labels: np.ndarray  # (N,) int64, cluster 0 the largest
    distances: np.ndarray  # (N,) float64, Euclidean distance to the own centre
    centres: np.ndarray  # (k, D) float64, the means of the members
    inertia: float  # sum of squared distances


@dataclass(kw_only=True)
class ClusterOptions:
    embed_dir: str = embed_dir_arg()
    k: int = setting(help="number of clusters (1 to the number of images)")
    seed: int = setting(0, "k-means++ seed (and of the training sample)")
    train_rows: int = setting(1_000_000, "k-means trains on every image up to this many, above on a seeded sample "
                                         "of this many (then every image goes to its nearest centre)",
                              check=at_least(1))
    out: str | None = setting(None, "output folder (default EMBED_DIR)")
    per_sheet: int = setting(64, "images per contact sheet, most central first", check=at_least(1))
    tile: int = tile_setting(64)


@dataclass
class ClusterResult:
    k: int
    sizes: list[int]  # images a cluster, the largest first
    inertia: float
    out: Path
    sheets: int  # contact sheets written


TRAIN_ROWS = ClusterOptions.train_rows  # k-means runs on every row up to here; above, on a seeded sample of this many


def cluster_features(z, k: int, seed: int = 0, iters: int = 100, engine: str = "auto",
                     train_rows: int = TRAIN_ROWS) -> Clustering:
    """Seeded k-means of the rows of z (see the module docstring); depends only on z, k, seed, iters and
    train_rows (the engine, ``isif.evaluate.engine``, changes the speed only).

    z is an (N, D) array or ``rows.Rows`` (memory-mapped). Up to ``train_rows`` rows, Lloyd runs on all of them and
    the centres are the means of their members. Above, it runs on a seeded sample of ``train_rows`` rows (read
    from disk), and every row is then assigned to its nearest centre block by block, so the collection is never in
    memory: the centres are then the sample's means, and ``labels``/``distances`` those of the nearest centre."""
    import torch

    from ..evaluate.kmeans import kmeans

    n = z.shape[0]
    if train_rows < k:
        raise UserError(f"--train-rows {train_rows}: k-means needs at least --k ({k}) rows to train on")
    sample = (np.sort(np.random.default_rng(seed).choice(n, train_rows, replace=False)) if n > train_rows
              else None)
    x = z[sample] if sample is not None else z[:]
    labels_t, centres_t = kmeans(torch.from_numpy(np.ascontiguousarray(x, np.float32)), k, iters=iters, seed=seed,
                                 engine=engine)
    centres = centres_t.numpy().astype(np.float64)
    if sample is None:
        labels = labels_t.numpy().astype(np.int64)
        dist = np.linalg.norm(x.astype(np.float64) - centres[labels], axis=1)
    else:
        del x, labels_t
        labels, dist = nearest_centres(z, centres)
    sizes = np.bincount(labels, minlength=k)
    first = np.full(k, n)
    np.minimum.at(first, labels, np.arange(n))
    order = np.lexsort((first, -sizes))  # old ids, largest first; ties by the earliest member
    new = np.empty(k, np.int64)
    new[order] = np.arange(k)
    return Clustering(new[labels], dist, centres[order], float((dist**2).sum()))


ASSIGN_BLOCK = 8192  # rows given their nearest centre at a time (4 MiB of 128-d float32, k floats each)


def nearest_centres(z, centres: np.ndarray, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest centre, Euclidean distance to it in float64) for every row of z, ``block`` rows read
    at a time. The nearest is k-means's own assignment (``kmeans.nearest_centroid``, float32), its distance
    recomputed in float64."""
    import torch

    from ..evaluate.kmeans import nearest_centroid

    n, block = z.shape[0], block or ASSIGN_BLOCK
    c32, c64 = torch.from_numpy(centres.astype(np.float32)), centres.astype(np.float64)
    labels, dist = np.empty(n, np.int64), np.empty(n, np.float64)
    for s in range(0, n, block):
        xb = np.ascontiguousarray(z[s:s + block], np.float32)
        lb = nearest_centroid(torch.from_numpy(xb), c32, block).numpy()
        labels[s:s + len(xb)] = lb
        dist[s:s + len(xb)] = np.linalg.norm(xb.astype(np.float64) - c64[lb], axis=1)
    return labels, dist


def cluster_order(c: Clustering) -> np.ndarray:
    """Row indices sorted by cluster, then distance to the centre, then index."""
    return np.lexsort((np.arange(len(c.labels)), c.distances, c.labels))


def cluster_folder(o: ClusterOptions) -> ClusterResult:
    """clusters.csv, clusters.json and clusters/cluster-NNN.png (most central images first)."""
    k, seed, per_sheet, tile, train_rows = o.k, o.seed, o.per_sheet, o.tile, o.train_rows
    ed = load_embed_dir(o.embed_dir)
    n = len(ed.paths)
    if not 1 <= k <= n:
        raise UserError(f"--k {k}: must be between 1 and the number of images ({n})")
    if per_sheet < 1 or tile < 16:
        raise UserError("--per-sheet must be >= 1 and --tile >= 16 pixels")
    require_images(ed)
    dest = output_dir(ed, o.out)
    c = cluster_features(ed.features, k, seed, train_rows=train_rows)  # on disk: read in blocks above train_rows
    order = cluster_order(c)
    write_csv(dest / "clusters.csv", ("path", "cluster", "distance_to_centre"),
              ((ed.paths[i], int(c.labels[i]), f"{c.distances[i]:.6f}") for i in order))
    sizes = np.bincount(c.labels, minlength=k)
    sampled = f"trained on a seeded sample of {train_rows:,} images, every image then given its nearest centre; " \
        if n > train_rows else ""
    meta = {"k": k, "seed": seed, "sizes": sizes.tolist(), "inertia": c.inertia, "images": n,
            "trained_on": min(n, train_rows),
            "method": f"Euclidean k-means (k-means++ seeding) on the unit-norm features; {sampled}clusters by size",
            "embed_dir": str(ed.folder.resolve())}
    write_bytes(dest / "clusters.json", (json.dumps(meta, indent=2) + "\n").encode())
    sheets = cluster_sheets(ed, c, order, dest / "clusters", per_sheet, tile)
    return ClusterResult(k, sizes.tolist(), float(c.inertia), dest, len(sheets))


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
