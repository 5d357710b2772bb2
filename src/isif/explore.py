"""Explore an ``isif embed`` output folder: k-means clusters, near-duplicate groups and a 2-D map.

The computations are pure functions over arrays (``cluster_features``, ``similar_pairs``, ``duplicate_groups``,
``group_pairs``, ``planted_pair_scores``, ``pca_2d``, ``class_labels``); ``cluster_folder``, ``duplicates_folder``
and ``map_folder`` read an embed folder and write CSV, JSON and PNG files atomically into the embed folder or the
chosen output, never into the image folder (an output inside it is refused).

- Clusters: Euclidean k-means (``isif.evaluate.kmeans``: k-means++ seeding, Lloyd iterations to convergence) on the
  unit-norm features. On unit vectors ||x - y||^2 = 2 - 2 cos(x, y); the centres are the plain means of their
  members (not re-normalised, so this is not spherical k-means), and ``distance_to_centre`` is the Euclidean
  distance to that mean. Clusters are renumbered by size: cluster 0 is the largest.
- Duplicates: every pair with cosine >= T, found one tile of ``block`` x ``block`` similarities at a time (memory
  O(block^2), never N x N), joined into groups by union-find: connected components, so a chain a~b, b~c makes one
  group even when cos(a, c) < T. A group's members are in paths.txt order; its first member is the reference.
- Map: UMAP (umap-learn, cosine metric, seeded) or PCA: the top two principal axes of the centred features,
  from the eigendecomposition of the D x D covariance in float64 (the SVD of the centred data), each axis's sign
  fixed so that its largest-magnitude loading is positive. Deterministic; the seed picks the thumbnails drawn.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .data.decode import BadImage, decode_rgb, report_skipped
from .errors import UserError
from .io import atomic_write_bytes

FIRST = "run `isif embed CHECKPOINT FOLDER --out DIR` first"
UMAP_MISSING = ("--method umap needs umap-learn: `pip install umap-learn` (or `pip install -e '.[umap]'`), or use "
                "--method pca")
BLACK, GREY, WHITE = (0, 0, 0), (190, 190, 190), (255, 255, 255)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
           (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
           (219, 219, 141), (158, 218, 229)]  # matplotlib's tab10, then tab20's light shades


# ----------------------------------------------------------------------------- the embed folder


@dataclass
class EmbedDir:
    folder: Path
    features: np.ndarray  # (N, D) float32, rows re-normalised to unit length
    paths: list[str]  # relative to root, as in paths.txt
    root: Path  # the image folder (index.json's "root")

    def image(self, i: int) -> Path:
        return self.root / self.paths[i]


def load_embed_dir(folder: str | Path) -> EmbedDir:
    """Read features.npy, paths.txt and index.json, or refuse in one line."""
    d = Path(folder)
    if not d.is_dir():
        raise UserError(f"{folder}: no such folder; {FIRST}")
    missing = [n for n in ("features.npy", "paths.txt", "index.json") if not (d / n).is_file()]
    if missing:
        raise UserError(f"{folder}: no {' or '.join(missing)} (not an `isif embed` output); {FIRST}")
    try:
        z = np.load(d / "features.npy", allow_pickle=False)
        paths = [line for line in (d / "paths.txt").read_text().splitlines() if line]
        root = json.loads((d / "index.json").read_text()).get("root")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{folder}: unreadable embed output ({str(e)[:80]}); {FIRST}") from None
    if z.ndim != 2 or z.dtype.kind != "f" or z.shape[0] == 0 or not np.isfinite(z).all():
        raise UserError(f"{folder}/features.npy: expected a non-empty (N, D) array of finite floats, got "
                        f"{z.dtype} {z.shape}; {FIRST}")
    if z.shape[0] != len(paths):
        raise UserError(f"{folder}: features.npy holds {z.shape[0]} rows for {len(paths)} paths in paths.txt; "
                        "re-run `isif embed`")
    if not isinstance(root, str):
        raise UserError(f"{folder}/index.json: no image root; re-run `isif embed`")
    return EmbedDir(d, unit_rows(z), paths, Path(root))


def unit_rows(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float32)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def require_images(ed: EmbedDir) -> None:
    if not ed.root.is_dir():
        raise UserError(f"image folder {ed.root} (the root in {ed.folder}/index.json) is missing; the PNGs need the "
                        "images: put them back there or re-run `isif embed`")


def output_dir(ed: EmbedDir, out: str | Path | None) -> Path:
    """The output folder (default: the embed folder); never the image folder or a folder inside it."""
    target = Path(out) if out else ed.folder
    t, r = target.resolve(), ed.root.resolve()
    if t == r or r in t.parents:
        raise UserError(f"{target} lies inside the image folder {ed.root}; nothing is written there: pass --out "
                        "with a folder outside it")
    return target


# ----------------------------------------------------------------------------- clusters


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

    from .evaluate.kmeans import kmeans

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
    c = cluster_features(ed.features, k, seed)
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


# ----------------------------------------------------------------------------- near-duplicates


def similar_pairs(z: np.ndarray, threshold: float,
                  block: int = 2048) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every pair i < j with z[i] . z[j] >= threshold, as (i, j, cosine) arrays, one tile of at most
    block x block similarities at a time (tiles on and above the diagonal; only non-empty ones are yielded)."""
    n = z.shape[0]
    for r0 in range(0, n, block):
        a = z[r0:r0 + block]
        for c0 in range(r0, n, block):
            s = a @ z[c0:c0 + block].T
            ii, jj = np.nonzero(s >= threshold)
            if r0 == c0:
                keep = ii < jj
                ii, jj = ii[keep], jj[keep]
            if len(ii):
                yield ii + r0, jj + c0, s[ii, jj]


def _roots(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    r = parent[x]
    while True:
        nxt = parent[r]
        if np.array_equal(nxt, r):
            return r
        r = nxt


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the sets of a[t] and b[t] for every t, all at once: the connected components of the edges between
    the current roots, each pointed at its smallest root (which keeps every root pointing at itself)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ra, rb = _roots(parent, a), _roots(parent, b)
    diff = ra != rb
    if not diff.any():
        return
    ra, rb = ra[diff], rb[diff]
    nodes, inv = np.unique(np.concatenate([ra, rb]), return_inverse=True)
    m = len(ra)
    graph = coo_matrix((np.ones(m, np.int8), (inv[:m], inv[m:])), shape=(len(nodes), len(nodes)))
    _, comp = connected_components(graph, directed=False)
    rep = np.full(comp.max() + 1, len(parent))
    np.minimum.at(rep, comp, nodes)
    parent[nodes] = rep[comp]
    parent[:] = _roots(parent, np.arange(len(parent)))  # flatten, so later finds take one step


def duplicate_groups(z: np.ndarray, threshold: float, block: int = 2048) -> list[np.ndarray]:
    """Connected components (size >= 2) of the graph "cosine >= threshold": index arrays in ascending order,
    the largest group first, ties by the first member."""
    n = z.shape[0]
    parent = np.arange(n)
    for i, j, _ in similar_pairs(z, threshold, block):
        _union(parent, i, j)
    roots = _roots(parent, np.arange(n))
    _, inv, counts = np.unique(roots, return_inverse=True, return_counts=True)
    members = np.argsort(inv, kind="stable")
    groups = [g for g in np.split(members, np.cumsum(counts)[:-1]) if len(g) > 1]
    groups.sort(key=lambda g: (-len(g), int(g[0])))
    return groups


def group_pairs(groups: Iterable[Iterable]) -> set[frozenset]:
    """The pairs a set of groups asserts: all n(n-1)/2 unordered pairs of each group of n."""
    out: set[frozenset] = set()
    for g in groups:
        g = list(g)
        out.update(frozenset((a, b)) for s, a in enumerate(g) for b in g[s + 1:] if a != b)
    return out


def planted_pair_scores(found_pairs: Iterable, planted_pairs: Iterable) -> tuple[float, float]:
    """(precision, recall) of found pairs against planted pairs, both unordered ((a, b) == (b, a)).

    A found pair is true when it is a planted pair. Found pairs usually come from ``group_pairs`` of the
    groups, so a group of n counts as all its n(n-1)/2 pairs: a planted pair whose members share a group is
    recalled, and every other pair in that group counts against precision. Precision is nan when nothing
    was found, recall nan when nothing was planted.
    """
    found = {frozenset(p) for p in found_pairs}
    planted = {frozenset(p) for p in planted_pairs}
    hits = len(found & planted)
    return (hits / len(found) if found else math.nan), (hits / len(planted) if planted else math.nan)


def grouped_pair_scores(groups: Iterable[Iterable], planted_pairs: Iterable) -> tuple[float, float]:
    """``planted_pair_scores(group_pairs(groups), planted_pairs)`` without listing the pairs (a group of n holds
    n(n-1)/2 of them, too many to list when a poor embedding makes one giant group). Groups must be disjoint."""
    groups = [list(g) for g in groups]
    where = {m: gi for gi, g in enumerate(groups) for m in g}
    found = sum(len(g) * (len(g) - 1) // 2 for g in groups)
    planted = {frozenset(p) for p in planted_pairs}
    hits = sum(1 for p in planted if len(p) == 2 and len({where.get(m, ("alone", m)) for m in p}) == 1)
    return (hits / found if found else math.nan), (hits / len(planted) if planted else math.nan)


def duplicates_folder(embed_dir: str, threshold: float = 0.95, out: str | None = None, max_groups: int = 50,
                      tile: int = 64, block: int = 2048) -> dict:
    """duplicates.csv (group, path, similarity to the group's first member) and duplicates.png."""
    if not -1.0 <= threshold <= 1.0:
        raise UserError(f"--threshold {threshold}: a cosine similarity, must be in [-1, 1]")
    if max_groups < 1 or tile < 16 or block < 1:
        raise UserError("--max-groups and --block must be >= 1, --tile >= 16 pixels")
    ed = load_embed_dir(embed_dir)
    require_images(ed)
    dest = output_dir(ed, out)
    z = ed.features
    groups = duplicate_groups(z, threshold, block)
    sims = [z[g] @ z[g[0]] for g in groups]
    write_csv(dest / "duplicates.csv", ("group", "path", "similarity"),
              ((gi, ed.paths[i], f"{min(float(s), 1.0):.6f}")
               for gi, (g, sg) in enumerate(zip(groups, sims, strict=True)) for i, s in zip(g, sg, strict=True)))
    bad: list[str] = []
    rows = []
    for gi, (g, sg) in enumerate(zip(groups[:max_groups], sims[:max_groups], strict=True)):
        shown = g[:12]
        more = f", the first {len(shown)} shown" if len(g) > len(shown) else ""
        rows.append((f"group {gi}: {len(g)} images{more}", thumbnails([ed.image(i) for i in shown], tile, bad),
                     [f"{min(float(s), 1.0):.3f}" for s in sg[:len(shown)]]))
    title = (f"{len(groups)} near-duplicate groups at cosine >= {threshold:g}"
             + (f", the {max_groups} largest shown" if len(groups) > max_groups else "")
             + ("; under each image: cosine to the group's first" if groups else ""))
    write_png(dest / "duplicates.png", rows_image(title, rows, tile))
    report_skipped(bad, "duplicates.png")
    return {"groups": len(groups), "images": int(sum(len(g) for g in groups)), "out": str(dest)}


# ----------------------------------------------------------------------------- the 2-D map


def pca_2d(z: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, 2) float64: coordinates on the top two principal axes (sign as in the module docstring)."""
    x = np.asarray(z, dtype=np.float64)
    x = x - x.mean(axis=0)
    _, vecs = np.linalg.eigh(x.T @ x)  # ascending eigenvalues
    axes = vecs[:, ::-1][:, :2]
    signs = np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(axes.shape[1])])
    coords = x @ (axes * np.where(signs == 0, 1.0, signs))
    return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))


def umap_module():
    """umap-learn's module, or None when it is not installed."""
    try:
        import umap
    except ImportError:
        return None
    return umap


def embed_2d(z: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """((N, 2) coordinates, the method used): UMAP when asked for or, with "auto", when importable; else PCA."""
    if method not in ("auto", "umap", "pca"):
        raise UserError(f"--method {method}: choose auto, umap or pca")
    umap = umap_module() if method != "pca" else None
    if umap is None and method == "umap":
        raise UserError(UMAP_MISSING)
    if umap is None or z.shape[0] < 4:
        return pca_2d(z), "pca"
    reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_neighbors=min(15, z.shape[0] - 1))
    return np.asarray(reducer.fit_transform(z), dtype=np.float64), "umap"


def class_labels(paths: list[str]) -> list[str] | None:
    """Each path's first folder ("(top level)" for files directly in the root), when at least two labels occur
    and some folder holds several images; else None (nothing to colour by)."""
    labels = [PurePath(p).parts[0] if len(PurePath(p).parts) > 1 else "(top level)" for p in paths]
    counts = Counter(labels)
    shared = any(c > 1 for lab, c in counts.items() if lab != "(top level)")
    return labels if len(counts) > 1 and shared else None


def map_folder(embed_dir: str, method: str = "auto", out: str | None = None, thumbs: int = 2000, seed: int = 0,
               size: int = 1400, tile: int = 28) -> dict:
    """map.png (points and a seeded subsample of thumbnails at their 2-D positions) and map.csv beside it."""
    if thumbs < 0 or size < 200 or tile < 8:
        raise UserError("--thumbs must be >= 0, --size >= 200 and --tile >= 8 pixels")
    ed = load_embed_dir(embed_dir)
    if method == "umap" and umap_module() is None:
        raise UserError(UMAP_MISSING)  # before any work
    require_images(ed)
    png = Path(out) if out else ed.folder / "map.png"
    output_dir(ed, png.parent)
    xy, used = embed_2d(ed.features, method, seed)
    write_csv(png.parent / "map.csv", ("path", "x", "y"),
              ((p, f"{x:.6g}", f"{y:.6g}") for p, (x, y) in zip(ed.paths, xy, strict=True)))
    n = len(ed.paths)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(thumbs, n), replace=False))
    bad: list[str] = []
    tiles = dict(zip(pick.tolist(), thumbnails([ed.image(i) for i in pick], tile, bad), strict=True))
    labels = class_labels(ed.paths)
    title = (f"{used.upper()} map of {n} images ({ed.features.shape[1]}-d), {len(pick)} thumbnails"
             + (", coloured by folder" if labels else ""))
    write_png(png, draw_map(xy, {i: t for i, t in tiles.items() if t is not None}, labels, title, size, tile))
    report_skipped(bad, "the map")
    return {"method": used, "images": n, "thumbnails": len(pick) - len(bad), "png": str(png),
            "csv": str(png.parent / "map.csv"), "classes": len(set(labels)) if labels else 0}


# ----------------------------------------------------------------------------- drawing and writing


def thumbnails(paths: list[Path], tile: int, bad: list[str]) -> list[Image.Image | None]:
    """tile x tile RGB thumbnails (centre-cropped), decoded safely and drafted near ``tile`` (a JPEG decoded at a
    reduced scale, anything else reduced once decoded); None (and the path added to ``bad``) for a file that cannot
    be read."""
    out: list[Image.Image | None] = []
    for p in paths:
        try:
            arr = decode_rgb(p.read_bytes(), str(p), draft=tile)
        except (BadImage, OSError):
            bad.append(str(p))
            out.append(None)
            continue
        out.append(ImageOps.fit(Image.fromarray(arr), (tile, tile)))
    return out


def rows_image(title: str, rows: list[tuple[str, list[Image.Image | None], list[str]]], tile: int) -> Image.Image:
    """A white canvas: the title, then per row an optional heading, its tiles left to right (a grey square for an
    unreadable image) and an optional caption under each tile."""
    pad, line = 4, 12
    font = ImageFont.load_default()
    cols = max([len(t) for _, t, _ in rows] + [1])
    heights = [(line if head else 0) + tile + (line if caps else 0) + pad for head, _, caps in rows]
    width = max(pad + cols * (tile + pad), int(font.getlength(title)) + 2 * pad)
    canvas = Image.new("RGB", (width, 2 * pad + line + sum(heights)), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill=BLACK, font=font)
    y = 2 * pad + line
    for (head, tiles, caps), h in zip(rows, heights, strict=True):
        if head:
            draw.text((pad, y), head, fill=BLACK, font=font)
        top = y + (line if head else 0)
        for j, im in enumerate(tiles):
            x = pad + j * (tile + pad)
            canvas.paste(im if im is not None else Image.new("RGB", (tile, tile), GREY), (x, top))
            if j < len(caps):
                draw.text((x, top + tile + 1), caps[j], fill=BLACK, font=font)
        y += h
    return canvas


def draw_map(xy: np.ndarray, tiles: dict[int, Image.Image], labels: list[str] | None, title: str, size: int,
             tile: int) -> Image.Image:
    """Every point as a dot and the given thumbnails centred on their points, framed in their label's colour;
    a legend on the right when labelled."""
    top, margin = 28, tile // 2 + 4
    legend_w = 240 if labels else 0
    canvas = Image.new("RGB", (size + legend_w, size + top), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 8), title, fill=BLACK)
    lo, span = xy.min(axis=0), np.ptp(xy, axis=0)
    frac = np.where(span > 0, (xy - lo) / np.where(span > 0, span, 1), 0.5)
    px = np.rint(margin + frac * (size - 2 * margin)).astype(int)
    px[:, 1] = top + (size - px[:, 1])  # y up
    names = [lab for lab, _ in sorted(Counter(labels).items(), key=lambda t: (-t[1], t[0]))] if labels else []
    colour_of = {lab: PALETTE[s % len(PALETTE)] for s, lab in enumerate(names)}
    colours = [colour_of[lab] for lab in labels] if labels else [(90, 90, 90)] * len(xy)
    for (x, y), col in zip(px.tolist(), colours, strict=True):
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=col)
    for i, im in tiles.items():
        framed = ImageOps.expand(im, border=2, fill=colours[i])
        canvas.paste(framed, (int(px[i, 0]) - framed.width // 2, int(px[i, 1]) - framed.height // 2))
    counts = Counter(labels or [])
    for s, lab in enumerate(names[:40]):
        y = top + 10 + 16 * s
        draw.rectangle([size + 10, y, size + 22, y + 12], fill=colour_of[lab])
        draw.text((size + 28, y), f"{lab} ({counts[lab]})"[:34], fill=BLACK)
    if len(names) > 40:
        draw.text((size + 10, top + 10 + 16 * 40), f"... and {len(names) - 40} more folders", fill=BLACK)
    return canvas


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write_bytes(Path(path), lambda f: f.write(data))


def write_csv(path: Path, header: tuple[str, ...], rows: Iterable[tuple]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    write_bytes(path, buf.getvalue().encode())


def write_png(path: Path, img: Image.Image) -> None:
    atomic_write_bytes(Path(path), lambda f: img.save(f, format="PNG"))
