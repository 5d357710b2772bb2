"""A training run's metrics as the reader sees them at the end: the one line ``isif train`` prints.

The table of the metrics themselves (names, meanings, directions, formats, what writes them) is
``isif.evaluate.metrics``, below the training layer because the evaluation writes most of them.
"""

from __future__ import annotations

import os

from ..evaluate.metrics import metric, summary
from .config import Config


def final_summary(cfg: Config, history: list[dict], out: str | os.PathLike | None = None) -> str | None:
    """The last evaluation of a run in one line, or None when it was never evaluated: 'kNN top-1 62.83% (k=200,
    sigma=0.1) after epoch 200', 'unseen classes: R@1 ...' or 'held-out images (no labels): views ...', then
    '; run folder: OUT' when ``out`` is given."""
    evals = [r for r in history if summary(r)]
    if not evals:
        return None
    last = evals[-1]
    if last.get("knn_top1") is not None:
        knn = metric("knn_top1")
        what = f"kNN top-1 {knn.format(last['knn_top1'])}% (k={cfg.eval.knn_k}, sigma={cfg.eval.knn_sigma})"
    elif last.get("recall@1") is not None:
        what = f"unseen classes: {summary(last)}"
    else:
        what = f"held-out images (no labels): {summary(last)}"
    return f"{what} after epoch {last['epoch']}" + (f"; run folder: {out}" if out is not None else "")
