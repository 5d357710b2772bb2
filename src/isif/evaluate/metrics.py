"""The one table of the metrics a run records: every key of metrics.jsonl, what it means, which way is better, how
it is printed and what writes it.

A row of metrics.jsonl holds, in this order: the loop's ``epoch, loss, knn_top1, lr, images_per_s, train_s``,
then what the evaluation found (kNN top-1, or Recall@K, MAP@R and NMI on unseen classes; the label-free metrics
and ``holdout_s`` when images are held out), then ``eval_s`` (evaluated epochs only), ``peak_memory_mib`` and
``elapsed_s``. ``recall@K`` stands for one key per K of ``--retrieval-ks`` (``recall@1``, ``recall@2``, ...).

The run log (its console line and the logger's ``eval/*`` scalars), the plots, the race table and ``isif train``'s
last line read their names, formats and directions here; the evaluation (``protocol``, ``labelfree``) writes the
keys.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# who writes a metric: an evaluation protocol (knn, retrieval on unseen classes, label-free on held-out images), or
# the training loop itself
EVALUATIONS = ("knn", "retrieval", "label-free")


@dataclass(frozen=True)
class Metric:
    key: str  # the metrics.jsonl key ("recall@K": one per K)
    meaning: str
    better: str  # "higher", "lower", or "" (a setting, a count or a time: neither)
    fmt: str  # the value's format spec in console lines and tables
    protocol: str  # what writes it: "knn", "retrieval", "label-free", or "loop"
    short: str  # its name in console lines and tables
    label: str  # its name on a plot's axis or legend
    evaluation: bool = True  # a result of the evaluation (logged as eval/KEY), not a time or a training value

    def format(self, value: float) -> str:
        return format(value, self.fmt)

    def axis(self) -> str:
        """The plot axis label, saying when lower is better."""
        return f"{self.label} (lower is better)" if self.better == "lower" else self.label


def _loop(key: str, meaning: str, fmt: str, short: str, label: str, better: str = "") -> Metric:
    return Metric(key, meaning, better, fmt, "loop", short, label, evaluation=False)


METRICS: tuple[Metric, ...] = (
    _loop("epoch", "epochs done; 0: the one evaluation of a method that does not train", "d", "epoch", "epoch"),
    _loop("loss", "mean training loss of the epoch's steps (None for a method that does not train)", ".4f", "loss",
          "training loss", better="lower"),
    Metric("knn_top1", "weighted kNN top-1 accuracy (%) on the labelled test images, the bank embedded with the test "
                       "transform (k=--knn-k, sigma=--knn-sigma); None when not evaluated or on unseen classes",
           "higher", ".2f", "knn", "kNN", "kNN top-1 (%)"),
    _loop("lr", "learning rate of the epoch's last step", ".4g", "lr", "learning rate"),
    _loop("images_per_s", "training images (views) per second over the epoch's steps", ".0f", "img/s", "images/s",
          better="higher"),
    _loop("train_s", "seconds of training steps so far, over every resume", ".0f", "train time (s)",
          "training time (s)"),
    Metric("recall@K", "Recall@K (%) on unseen classes: queries with a same-class image among their K nearest "
                       "others", "higher", ".2f", "retrieval", "R@K", "Recall@K on unseen classes (%)"),
    Metric("map@r", "MAP@R (%) on unseen classes; None when every class has one image", "higher", ".2f", "retrieval",
           "MAP@R", "MAP@R (%)"),
    Metric("nmi", "NMI (%) of k-means clusters of the unseen classes' test images against their labels", "higher",
           ".2f", "retrieval", "NMI", "NMI (%)"),
    Metric("view_top1", "held-out images (%) whose other augmented view is their view's nearest", "higher", ".1f",
           "label-free", "views top-1", "view top-1"),
    Metric("view_top5", "held-out images (%) whose other augmented view is among their view's 5 nearest", "higher",
           ".1f", "label-free", "top-5", "view top-5"),
    Metric("alignment", "mean squared distance between two views of a held-out image", "lower", ".3f", "label-free",
           "align", "alignment"),
    Metric("uniformity", "log mean exp(-2 d^2) over pairs of different held-out images", "lower", ".2f", "label-free",
           "unif", "uniformity"),
    Metric("rankme", "effective rank (RankMe) of the held-out images' embeddings; near 1 when they collapse",
           "higher", ".1f", "label-free", "rank", "effective rank"),
    Metric("pos_cos", "mean cosine of two views of a held-out image", "", ".3f", "label-free", "positives",
           "positives' cosine"),
    Metric("neg_cos", "mean cosine of two different held-out images", "", ".3f", "label-free", "negatives",
           "negatives' cosine"),
    Metric("holdout_s", "seconds of the label-free metrics in this evaluation", "", ".1f", "label-free",
           "held-out time (s)", "held-out time (s)", evaluation=False),
    _loop("eval_s", "seconds of this epoch's evaluation (evaluated epochs only)", ".1f", "eval time (s)",
          "evaluation time (s)"),
    _loop("peak_memory_mib", "peak memory (MiB): GPU allocated, or the process's resident set on the CPU", ".0f",
          "peak memory (MiB)", "peak memory (MiB)"),
    _loop("elapsed_s", "seconds of training and evaluation so far", ".0f", "elapsed (s)", "elapsed (s)"),
)
_BY_KEY = {m.key: m for m in METRICS}
RECALL = _BY_KEY["recall@K"]


def loop_row(epoch: int, loss: float | None, lr: float, images_per_s: float, train_s: float) -> dict:
    """The row the training loop starts for an epoch, in metrics.jsonl's order; the evaluation fills
    ``knn_top1`` (kept in its place) and adds its own keys after ``train_s``."""
    return {"epoch": epoch, "loss": loss, "knn_top1": None, "lr": lr, "images_per_s": images_per_s,
            "train_s": train_s}


def recall_key(k: int) -> str:
    return f"recall@{k}"


def lookup(key: str) -> Metric | None:
    """The table's entry for a metrics-row key (``recall@4``: R@4), or None for a key it does not know."""
    if key.startswith("recall@") and key[len("recall@"):].isdigit():
        k = key[len("recall@"):]
        return replace(RECALL, key=key, short=f"R@{k}", label=RECALL.label.replace("@K", f"@{k}"))
    return _BY_KEY.get(key)


def metric(key: str) -> Metric:
    m = lookup(key)
    if m is None:
        raise KeyError(f"{key!r} is not a metric of metrics.jsonl (isif.evaluate.metrics.METRICS)")
    return m


def is_evaluation(key: str) -> bool:
    """Is this metrics-row key an evaluation result (kNN top-1, a retrieval or a label-free metric)?"""
    m = lookup(key)
    return m is not None and m.evaluation


def is_retrieval(key: str) -> bool:
    m = lookup(key)
    return m is not None and m.protocol == "retrieval" and m.evaluation


def primary(rows: list[dict]) -> Metric:
    """The labelled metric of these rows, to plot and to race on: kNN top-1, or Recall@1 when only retrieval was
    evaluated."""
    if any(r.get("knn_top1") is not None for r in rows) or not any(recall_key(1) in r for r in rows):
        return metric("knn_top1")
    return metric(recall_key(1))


def fmt(row: dict, key: str) -> str:
    return metric(key).format(row[key])


def summary(row: dict) -> str:
    """'kNN 62.83%' or 'R@1 31.20 R@2 ... NMI 40.10', then the label-free 'views top-1/5 71.2/90.3% rank 54.1 align
    0.412 unif -2.31', for a metrics row; '' when it has no evaluation."""
    out = []
    if row.get("knn_top1") is not None:
        out.append(f"{metric('knn_top1').short} {fmt(row, 'knn_top1')}%")
    rec = [f"{metric(k).short} {fmt(row, k)}" for k, v in row.items() if k.startswith("recall@") and v is not None]
    if rec and row.get("knn_top1") is None:
        out.append(" ".join(rec) + f" {metric('nmi').short} {fmt(row, 'nmi')}")
    if row.get("view_top1") is not None:
        out.append(f"{metric('view_top1').short}/5 {fmt(row, 'view_top1')}/{fmt(row, 'view_top5')}% "
                   + " ".join(f"{metric(k).short} {fmt(row, k)}" for k in ("rankme", "alignment", "uniformity")))
    return "  ".join(out)
