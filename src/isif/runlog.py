"""The run folder and everything written to it besides checkpoints: metrics.jsonl, TensorBoard, the curve, and
the console line.

    RUN/config.json            the resolved config
    RUN/metrics.jsonl          one JSON object per epoch, rewritten whole and atomically
    RUN/checkpoints/last.pt    (isif.checkpoint)
    RUN/tensorboard/           TensorBoard events
    RUN/curve.png              loss and the evaluation metric against epoch
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

from .errors import UserError
from .evaluate.protocol import summary
from .io import atomic_write_bytes
from .plots import is_eval_metric, plot_curve


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


class RunLog:
    """The run's log sinks. ``open`` creates or takes over the folder; ``epoch`` records one finished epoch."""

    def __init__(self, run: RunDir, title: str, epochs: int, steps_per_epoch: int, console: bool) -> None:
        self.run, self.title, self.epochs, self.steps = run, title, epochs, steps_per_epoch
        self.console = console
        self.writer = None

    def open(self, config: dict, history: list[dict], resume: bool, first_step: int) -> RunLog:
        create_run_dir(self.run, resume)
        if resume:
            write_metrics(self.run.metrics, history)  # drop anything written after the checkpoint
        atomic_write_bytes(self.run.config, lambda f: f.write(json.dumps(config, indent=2).encode()))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run.tensorboard), purge_step=first_step)
        return self

    def epoch(self, row: dict, history: list[dict], seconds: float) -> None:
        """metrics.jsonl, TensorBoard scalars, the curve, and one console line."""
        gs = row["epoch"] * self.steps
        for key in ("loss", "images_per_s", "lr"):
            self.writer.add_scalar(f"train/{key}", row[key], gs)
        self._record(row, history, gs, f"epoch {row['epoch']}/{self.epochs}  loss {row['loss']:.4f}",
                     f"  {row['images_per_s']:.0f} img/s  {seconds:.0f} s")

    def untrained(self, row: dict, history: list[dict]) -> None:
        """The one evaluation of a method that does not train."""
        self._record(row, history, 0, "untrained network:", "")

    def _record(self, row: dict, history: list[dict], gs: int, head: str, tail: str) -> None:
        write_metrics(self.run.metrics, history)
        for key, value in row.items():
            if value is not None and is_eval_metric(key):
                self.writer.add_scalar(f"eval/{key.replace('@', '_at_')}", value, gs)
        self.writer.flush()
        plot_curve(history, self.run.curve, title=self.title)
        if self.console:
            ev = f"  {summary(row)}" if summary(row) else ""
            print(f"{head}{ev}{tail}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
