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
    if not names:
        raise UserError("--methods needs at least one method")


def race_metric(histories: dict[str, list[dict]]) -> tuple[str, str]:
    """(metrics-row key, label) the race compares: kNN top-1, or Recall@1 when the test classes are unseen."""
    m = primary([r for h in histories.values() for r in h])
    return m.key, m.axis()


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
             f"{t.precision}, seed {t.seed}")
    key, label = race_metric(histories)
    plot_race(histories, out / "race.png", title, key=key, label=label)
    text = f"{label} after each evaluated epoch; {title}\n\n" + race_table(histories)
    atomic_write_bytes(out / "race.md", lambda f: f.write(text.encode()))
