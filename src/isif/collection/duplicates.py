"""``isif duplicates``: near-duplicate groups of an embed folder, duplicates.csv and duplicates.png.

Every pair with cosine >= T, found one tile of ``block`` x ``block`` similarities at a time (memory O(block^2), never
N x N), joined into groups by union-find: connected components, so a chain a~b, b~c makes one group even when
cos(a, c) < T. A group's members are in paths.txt order; its first member is the reference.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ..base.errors import UserError
from ..data.decode import report_skipped
from .embed_dir import load_embed_dir, output_dir, require_images
from .render import rows_image, thumbnails, write_csv, write_png


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
