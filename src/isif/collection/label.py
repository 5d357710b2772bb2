"""``isif label``: a label for every image of an embed folder from the labels of a few, with a calibrated confidence,
and the given labels most likely wrong.

The given labels are split into stratified folds (5, fewer when a class has fewer images; none below 2 a class).
Each candidate predictor is scored by its out-of-fold accuracy: the weighted kNN of isif's evaluation (votes
exp(cos / 0.1) of the k nearest labelled images, k in 10, 50, 200) and, when every class has at least 2 images,
the linear probe of ``isif.evaluate.linear`` (on standardised features). The best spreads the labels; its
temperature T (probabilities ~ p^(1/T), logits / T for the probe) is fitted on the out-of-fold predictions by
negative log-likelihood, so a confidence of 0.8 is right about 80% of the time on the given labels.

Suspects: every given image's out-of-fold probabilities (the mean of the calibrated kNN's and probe's, when both
run), none of which saw its own label. Its score is 1 - p(given label); it is flagged by confident learning's rule
(Northcutt et al., JAIR 2021: the off-diagonal of the confident joint, ``suspects_of``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base.errors import UserError
from ..base.settings import setting
from .embed_dir import EmbedDir, load_embed_dir, made_from_these, output_dir
from .render import read_csv, write_bytes, write_csv

KS = (10, 50, 200)
SIGMA = 0.1
FOLDS = 5
PROBE_MIN = 2  # labelled images a class needs for the probe to be a candidate
BLOCK = 8192


@dataclass
class Given:
    rows: np.ndarray  # (n,) rows of the collection
    y: np.ndarray  # (n,) class ids
    classes: list[str]


def read_labels(path: str | Path, ed: EmbedDir) -> Given:
    """The ``path,label`` CSV as rows and class ids, or one line naming the fix."""
    where = {p: i for i, p in enumerate(ed.paths)}
    fix = "LABELS.csv is a UTF-8 CSV file with a header row `path,label`, paths as paths.txt lists them"
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not {"path", "label"} <= set(reader.fieldnames or []):
                raise UserError(f"{path}: no `path` and `label` columns; {fix}")
            pairs = [(r["path"], (r["label"] or "").strip()) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: unreadable ({str(e)[:80]}); {fix}") from None
    missing = [p for p, _ in pairs if p not in where]
    if missing:
        raise UserError(f"{path}: {len(missing):,} of its paths are not in {ed.folder} (first: {missing[0]!r}); "
                        f"{fix}")
    seen: dict[str, str] = {}
    for p, lab in pairs:
        if not lab:
            raise UserError(f"{path}: {p!r} has an empty label; leave unlabelled images out of the file")
        if seen.setdefault(p, lab) != lab:
            raise UserError(f"{path}: {p!r} is labelled both {seen[p]!r} and {lab!r}; keep one")
    classes = sorted(set(seen.values()))
    if len(classes) < 2:
        raise UserError(f"{path}: {len(classes)} class given; labels need at least 2 classes to tell apart")
    ids = {c: j for j, c in enumerate(classes)}
    rows = np.array([where[p] for p in seen], np.int64)
    order = np.argsort(rows)
    return Given(rows[order], np.array([ids[v] for v in seen.values()], np.int64)[order], classes)


def folds_of(y: np.ndarray, seed: int) -> np.ndarray | None:
    """A stratified fold id for each label (``FOLDS``, fewer when a class has fewer), or None when some class has a
    single label."""
    counts = np.bincount(y)
    f = min(FOLDS, int(counts[counts > 0].min()))
    if f < 2:
        return None
    rng = np.random.default_rng(seed)
    out = np.empty(len(y), np.int64)
    for c in np.unique(y):
        idx = np.nonzero(y == c)[0]
        out[rng.permutation(idx)] = np.arange(len(idx)) % f
    return out


def knn_probs(q: np.ndarray, bank: np.ndarray, y: np.ndarray, classes: int, k: int) -> np.ndarray:
    import torch

    from ..evaluate.knn import knn_scores

    return knn_scores(torch.from_numpy(q), torch.from_numpy(bank), torch.from_numpy(y), classes, k, SIGMA).numpy()


def probe_logits(x: np.ndarray, y: np.ndarray, classes: int, q: np.ndarray, seed: int) -> np.ndarray:
    import torch

    from ..evaluate.linear import LinearRecipe, fit_probe

    probe = fit_probe(torch.from_numpy(x), torch.from_numpy(y), classes, LinearRecipe(seed=seed))
    return probe.logits(torch.from_numpy(q)).numpy()


def log_probs(kind: str, raw: np.ndarray) -> np.ndarray:
    """Log-probabilities before the temperature: kNN votes (smoothed), or probe logits."""
    if kind == "knn":
        return np.log(raw + 1e-6)
    return raw - raw.max(1, keepdims=True)


def calibrated(kind: str, raw: np.ndarray, t: float) -> np.ndarray:
    z = log_probs(kind, raw) / t
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def fit_temperature(kind: str, raw: np.ndarray, y: np.ndarray) -> float:
    """The T in [0.02, 50] (log grid) of least negative log-likelihood of the true labels."""
    grid = np.exp(np.linspace(np.log(0.02), np.log(50), 161))
    nll = [-np.log(calibrated(kind, raw, t)[np.arange(len(y)), y] + 1e-12).mean() for t in grid]
    return float(grid[int(np.argmin(nll))])


def ece(p: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top class (equal-width bins)."""
    conf, right = p.max(1), p.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(conf[which == b].mean() - right[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


@dataclass
class Candidate:
    name: str  # "knn-50" or "probe"
    kind: str  # knn | probe
    k: int
    oof: np.ndarray  # raw out-of-fold scores (n, C)
    accuracy: float = 0.0
    temperature: float = 1.0


def cross_validate(x: np.ndarray, y: np.ndarray, classes: int, seed: int) -> tuple[list[Candidate], np.ndarray | None]:
    """Every candidate predictor's out-of-fold scores on the given labels, and the folds (None: too few labels)."""
    folds = folds_of(y, seed)
    if folds is None:
        return [], None
    cands = [Candidate(f"knn-{k}", "knn", k, np.zeros((len(y), classes))) for k in KS if k <= len(y)]
    if not cands:
        cands = [Candidate(f"knn-{len(y)}", "knn", len(y), np.zeros((len(y), classes)))]
    if np.bincount(y, minlength=classes).min() >= PROBE_MIN:
        cands.append(Candidate("probe", "probe", 0, np.zeros((len(y), classes))))
    for f in range(int(folds.max()) + 1):
        tr, te = folds != f, folds == f
        for c in cands:
            c.oof[te] = (knn_probs(x[te], x[tr], y[tr], classes, c.k) if c.kind == "knn"
                         else probe_logits(x[tr], y[tr], classes, x[te], seed))
    for c in cands:
        c.accuracy = float((c.oof.argmax(1) == y).mean())
        c.temperature = fit_temperature(c.kind, c.oof, y)
    return cands, folds


def suspects_of(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score 1 - p(given), suggested class, flagged) from out-of-fold probabilities: confident learning's rule.
    Class j's threshold t_j is its mean probability over the images given j; an image is confidently of the
    classes whose probability reaches their threshold (the most probable class when several do); flagged when
    that class exists and is not the given one. Suggested: that class when flagged, else the likeliest other."""
    n, classes = p.shape
    score = 1.0 - p[np.arange(n), y]
    t = np.array([p[y == j, j].mean() if (y == j).any() else np.inf for j in range(classes)])
    confident = p >= t[None, :] - 1e-6
    count = confident.sum(1)
    guess = np.where(count > 1, p.argmax(1), confident.argmax(1))
    flagged = (count > 0) & (guess != y)
    other = p.copy()
    other[np.arange(n), y] = -1.0
    suggested = np.where(flagged, guess, other.argmax(1))
    return score, suggested, flagged


def spread(z, given: Given, seed: int = 0) -> dict:
    """Everything ``isif label`` writes, as arrays (see the module docstring). ``z``: (N, D) unit rows (an array or
    memory-mapped ``Rows``)."""
    import torch

    x = np.ascontiguousarray(z[given.rows], np.float32)
    classes, y = len(given.classes), given.y
    cands, folds = cross_validate(x, y, classes, seed)
    if cands:
        best = max(cands, key=lambda c: (c.accuracy, c.kind == "knn", -c.k))
        why = (f"best of {', '.join(f'{c.name} {c.accuracy:.1%}' for c in cands)} in {int(folds.max()) + 1}-fold "
               "cross-validation on the given labels")
        knn = max((c for c in cands if c.kind == "knn"), key=lambda c: c.accuracy)
        used = [knn] + [c for c in cands if c.kind == "probe"]  # the neighbours' vote and the probe's
        p_oof = np.mean([calibrated(c.kind, c.oof, c.temperature) for c in used], axis=0)
    else:
        best = Candidate(f"knn-{min(KS[0], len(y))}", "knn", min(KS[0], len(y)), np.zeros(0))
        why = "a class has a single given label: no cross-validation, kNN"
        p_oof = None
    n = z.shape[0]
    label, conf = np.empty(n, np.int64), np.empty(n)
    probe = None
    if best.kind == "probe":
        from ..evaluate.linear import LinearRecipe, fit_probe

        probe = fit_probe(torch.from_numpy(x), torch.from_numpy(y), classes, LinearRecipe(seed=seed))
    for s in range(0, n, BLOCK):
        q = np.ascontiguousarray(z[s:s + BLOCK], np.float32)
        raw = (probe.logits(torch.from_numpy(q)).numpy() if probe is not None
               else knn_probs(q, x, y, classes, best.k))
        p = calibrated(best.kind, raw, best.temperature)
        label[s:s + len(q)], conf[s:s + len(q)] = p.argmax(1), p.max(1)
    label[given.rows] = y
    out = {"label": label, "confidence": conf, "predictor": best.name, "why": why,
           "temperature": best.temperature, "candidates": {c.name: c.accuracy for c in cands}}
    if p_oof is not None:
        score, suggested, flagged = suspects_of(p_oof, y)
        conf[given.rows] = p_oof[np.arange(len(y)), y]
        best_p = calibrated(best.kind, best.oof, best.temperature)
        out.update(score=score, suggested=suggested, flagged=flagged, expected_accuracy=best.accuracy,
                   ece=ece(best_p, y), ece_uncalibrated=ece(calibrated(best.kind, best.oof, 1.0), y))
    else:
        conf[given.rows] = 1.0
    return out


@dataclass(kw_only=True)
class LabelOptions:
    embed_dir: str = setting(help="an `isif embed` output folder", positional=True, metavar="EMBED_DIR")
    labels: str = setting(help="a CSV file `path,label`: the labels given, for any subset of the images",
                          positional=True, metavar="LABELS_CSV")
    seed: int = setting(0, "seed of the folds and the probe")
    out: str | None = setting(None, "output folder (default EMBED_DIR)")


@dataclass
class LabelResult:
    classes: list[str]
    given: int
    images: int
    predictor: str
    why: str
    expected_accuracy: float | None  # out-of-fold, on the given labels
    ece: float | None
    flagged: int
    spread_to: list[int]  # images given each class among the unlabelled
    low_confidence: int  # unlabelled images under 0.5
    worst: list[tuple[str, str, str, float]]  # (path, given, suggested, score), the five likeliest wrong
    out: Path


LABELS_CSV, SUSPECTS_CSV, LABELS_JSON = "labels.csv", "suspects.csv", "labels.json"


def write_labels(dest: Path, ed: EmbedDir, given: Given, res: dict, meta: dict) -> None:
    """labels.csv, suspects.csv and labels.json: their one writer."""
    is_given = np.zeros(len(ed.paths), bool)
    is_given[given.rows] = True
    names = given.classes
    write_csv(dest / LABELS_CSV, ("path", "label", "confidence", "given"),
              ((p, names[int(res["label"][i])], f"{res['confidence'][i]:.4f}",
                names[int(res["label"][i])] if is_given[i] else "") for i, p in enumerate(ed.paths)))
    if "score" in res:
        order = np.lexsort((given.rows, -res["score"]))
        write_csv(dest / SUSPECTS_CSV, ("path", "given", "suggested", "score", "flagged"),
                  ((ed.paths[int(given.rows[j])], names[int(given.y[j])], names[int(res["suggested"][j])],
                    f"{res['score'][j]:.4f}", int(res["flagged"][j])) for j in order))
    elif (dest / SUSPECTS_CSV).exists():
        (dest / SUSPECTS_CSV).unlink()  # of other labels: never left beside these
    write_bytes(dest / LABELS_JSON, (json.dumps(meta, indent=2) + "\n").encode())


@dataclass
class LabelTable:
    """labels.csv (and suspects.csv) read back for the rows of paths.txt."""

    label: list[str]
    confidence: np.ndarray
    given: np.ndarray  # bool
    suspect: np.ndarray  # score, nan where no label was given or there is no suspects.csv


def read_labels_table(ed: EmbedDir, shown: str) -> LabelTable | None:
    """The embed folder's labels.csv and suspects.csv when made from these features; None (one warning line naming
    ``isif label``, and ``shown``: what goes without them) when stale or unreadable."""
    path = ed.folder / LABELS_CSV
    fix = f"{shown} (re-run `isif label {ed.folder} LABELS.csv`)"
    if not path.is_file() or not made_from_these(ed, path, LABELS_JSON, fix):
        return None
    where = {p: i for i, p in enumerate(ed.paths)}
    rows = read_csv(path, lambda r: (where[r["path"]], r["label"], float(r["confidence"]), bool(r["given"])), fix)
    if rows is None or len(rows) != len(ed.paths):
        return None
    label = [""] * len(ed.paths)
    conf, given, suspect = np.zeros(len(ed.paths)), np.zeros(len(ed.paths), bool), np.full(len(ed.paths), np.nan)
    for i, lab, c, g in rows:
        label[i], conf[i], given[i] = lab, c, g
    if (ed.folder / SUSPECTS_CSV).is_file():
        sus = read_csv(ed.folder / SUSPECTS_CSV, lambda r: (where[r["path"]], float(r["score"])), fix)
        for i, sc in sus or []:
            suspect[i] = sc
    return LabelTable(label, conf, given, suspect)


def label_folder(o: LabelOptions) -> LabelResult:
    """A label for every image and the suspects among the given ones (see the module docstring)."""
    ed = load_embed_dir(o.embed_dir)
    given = read_labels(o.labels, ed)
    dest = output_dir(ed, o.out)
    res = spread(ed.features, given, o.seed)
    names = given.classes
    per_class = np.bincount(given.y, minlength=len(names))
    flagged = int(res["flagged"].sum()) if "flagged" in res else 0
    meta = {"classes": names, "given": int(len(given.rows)), "images": len(ed.paths),
            "given_per_class": per_class.tolist(), "predictor": res["predictor"], "why": res["why"],
            "temperature": res["temperature"], "cross_validated": res["candidates"],
            "expected_accuracy": res.get("expected_accuracy"), "ece": res.get("ece"),
            "ece_uncalibrated": res.get("ece_uncalibrated"), "flagged": flagged, "seed": o.seed,
            "features_id": ed.features_id, "labels_csv": str(Path(o.labels).resolve())}
    write_labels(dest, ed, given, res, meta)
    unl = np.ones(len(ed.paths), bool)
    unl[given.rows] = False
    worst = ([(ed.paths[int(given.rows[j])], names[int(given.y[j])], names[int(res["suggested"][j])],
               float(res["score"][j])) for j in np.argsort(-res["score"], kind="stable")[:5]]
             if "score" in res else [])
    return LabelResult(names, int(len(given.rows)), len(ed.paths), res["predictor"], res["why"],
                       res.get("expected_accuracy"), res.get("ece"), flagged,
                       np.bincount(res["label"][unl], minlength=len(names)).tolist(),
                       int((res["confidence"][unl] < 0.5).sum()), worst, dest)
