"""``isif audit``: what in a collection should not be trained on, and what of it leaks into another one.

Per image, an outlier score from the embedding and the pixel checks of ``CHECKS`` from the statistics ``isif
embed`` measured while decoding (``pixel_stats.py``), each a score (higher: worse) and a flag; the files that
did not decode, from the embedding's manifests. The outlier score is the mean cosine distance to the k nearest
other images (the kNN outlier score of Angiulli and Pizzuti, 2002), as a robust z-score against the
collection's own distances: (d - median) / (1.4826 MAD), flagged above ``OUTLIER_Z``. With ``--against`` the
images with a near-duplicate in the other collection (the same checkpoint's embedding; the calibrated copy
threshold), found through the other collection's index when it has one. Rules and measurements:
docs/collection.md ("Auditing").
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base.errors import UserError
from ..base.settings import at_least, setting
from .duplicates import HASH_BITS, default_threshold, hash_floor, image_hashes
from .embed_dir import EmbedDir, load_embed_dir, made_from_these, output_dir
from .pixel_stats import COLUMNS
from .render import read_csv, rows_image, thumbnails, write_bytes, write_csv, write_png
from .rows import BLOCK, Rows

OUTLIER_Z = 3.5  # Iglewicz and Hoaglin's cut for a robust z-score
QUERIES = 1 << 26  # similarities computed at a time (256 MiB of float32)
AUDIT_CSV, AUDIT_JSON, LEAKS_CSV = "audit.csv", "audit.json", "leaks.csv"


@dataclass(frozen=True)
class Check:
    """A pixel check: its score of the statistics (N, len(COLUMNS)) (higher: worse) and its flag of the score."""

    what: str
    score: Callable[[np.ndarray], np.ndarray]
    flag: Callable[[np.ndarray], np.ndarray]


def _col(p: np.ndarray, name: str) -> np.ndarray:
    return p[:, COLUMNS.index(name)].astype(np.float64)


def _robust_z(x: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD), the MAD floored at 1e-6 of the median's scale (a constant column)."""
    med = np.median(x)
    mad = 1.4826 * np.median(np.abs(x - med))
    return (x - med) / max(mad, 1e-6 * max(abs(med), 1.0))


def _side_ratio(p: np.ndarray) -> np.ndarray:
    """|log2(side / the median side)|, side = sqrt(width x height)."""
    side = np.log2(np.sqrt(np.maximum(_col(p, "width") * _col(p, "height"), 1)))
    return np.abs(side - np.median(side))


def _aspect_ratio(p: np.ndarray) -> np.ndarray:
    """|log2(aspect / the median aspect)|, aspect = width / height."""
    a = np.log2(np.maximum(_col(p, "width"), 1) / np.maximum(_col(p, "height"), 1))
    return np.abs(a - np.median(a))


CHECKS: dict[str, Check] = {
    "blurry": Check("sharpness far below the collection's (robust z of the Laplacian's share of the variance)",
                    lambda p: -_robust_z(_col(p, "sharpness")), lambda s: s > 3.0),
    "dark": Check("even the brightest pixels are dark (99th percentile of brightness under 0.35)",
                  lambda p: 1 - _col(p, "bright_p99"), lambda s: s > 0.65),
    "bright": Check("even the darkest pixels are bright (1st percentile of brightness over 0.65)",
                    lambda p: _col(p, "bright_p01"), lambda s: s > 0.65),
    "low_information": Check("a brightness histogram of under 4 bits of entropy (near-constant)",
                             lambda p: 1 - _col(p, "entropy") / 8, lambda s: s > 0.5),
    "odd_aspect": Check("over twice as wide or as tall as the collection's typical image",
                        _aspect_ratio, lambda s: s > 1.0),
    "odd_size": Check("a side over 4 times or under a quarter of the collection's typical side",
                      _side_ratio, lambda s: s > 2.0),
    "grayscale": Check("no colour (the mean spread of R, G and B under 1% of the range)",
                       lambda p: 1 - _col(p, "colour"), lambda s: s > 0.99),
}


@dataclass(kw_only=True)
class AuditOptions:
    embed_dir: str = setting(help="an `isif embed` output folder", positional=True, metavar="EMBED_DIR")
    against: str | None = setting(None, "another embed folder (the same checkpoint): the images of EMBED_DIR with "
                                        "a near-duplicate there go to leaks.csv")
    k: int = setting(10, "the outlier score's neighbours: the mean distance to the k nearest other images",
                     check=at_least(1))
    threshold: float | None = setting(None, "the copy threshold of --against, a cosine (default: EMBED_DIR's "
                                            "calibrated one)")
    hash_bits: int = setting(HASH_BITS, "with --against, also a copy: mirror-aware perceptual hashes at most this "
                                        "many bits apart (of 64; -1: the embedding alone)", check=at_least(-1))
    checks: str | None = setting(None, "the pixel checks to run, comma-separated, or none (default: every one "
                                       "the embed folder has statistics for)")
    exact: bool = setting(False, "exact neighbours even when a faiss index is there")
    out: str | None = setting(None, "output folder (default EMBED_DIR)")
    sheet: int = setting(48, "the worst images drawn per issue in audit-ISSUE.png (0: none)", check=at_least(0))
    tile: int = setting(64, "thumbnail side in pixels", check=at_least(16))


@dataclass
class AuditResult:
    images: int
    counts: dict[str, int]  # flagged images per issue, "outlier" and "unreadable" included
    worst: dict[str, list[tuple[str, float]]]  # per issue, the worst flagged (path, score)
    pixels: bool  # whether the pixel checks ran (the embed folder has the statistics)
    neighbours: str  # "exact" or the index that gave them
    leaks: int | None
    leak_threshold: float | None
    out: Path


def nearest(queries: Rows | np.ndarray, gallery: Rows, k: int, index=None,
            skip_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(similarities (q, k), ids (q, k)) of each query's k nearest gallery rows: exact in blocks of queries
    (memory O(block x BLOCK)), or the index's candidates re-scored exactly; ``skip_self``: the queries are the
    gallery, and row i never counts as its own neighbour."""
    from .index import _exact_topk_rows, exact_rescore

    n, kk = len(queries), k + int(skip_self)
    qb = max(1, min(n, QUERIES // max(1, min(len(gallery), BLOCK))))
    sims, ids = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    for s in range(0, n, qb):
        q = np.ascontiguousarray(queries[s:s + qb], dtype=np.float32)
        own = list(range(s, s + len(q))) if skip_self else [None] * len(q)
        if index is not None:
            _, cand = index.search(q, max(kk, 32))
            sc, ci = exact_rescore(q, gallery, cand, k, own)
        else:
            sc, ci = _exact_topk_rows(q, gallery, kk)
            if skip_self:
                keep = ci != np.arange(s, s + len(q))[:, None]
                keep[keep.sum(1) > k, -1] = False  # self not among them: drop the last instead
                sc, ci = sc[keep].reshape(len(q), k), ci[keep].reshape(len(q), k)
        sims[s:s + len(q)], ids[s:s + len(q)] = sc[:, :k], ci[:, :k]
    return sims, ids


def _index_of(ed: EmbedDir, exact: bool):
    """(the faiss index of ``ed`` when it has a current one and ``exact`` is off, its name), else (None, "exact")."""
    if exact or not (ed.folder / "index.faiss").is_file():
        return None, "exact"
    from .index import load_index

    index, meta = load_index(ed.folder, ed.features_id)
    return index, str(meta.get("kind", "index"))


def outlier_scores(ed: EmbedDir, k: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray, dict, str]:
    """(robust z-scores, the mean cosine distances to the k nearest, {median, mad}, how the neighbours were found).
    The mean of the k rather than the k-th alone: steadier, and the score cleanlab's Datalab ranks by."""
    if len(ed.paths) <= k:
        raise UserError(f"--k {k}: the collection has {len(ed.paths)} images; choose a k below that")
    index, how = _index_of(ed, exact)
    sims, _ = nearest(ed.features, ed.features, k, index, skip_self=True)
    d = 1.0 - sims.astype(np.float64).mean(1)
    med = float(np.median(d))
    mad = float(1.4826 * np.median(np.abs(d - med)))
    return _robust_z(d), d, {"median": med, "mad": mad}, how


def leak_threshold(ed: EmbedDir, other: EmbedDir, threshold: float | None) -> tuple[float, str]:
    """(the copy threshold, where it came from) for leaks of ``ed`` into ``other``, or a one-line refusal: another
    checkpoint's embedding, a threshold that is not a cosine, none given and none calibrated."""
    if ed.folder.resolve() == other.folder.resolve():
        raise UserError(f"--against {other.folder} is the collection audited itself: name another embed folder "
                        f"(copies within one collection: `isif duplicates {ed.folder}`)")
    if ed.checkpoint_sha256 != other.checkpoint_sha256 or ed.features.shape[1] != other.features.shape[1]:
        raise UserError(f"--against {other.folder} was embedded by another checkpoint than {ed.folder} (sha256 "
                        f"{str(other.checkpoint_sha256)[:12]}... against {str(ed.checkpoint_sha256)[:12]}...): "
                        f"embed both with one checkpoint")
    if threshold is None:
        return default_threshold(ed)[0], "calibrated"
    if not -1.0 < threshold <= 1.0:
        raise UserError(f"--threshold {threshold}: a cosine similarity, must be in (-1, 1]")
    return float(threshold), "--threshold"


def _hash_nearest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(for each hash of ``a``, the row of ``b`` fewest bits away, those bits): every pair, in blocks of rows of
    ``a`` (memory O(QUERIES) bytes)."""
    rows, bits = np.zeros(len(a), np.int64), np.zeros(len(a), np.int64)
    step = max(1, QUERIES // max(1, len(b)))
    for s in range(0, len(a), step):
        d = np.bitwise_count(a[s:s + step, None] ^ b[None, :])
        rows[s:s + step] = d.argmin(1)
        bits[s:s + step] = d[np.arange(len(d)), rows[s:s + step]]
    return rows, bits


def find_leaks(ed: EmbedDir, other: EmbedDir, threshold: float, exact: bool = False,
               hash_bits: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(rows of ``ed``, their copies' rows of ``other``, cosines, hash bits apart or None) most similar first: the
    nearest row at cosine >= ``threshold``, or (``hash_bits`` >= 0 and both have hashes) the row with the nearest
    mirror hash when it is at most ``hash_bits`` apart at a cosine of at least ``duplicates.hash_floor``."""
    index, _ = _index_of(other, exact)
    sims, ids = nearest(ed.features, other.features, 1, index)
    sim, to = sims[:, 0].astype(np.float64), ids[:, 0]
    ha = image_hashes(ed, hash_bits)
    hb = image_hashes(other, hash_bits) if ha is not None else None
    leak = sim >= threshold
    if ha is not None and hb is not None:
        hrow, hbits = _hash_nearest(ha, hb)
        cand = np.nonzero((hbits <= hash_bits) & ~leak)[0]
        hsim = np.einsum("ij,ij->i", np.asarray(ed.features[cand], np.float64),
                         np.asarray(other.features[hrow[cand]], np.float64)) if len(cand) else np.zeros(0)
        close = hsim >= hash_floor(ed.meta.get("calibration"))
        ok = cand[close]
        to[ok], sim[ok], leak[ok] = hrow[ok], hsim[close], True
    rows = np.nonzero(leak)[0]
    rows = rows[np.argsort(-sim[rows], kind="stable")]
    bits = np.bitwise_count(ha[rows] ^ hb[to[rows]]) if ha is not None and hb is not None else None
    return rows, to[rows], sim[rows], bits


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _wanted_checks(ed: EmbedDir, checks: str | None) -> list[str]:
    """The pixel checks to run: all by default; ``checks`` names some (comma-separated, or "none"), refused in one
    line when one is unknown or when the embed folder has no pixel statistics to run them on."""
    if checks is None:
        return list(CHECKS)
    names = [c.strip() for c in checks.split(",") if c.strip() and c.strip() != "none"]
    unknown = [c for c in names if c not in CHECKS]
    if unknown:
        raise UserError(f"--checks {unknown[0]!r}: not a pixel check; choose from {', '.join(CHECKS)} (or none)")
    if names and ed.pixels is None:
        raise UserError(f"--checks {','.join(names)}: {ed.folder} was embedded before isif measured these pixel "
                        f"statistics; `isif embed {ed.checkpoint} {ed.root} --out {ed.folder}` measures them")
    return names


def audit_folder(o: AuditOptions) -> AuditResult:
    """audit.csv, audit.json and audit-ISSUE.png (and leaks.csv with ``--against``) in the output folder."""
    ed = load_embed_dir(o.embed_dir)
    other = load_embed_dir(o.against) if o.against else None
    leak_t, source = leak_threshold(ed, other, o.threshold) if other is not None else (None, None)
    dest = output_dir(ed, o.out)
    z, dist, norm, how = outlier_scores(ed, o.k, o.exact)
    pixels, wanted = ed.pixels, _wanted_checks(ed, o.checks)
    if pixels is None and wanted:
        print(f"isif: pixel checks skipped: {ed.folder} was embedded before isif measured these pixel statistics; "
              f"`isif embed {ed.checkpoint} {ed.root} --out {ed.folder}` measures them (the outlier score needs "
              "only the features)", file=sys.stderr)
    scores: dict[str, np.ndarray] = {"outlier": z}
    flags: dict[str, np.ndarray] = {"outlier": z > OUTLIER_Z}
    for name, c in CHECKS.items():
        if pixels is not None and name in wanted:
            scores[name] = c.score(pixels)
            flags[name] = c.flag(scores[name])
    broken = ed.unreadable()
    header = ("path",) + tuple(x for name in scores for x in (name, f"{name}_flag")) + ("unreadable",)
    rows = ((p,) + tuple(x for name in scores for x in (_fmt(float(scores[name][i])), int(flags[name][i]))) + (0,)
            for i, p in enumerate(ed.paths))  # streamed: a million rows never held as tuples
    write_csv(dest / AUDIT_CSV, header, itertools.chain(rows, ((p,) + ("",) * (2 * len(scores)) + (1,)
                                                              for p, _ in broken)))
    counts = {name: int(f.sum()) for name, f in flags.items()} | {"unreadable": len(broken)}
    worst = {}
    for name, f in flags.items():
        idx = np.nonzero(f)[0]
        idx = idx[np.argsort(-scores[name][idx], kind="stable")]
        worst[name] = [(ed.paths[i], float(scores[name][i])) for i in idx[:5]]
    worst["unreadable"] = [(p, 0.0) for p, _ in broken[:5]]
    leaks = None
    meta = {"features_id": ed.features_id, "images": len(ed.paths), "k": o.k, "outlier_z": OUTLIER_Z,
            "outlier_distance": norm, "neighbours": how, "pixels": pixels is not None,
            "checks": {n: c.what for n, c in CHECKS.items() if n in scores}, "counts": counts,
            "unreadable": [{"path": p, "reason": r[:200]} for p, r in broken]}
    if other is not None:
        lr, lo, ls, lb = find_leaks(ed, other, leak_t, o.exact, o.hash_bits)
        bits = lb.tolist() if lb is not None else [""] * len(lr)
        write_csv(dest / LEAKS_CSV, ("path", "other_path", "cosine", "hash_bits"),
                  ((ed.paths[i], other.paths[j], f"{min(float(s), 1.0):.6f}", b)
                   for i, j, s, b in zip(lr.tolist(), lo.tolist(), ls.tolist(), bits, strict=True)))
        leaks = len(lr)
        meta["against"] = {"folder": str(other.folder), "features_id": other.features_id, "threshold": leak_t,
                           "threshold_source": source, "leaks": leaks,
                           "hash_bits": o.hash_bits if lb is not None else None}
    write_bytes(dest / AUDIT_JSON, (json.dumps(meta, indent=2) + "\n").encode())
    if o.sheet and ed.root.is_dir():
        _sheets(ed, dest, scores, flags, o)
    return AuditResult(len(ed.paths), counts, worst, pixels is not None, how, leaks, leak_t, dest)


def _sheets(ed: EmbedDir, dest: Path, scores: dict, flags: dict, o: AuditOptions) -> None:
    """audit-ISSUE.png: the worst flagged images of each issue with any, their scores under them."""
    for name, f in flags.items():
        stale = dest / f"audit-{name}.png"
        idx = np.nonzero(f)[0]
        if not len(idx):
            stale.unlink(missing_ok=True)
            continue
        idx = idx[np.argsort(-scores[name][idx], kind="stable")][:o.sheet]
        bad: list[str] = []
        tiles = thumbnails([ed.image(int(i)) for i in idx], o.tile, bad)
        cols = max(1, math.ceil(math.sqrt(len(tiles))))
        grid = [("", tiles[s:s + cols], [f"{scores[name][i]:.3g}" for i in idx[s:s + cols]])
                for s in range(0, len(tiles), cols)]
        more = f", the worst {len(idx)}" if int(f.sum()) > len(idx) else ""
        write_png(stale, rows_image(f"{name}: {int(f.sum())} images{more}", grid, o.tile))


def read_audit(ed: EmbedDir, shown: str) -> dict[str, np.ndarray] | None:
    """{column: values in paths.txt's row order} of the embed folder's audit.csv (scores float, flags bool) when
    it was made from these features; None (one warning naming ``isif audit``) when stale or unreadable."""
    path = ed.folder / AUDIT_CSV
    fix = f"{shown} (re-run `isif audit {ed.folder}`)"
    if not path.is_file() or not made_from_these(ed, path, AUDIT_JSON, fix):
        return None
    where = {p: i for i, p in enumerate(ed.paths)}
    rows = read_csv(path, lambda r: (r["path"], r), fix)
    if rows is None:
        return None
    names = [c for c in rows[0][1] if c not in ("path", "unreadable")] if rows else []
    out: dict[str, np.ndarray] = {}
    for c in names:
        flag = c.endswith("_flag")
        col = np.zeros(len(ed.paths), bool) if flag else np.full(len(ed.paths), np.nan)
        for p, r in rows:
            if p in where and r.get(c):
                col[where[p]] = r[c] == "1" if flag else float(r[c])
        out[c] = col
    return out
