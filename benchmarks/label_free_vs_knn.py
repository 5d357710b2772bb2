"""Do the label-free metrics track the labelled one? A run's metrics.jsonl as a table, with correlations.

    python benchmarks/label_free_vs_knn.py RUN_DIR [RUN_DIR ...]

Prints, per epoch, kNN top-1 (or Recall@1) beside the label-free metrics of the held-out images, then the
Pearson and Spearman correlation of each label-free metric with the labelled one across the evaluated epochs
(of all the runs given, pooled).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

COLUMNS = ("view_top1", "view_top5", "alignment", "uniformity", "rankme", "pos_cos", "neg_cos")


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):  # ties share their mean rank
        r[x == v] = r[x == v].mean()
    return r


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def main(runs: list[str]) -> int:
    rows = []
    for run in runs:
        for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("view_top1") is not None:
                rows.append(r)
    key = "knn_top1" if any(r.get("knn_top1") is not None for r in rows) else "recall@1"
    rows = [r for r in rows if r.get(key) is not None]
    print(f"| epoch | {key} | " + " | ".join(COLUMNS) + " | train s | images/s |")
    print("|---:" * (len(COLUMNS) + 5) + "|")
    for r in rows:
        vals = " | ".join(f"{r[c]:.3f}" if abs(r[c]) < 10 else f"{r[c]:.1f}" for c in COLUMNS)
        print(f"| {r['epoch']} | {r[key]:.2f} | {vals} | {r['train_s']:.0f} | {r['images_per_s']:.0f} |")
    y = np.array([r[key] for r in rows])
    print(f"\ncorrelation with {key} across {len(rows)} evaluations:\n")
    print("| metric | Pearson | Spearman |\n|---|---:|---:|")
    for c in COLUMNS:
        x = np.array([r[c] for r in rows])
        print(f"| {c} | {_pearson(x, y):+.3f} | {_pearson(_rank(x), _rank(y)):+.3f} |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
