"""The one training loop, shared by every method.

    restore (or start) the run
    for each epoch:
        draw the instance order (seeded; a resumed run redraws the same)
        the objective's epoch hook (DeepCluster clusters here)
        run the steps: views -> z -> loss = objective(z, idx) -> SGD (step-level scalars every --log-every)
        evaluate on schedule (kNN, or Recall@K / NMI on unseen classes)
        checkpoint (atomic), then metrics.jsonl, the logger (TensorBoard or wandb), the curve, one console line

The parts it calls: ``step`` (one optimisation step), ``sampler`` (the
order, the nearest-neighbour positives, the position in the epoch),
``checkpoint`` (the training state and its file), ``runlog`` (the run
folder's sinks), ``evaluate.protocol`` (the evaluation). A method that does
not train (``random``) is evaluated once instead.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..base.device import peak_memory_mib, resolve_device
from ..base.dist import World, any_flag, barrier, check_batch, device_for, setup
from ..base.errors import UserError
from ..base.faults import fault_point
from ..data.registry import load_sets
from ..data.types import LazyImages, Sets
from ..evaluate.metrics import loop_row
from ..evaluate.protocol import evaluate_sets, protocol_for
from ..evaluate.retrieval import nearest_neighbour
from ..objectives import EpochContext, get_method
from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .config import Config
from .elastic import check_shared, launch_record, settle_run, write_launch
from .optim import lr_at, set_lr
from .runlog import RunDir, RunLog, check_logger
from .sampler import InstanceSampler
from .step import Parts, build_parts, estimate_step_seconds, kernel_choice, make_model, train_step


class TrainingDiverged(Exception):
    """The loss became NaN or Inf."""


class Interrupted(Exception):
    """SIGINT: a checkpoint was saved; ``--resume`` continues."""


@dataclass
class Session:
    """A run being trained: its config, folder, processes, parts, sampler, state and data."""

    cfg: Config
    run: RunDir
    world: World
    parts: Parts
    sampler: InstanceSampler
    state: TrainState
    sets: Sets
    resumed: bool
    budgeted: bool = False  # the epochs came from --budget
    launch: dict | None = None  # launch.json of a run under torchrun: its command line (``elastic``)
    steps_done: int = 0  # optimiser steps in this call (for ``stop_after_steps``)


def train(cfg: Config, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, stop_after_steps: int | None = None, dry_run: bool = False) -> list[dict]:
    """Train ``cfg`` into the run folder ``out``; returns the metrics history.

    Everything is checked (config, folder, device, data, objective) before the folder is touched; ``dry_run``
    stops there. ``stop_after_steps`` interrupts the run (as SIGINT would) after that many optimiser steps in
    this call: for tests of mid-epoch resume. The run's kernel settings (``--deterministic``) hold inside this
    call only.
    """
    with kernel_choice(cfg.train.deterministic):
        s = prepare(cfg, Path(out), resume, overwrite)
        if dry_run:
            return []
        if progress and s.world.main:
            print(announce(s), file=sys.stderr, flush=True)
        if not get_method(cfg.method.name).trains:
            return evaluate_untrained(s, progress)
        return run_session(s, progress, stop_after_steps)


def run_session(s: Session, progress: bool, stop_after_steps: int | None) -> list[dict]:
    """The epochs of a prepared run, from its restored position to the last; returns the metrics history."""
    cfg = s.cfg
    t, state, sampler, parts = cfg.train, s.state, s.sampler, s.parts
    console = progress and s.world.main
    log = RunLog(s.run, f"{cfg.preset}: {cfg.method.name}", t.epochs, sampler.steps_per_epoch, console)
    if s.world.main:
        log.open(cfg.to_dict(), state.history, s.resumed, state.epoch * sampler.steps_per_epoch + state.step)
        if s.launch is not None and not s.resumed:
            write_launch(s.run, s.launch)
    images = s.sets.train.images
    images = images if isinstance(images, LazyImages) else images.to(parts.device)
    if cfg.sampler.nn_positive > 0 and sampler.neighbours is None:  # in the initial network's feature space
        sampler.neighbours = nearest_neighbour(parts.extractor()(parts.model, images)).cpu()
    parts.model.train()
    with log, _SigintFlag() as sigint:
        for epoch in range(state.epoch, t.epochs):
            perm, second = sampler.epoch(epoch)
            if state.step == 0:
                state.loss_sum, state.loss_steps = 0.0, 0
                parts.objective.on_epoch_start(EpochContext(
                    epoch, lambda: parts.extractor()(parts.model, images), parts.opt))
            seconds, rate = run_epoch(s, epoch, images, perm, second, sigint, stop_after_steps, console, log)
            row = epoch_row(s, epoch, rate)
            if (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == t.epochs:
                t_eval = time.perf_counter()
                row.update(evaluate_sets(parts.model, s.sets, parts.extractor(), parts.probe_views(), cfg.eval, t.seed))
                row["eval_s"] = time.perf_counter() - t_eval
            finish_epoch(s, row)
            if s.world.main:
                save_checkpoint(state.state_dict(parts, sampler), s.run.last)
                fault_point("epoch-end")
                log.epoch(row, state.history, seconds)
    barrier(s.world)
    return state.history


def prepare(cfg: Config, out: Path, resume: bool, overwrite: bool) -> Session:
    """Check everything, build the parts and restore the state; nothing on disk changes."""
    cfg.validate()
    check_logger(cfg.log)
    world = setup(cfg.train.device)
    run, restarted, overwrite, note = settle_run(out, resume, overwrite, world)  # torchrun restarts: see elastic
    check_shared(out, world)
    saved = load_checkpoint(run.last) if restarted else None
    if restarted and not resume:  # a restarted group continues as --resume would: the run's own config
        cfg = Config.from_dict(saved["config"])
    resume = restarted
    if note and world.main:
        print(note, file=sys.stderr, flush=True)
    t = cfg.train
    device = resolve_device(device_for(world, t.device))
    if t.sync_bn and world.active and device.type != "cuda":
        raise UserError("--sync-bn needs GPUs: torch's SyncBatchNorm has no CPU kernel; drop it on CPU")
    torch.manual_seed(t.seed)
    model = make_model(cfg)  # before the data: unreachable or unfitting weights fail before a long scan
    sets = load_sets(cfg.data)
    n = len(sets.train)
    if t.epochs is None and t.batch_size > n >= 2 * world.size:  # a budgeted preset on a small folder
        t.batch_size = n - n % (2 * world.size)  # the whole folder in each step
    if t.batch_size > n:
        raise UserError(f"--batch-size {t.batch_size} is larger than the training set ({n} images)")
    check_batch(world, t.batch_size)
    budgeted, t.epochs = t.epochs is None, t.resolve_epochs(n)
    check_evaluation(cfg, sets)
    parts = build_parts(cfg, sets.splits, n, device, world, model)
    sampler = InstanceSampler(n, t.batch_size, t.seed, world, cfg.sampler.nn_positive)
    state = TrainState()
    if saved is not None:
        state.load_state_dict(saved, parts, sampler)
    return Session(cfg, run, world, parts, sampler, state, sets, resumed=resume, budgeted=budgeted,
                   launch=launch_record() if "RANK" in os.environ else None)


def check_evaluation(cfg: Config, sets: Sets) -> None:
    """Refuse an evaluation the data cannot give, in one line naming the fix."""
    protocol = protocol_for(cfg.eval, sets.bank, sets.test)
    if sets.test is None and cfg.eval.protocol in ("knn", "retrieval"):
        raise UserError(f"--eval-protocol {cfg.eval.protocol} needs labelled images: pass --eval-data PATH (train/ "
                        "and test/ class folders for knn, class folders for retrieval), or use auto")
    if protocol == "knn" and sets.bank is None:
        raise UserError("--eval-protocol knn needs a labelled kNN bank: --eval-data with train/<class>/ and "
                        "test/<class>/ folders")
    if protocol == "knn" and cfg.eval.knn_k > len(sets.bank):  # type: ignore[arg-type]
        raise UserError(f"--knn-k {cfg.eval.knn_k} is larger than the kNN bank ({len(sets.bank)} labelled images); "
                        "lower it")
    if sets.holdout is not None and len(sets.holdout) < 2 and cfg.eval.protocol != "none":
        raise UserError(f"--holdout {cfg.data.holdout} holds out {len(sets.holdout)} image; the label-free "
                        "metrics need at least 2 (0 turns them off)")


def announce(s: Session) -> str:
    """The run's one banner: what trains where (resumed: from where) and the images; then the network, the batch
    (per process under torchrun), images a step (views x batch), the schedule, precision, device and the expected
    time on this machine."""
    from .presets import PRESETS

    cfg, n, steps, st = s.cfg, len(s.sets.train), s.sampler.steps_per_epoch, s.state
    epochs = cfg.train.epochs
    doc = PRESETS[cfg.preset].doc.split(";")[0].split(": ", 1)[-1] if cfg.preset in PRESETS else "custom settings"
    held = f" (+{len(s.sets.holdout)} held out for the label-free metrics)" if s.sets.holdout is not None else ""
    if not s.resumed:
        where = ""
    elif st.epoch >= epochs:
        where = f", all {epochs} epochs done"
    else:
        where = f" from epoch {st.epoch + 1}/{epochs}" + (f", step {st.step}/{steps}" if st.step else "")
    head = (f"isif: {'resuming' if s.resumed else 'training'} {cfg.method.name} (preset {cfg.preset}: {doc}) -> "
            f"{s.run.root}{where}; {n:,} images{held}")
    return f"{head}\n  {_backbone(cfg)}; {_schedule(s)}"


def _schedule(s: Session) -> str:
    """The banner's second line after the network: batch, images a step, epochs, precision, device, time."""
    t, w, steps = s.cfg.train, s.world, s.sampler.steps_per_epoch
    batch, views = s.sampler.batch_size, len(s.parts.views)
    share = f" = {batch // w.size} per process x {w.size} processes" if w.active else ""
    budget = f" (from --budget {t.budget:,} instances)" if s.budgeted else ""
    step_s = estimate_step_seconds(s.parts, s.sets.train.images, batch)
    left = max(0, steps * (t.epochs - s.state.epoch) - s.state.step)
    return (f"batch {batch} instances{share}, {views * batch} images/step ({views} view{'s' * (views > 1)} of each); "
            f"{t.epochs} epochs{budget} of {steps} steps at {s.parts.plain.size}px, {t.precision}, device "
            f"{s.parts.device}; about {_minutes(step_s * left)} of training{' left' * s.resumed} on this machine "
            f"({step_s:.2f} s a step, measured; evaluations add)")


def _backbone(cfg: Config) -> str:
    """The network in the banner; a --width that the backbone does not take is said to be ignored."""
    m = cfg.model
    if m.arch == "resnet18_cifar":
        return f"network resnet18_cifar width {m.width:g}"
    return f"network {m.arch}" + (f" (--width {m.width:g} does not apply to it)" if m.width != 1 else "")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} minutes" if seconds >= 90 else f"{seconds:.0f} seconds"


def run_epoch(s: Session, epoch: int, images, perm: torch.Tensor, second: torch.Tensor | None, sigint: _SigintFlag,
              stop_after: int | None, console: bool, log: RunLog) -> tuple[float, float]:
    """The steps of ``epoch`` from ``state.step`` on; returns (seconds, images/s). Stops with ``Interrupted``
    (checkpoint saved) on Ctrl-C, or ``TrainingDiverged`` on a NaN/Inf loss."""
    cfg, parts, state, sampler = s.cfg, s.parts, s.state, s.sampler
    first, steps, device = state.step, sampler.steps_per_epoch, parts.device
    batches = sampler.batches(images, perm, second, first, device)
    bar = _bar(steps, first, f"epoch {epoch + 1}/{cfg.train.epochs}", console)
    # the epoch's loss sum, carried on from a checkpoint inside the epoch, so a resumed epoch adds its losses in
    # the order an uninterrupted one does (float64 sums bit for bit); read every 10 steps only
    acc = torch.full((), state.loss_sum, device=device, dtype=torch.float64)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    meter = _Meter(first, sampler.batch_size * len(parts.views))
    log.start_steps(meter.per)
    t0 = time.perf_counter()
    every = cfg.train.checkpoint_every
    for step in range(first, steps):
        if any_flag(sigint.set or (stop_after is not None and s.steps_done >= stop_after), s.world, device):
            _interrupt(s, epoch, step, float(acc), step - first, time.perf_counter() - t0, bar)
        if every and step > first and (epoch * steps + step) % every == 0:
            _save_inside(s, epoch, step, float(acc), step - first, time.perf_counter() - t0)
        lr = lr_at(cfg.optim, cfg.train.epochs, epoch + step / steps)
        set_lr(parts.opt, lr)
        idx = sampler.batch_indices(perm, step).to(device, non_blocking=True)  # (B,) the global batch
        x, x2 = next(batches)
        loss = train_step(parts, x, idx, parts.aug_gen, x2)
        fault_point("step")
        ld = loss.detach()
        first_bad = torch.where(~torch.isfinite(ld) & (first_bad < 0), epoch * steps + step, first_bad)
        acc += ld
        s.steps_done += 1
        log.step(epoch * steps + step + 1, ld, lr)
        if (step + 1 - first) % 10 == 0 or step == steps - 1:
            if int(first_bad) >= 0:
                bar.close()
                raise TrainingDiverged(_diverged_message(int(first_bad), steps, s.run, cfg))
            bar.set_postfix(loss=f"{float(acc) / (state.loss_steps + step + 1 - first):.4f}",
                            img_s=f"{meter.rate(step):.0f}",
                            refresh=False)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    state.train_time += seconds
    state.loss_sum = float(acc)
    state.loss_steps += steps - first
    return seconds, (steps - first) * sampler.batch_size * len(parts.views) / max(seconds, 1e-9)


def epoch_row(s: Session, epoch: int, images_per_s: float) -> dict[str, Any]:
    """The metrics row of a finished epoch, before its evaluation."""
    steps, st = s.sampler.steps_per_epoch, s.state
    lr = lr_at(s.cfg.optim, s.cfg.train.epochs, epoch + 1 - 1 / max(steps, 1))  # the last step's
    return loop_row(epoch + 1, st.loss_sum / max(st.loss_steps, 1), lr, images_per_s, st.train_time)


def finish_epoch(s: Session, row: dict[str, Any]) -> None:
    """Close the row, append it to the history, and move the state and the sampler to the next epoch."""
    st = s.state
    row["peak_memory_mib"] = peak_memory_mib(s.parts.device)
    row["elapsed_s"] = st.train_time + sum(r.get("eval_s", 0.0) for r in st.history) + row.get("eval_s", 0.0)
    st.history.append(row)
    s.sampler.next_epoch()
    st.epoch, st.step, st.loss_sum, st.loss_steps = row["epoch"] if row["epoch"] else 1, 0, 0.0, 0


def evaluate_untrained(s: Session, progress: bool) -> list[dict]:
    """A method that does not train: one evaluation of the network as initialised, recorded as epoch 0."""
    cfg, st, parts = s.cfg, s.state, s.parts
    log = RunLog(s.run, f"{cfg.preset}: {cfg.method.name}", cfg.train.epochs, 0, progress and s.world.main)
    if s.world.main:
        log.open(cfg.to_dict(), st.history, s.resumed, 0)
    with log:
        if st.epoch >= 1:  # already evaluated
            return st.history
        row = loop_row(0, None, lr_at(cfg.optim, cfg.train.epochs, 0.0), 0.0, st.train_time)
        t_eval = time.perf_counter()
        row.update(evaluate_sets(parts.model, s.sets, parts.extractor(), parts.probe_views(), cfg.eval, cfg.train.seed))
        row["eval_s"] = time.perf_counter() - t_eval
        finish_epoch(s, row)
        if s.world.main:
            save_checkpoint(st.state_dict(parts, s.sampler), s.run.last)
            fault_point("epoch-end")
            log.untrained(row, st.history)
    barrier(s.world)
    return st.history


def _save_inside(s: Session, epoch: int, step: int, acc: float, acc_steps: int, seconds: float) -> None:
    """``--checkpoint-every``: the checkpoint of the exact position inside the epoch (as an interruption saves it),
    the epoch then going on; the run's accumulators are left as they were."""
    st = s.state
    kept = st.loss_sum, st.loss_steps, st.train_time, st.epoch, st.step
    st.loss_sum, st.loss_steps, st.train_time = acc, st.loss_steps + acc_steps, st.train_time + seconds
    st.epoch, st.step = epoch, step
    if s.world.main:
        save_checkpoint(st.state_dict(s.parts, s.sampler), s.run.last)
        fault_point("step-checkpoint")
    st.loss_sum, st.loss_steps, st.train_time, st.epoch, st.step = kept
    barrier(s.world)


def _interrupt(s: Session, epoch: int, step: int, acc: float, acc_steps: int, seconds: float, bar) -> None:
    """Save the exact position inside the epoch and stop every process at the same step."""
    st = s.state
    st.loss_sum = acc  # the epoch's sum so far (run_epoch's acc starts from it)
    st.loss_steps += acc_steps
    st.train_time += seconds
    st.epoch, st.step = epoch, step
    if s.world.main:
        save_checkpoint(st.state_dict(s.parts, s.sampler), s.run.last)
    barrier(s.world)
    bar.close()
    raise Interrupted(f"stopped at epoch {epoch + 1}, step {step}/{s.sampler.steps_per_epoch}; "
                      f"continue with: isif train --resume {s.run.root}")


def _diverged_message(gstep: int, steps_per_epoch: int, run: RunDir, cfg: Config) -> str:
    epoch, step = divmod(gstep, steps_per_epoch)
    hint = "lower --lr" + (" or use --precision fp32" if cfg.train.precision != "fp32" else "")
    return (f"loss became NaN/Inf at epoch {epoch + 1}, step {step} (global step {gstep}); "
            f"the last good checkpoint is {run.last}; {hint}")


class _Meter:
    """Images per second since the previous reading."""

    def __init__(self, first: int, images_per_step: int) -> None:
        self.first, self.per = first, images_per_step
        self.t, self.seen = time.perf_counter(), 0

    def rate(self, step: int) -> float:
        now, seen = time.perf_counter(), (step + 1 - self.first) * self.per
        r = (seen - self.seen) / max(now - self.t, 1e-9)
        self.t, self.seen = now, seen
        return r


def _bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, mininterval=0.5 if tty else 30,
                leave=tty, file=sys.stderr)


class _SigintFlag:
    """The first Ctrl-C asks the loop to save and stop; a second one stops at once."""

    def __init__(self) -> None:
        self.set = False
        self._old: Any = None

    def __enter__(self) -> _SigintFlag:
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
