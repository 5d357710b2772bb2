"""How close a network puts an image and its copies, and how close it puts different pictures: the near-duplicate
threshold of an embed folder, measured on the collection itself.

``isif embed`` draws a seeded sample of the collection (``SAMPLE`` images), makes one copy of each by one edit,
the edits in turn: re-encoded as JPEG (quality 40 to 90), resized (0.5x to 1.5x a side), mirrored, or cropped
(80% to 95% of each side kept). These are what "a copy" means here; rotations, overlays and colour changes are not.
It embeds the copies with the same decoder, input recipe and network as the collection, and records in index.json
(``"calibration"``):

- ``copies``: the cosine of each sampled image to its copy, overall and per edit;
- ``nearest`` and ``second``: the cosine of each of a larger seeded sample (``LOOKALIKE_SAMPLE`` images, features
  only: no copies needed) to its nearest and second-nearest other image in the collection (up to ``NEAREST_POOL``
  images, a seeded subset above), what pictures that are not it score. The
  nearest may be a real copy of it; the second is one only when the picture was copied more than once, so the
  look-alike level is read from ``second`` (a little below what the nearest look-alike of a copy-free image scores).

The default threshold (``threshold_of``) is the 5th percentile of ``copies`` (95% of such copies found), raised to
the 99th percentile of ``second`` when the look-alikes reach higher: then about 1 image in 100 at most is grouped
with a look-alike, copies of the edits the network does not see through are lost, and ``separable`` is false,
which ``isif duplicates`` reports in one line with the share of each edit still found. The record also estimates
the share of the collection that has a copy at the threshold (``with_copy``: the nearest at or above it).
This works for any checkpoint (torchvision or timm weights included), with no training figures needed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.decode import BadImage, decode_rgb

SAMPLE = 512
VERSION = 1
EDITS = ("jpeg", "resize", "mirror", "crop")
EDIT_HELP = "re-encoded as JPEG q40-90, resized 0.5-1.5x, mirrored, or cropped to 80-95% of each side"
COPY_QUANTILE = 0.05  # the threshold finds 95% of copies ...


def copy_of(arr: np.ndarray, edit: str, rng: np.random.Generator) -> np.ndarray:
    """A copy of the (H, W, 3) uint8 image ``arr`` by one edit of ``EDITS``, its parameter drawn from ``rng``."""
    h, w = arr.shape[:2]
    if edit == "mirror":
        return np.ascontiguousarray(arr[:, ::-1])
    if edit == "crop":
        ch, cw = (max(1, round(s * rng.uniform(0.80, 0.95))) for s in (h, w))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return np.ascontiguousarray(arr[y:y + ch, x:x + cw])
    im = Image.fromarray(arr)
    if edit == "resize":
        f = rng.uniform(0.5, 1.5)
        return np.asarray(im.resize((max(8, round(w * f)), max(8, round(h * f))), Image.Resampling.BICUBIC))
    if edit == "jpeg":
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(40, 91)))
        return decode_rgb(buf.getvalue(), "copy.jpg")
    raise ValueError(f"unknown edit {edit!r}; one of {EDITS}")


NEAREST_POOL = 200_000
LOOKALIKE_SAMPLE = 2048
LOOKALIKE_QUANTILE = 0.99  # ... unless 1% of the images have a second-nearest other image above it


def _quantiles(x: np.ndarray, qs: dict[str, float]) -> dict[str, float]:
    return {k: round(float(np.quantile(x, q)), 6) for k, q in qs.items()} | {"mean": round(float(x.mean()), 6)}


def threshold_of(copies: np.ndarray, second: np.ndarray) -> tuple[float, bool]:
    """(the default threshold, whether copies and look-alikes are separable), by the module's rule."""
    t = float(np.quantile(copies, COPY_QUANTILE))
    level = float(np.quantile(second, LOOKALIKE_QUANTILE))
    return min(round(max(t, level), 4), 1.0), t >= level


def summary(copies: np.ndarray, nearest: np.ndarray, second: np.ndarray, seed: int, edits: list[str],
            pool: int) -> dict:
    """The ``"calibration"`` record of index.json from the distributions (``edits[i]`` made copy i)."""
    t, separable = threshold_of(copies, second)
    kinds = np.asarray(edits)
    return {"version": VERSION, "sample": len(copies), "seed": seed, "edits": EDIT_HELP, "pool": pool,
            "copies": _quantiles(copies, {"p01": 0.01, "p05": 0.05, "p10": 0.10, "p50": 0.5}),
            "copies_by_edit": {e: {"n": int((kinds == e).sum()), "found": round(float(np.mean(c >= t)), 4),
                                   **_quantiles(c, {"p05": 0.05, "p50": 0.5})}
                               for e in EDITS if len(c := copies[kinds == e])},
            "lookalike_sample": len(second), "nearest": _quantiles(nearest, {"p50": 0.5, "p90": 0.9, "p99": 0.99}),
            "second": _quantiles(second, {"p50": 0.5, "p90": 0.9, "p99": 0.99}),
            "lookalike_p99": round(float(np.quantile(second, LOOKALIKE_QUANTILE)), 6),
            "threshold": t, "separable": bool(separable),
            "copies_found": round(float(np.mean(copies >= t)), 4),
            "lookalikes_above": round(float(np.mean(second >= t)), 4),
            "with_copy": round(float(np.mean(nearest >= t)), 4)}


def nearest_other(features: np.ndarray, rows: list[int], rng: np.random.Generator, pool: int = NEAREST_POOL,
                  block: int = 65_536) -> tuple[np.ndarray, np.ndarray, int]:
    """(for each of ``rows``, the largest and the second-largest cosine to another row of ``features``, the number
    of rows searched): all of them up to ``pool``, else a seeded subset of ``pool`` (plus the rows themselves, left
    out as their own neighbour). Blockwise: memory O(len(rows) x block). -inf where there is no such row."""
    n = len(features)
    cand = np.arange(n) if n <= pool else np.union1d(np.sort(rng.choice(n, size=pool, replace=False)), rows)
    q = unit64(np.asarray(features[rows])).astype(np.float32)  # float32 products: ~1e-6, far below any decision
    best = np.full((len(rows), 2), -np.inf)
    where = {r: k for k, r in enumerate(rows)}
    for s0 in range(0, len(cand), block):
        idx = cand[s0:s0 + block]
        sims = (q @ unit64(np.asarray(features[idx])).astype(np.float32).T).astype(np.float64)
        for col, r in enumerate(idx.tolist()):
            if r in where:
                sims[where[r], col] = -np.inf  # not its own neighbour
        both = np.concatenate([best, sims], axis=1)
        best = -np.sort(-np.partition(both, both.shape[1] - 2, axis=1)[:, -2:], axis=1)
    return best[:, 0], best[:, 1], int(len(cand))


def unit64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def calibrate(embedder, files: list[Path], features: np.ndarray, seed: int = 0, sample: int = SAMPLE) -> dict | None:
    """The calibration record for a collection: ``files`` and their ``features`` (rows in the same order, as
    embedded), ``sample`` of them drawn with ``seed``, one copy each embedded by ``embedder``. None with fewer
    than 8 readable images (nothing to measure)."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(files), size=min(sample, len(files)), replace=False))
    kinds = [EDITS[i % len(EDITS)] for i in rng.permutation(len(pick))]
    spec, b = embedder.spec, max(1, embedder.batch_size)
    xs: list = []
    zc: list[np.ndarray] = []
    rows: list[int] = []
    edits: list[str] = []
    for i, edit in zip(pick.tolist(), kinds, strict=True):
        try:
            arr = spec.decode(files[i].read_bytes(), str(files[i]))
        except (BadImage, OSError):
            continue
        xs.append(spec.prepare(copy_of(arr, edit, rng)))
        rows.append(i)
        edits.append(edit)
        if len(xs) == b:
            zc.append(embedder.forward(xs).numpy())
            xs = []
    if xs:
        zc.append(embedder.forward(xs).numpy())
    if len(rows) < 8:
        return None
    copies = np.einsum("ij,ij->i", unit64(np.asarray(features[rows])), unit64(np.concatenate(zc)))
    more = rng.choice(len(features), size=min(LOOKALIKE_SAMPLE, len(features)), replace=False)
    nearest, second, pool = nearest_other(features, np.union1d(rows, more).tolist(), rng)
    return summary(copies, nearest, second, seed, edits, pool)
