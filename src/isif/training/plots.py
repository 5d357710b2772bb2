"""Figures: learning curves, the learning-speed race (Fig. 3), similarity histograms (Fig. 5).

Every figure is written atomically as a PNG, with matplotlib's Agg backend. The metrics' axis and legend labels
(and which are better lower) come from ``isif.evaluate.metrics``.
"""

from __future__ import annotations

from pathlib import Path

from ..base.files import atomic_write_bytes
from ..evaluate.metrics import metric, primary


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write_bytes(Path(path), lambda f: fig.savefig(f, format="png", dpi=110))
    _plt().close(fig)


def _series(ax, history: list[dict], key: str, color: str, **kw) -> None:
    ev = [r for r in history if r.get(key) is not None]
    ax.plot([r["epoch"] for r in ev], [r[key] for r in ev], marker="o", color=color, label=metric(key).label, **kw)


def plot_curve(history: list[dict], path: Path, title: str = "") -> None:
    """Loss and the labelled metric (kNN top-1 or Recall@1) against epoch; with held-out images, also the
    label-free metrics: view retrieval, effective rank, alignment and uniformity."""
    plt = _plt()
    main = primary(history)
    key, label = main.key, main.axis()
    labelled = any(r.get(key) is not None for r in history)
    free = any(r.get("view_top1") is not None for r in history)
    n = 1 + labelled + 2 * free if free else 2
    fig, axes = plt.subplots(1, n, figsize=(4.3 * n, 3.5))
    rows = [r for r in history if r.get("loss") is not None]
    axes[0].plot([r["epoch"] for r in rows], [r["loss"] for r in rows], marker="o")
    axes[0].set_ylabel(metric("loss").label)
    if labelled or not free:
        _series(axes[1], history, key, "tab:green")
        axes[1].set_ylabel(label)
    if free:
        ax = axes[-2]
        _series(ax, history, "view_top1", "tab:blue")
        _series(ax, history, "view_top5", "tab:blue", ls="--")
        ax.set_ylabel("held-out view retrieval (%)")
        rank = ax.twinx()
        _series(rank, history, "rankme", "tab:purple")
        rank.set_ylabel(f"{metric('rankme').label} (RankMe)", color="tab:purple")
        ax.legend(fontsize=7, loc="lower right")
        ax = axes[-1]
        _series(ax, history, "alignment", "tab:red")
        ax.set_ylabel(metric("alignment").axis(), color="tab:red")
        unif = ax.twinx()
        _series(unif, history, "uniformity", "tab:orange")
        unif.set_ylabel(metric("uniformity").axis(), color="tab:orange")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_race(histories: dict[str, list[dict]], path: Path, title: str = "", key: str = "knn_top1",
              label: str | None = None) -> None:
    """A metric (kNN top-1 by default) against epoch, one line per method, each its own colour and marker; the
    legend, outside the axes, lists the methods by their last value (highest first); ``label``: the axis."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    label = metric(key).axis() if label is None else label
    curves = {n: [r for r in h if r.get(key) is not None] for n, h in histories.items()}
    curves = {n: ev for n, ev in curves.items() if ev}
    order = sorted(curves, key=lambda n: -curves[n][-1][key])
    fig, ax = plt.subplots(figsize=(7.6, 4.4))
    colours = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xhp<>"
    trained = [n for n in order if not (len(curves[n]) == 1 and curves[n][0]["epoch"] == 0)]
    style = {n: (colours[(2 * i) % 20 + (2 * i) // 20 % 2], markers[i % len(markers)]) for i, n in
             enumerate(sorted(trained))}  # by name: a method keeps its colour whatever the others do
    for name in order:
        ev = curves[name]
        if name not in style:  # an untrained network: a flat reference line
            ax.axhline(ev[0][key], ls="--", color="grey", label=f"{name} ({ev[0][key]:.1f})")
            continue
        colour, marker = style[name]
        ax.plot([r["epoch"] for r in ev], [r[key] for r in ev], marker=marker, color=colour,
                label=f"{name} ({ev[-1][key]:.1f})", lw=2.8 if name == "isif" else 1.5, ms=5)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_similarity(series: dict[str, tuple[list[float], list[float]]], path: Path, title: str = "") -> None:
    """Histograms of cosine similarity for positives (two views of one image) and negatives, per run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    bins = [i / 50 - 1 for i in range(101)]
    for k, (name, (pos, neg)) in enumerate(series.items()):
        c = colors[k % len(colors)]
        ax.hist(pos, bins=bins, density=True, histtype="step", lw=2, color=c, label=f"{name}: positives")
        ax.hist(neg, bins=bins, density=True, histtype="step", lw=2, ls="--", color=c, label=f"{name}: negatives")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
