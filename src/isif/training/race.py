"""The learning-speed race (Fig. 3): every method under the same budget, data, seed and backbone."""

from __future__ import annotations

from pathlib import Path

from ..base.errors import UserError
from ..base.files import atomic_write_bytes
from ..evaluate.metrics import is_retrieval, metric, primary
from ..objectives import get_method
from ..objectives import methods as registered
from .checkpoint import load_checkpoint
from .config import Config
from .loop import train
from .plots import plot_race
from .runlog import RunDir

DEFAULT_METHODS = tuple(registered())  # every registered method, in registry order


def race(configs: dict[str, Config], out: Path, progress: bool = True) -> dict[str, list[dict]]:
    """Train each method's config into ``out/<method>``; finished runs are reused, interrupted ones resumed.

    Writes ``out/race.png`` and ``out/race.md`` after every method, so partial
    results survive an interruption.
    """
    if not configs:
        raise UserError("--methods needs at least one method")
    out = Path(out)
    histories: dict[str, list[dict]] = {}
    for name, cfg in configs.items():
        run = RunDir(out / name)
        if run.last.is_file():
            state = load_checkpoint(run.last)
            planned = cfg.train.epochs or state["config"]["train"]["epochs"]  # a budgeted preset: as resolved
            epochs = planned if get_method(name).trains else 1
            done = state["epoch"] >= epochs and state["step"] == 0
            histories[name] = state["history"] if done else train(cfg, run.root, resume=True, progress=progress)
        else:
            histories[name] = train(cfg, run.root, overwrite=True, progress=progress)
        write_race(histories, out, next(iter(configs.values())))
    return histories


def check_methods(names: list[str]) -> None:
    unknown = [n for n in names if n not in registered()]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(sorted(registered()))}")
    if len(set(names)) < 2:
        raise UserError(f"--methods {','.join(names)}: a race needs at least two methods, e.g. --methods isif,simclr")


LABEL_FREE = "view_top1"  # what ranks methods on images without labels: view retrieval on the held-out images


def race_metric(histories: dict[str, list[dict]]) -> tuple[str, str]:
    """(metrics-row key, label) the race compares: kNN top-1, or Recall@1 when the test classes are unseen, or,
    on a folder without labels (no ``--eval-data``), the label-free view retrieval on the held-out images."""
    rows = [r for h in histories.values() for r in h]
    labelled = any(r.get("knn_top1") is not None or r.get("recall@1") is not None for r in rows)
    m = primary(rows) if labelled or not any(r.get(LABEL_FREE) is not None for r in rows) else metric(LABEL_FREE)
    return m.key, m.axis()


def final(hist: list[dict], key: str) -> float | None:
    """The last evaluated value of ``key`` in a run's history."""
    vals = [r[key] for r in hist if r.get(key) is not None]
    return vals[-1] if vals else None


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, the largest first, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation of two equally long lists (Pearson's r of their ranks); None under 3 values or
    when a list is constant."""
    if len(a) != len(b) or len(a) < 3:
        return None
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / (va * vb) ** 0.5 if va > 0 and vb > 0 else None


def label_free_ranking(histories: dict[str, list[dict]]) -> str:
    """The methods ranked by their last label-free figures (view top-1 first; RankMe and uniformity beside it),
    with their labelled metric when there is one, and Spearman's rho between the two rankings."""
    trained = {n: h for n, h in histories.items() if final(h, LABEL_FREE) is not None}
    if not trained:
        return ""
    labelled = next((k for k in ("knn_top1", "recall@1") if any(final(h, k) is not None for h in trained.values())),
                    None)
    order = sorted(trained, key=lambda n: -final(trained[n], LABEL_FREE))
    cols = [LABEL_FREE, "view_top5", "rankme", "uniformity"] + ([labelled] if labelled else [])
    lines = ["| # | method | " + " | ".join(metric(k).short for k in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for i, n in enumerate(order, 1):
        cells = [metric(k).format(v) if (v := final(trained[n], k)) is not None else "–" for k in cols]
        lines.append(f"| {i} | {n} | " + " | ".join(cells) + " |")
    text = ("Ranked without labels (the last evaluation's view top-1 on the held-out images; it favours embeddings "
            "trained for instance retrieval over backbone features, see docs/method.md):\n\n" + "\n".join(lines))
    if labelled:
        both = [n for n in order if final(trained[n], labelled) is not None]
        rho = spearman([final(trained[n], LABEL_FREE) for n in both], [final(trained[n], labelled) for n in both])
        if rho is not None:
            text += (f"\n\nSpearman's rho between the label-free ranking and the {metric(labelled).short} ranking "
                     f"over {len(both)} methods: {rho:.3f}")
    return text + "\n"


def race_table(histories: dict[str, list[dict]]) -> str:
    key, _ = race_metric(histories)
    m = metric(key)
    epochs = sorted({r["epoch"] for h in histories.values() for r in h
                     if r["epoch"] > 0 and r.get(key) is not None}) or [0]
    columns = [f"ep {e}" if e else m.short for e in epochs] + [metric("train_s").short]
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, hist in histories.items():
        by_epoch = {r["epoch"]: r for r in hist}
        if set(by_epoch) == {0}:
            cells = [m.format(by_epoch[0][key]) for _ in epochs]
            lines.append(f"| {name} (untrained) | " + " | ".join(cells) + " | 0 |")
            continue
        cells = [m.format(by_epoch[e][key]) if e in by_epoch and by_epoch[e].get(key) is not None
                 else "–" for e in epochs]
        train_s = max(r.get("train_s", 0.0) for r in hist)
        best = "**" if name == "isif" else ""
        lines.append(f"| {best}{name}{best} | " + " | ".join(cells) + f" | {metric('train_s').format(train_s)} |")
    if m.protocol == "retrieval":
        lines += ["", final_retrieval_table(histories)]
    return "\n".join(lines) + "\n"


def final_retrieval_table(histories: dict[str, list[dict]]) -> str:
    """Every retrieval metric of each method's last evaluation."""
    names = []
    for h in histories.values():
        for r in h:
            names += [k for k in r if is_retrieval(k) and k not in names]
    lines = ["| method | epoch | " + " | ".join(metric(k).short for k in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for name, hist in histories.items():
        ev = [r for r in hist if r.get("recall@1") is not None]
        if not ev:
            continue
        last = ev[-1]
        who = f"{name} (untrained)" if last["epoch"] == 0 else name
        lines.append(f"| {who} | {last['epoch']} | " + " | ".join(
            metric(k).format(last[k]) if last.get(k) is not None else "–" for k in names) + " |")
    return "\n".join(lines)


def write_race(histories: dict[str, list[dict]], out: Path, base: Config) -> None:
    t = base.train
    title = (f"{base.preset}: {base.model.arch} width {base.model.width}, batch {t.batch_size}, "
             f"{t.precision}, seed {t.seed}, {'each method its own recipe' if t.recipe == 'own' else 'one recipe'}")
    key, label = race_metric(histories)
    plot_race(histories, out / "race.png", title, key=key, label=label)
    text = f"{label} after each evaluated epoch; {title}\n\n" + race_table(histories)
    ranking = label_free_ranking(histories)
    if ranking:
        text += "\n" + ranking
    atomic_write_bytes(out / "race.md", lambda f: f.write(text.encode()))
