"""kNN top-1 against epoch for several runs on one plot (a recipe against another).

    python benchmarks/plot_curves.py OUT.png LABEL=SOURCE [LABEL=SOURCE ...]

SOURCE is a run folder (its metrics.jsonl: the epochs with a kNN figure) or a JSON file {"epoch": [...],
"knn_top1": [...]} holding a curve measured earlier (a table in the docs). The legend gives each curve's last
figure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def curve(source: Path) -> tuple[list[int], list[float]]:
    if source.is_dir():
        rows = [json.loads(line) for line in (source / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("knn_top1") is not None]
        return [r["epoch"] for r in rows], [r["knn_top1"] for r in rows]
    data = json.loads(source.read_text())
    return list(data["epoch"]), list(data["knn_top1"])


def main(argv: list[str]) -> int:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        print("usage: plot_curves.py OUT.png LABEL=RUN_DIR_OR_JSON ...", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for spec, marker in zip(argv[1:], "osD^v", strict=False):
        label, source = spec.split("=", 1)
        x, y = curve(Path(source))
        ax.plot(x, y, marker=marker, label=f"{label}: {y[-1]:.2f}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(argv[0])
    print(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
