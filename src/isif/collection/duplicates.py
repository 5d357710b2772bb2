"""``isif duplicates``: near-duplicate groups of an embed folder, duplicates.csv and duplicates.png.

A group means "the same picture": every two of its members have cosine >= T (complete linkage), so a chain of
look-alikes a~b, b~c never joins a and c, and an image is in at most one group. Why every pair and not "every
member close to a representative": a group is offered for reduction to one image, so any member must be a copy
of any other; a star around a representative lets two members be twice as far apart as either is from it (a crop
of the left half and one of the right half of a photo, or two photos of one place).

T is calibrated per embedding (``calibration.py``: how close this network puts an image and its copies, and how
close it puts different pictures, measured by ``isif embed`` on a sample of the collection and kept in
index.json); ``--threshold`` overrides it. The pairs >= T are found one tile of ``block`` x ``block``
similarities at a time (memory O(block^2), never N x N).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base.errors import UserError
from ..base.files import atomic_write_bytes
from ..base.settings import at_least, setting
from ..data.decode import report_skipped
from .embed_dir import load_embed_dir, output_dir, require_images
from .options import embed_dir_arg, tile_setting
from .pixel_stats import hash_words
from .render import read_csv, rows_image, thumbnails, write_csv, write_png
from .rows import resident

HASH_BITS = 6  # of 64: 99.6% of mirrored JPEG q60 copies within it (docs/own-images.md, "Copies whatever the network")


def similar_pairs(z: np.ndarray, threshold: float, block: int = 2048, hashes: np.ndarray | None = None,
                  hash_bits: int = -1, hash_floor: float = -1.0) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every pair i < j with z[i] . z[j] >= threshold, or with ``hashes`` (uint64 ``mirror_hash`` words) at most
    ``hash_bits`` bits apart and cosine >= ``hash_floor``, as (i, j, cosine) arrays, one tile of at most block x
    block similarities at a time (tiles on and above the diagonal; only non-empty ones are yielded)."""
    n = z.shape[0]
    for r0 in range(0, n, block):
        a = z[r0:r0 + block]
        for c0 in range(r0, n, block):
            s = a @ z[c0:c0 + block].T
            hit = s >= threshold
            if hashes is not None and hash_bits >= 0:
                near = np.bitwise_count(hashes[r0:r0 + block, None] ^ hashes[None, c0:c0 + block]) <= hash_bits
                hit |= near & (s >= hash_floor)
            ii, jj = np.nonzero(hit)
            if r0 == c0:
                keep = ii < jj
                ii, jj = ii[keep], jj[keep]
            if len(ii):
                yield ii + r0, jj + c0, s[ii, jj]


def _pairs(z: np.ndarray, threshold: float, block: int, max_pairs: int, hashes: np.ndarray | None = None,
           hash_bits: int = -1, hash_floor: float = -1.0) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) int64 arrays of every pair of ``similar_pairs``, i < j; refused past ``max_pairs`` pairs (a
    threshold inside the bulk of the similarities, where no grouping can mean "copies")."""
    ii, jj, count = [], [], 0
    for i, j, _ in similar_pairs(z, threshold, block, hashes, hash_bits, hash_floor):
        ii.append(i)
        jj.append(j)
        count += len(i)
        if count > max_pairs:
            raise UserError(f"more than {max_pairs:,} pairs of the {z.shape[0]:,} images have cosine >= "
                            f"{threshold:g}: that is not a copy threshold for this embedding; raise --threshold")
    if not ii:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ii).astype(np.int64), np.concatenate(jj).astype(np.int64)


def _complete_linkage(nodes: np.ndarray, ii: np.ndarray, jj: np.ndarray, sims: np.ndarray,
                      n: int) -> list[np.ndarray]:
    """Greedy complete linkage on the graph of the pairs (i, j) over ``nodes``: the pairs taken from the most
    similar down, two groups merged only when every pair across them is an edge (cosine >= the threshold), so
    each group is a clique of the graph. A failed merge stays failed (a larger group only has more pairs to satisfy)."""
    from scipy.sparse import csr_matrix

    adj = csr_matrix((np.ones(2 * len(ii), np.int8), (np.concatenate([ii, jj]), np.concatenate([jj, ii]))),
                     shape=(n, n))
    group = np.arange(n)
    members: dict[int, list[int]] = {int(v): [int(v)] for v in nodes}
    failed: set[tuple[int, int]] = set()
    for e in np.lexsort((jj, ii, -sims)):
        a, b = int(group[ii[e]]), int(group[jj[e]])
        if a == b or (min(a, b), max(a, b)) in failed:
            continue
        small, big = (a, b) if len(members[a]) <= len(members[b]) else (b, a)
        if len(members[small]) * len(members[big]) > 1:
            links = sum(int(np.count_nonzero(group[adj.indices[adj.indptr[v]:adj.indptr[v + 1]]] == big))
                        for v in members[small])
            if links < len(members[small]) * len(members[big]):
                failed.add((min(a, b), max(a, b)))
                continue
        members[big] += members.pop(small)
        group[members[big]] = big
    return [np.array(sorted(m)) for m in members.values() if len(m) > 1]


def _representative_first(z: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The group's members with its representative first (the medoid: the largest summed cosine to the others,
    ties to the first path), then by cosine to it, most similar first (ties in path order)."""
    s = z[g].astype(np.float64) @ z[g].astype(np.float64).T
    rep = int(np.argmax(s.sum(axis=1)))
    order = np.lexsort((g, -s[rep]))
    order = np.concatenate([[rep], order[order != rep]])
    return g[order]


def duplicate_groups(z: np.ndarray, threshold: float, block: int = 2048, max_pairs: int | None = None,
                     hashes: np.ndarray | None = None, hash_bits: int = -1,
                     hash_floor: float = -1.0) -> list[np.ndarray]:
    """Groups of near-duplicates: every two members of a group are copies, at cosine >= ``threshold`` or (with
    ``hashes``) mirror hashes at most ``hash_bits`` apart at cosine >= ``hash_floor`` (complete linkage, never a
    chain a~b~c with a, c apart), and an image is in at most one group.

    The pairs above the threshold make a graph; a connected component that is already a clique is a group as it
    stands, the others are split by ``_complete_linkage``. Each group is an index array with its representative
    first (``_representative_first``); the largest group first, ties by the representative's index. More than
    ``max_pairs`` pairs (default 50 a image, at least a million) is refused with the fix (raise the threshold)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = z.shape[0]
    ii, jj = _pairs(z, threshold, block, max_pairs or max(1_000_000, 50 * n), hashes, hash_bits, hash_floor)
    if not len(ii):
        return []
    _, comp = connected_components(coo_matrix((np.ones(len(ii), np.int8), (ii, jj)), shape=(n, n)),
                                   directed=False)
    size = np.bincount(comp, minlength=n)
    edges = np.bincount(comp[ii], minlength=n)
    groups: list[np.ndarray] = []
    split = np.nonzero((size > 1) & (edges < size * (size - 1) // 2))[0]
    clique = np.nonzero((size > 1) & (edges == size * (size - 1) // 2))[0]
    order = np.argsort(comp, kind="stable")
    starts = np.concatenate([[0], np.cumsum(size)])
    groups += [order[starts[c]:starts[c + 1]] for c in clique]
    if len(split):  # components are independent: one pass over all their pairs splits each one
        hard = np.isin(comp[ii], split)
        ih, jh = ii[hard], jj[hard]
        nodes = np.concatenate([order[starts[c]:starts[c + 1]] for c in split])
        groups += _complete_linkage(nodes, ih, jh, np.einsum("ij,ij->i", z[ih], z[jh]), n)
    groups = [_representative_first(z, g) for g in groups]
    groups.sort(key=lambda g: (-len(g), int(g[0])))
    return groups


def group_pairs(groups: Iterable[Iterable]) -> set[frozenset]:
    """The pairs a set of groups asserts: all n(n-1)/2 unordered pairs of each group of n."""
    out: set[frozenset] = set()
    for g in groups:
        g = list(g)
        out.update(frozenset((a, b)) for s, a in enumerate(g) for b in g[s + 1:] if a != b)
    return out


def large_group(n_images: int) -> int:
    """The size from which a group is implausible as copies of one picture: 25 images, or 1% of the collection."""
    return max(25, n_images // 100)


def default_threshold(ed) -> tuple[float, dict]:
    """(the calibrated threshold, the calibration record) of an embed folder, or a one-line refusal naming
    --threshold when the folder has no calibration (embedded before it was measured, or too few images)."""
    cal = ed.meta.get("calibration")
    t = cal.get("threshold") if isinstance(cal, dict) else None
    if not isinstance(t, (int, float)) or not -1.0 < t <= 1.0:
        raise UserError(f"{ed.folder}: no near-duplicate calibration in index.json (it is measured by `isif embed` "
                        "since this version); pass --threshold T (a cosine, e.g. 0.95), or re-run `isif embed "
                        "CHECKPOINT FOLDER --out EMBED_DIR --overwrite`")
    return float(t), cal


@dataclass(kw_only=True)
class DuplicatesOptions:
    embed_dir: str = embed_dir_arg()
    threshold: float | None = setting(None, "cosine similarity that makes two images copies, in (-1, 1] "
                                            "(default: calibrated by `isif embed` on the collection)")
    out: str | None = setting(None, "output folder (default EMBED_DIR)")
    max_groups: int = setting(50, "groups drawn in duplicates.png", check=at_least(1))
    tile: int = tile_setting(64)
    block: int = setting(2048, "rows and columns of one similarity tile", check=at_least(1))
    keep: str | None = setting(None, "also write the images to keep to this file, one absolute path a line: every "
                                     "image in no group and each group's representative")
    hash_bits: int = setting(HASH_BITS, "also copies: images whose mirror-aware perceptual hashes (64 bits, "
                                        "measured by `isif embed`) differ in at most this many bits (-1: the "
                                        "embedding alone)", check=at_least(-1))


@dataclass
class DuplicatesResult:
    threshold: float
    source: str  # "calibrated" or "--threshold"
    groups: int
    collection: int  # images in the collection
    images: int  # images in some group
    largest: int
    warnings: list[str]  # one line each, with what to do
    calibration: dict | None
    out: Path
    keep: int | None  # images in the keep-list, when one was written
    hashed: bool  # whether perceptual hashes joined the embedding's pairs


def duplicates_folder(o: DuplicatesOptions) -> DuplicatesResult:
    """duplicates.csv (group, path, cosine to the group's representative, which is its first row),
    duplicates.png and duplicates.json (the threshold and where it came from, the counts, the warnings); with
    ``o.keep``, that file: the absolute path of every image to keep, one a line (``keep_list``)."""
    threshold, max_groups, tile, block, keep = o.threshold, o.max_groups, o.tile, o.block, o.keep
    if threshold is not None and not (-1.0 < threshold <= 1.0):
        raise UserError(f"--threshold {threshold}: a cosine similarity, must be in (-1, 1]")
    if max_groups < 1 or tile < 16 or block < 1:
        raise UserError("--max-groups and --block must be >= 1, --tile >= 16 pixels")
    ed = load_embed_dir(o.embed_dir)
    cal = ed.meta.get("calibration") if isinstance(ed.meta.get("calibration"), dict) else None
    source = "--threshold"
    if threshold is None:
        threshold, cal = default_threshold(ed)
        source = "calibrated"
    require_images(ed)
    dest = output_dir(ed, o.out)
    if keep:
        output_dir(ed, Path(keep).parent)  # never into the image folder
    z = resident(ed.features)  # every pair is compared: in memory up to a million rows, else tiles read from disk
    hashes = image_hashes(ed, o.hash_bits)
    floor = hash_floor(cal)
    groups = duplicate_groups(z, threshold, block, hashes=hashes, hash_bits=o.hash_bits, hash_floor=floor)
    sims = [z[g] @ z[g[0]] for g in groups]
    bits = [np.bitwise_count(hashes[g] ^ hashes[g[0]]) if hashes is not None else [""] * len(g) for g in groups]
    write_csv(dest / "duplicates.csv", ("group", "path", "similarity", "hash_bits"),
              ((gi, ed.paths[i], f"{min(float(s), 1.0):.6f}", str(b))
               for gi, (g, sg, bg) in enumerate(zip(groups, sims, bits, strict=True))
               for i, s, b in zip(g, sg, bg, strict=True)))
    bad: list[str] = []
    rows = []
    for gi, (g, sg) in enumerate(zip(groups[:max_groups], sims[:max_groups], strict=True)):
        shown = g[:12]
        more = f", the first {len(shown)} shown" if len(g) > len(shown) else ""
        rows.append((f"group {gi}: {len(g)} images{more}", thumbnails([ed.image(i) for i in shown], tile, bad),
                     [f"{min(float(s), 1.0):.3f}" for s in sg[:len(shown)]]))
    title = (f"{len(groups)} near-duplicate groups at cosine >= {threshold:g} ({source})"
             + (f" or hashes <= {o.hash_bits} bits apart" if hashes is not None else "")
             + (f", the {max_groups} largest shown" if len(groups) > max_groups else "")
             + ("; under each image: cosine to the group's first, its representative" if groups else ""))
    write_png(dest / "duplicates.png", rows_image(title, rows, tile))
    report_skipped(bad, "duplicates.png")
    warnings = group_warnings(groups, len(ed.paths), threshold, cal, source)
    meta = {"threshold": threshold, "source": source, "groups": len(groups), "collection": len(ed.paths),
            "features_of": ed.checkpoint_sha256, "images": int(sum(len(g) for g in groups)),
            "largest": int(len(groups[0])) if groups else 0, "warnings": warnings, "calibration": cal,
            "hash_bits": o.hash_bits if hashes is not None else None, "hash_floor": floor}
    atomic_write_bytes(dest / "duplicates.json", lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
    kept = None
    if keep:
        rows = keep_list(len(ed.paths), groups)
        atomic_write_bytes(Path(keep), lambda fh: fh.write("".join(f"{ed.image(int(i))}\n" for i in rows).encode()))
        kept = len(rows)
    return DuplicatesResult(threshold, source, len(groups), len(ed.paths), meta["images"], meta["largest"], warnings,
                            cal, dest, kept, hashes is not None)


def hash_floor(cal: dict | None) -> float:
    """The least cosine at which a hash match counts as a copy: the 1st percentile of the calibrated copies'
    cosines (a pHash coincidence between two unrelated images is far below it), or -1 without a calibration."""
    try:
        return float(cal["copies"]["p01"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return -1.0


def image_hashes(ed, hash_bits: int) -> np.ndarray | None:
    """The (N,) uint64 mirror hashes of the collection (``pixel_stats.mirror_hash``), or None: ``hash_bits`` < 0,
    or an embed folder written before isif measured them (one line says how to get them)."""
    if hash_bits < 0:
        return None
    pixels = ed.pixels
    if pixels is None:
        import sys

        print(f"isif: copies by the embedding alone: {ed.folder} was embedded before isif measured perceptual "
              f"hashes; `isif embed {ed.checkpoint} {ed.root} --out {ed.folder}` measures them", file=sys.stderr)
        return None
    return hash_words(pixels)


def keep_list(n: int, groups: list[np.ndarray]) -> np.ndarray:
    """The rows to keep, in row order: every row in no group, and each group's first (its representative)."""
    keep = np.ones(n, bool)
    for g in groups:
        keep[np.asarray(g)[1:]] = False
    return np.nonzero(keep)[0]


def group_warnings(groups: list[np.ndarray], n: int, threshold: float, cal: dict | None, source: str) -> list[str]:
    """One line each, with what to do: a group too large to be copies; an embedding that cannot separate copies
    from different pictures (by its calibration); a --threshold below what the calibration calls a copy."""
    out = []
    if groups and len(groups[0]) >= large_group(n):
        out.append(f"the largest group holds {len(groups[0])} of the {n} images, implausible as copies of one "
                   "picture: look at duplicates.png, and raise --threshold"
                   + (f" (the calibrated one is {cal['threshold']:g})" if cal and source != "calibrated" else ""))
    level = cal.get("lookalike_p99") if cal else None
    if cal and not cal.get("separable", True):
        lost = ", ".join(f"{e} {v['found']:.0%}" for e, v in cal.get("copies_by_edit", {}).items() if v["found"] < 0.9)
        out.append(f"this network puts look-alikes as close as copies (1% of the images have a second-nearest "
                   f"image above {level:.3f}; 5% of copies are below {cal['copies']['p05']:.3f}), so the threshold "
                   f"{cal['threshold']:g} finds only part of some copies ({lost or 'each edit under 95%'}); train "
                   "longer or on more images, or pass a lower --threshold and check duplicates.png")
    elif level is not None and source != "calibrated" and threshold < level:
        out.append(f"--threshold {threshold:g} is below the look-alike level of this collection ({level:.3f}: 1% of "
                   f"the images have a second-nearest image that close): expect look-alikes in the groups; the "
                   f"calibrated threshold is {cal['threshold']:g}")
    return out


def read_duplicates(ed, shown: str) -> np.ndarray | None:
    """duplicates.csv read back (``isif duplicates``): the group of paths.txt's row i, -1 outside every group; None
    when there is none; None and one warning line naming the fix (``shown``: what goes without it) when it is
    unreadable or was made for another collection (before the last ``isif embed``, or by another checkpoint)."""
    import sys

    path = ed.folder / "duplicates.csv"
    if not path.is_file():
        return None
    fix = f"{shown} (re-run `isif duplicates {ed.folder}`)"
    where = {p: i for i, p in enumerate(ed.paths)}
    rows = read_csv(path, lambda r: (r["path"], int(r["group"])), fix)
    if rows is None:
        return None
    try:
        meta = json.loads((path.parent / "duplicates.json").read_text())
    except (OSError, ValueError) as e:
        print(f"isif: warning: {path.parent / 'duplicates.json'} is unreadable ({str(e)[:60]}); {fix}", file=sys.stderr)
        return None
    paths = [p for p, _ in rows]
    if (not isinstance(meta, dict) or meta.get("collection") != len(ed.paths)
            or meta.get("features_of") != ed.checkpoint_sha256 or len(set(paths)) != len(paths)
            or any(p not in where for p in paths) or any(g < 0 for _, g in rows)):
        print(f"isif: warning: {path} was made before the last `isif embed` (not for the images of {ed.folder}); "
              f"{fix}", file=sys.stderr)
        return None
    of = np.full(len(ed.paths), -1, dtype=np.int64)
    for p, g in rows:
        of[where[p]] = g
    return of
