"""``isif select``: which images of an embed folder to label first, without any label.

Strategies (``STRATEGIES``; each picks ``budget`` rows of a pool of unit-norm features around the rows already
labelled, Euclidean distances as their papers use them):

- ``typiclust`` (Hacohen et al., ICML 2022): k-means into (labelled + budget) clusters, at most 500; each pick goes
  to the cluster with the fewest labelled images (ties: the largest; clusters under 5 images skipped) and takes its
  most typical image, typicality = 1 / the mean distance to its 20 nearest neighbours in the cluster.
- ``probcover`` (Yehuda et al., NeurIPS 2022): greedy maximum coverage of balls of radius delta; delta is the
  largest radius at which 95% of the balls are pure, purity judged by k-means pseudo-labels with as many clusters
  as typiclust uses. An (open) ball around x is pure while delta is at most x's distance to the nearest image of
  another pseudo-class, so delta is the 5% quantile of those distances: read from the embedding, never by hand.
- ``kcenter`` (the coreset of Sener and Savarese, ICLR 2018): greedy farthest-first from the labelled images (from
  one seeded image when there are none).
- ``random``: the baseline.

Above ``pool`` rows (default 100,000) every strategy works on a seeded sample of that many plus the labelled rows,
read from the memory-mapped features, so a collection of millions selects in the memory of its sample.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base.errors import UserError
from ..base.settings import at_least, one_of, setting
from .embed_dir import EmbedDir, load_embed_dir, made_from_these, output_dir
from .render import read_csv, rows_image, thumbnails, write_bytes, write_csv, write_png

MAX_CLUSTERS, MIN_CLUSTER, TYPICAL_K = 500, 5, 20  # TypiClust's constants
PURITY = 0.95  # ProbCover's alpha
EDGES_MAX = 100_000_000  # ProbCover's graph (int32 neighbour lists: 400 MB)
CELLS = 1 << 24  # distances computed at a time (64 MiB of float32)


@dataclass
class Picks:
    """Rows of the pool in pick order and each pick's score (``score`` names it; None for random)."""

    rows: np.ndarray
    scores: np.ndarray
    score: str | None
    detail: dict


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances of unit rows (2 - 2 cos), clipped at 0."""
    return np.maximum(2.0 - 2.0 * (a @ b.T), 0.0)


def _block(n: int) -> int:
    return max(1, CELLS // max(n, 1))


def n_clusters(labelled: int, budget: int, n: int) -> int:
    return max(1, min(labelled + budget, MAX_CLUSTERS, n))


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    import torch

    from ..evaluate.kmeans import kmeans

    return kmeans(torch.from_numpy(x), k, iters=100, seed=seed)[0].numpy()


def typicality(x: np.ndarray, k: int = TYPICAL_K) -> np.ndarray:
    """1 / (mean distance to the k nearest other rows + 1e-5), TypiClust's measure (k capped at len(x) - 1)."""
    k = min(k, len(x) - 1)
    if k < 1:
        return np.ones(len(x))
    out, b = np.empty(len(x)), _block(len(x))
    for s in range(0, len(x), b):
        d2 = _sq_dists(x[s:s + b], x)
        d2[np.arange(len(d2)), np.arange(s, s + len(d2))] = np.inf  # not itself
        near = np.partition(d2, k - 1, axis=1)[:, :k]
        out[s:s + len(d2)] = 1.0 / (np.sqrt(near.astype(np.float64)).mean(1) + 1e-5)
    return out


def typiclust(x: np.ndarray, labelled: np.ndarray, budget: int, seed: int) -> Picks:
    k = n_clusters(int(labelled.sum()), budget, len(x))
    clusters = _kmeans(x, k, seed)
    sizes = np.bincount(clusters, minlength=k)
    counts = np.bincount(clusters[labelled], minlength=k)
    taken = labelled.copy()
    typ: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    rows, scores = [], []
    for _ in range(budget):
        free = np.bincount(clusters[~taken], minlength=k)
        ok = (sizes >= MIN_CLUSTER) & (free > 0)
        if not ok.any():
            ok = free > 0
        c = np.lexsort((-sizes, counts))  # fewest labelled first, then the largest
        c = int(c[ok[c]][0])
        if c not in typ:
            members = np.nonzero(clusters == c)[0]
            typ[c] = (members, typicality(x[members]))
        members, t = typ[c]
        t = np.where(taken[members], -np.inf, t)
        j = int(np.argmax(t))
        rows.append(int(members[j]))
        scores.append(float(t[j]))
        taken[members[j]] = True
        counts[c] += 1
    return Picks(np.array(rows, np.int64), np.array(scores), "typicality", {"clusters": k})


def other_class_distance(x: np.ndarray, pseudo: np.ndarray) -> np.ndarray:
    """Each row's Euclidean distance to the nearest row of another pseudo-class (inf when there is none): one
    pseudo-class's rows against all the others at a time, so no mask over all N^2 pairs."""
    d2 = np.full(len(x), np.inf, np.float32)
    for c in np.unique(pseudo):
        inside = pseudo == c
        xc, out = x[inside], np.nonzero(~inside)[0]
        b = _block(len(xc))
        for s in range(0, len(out), b):
            rows = out[s:s + b]
            d2[rows] = np.minimum(d2[rows], _sq_dists(x[rows], xc).min(1))
    return np.sqrt(d2.astype(np.float64))


def radius_of(x: np.ndarray, k: int, seed: int) -> tuple[float, float]:
    """ProbCover's delta for k pseudo-classes: the largest radius with ``PURITY`` of the balls pure; and the share
    of pure balls at it."""
    if k < 2:
        raise UserError("probcover needs at least 2 clusters to judge purity: raise --budget, or use typiclust")
    d = np.sort(other_class_distance(x, _kmeans(x, k, seed)))
    delta = float(d[len(d) - math.ceil(PURITY * len(d))])  # balls are open: pure while delta <= d
    return delta, float((d >= delta).mean())


def ball_graph(x: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """CSR neighbour lists (indptr, indices) of the rows within ``delta`` of each row (itself included)."""
    lists, total = [], 0
    r2, b = delta * delta, _block(len(x))
    for s in range(0, len(x), b):
        d2 = _sq_dists(x[s:s + b], x)
        i, j = np.nonzero(d2 < r2)
        total += len(j)
        if total > EDGES_MAX:
            raise UserError(f"probcover's graph at radius {delta:.3f} would hold over {EDGES_MAX:,} edges: pass a "
                            "smaller --pool, or --strategy typiclust")
        lists.append((i + s, j.astype(np.int32)))
    rows = np.concatenate([a for a, _ in lists])
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(x)))]).astype(np.int64)
    return indptr, np.concatenate([b for _, b in lists])


def probcover(x: np.ndarray, labelled: np.ndarray, budget: int, seed: int) -> Picks:
    k = n_clusters(int(labelled.sum()), budget, len(x))
    delta, pure = radius_of(x, k, seed)
    indptr, nbr = ball_graph(x, delta)
    covered = np.zeros(len(x), bool)

    def cover(i: int) -> np.ndarray:
        ball = nbr[indptr[i]:indptr[i + 1]]
        new = ball[~covered[ball]]
        covered[new] = True
        return new

    degree = np.diff(indptr).astype(np.int64)  # uncovered rows in each ball (the graph is symmetric)

    def uncount(new: np.ndarray) -> None:
        if len(new):
            touched = np.concatenate([nbr[indptr[c]:indptr[c + 1]] for c in new])
            degree[:] -= np.bincount(touched, minlength=len(x))

    for i in np.nonzero(labelled)[0]:
        uncount(cover(int(i)))
    taken = labelled.copy()
    rng = np.random.default_rng(seed)
    rows, scores = [], []
    for _ in range(budget):
        d = np.where(taken, -1, degree)
        i = int(np.argmax(d))
        if d[i] <= 0:  # every image covered: the rest at random, as the paper's code does
            i = int(rng.choice(np.nonzero(~taken)[0]))
        new = cover(i)
        uncount(new)
        rows.append(i)
        scores.append(float(len(new)))
        taken[i] = True
    return Picks(np.array(rows, np.int64), np.array(scores), "newly_covered",
                 {"clusters": k, "radius": delta, "pure_balls": pure,
                  "covered": float(covered.mean()), "mean_ball": float(np.diff(indptr).mean())})


def kcenter(x: np.ndarray, labelled: np.ndarray, budget: int, seed: int) -> Picks:
    d2 = np.full(len(x), np.inf)
    lab = x[labelled]
    if len(lab):
        b = _block(len(lab))
        for t in range(0, len(x), b):
            d2[t:t + b] = _sq_dists(x[t:t + b], lab).min(1)
    taken = labelled.copy()
    rows, scores = [], []
    first = None if labelled.any() else int(np.random.default_rng(seed).integers(len(x)))
    for _ in range(budget):
        i = first if first is not None else int(np.argmax(np.where(taken, -1.0, d2)))
        first = None
        rows.append(i)
        scores.append(float(np.sqrt(d2[i])) if np.isfinite(d2[i]) else math.nan)
        taken[i] = True
        d2 = np.minimum(d2, np.maximum(2.0 - 2.0 * (x @ x[i]), 0.0))
    return Picks(np.array(rows, np.int64), np.array(scores), "distance", {})


def random_picks(x: np.ndarray, labelled: np.ndarray, budget: int, seed: int) -> Picks:
    free = np.nonzero(~labelled)[0]
    rows = np.random.default_rng(seed).choice(free, budget, replace=False)
    return Picks(rows.astype(np.int64), np.zeros(budget), None, {})


STRATEGIES: dict[str, Callable[[np.ndarray, np.ndarray, int, int], Picks]] = {
    "typiclust": typiclust, "probcover": probcover, "kcenter": kcenter, "random": random_picks}


AUTO_TYPICAL_UP_TO = 500  # labelled images after the picks; above it, random (docs/collection.md's benchmark)


def auto_strategy(labelled: int, budget: int) -> tuple[str, str]:
    """(strategy, why) for ``--strategy auto``, from docs/collection.md's selection benchmark: typiclust while the
    labelled set stays small (10 points ahead of random at 10 and 20 picks), random above (at 1,000 picks a
    linear probe on random picks was ahead of one on typical picks)."""
    if labelled + budget > AUTO_TYPICAL_UP_TO:
        return "random", (f"{labelled + budget:,} labelled images in all: past {AUTO_TYPICAL_UP_TO}, random picks "
                          "train a linear probe as well as any strategy in the selection benchmark")
    k = n_clusters(labelled, budget, labelled + budget)
    return "typiclust", (f"typical images of {k} clusters: the most ahead of random at small budgets in the "
                         "selection benchmark")


def pool_of(n: int, labelled: np.ndarray, pool: int, seed: int) -> np.ndarray:
    """Sorted rows the strategies see: all of them up to ``pool``, else the labelled ones and a seeded sample."""
    if n <= pool:
        return np.arange(n)
    others = np.setdiff1d(np.arange(n), labelled)
    sample = np.random.default_rng(seed).choice(others, max(pool - len(labelled), 0), replace=False)
    return np.sort(np.concatenate([labelled, sample]))


def select_rows(z, budget: int, strategy: str = "auto", seed: int = 0, labelled: np.ndarray | None = None,
                pool: int = 100_000) -> tuple[Picks, str, str, int]:
    """(picks as rows of ``z``, the strategy run, why, pool size): ``budget`` rows of ``z`` (an (N, D) array or
    memory-mapped ``Rows`` of unit rows) not in ``labelled``."""
    n = z.shape[0]
    labelled = np.unique(np.asarray([] if labelled is None else labelled, np.int64))
    free = n - len(labelled)
    if not 1 <= budget <= free:
        raise UserError(f"--budget {budget}: must be between 1 and the {free:,} images not yet labelled")
    why = ""
    if strategy == "auto":
        strategy, why = auto_strategy(len(labelled), budget)
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy}: one of auto, {', '.join(STRATEGIES)}")
    rows = pool_of(n, labelled, max(pool, budget + len(labelled)), seed)
    x = np.ascontiguousarray(z[rows], dtype=np.float32)
    mask = np.isin(rows, labelled)
    picks = STRATEGIES[strategy](x, mask, budget, seed)
    picks.rows = rows[picks.rows]
    return picks, strategy, why, len(rows)


def read_paths_csv(path: str | Path, ed: EmbedDir, what: str) -> np.ndarray:
    """Rows of the embed folder named by the ``path`` column of a CSV file (paths as paths.txt lists them)."""
    import csv

    where = {p: i for i, p in enumerate(ed.paths)}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if "path" not in (reader.fieldnames or []):
                raise UserError(f"{path}: no `path` column; {what} is a CSV file with a header row naming `path`")
            names = [r["path"] for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: unreadable ({str(e)[:80]}); {what} is a UTF-8 CSV file with a `path` column") \
            from None
    missing = [p for p in names if p not in where]
    if missing:
        raise UserError(f"{path}: {len(missing):,} of its paths are not in {ed.folder} (first: {missing[0]!r}); "
                        f"write them as {ed.folder}/paths.txt lists them")
    return np.array(sorted({where[p] for p in names}), np.int64)


@dataclass(kw_only=True)
class SelectOptions:
    embed_dir: str = setting(help="an `isif embed` output folder", positional=True, metavar="EMBED_DIR")
    budget: int = setting(help="how many images to pick", check=at_least(1))
    strategy: str = setting("auto", "auto (chosen by the budget; says which), typiclust, probcover, kcenter or "
                                    "random", check=one_of("auto", "typiclust", "probcover", "kcenter", "random"))
    exclude: str | None = setting(None, "a CSV file with a `path` column: images already labelled (the picks go "
                                        "around them)")
    seed: int = setting(0, "seed of the clustering, the sample and the random picks")
    pool: int = setting(100_000, "the strategies see every image up to this many, above a seeded sample of this "
                                 "many plus the excluded ones", check=at_least(2))
    out: str | None = setting(None, "output folder (default EMBED_DIR)")
    sheet: int = setting(100, "picks drawn in selection.png (0: none)", check=at_least(0))
    tile: int = setting(64, "thumbnail side in pixels", check=at_least(16))


@dataclass
class SelectResult:
    strategy: str
    why: str
    budget: int
    pool: int
    images: int
    labelled_before: int
    score: str | None
    detail: dict
    out: Path
    drawn: int


SELECTION_CSV, SELECTION_JSON = "selection.csv", "selection.json"


def write_selection(dest: Path, ed: EmbedDir, picks: Picks, meta: dict) -> None:
    """selection.csv (rank, path, the strategy's score) and selection.json (how, and the features it was made
    from): the one writer of both."""
    header = ("rank", "path") + ((picks.score,) if picks.score else ())
    write_csv(dest / SELECTION_CSV, header,
              ((r + 1, ed.paths[i]) + ((f"{s:.6g}",) if picks.score else ())
               for r, (i, s) in enumerate(zip(picks.rows.tolist(), picks.scores.tolist(), strict=True))))
    write_bytes(dest / SELECTION_JSON, (json.dumps(meta, indent=2) + "\n").encode())


def read_selection(ed: EmbedDir, shown: str) -> dict[int, int] | None:
    """{row: rank} of the embed folder's selection.csv when it was made from these features; None (with one
    warning line naming ``isif select``, and ``shown``: what goes without it) when it is stale or unreadable."""
    path = ed.folder / SELECTION_CSV
    fix = f"{shown} (re-run `isif select {ed.folder} --budget N`)"
    if not path.is_file() or not made_from_these(ed, path, SELECTION_JSON, fix):
        return None
    where = {p: i for i, p in enumerate(ed.paths)}
    rows = read_csv(path, lambda r: (where[r["path"]], int(r["rank"])), fix)
    return None if rows is None else dict(rows)


def select_folder(o: SelectOptions) -> SelectResult:
    """Pick ``o.budget`` images to label; selection.csv, selection.json and selection.png in the embed folder."""
    ed = load_embed_dir(o.embed_dir)
    labelled = read_paths_csv(o.exclude, ed, "--exclude") if o.exclude else np.zeros(0, np.int64)
    dest = output_dir(ed, o.out)
    picks, run, why, pool_n = select_rows(ed.features, o.budget, o.strategy, o.seed, labelled, o.pool)
    meta = {"strategy": run, "asked": o.strategy, "why": why, "budget": o.budget, "seed": o.seed, "pool": pool_n,
            "images": len(ed.paths), "labelled_before": len(labelled), "features_id": ed.features_id,
            "score": picks.score, **picks.detail}
    write_selection(dest, ed, picks, meta)
    drawn = 0
    if ed.root.is_dir() and o.sheet:
        shown = picks.rows[:o.sheet]
        bad: list[str] = []
        tiles = thumbnails([ed.image(int(i)) for i in shown], o.tile, bad)
        cols = max(1, math.ceil(math.sqrt(len(tiles))))
        grid = [("", tiles[s:s + cols], [str(s + j + 1) for j in range(len(tiles[s:s + cols]))])
                for s in range(0, len(tiles), cols)]
        more = f", the first {len(shown)}" if len(picks.rows) > len(shown) else ""
        write_png(dest / "selection.png", rows_image(f"label next: {len(picks.rows)} images by {run}{more}",
                                                      grid, o.tile))
        drawn = len(shown)
    return SelectResult(run, why, o.budget, pool_n, len(ed.paths), len(labelled), picks.score, picks.detail, dest,
                        drawn)
