"""The run folder and everything written to it besides checkpoints: metrics.jsonl, the logger (TensorBoard or
wandb), the curve, and the console line.

    RUN/config.json            the resolved config
    RUN/metrics.jsonl          one JSON object per epoch, rewritten whole and atomically
    RUN/checkpoints/last.pt    (isif.training.checkpoint)
    RUN/tensorboard/           TensorBoard events (--logger tensorboard, the default)
    RUN/wandb-id, RUN/wandb/   the W&B run's id, kept for --resume, and its files, or in $WANDB_DIR (--logger wandb)
    RUN/curve.png              loss and the evaluation metric against epoch

Scalars are logged against the global step (optimiser steps done): per epoch ``train/*`` and ``eval/*``, and
with ``--log-every N`` also ``step/loss`` (the mean since the last point), ``step/lr`` and
``step/images_per_s``. A logger that fails prints one warning line and is dropped; the run goes on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..base.errors import UserError
from ..base.files import atomic_write_bytes
from ..base.settings import at_least, one_of, setting
from ..evaluate.metrics import fmt, is_evaluation, metric, summary
from .plots import plot_curve

LOGGERS = ("tensorboard", "wandb", "none")


@dataclasses.dataclass
class LogConfig:
    logger: str = setting("tensorboard", "where scalars go besides metrics.jsonl: tensorboard (RUN/tensorboard/), "
                                         "wandb (pip install 'isif[wandb]'), or none",
                          check=one_of(*LOGGERS), resume=True)
    every: int | None = setting(None, "also log step-level scalars (loss, lr, images/s) every N optimiser steps "
                                      "(0 or none: off)", check=at_least(0), flag="--log-every", resume=True)


def check_logger(cfg: LogConfig) -> None:
    """Refuse a logger whose package is missing, in one line naming the install."""
    if cfg.logger == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--logger wandb needs the wandb package: pip install 'isif[wandb]' (or use --logger "
                            "tensorboard)") from None


@dataclasses.dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def wandb_id(self) -> Path:
        return self.root / "wandb-id"

    @property
    def curve(self) -> Path:
        return self.root / "curve.png"


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> RunDir:
    """Refuse to resume nothing or to overwrite a run by accident; changes nothing on disk."""
    run = RunDir(out)
    if resume:
        if not run.last.is_file():
            raise UserError(f"nothing to resume in {out}: no checkpoints/last.pt; start without --resume")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} already exists; pass --resume to continue it or --overwrite to start again")
    return run


def create_run_dir(run: RunDir, resume: bool) -> None:
    """For a new run, replace whatever was at the folder (checked by ``check_run_dir``) with an empty run."""
    out = run.root
    if not resume and out.exists():
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    try:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        for stale in run.root.glob("**/.*.tmp"):  # temporary files of a killed process
            stale.unlink()
    except OSError as e:
        raise UserError(f"cannot create the run folder {out} ({e.strerror}); pass --out to a writable place") from None


def write_metrics(path: Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl whole and atomically: a reader never sees a half line."""
    text = "".join(json.dumps(r) + "\n" for r in history).encode()
    atomic_write_bytes(path, lambda f: f.write(text), fault_site="metrics-write")


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run: RunDir, config: dict, resume: bool, first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # resumed: TensorBoard hides what a killed process logged after the checkpoint (steps > first_step)
        self.writer = SummaryWriter(str(run.tensorboard), purge_step=first_step + 1 if resume else None)

    def scalars(self, values: dict[str, float], step: int, flush: bool) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        if flush:
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """A W&B run; its id is kept in RUN/wandb-id so that --resume continues the same run."""

    name = "wandb"

    def __init__(self, run: RunDir, config: dict, resume: bool, first_step: int) -> None:
        import wandb

        run_id = run.wandb_id.read_text().strip() if resume and run.wandb_id.is_file() else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "isif"), name=run.root.name, id=run_id,
                              resume="allow" if run_id else None, config=config,
                              dir=os.environ.get("WANDB_DIR") or str(run.root))
        atomic_write_bytes(run.wandb_id, lambda f: f.write(str(self.run.id).encode()))

    def scalars(self, values: dict[str, float], step: int, flush: bool) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


_SINKS = {"tensorboard": _TensorBoard, "wandb": _Wandb}


class RunLog:
    """The run's log sinks. ``open`` creates or takes over the folder; ``epoch`` records one finished epoch;
    ``start_steps`` and ``step`` give the step-level scalars of ``--log-every``."""

    def __init__(self, run: RunDir, title: str, epochs: int, steps_per_epoch: int, console: bool) -> None:
        self.run, self.title, self.epochs, self.steps = run, title, epochs, steps_per_epoch
        self.console = console
        self.sink: Any = None
        self.every = 0
        self._loss: Any = None  # the loss summed since the last step-level point, on the device
        self._n = self._timed = self._per_step = 0
        self._t = 0.0

    def open(self, config: dict, history: list[dict], resume: bool, first_step: int) -> RunLog:
        """``config``: the run's config dict; its ``log`` section chooses the logger and the step interval."""
        create_run_dir(self.run, resume)
        if resume:
            write_metrics(self.run.metrics, history)  # drop anything written after the checkpoint
        atomic_write_bytes(self.run.config, lambda f: f.write(json.dumps(config, indent=2).encode()))
        log = config.get("log", {})
        self.every = log.get("every") or 0
        kind = _SINKS.get(log.get("logger", "tensorboard"))
        if kind is not None:
            self.sink = self._safely(lambda: kind(self.run, config, resume, first_step), kind.name)
        return self

    def start_steps(self, images_per_step: int) -> None:
        """The steps of an epoch begin: step-level images/s is timed from here."""
        self._t, self._timed, self._per_step = time.perf_counter(), 0, images_per_step

    def step(self, global_step: int, loss, lr: float) -> None:
        """After an optimiser step (``global_step`` steps done, ``loss`` a tensor): every ``every`` steps, log the
        mean loss since the last point, the lr and images/s. Reads the loss only then."""
        if not self.every or self.sink is None:
            return
        self._loss = loss.double() if self._loss is None else self._loss + loss
        self._n, self._timed = self._n + 1, self._timed + 1
        if global_step % self.every:
            return
        now = time.perf_counter()
        values = {"step/loss": float(self._loss) / self._n, "step/lr": lr,
                  "step/images_per_s": self._timed * self._per_step / max(now - self._t, 1e-9)}
        self._loss, self._n, self._t, self._timed = None, 0, now, 0
        self._send(values, global_step, flush=False)

    def epoch(self, row: dict, history: list[dict], seconds: float) -> None:
        """metrics.jsonl, the logger's scalars, the curve, and one console line."""
        scalars = {f"train/{key}": row[key] for key in ("loss", "images_per_s", "lr")}
        self._record(row, history, row["epoch"] * self.steps, scalars,
                     f"epoch {row['epoch']}/{self.epochs}  loss {fmt(row, 'loss')}",
                     f"  {fmt(row, 'images_per_s')} {metric('images_per_s').short}  {seconds:.0f} s")

    def untrained(self, row: dict, history: list[dict]) -> None:
        """The one evaluation of a method that does not train."""
        self._record(row, history, 0, {}, "untrained network:", "")

    def _record(self, row: dict, history: list[dict], gs: int, scalars: dict, head: str, tail: str) -> None:
        write_metrics(self.run.metrics, history)
        for key, value in row.items():
            if value is not None and is_evaluation(key):
                scalars[f"eval/{key.replace('@', '_at_')}"] = value
        self._send(scalars, gs, flush=True)
        plot_curve(history, self.run.curve, title=self.title)
        if self.console:
            ev = f"  {summary(row)}" if summary(row) else ""
            print(f"{head}{ev}{tail}", file=sys.stderr, flush=True)

    def _send(self, values: dict[str, float], step: int, flush: bool) -> None:
        if self.sink is not None:
            self._safely(lambda: self.sink.scalars(values, step, flush), self.sink.name)

    def _safely(self, call, name: str) -> Any:
        """Run a logger call; a failure is one warning line and the logger is dropped: logging never stops a run."""
        try:
            return call()
        except Exception as e:  # whatever a logger raises, training goes on
            self.sink = None
            first = (str(e).strip().splitlines() or [""])[0]
            print(f"isif: warning: {name} logging failed ({type(e).__name__}: {first}); training continues "
                  "without it", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.sink is not None:
            self._safely(self.sink.close, self.sink.name)
            self.sink = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
