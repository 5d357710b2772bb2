"""The one training loop, shared by every method.

    for each epoch:
        permute the instances (seeded generator)
        for each batch of B instances:
            views  = [augment or plain transform of the batch, per objective.views]
            z      = model(cat(views))             # (V*B, 128), L2-normalised
            loss   = objective(z, instance_idx)    # every method has this call
            SGD step, lr from the schedule
        kNN evaluation (every N epochs and after the last)
        checkpoint (atomic), metrics.jsonl, TensorBoard, learning-curve PNG

Resuming restores model, optimiser, RNG streams, epoch and position inside
the epoch, so an interrupted run continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config
from .data.augment import BatchAugment, PlainTransform
from .data.sources import ArrayDataset, Splits, atomic_write_bytes, load_dataset
from .dist import SINGLE, World, any_flag, barrier, check_batch, device_for, gather_rows, gather_views, setup, shard
from .errors import UserError
from .evaluate import extract_features, knn_accuracy
from .faults import fault_point
from .models import build_model
from .objectives import build_objective
from .plots import is_eval_metric, plot_curve
from .precision import autocast


class TrainingDiverged(Exception):
    """The loss became NaN or Inf."""


class Interrupted(Exception):
    """SIGINT: a checkpoint was saved; ``--resume`` continues."""


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    return dev


def lr_at(cfg: Config, t: float) -> float:
    """Learning rate at training time ``t``, in epochs (fractional inside an epoch)."""
    o = cfg.optim
    if o.schedule == "cosine":
        lr = o.lr * 0.5 * (1.0 + math.cos(math.pi * min(t, cfg.train.epochs) / cfg.train.epochs))
    else:
        lr = o.lr
        for milestone, factor in zip(o.milestones, o.factors, strict=True):
            if t >= milestone:
                lr = o.lr * factor
    if o.warmup_epochs > 0 and t < o.warmup_epochs:
        lr *= t / o.warmup_epochs
    return lr


def build_augment(cfg: Config, splits: Splits) -> tuple[BatchAugment, PlainTransform]:
    a = cfg.augment
    size = cfg.data.size or int(splits.train.images.shape[-1])
    stored = int(splits.train.images.shape[-1])
    if a.crop_mode == "fixed" and size > stored:
        raise UserError(f"--size {size} is larger than the stored {stored}x{stored} images; a fixed crop needs "
                        "a smaller size")
    aug = BatchAugment(size, splits.mean, splits.std, a.crop_scale, jitter=a.jitter,
                       grayscale_p=a.grayscale_p, flip=a.flip, crop_mode=a.crop_mode)
    return aug, PlainTransform(size, splits.mean, splits.std, center_crop=a.crop_mode == "fixed")


def load_splits(cfg: Config) -> tuple[Splits, ArrayDataset, ArrayDataset, ArrayDataset]:
    """(splits, training instances, kNN bank, test set), with the configured slices applied."""
    splits = load_dataset(cfg.data.dataset, cfg.data.path, Path(cfg.data.cache_dir) if cfg.data.cache_dir else None,
                          cfg.data.split, strict=cfg.data.strict, workers=cfg.data.workers)
    train_set = splits.train.subset(cfg.data.train_subset)
    bank = train_set if splits.bank is None else splits.bank.subset(cfg.data.train_subset)
    return splits, train_set, bank, splits.test.subset(cfg.data.test_subset)


def sharded_features(model: nn.Module, images: torch.Tensor, plain: PlainTransform, cfg: Config,
                     device: torch.device, world: World = SINGLE) -> torch.Tensor:
    """Embeddings of ``images`` with the test transform; under torchrun each process embeds one shard."""
    t = cfg.train
    kw = dict(batch_size=t.eval_batch_size, device=device, precision=t.precision, channels_last=t.channels_last)
    if not world.active:
        return extract_features(model, images, plain, **kw)
    start, stop, per = shard(images.shape[0], world)
    feats = extract_features(model, images[start:stop], plain, **kw)
    pad = torch.zeros(per - feats.shape[0], feats.shape[1], device=feats.device, dtype=feats.dtype)
    return gather_rows(torch.cat([feats, pad]), world)[: images.shape[0]]


def evaluate_knn(model: nn.Module, train_set: ArrayDataset, test_set: ArrayDataset, plain: PlainTransform,
                 cfg: Config, device: torch.device, world: World = SINGLE) -> float:
    """The paper's kNN: train features recomputed with the test transform, k=200, sigma=0.1 by default."""
    t = cfg.train
    bank = sharded_features(model, train_set.images, plain, cfg, device, world)
    fault_point("eval")
    query = sharded_features(model, test_set.images, plain, cfg, device, world)
    return knn_accuracy(query, test_set.labels, bank, train_set.labels, len(train_set.classes), t.knn_k, t.knn_sigma)


def eval_protocol(cfg: Config, bank_set: ArrayDataset, test_set: ArrayDataset) -> str:
    """"knn" when the test classes were seen in training, "retrieval" when none of them was."""
    p = cfg.train.eval_protocol
    if p != "auto":
        return p
    seen = {bank_set.classes[int(c)] for c in torch.unique(bank_set.labels)}
    tested = {test_set.classes[int(c)] for c in torch.unique(test_set.labels)}
    return "retrieval" if not seen & tested else "knn"


def evaluate_retrieval(model: nn.Module, test_set: ArrayDataset, plain: PlainTransform, cfg: Config,
                       device: torch.device, world: World = SINGLE, seed: int | None = None) -> dict[str, float]:
    """Recall@K, MAP@R and NMI on the test split, every test image a query against all the others."""
    from .evaluate.retrieval import map_at_r, nmi, recall_at_k

    feats = sharded_features(model, test_set.images, plain, cfg, device, world)
    fault_point("eval")
    labels = test_set.labels.to(feats.device)
    ks = tuple(int(k) for k in cfg.train.retrieval_ks)
    out = {f"recall@{k}": v for k, v in recall_at_k(feats, labels, ks).items()}
    multi = bool((torch.bincount(labels - labels.min()) > 1).any())
    out["map@r"] = map_at_r(feats, labels) if multi else None  # undefined when every class has one image
    out["nmi"] = nmi(feats, labels, seed=cfg.train.seed if seed is None else seed)
    return out


def evaluate(model: nn.Module, bank_set: ArrayDataset, test_set: ArrayDataset, plain: PlainTransform, cfg: Config,
             device: torch.device, world: World = SINGLE) -> dict[str, float | None]:
    """The run's evaluation, as metrics-row fields: kNN top-1, or the retrieval metrics on unseen classes."""
    if eval_protocol(cfg, bank_set, test_set) == "retrieval":
        return {"knn_top1": None, **evaluate_retrieval(model, test_set, plain, cfg, device, world)}
    return {"knn_top1": evaluate_knn(model, bank_set, test_set, plain, cfg, device, world)}


def eval_summary(row: dict) -> str:
    """'kNN 62.83%' or 'R@1 31.20 R@2 ... NMI 40.1' for a metrics row; '' when it has no evaluation."""
    if row.get("knn_top1") is not None:
        return f"kNN {row['knn_top1']:.2f}%"
    rec = [f"R@{k.split('@')[1]} {v:.2f}" for k, v in row.items() if k.startswith("recall@")]
    if not rec:
        return ""
    return " ".join(rec) + f" NMI {row['nmi']:.2f}"


@dataclasses.dataclass
class Parts:
    """Everything one optimisation step needs; shared by the loop and the benchmark."""

    cfg: Config
    device: torch.device
    model: nn.Module  # the plain module: state_dict, evaluation
    net: nn.Module  # what the step calls: the model, or its DistributedDataParallel wrapper
    objective: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    augment: BatchAugment
    plain: PlainTransform
    views: tuple[str, ...]
    world: World = SINGLE


def make_model(cfg: Config) -> nn.Module:
    """The configured network (on the CPU); unknown architectures and unusable weights are UserErrors."""
    try:
        return build_model(cfg.model.arch, cfg.model.width, cfg.model.dim, cfg.model.weights)
    except ValueError as e:
        raise UserError(str(e)) from None


def build_parts(cfg: Config, splits: Splits, num_instances: int, device: torch.device,
                world: World = SINGLE, model: nn.Module | None = None) -> Parts:
    """Everything a step needs; ``model`` is built from the config when not given."""
    t = cfg.train
    model = (model if model is not None else make_model(cfg)).to(device)
    if t.sync_bn and world.active:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    mcfg = dataclasses.asdict(cfg.method)
    try:
        objective = build_objective(mcfg.pop("name"), **mcfg, num_instances=num_instances, dim=cfg.model.dim,
                                    seed=t.seed).to(device)
    except ValueError as e:
        raise UserError(f"method {cfg.method.name}: {e}") from None
    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    augment, plain = build_augment(cfg, splits)
    views = tuple(getattr(objective, "views", ("augment", "augment")))
    net: nn.Module = model
    if world.active:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        net = torch.compile(net)
    return Parts(cfg, device, model, net, objective, opt, scaler, augment, plain, views, world)


def make_views(parts: Parts, x: torch.Tensor, gen: torch.Generator, second: torch.Tensor | None = None) -> torch.Tensor:
    """(b, 3, H, W) uint8 -> (V*b, 3, S, S) float: view v of local instance i at row v*b + i.

    Augmentation parameters are drawn for the whole global batch (W*b images
    per view, the same draws on every process) and each process applies its
    own share, so the views do not depend on the number of processes.
    ``second``, when given, is the source of view 1 (the positive) instead of
    ``x``: the nearest-neighbour positive of the CUB-200 setting.
    """
    w = parts.world
    b = x.shape[0]
    share = slice(w.rank * b, (w.rank + 1) * b)
    out = []
    for i, v in enumerate(parts.views):
        src = second if (i == 1 and second is not None) else x
        if v == "augment":
            params = parts.augment.sample(b * w.size, src.shape[2], src.shape[3], gen)
            out.append(parts.augment.apply(src, params.select(share) if w.active else params))
        else:
            out.append(parts.plain(src))
    inp = torch.cat(out)
    if parts.cfg.train.channels_last:
        inp = inp.contiguous(memory_format=torch.channels_last)
    return inp


def train_step(parts: Parts, x: torch.Tensor, idx: torch.Tensor, gen: torch.Generator,
               second: torch.Tensor | None = None) -> torch.Tensor:
    """One optimisation step on this process's share ``x`` of the global batch ``idx`` (all B indices).

    Returns the (undetached) loss over the global batch.
    """
    inp = make_views(parts, x, gen, second)
    with autocast(parts.device, parts.cfg.train.precision):
        z = parts.net(inp)  # (V*b, D)
    z = gather_views(z, len(parts.views), parts.world)  # (V*B, D), gradients kept
    loss = parts.objective(z, idx)
    parts.opt.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    parts.scaler.step(parts.opt)
    parts.scaler.update()
    return loss


def epoch_batches(images, perm: torch.Tensor, second: torch.Tensor | None, first: int, steps: int, batch: int,
                  share: slice, device: torch.device):
    """Yield (x, x2 or None) for steps ``first`` .. ``steps - 1`` of an epoch: this process's share of each
    global batch ``perm[s*B:(s+1)*B]`` (and of ``second``, the sources of the positives), on ``device``.

    In-memory images are gathered on the device; streamed files are decoded
    ahead by DataLoader workers, pinned when training on a GPU.
    """
    if not hasattr(images, "batches"):
        for s in range(first, steps):
            idx = perm[s * batch:(s + 1) * batch][share].to(device, non_blocking=True)
            x2 = None
            if second is not None:
                x2 = images[second[s * batch:(s + 1) * batch][share].to(device, non_blocking=True)]
            yield images[idx], x2
        return
    lists = []
    for s in range(first, steps):
        idx = perm[s * batch:(s + 1) * batch][share].tolist()
        if second is not None:
            idx += second[s * batch:(s + 1) * batch][share].tolist()
        lists.append(idx)
    for xb in images.batches(lists, pin=device.type == "cuda"):
        xb = xb.to(device, non_blocking=True)
        if second is None:
            yield xb, None
        else:
            half = xb.shape[0] // 2
            yield xb[:half], xb[half:]


def positive_sources(neighbours: torch.Tensor | None, perm: torch.Tensor, p: float, seed: int,
                     epoch: int) -> torch.Tensor | None:
    """For the nearest-neighbour positive: per position of ``perm``, the image whose augmentation is the
    positive: the instance itself, or with probability ``p`` its nearest neighbour. A function of
    (seed, epoch) alone, so a resumed run draws the same."""
    if neighbours is None or p <= 0:
        return None
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 17)
    swap = torch.rand(perm.shape[0], generator=g) < p
    return torch.where(swap, neighbours[perm], perm)


def _write_metrics(path: Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl whole and atomically: a reader never sees a half line."""
    text = "".join(json.dumps(r) + "\n" for r in history).encode()
    atomic_write_bytes(path, lambda f: f.write(text), fault_site="metrics-write")


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


def train(cfg: Config, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, stop_after_steps: int | None = None, dry_run: bool = False) -> list[dict]:
    """Train ``cfg`` into the run folder ``out``; returns the metrics history.

    Everything is checked (config, folder, device, data, objective) before the
    folder is touched. ``dry_run`` stops there. ``stop_after_steps``
    interrupts the run (as SIGINT would) after that many optimiser steps in
    this call: for tests of mid-epoch resume.
    """
    cfg.validate()
    world = setup(cfg.train.device)
    run = check_run_dir(Path(out), resume, overwrite) if world.main else RunDir(Path(out))
    barrier(world)
    state = load_checkpoint(run.last) if resume else None
    device = resolve_device(device_for(world, cfg.train.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    t = cfg.train

    torch.manual_seed(t.seed)
    model = make_model(cfg)  # before the data: unreachable or unfitting weights fail before a long scan
    splits, train_set, bank_set, test_set = load_splits(cfg)
    n = len(train_set)
    if t.batch_size > n:
        raise UserError(f"--batch-size {t.batch_size} is larger than the training set ({n} images)")
    local_b = check_batch(world, t.batch_size)  # this process's share of the global batch
    if t.knn_k > len(bank_set) and eval_protocol(cfg, bank_set, test_set) == "knn":
        raise UserError(f"--knn-k {t.knn_k} is larger than the kNN bank ({len(bank_set)} labelled images); lower it")
    parts = build_parts(cfg, splits, n, device, world, model)
    model, objective, opt, scaler = parts.model, parts.objective, parts.opt, parts.scaler
    data_gen = torch.Generator().manual_seed(t.seed + 1)  # instance order
    aug_gen = torch.Generator().manual_seed(t.seed + 2)  # augmentation parameters
    plain = parts.plain
    views = parts.views

    history: list[dict] = []
    start_epoch, start_step, loss_sum, loss_steps, train_time = 0, 0, 0.0, 0, 0.0
    epoch_start_rng = data_gen.get_state()
    if state is not None:
        _check_compatible(state, cfg)
        model.load_state_dict(state["model"])
        _load_objective_state(objective, state["objective"], n)
        opt.load_state_dict(state["optimizer"])
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        epoch_start_rng = rng["data_epoch_start"]
        aug_gen.set_state(rng["augment"])
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        loss_sum, loss_steps = float(state["epoch_loss_sum"]), int(state["epoch_loss_steps"])
        train_time = float(state["train_time_s"])
        history = list(state["history"])
    if dry_run:
        return []
    trains = getattr(objective, "trains", True)
    steps_per_epoch = n // t.batch_size if trains else 0
    writer = None
    if world.main:  # rank 0 alone writes the run folder
        create_run_dir(run, resume)
        if state is not None:
            _write_metrics(run.metrics, history)  # drop anything written after this checkpoint
        atomic_write_bytes(run.config, lambda f: f.write(json.dumps(cfg.to_dict(), indent=2).encode()))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run.tensorboard), purge_step=start_epoch * steps_per_epoch + start_step)
    progress = progress and world.main
    images = train_set.images.to(device)
    neighbours = None
    if cfg.method.nn_positive > 0:
        if state is not None and "neighbours" in state:
            neighbours = state["neighbours"].cpu()
        else:  # nearest neighbours in the initial (e.g. ImageNet-pretrained) network's feature space
            from .evaluate.retrieval import nearest_neighbour

            neighbours = nearest_neighbour(sharded_features(model, images, plain, cfg, device, world)).cpu()
            model.train()
    share = slice(world.rank * local_b, (world.rank + 1) * local_b)
    tqdm = _tqdm()
    tty = sys.stderr.isatty()
    steps_this_call = 0
    model.train()

    def snapshot(epoch: int, step: int, data_state: torch.Tensor) -> dict[str, Any]:
        s = {
            "config": cfg.to_dict(),
            "model": model.state_dict(),
            "objective": objective.state_dict(),
            "optimizer": opt.state_dict(),
            "rng": {"data_epoch_start": data_state, "augment": aug_gen.get_state(), "torch": torch.get_rng_state()},
            "epoch": epoch,
            "step": step,
            "epoch_loss_sum": loss_sum,
            "epoch_loss_steps": loss_steps,
            "train_time_s": train_time,
            "history": history,
            "input": {"size": int(parts.plain.size), "mean": [float(v) for v in splits.mean],
                      "std": [float(v) for v in splits.std], "resize": int(train_set.images.shape[-1]),
                      "center_crop": bool(parts.plain.center_crop)},
        }
        if neighbours is not None:
            s["neighbours"] = neighbours
        if scaler.is_enabled():
            s["scaler"] = scaler.state_dict()
        if device.type == "cuda":
            s["rng"]["cuda"] = torch.cuda.get_rng_state(device)
        return s

    try:
        with _SigintFlag() as sigint:
            for epoch in range(start_epoch, t.epochs if trains else min(start_epoch + 1, 1)):
                data_gen.set_state(epoch_start_rng)
                perm = torch.randperm(n, generator=data_gen)  # (N,)
                next_epoch_rng = data_gen.get_state()
                first = start_step if epoch == start_epoch else 0
                second = positive_sources(neighbours, perm, cfg.method.nn_positive, t.seed, epoch)
                batches = epoch_batches(images, perm, second, first, steps_per_epoch, t.batch_size, share, device)
                if first == 0:
                    loss_sum, loss_steps = 0.0, 0
                    hook = getattr(objective, "on_epoch_start", None)
                    if hook is not None:
                        hook(EpochContext(epoch, lambda: sharded_features(model, images, plain, cfg, device, world),
                                          opt))
                bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{t.epochs}",
                           disable=not (progress and trains), mininterval=0.5 if tty else 30, leave=tty,
                           file=sys.stderr)
                acc = torch.zeros((), device=device, dtype=torch.float64)
                first_bad = torch.full((), -1, device=device, dtype=torch.long)
                acc_steps = 0
                t_epoch = time.perf_counter()
                t_mark, seen_mark = t_epoch, 0
                for step in range(first, steps_per_epoch):
                    stop = sigint.set or (stop_after_steps is not None and steps_this_call >= stop_after_steps)
                    if any_flag(stop, world, device):  # every process stops at the same step
                        loss_sum += float(acc)
                        loss_steps += acc_steps
                        train_time += time.perf_counter() - t_epoch
                        if world.main:
                            save_checkpoint(snapshot(epoch, step, epoch_start_rng), run.last)
                        barrier(world)
                        bar.close()
                        raise Interrupted(f"stopped at epoch {epoch + 1}, step {step}/{steps_per_epoch}; "
                                          f"continue with: isif train --resume {run.root}")
                    gstep = epoch * steps_per_epoch + step
                    for group in opt.param_groups:
                        group["lr"] = lr_at(cfg, epoch + step / steps_per_epoch)
                    idx = perm[step * t.batch_size:(step + 1) * t.batch_size]  # (B,) the global batch
                    idx_dev = idx.to(device, non_blocking=True)
                    x, x2 = next(batches)
                    loss = train_step(parts, x, idx_dev, aug_gen, x2)
                    fault_point("step")
                    ld = loss.detach()
                    first_bad = torch.where(~torch.isfinite(ld) & (first_bad < 0), gstep, first_bad)
                    acc += ld
                    acc_steps += 1
                    steps_this_call += 1
                    if acc_steps % 10 == 0 or step == steps_per_epoch - 1:
                        bad = int(first_bad)
                        if bad >= 0:
                            bar.close()
                            raise TrainingDiverged(_diverged_message(bad, steps_per_epoch, run, cfg))
                        now = time.perf_counter()
                        seen = (step + 1 - first) * t.batch_size * len(views)
                        rate = (seen - seen_mark) / max(now - t_mark, 1e-9)
                        t_mark, seen_mark = now, seen
                        bar.set_postfix(loss=f"{float(acc) / acc_steps:.4f}", img_s=f"{rate:.0f}", refresh=False)
                    bar.update(1)
                bar.close()
                dt = time.perf_counter() - t_epoch
                train_time += dt
                loss_sum += float(acc)
                loss_steps += acc_steps
                images_per_s = (steps_per_epoch - first) * t.batch_size * len(views) / max(dt, 1e-9)
                epoch_number = epoch + 1 if trains else 0
                epoch_loss = loss_sum / max(loss_steps, 1)
                row: dict[str, Any] = {"epoch": epoch_number, "loss": epoch_loss if trains else None,
                                       "knn_top1": None, "lr": lr_at(cfg, epoch + 1 - 1 / max(steps_per_epoch, 1)),
                                       "images_per_s": images_per_s, "train_s": train_time}
                if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs or not trains:
                    t_eval = time.perf_counter()
                    row.update(evaluate(model, bank_set, test_set, plain, cfg, device, world))
                    row["eval_s"] = time.perf_counter() - t_eval
                row["peak_memory_mib"] = _peak_memory_mib(device)
                row["elapsed_s"] = train_time + sum(r.get("eval_s", 0.0) for r in history) + row.get("eval_s", 0.0)
                history.append(row)
                epoch_start_rng = next_epoch_rng
                loss_sum, loss_steps = 0.0, 0
                if not world.main:
                    continue
                save_checkpoint(snapshot(epoch + 1, 0, epoch_start_rng), run.last)
                fault_point("epoch-end")
                _write_metrics(run.metrics, history)
                gs = (epoch + 1) * steps_per_epoch
                writer.add_scalar("train/loss", epoch_loss, gs)
                writer.add_scalar("train/images_per_s", images_per_s, gs)
                writer.add_scalar("train/lr", row["lr"], gs)
                for key, value in row.items():
                    if value is not None and is_eval_metric(key):
                        writer.add_scalar(f"eval/{key.replace('@', '_at_')}", value, gs)
                writer.flush()
                plot_curve(history, run.curve, title=f"{cfg.preset}: {cfg.method.name}")
                knn = f"  {eval_summary(row)}" if eval_summary(row) else ""
                if progress and not trains:
                    print(f"untrained network:{knn}", file=sys.stderr, flush=True)
                elif progress:
                    print(f"epoch {epoch_number}/{t.epochs}  loss {epoch_loss:.4f}{knn}  "
                          f"{images_per_s:.0f} img/s  {dt:.0f} s", file=sys.stderr, flush=True)
    finally:
        if writer is not None:
            writer.close()
    barrier(world)
    return history


@dataclasses.dataclass
class EpochContext:
    """What an objective's ``on_epoch_start`` hook may use."""

    epoch: int
    features: Callable[[], torch.Tensor]  # (N, D) embeddings of the training set, test transform, in order
    optimizer: torch.optim.Optimizer

    def reset_optimizer_state(self, params: list[torch.nn.Parameter]) -> None:
        """Forget momentum for re-initialised parameters."""
        for p in params:
            self.optimizer.state.pop(p, None)


def _load_objective_state(objective: nn.Module, sd: dict, n: int) -> None:
    mine = objective.state_dict()
    for key, value in sd.items():
        if key in mine and mine[key].shape != value.shape:
            raise UserError(f"the checkpoint's {key} has shape {tuple(value.shape)} but this data needs "
                            f"{tuple(mine[key].shape)} ({n} training images); resume with the data it was trained on")
    objective.load_state_dict(sd)


def _peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA; the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _diverged_message(gstep: int, steps_per_epoch: int, run: RunDir, cfg: Config) -> str:
    epoch, step = divmod(gstep, steps_per_epoch)
    hint = "lower --lr" + (" or use --precision fp32" if cfg.train.precision != "fp32" else "")
    return (f"loss became NaN/Inf at epoch {epoch + 1}, step {step} (global step {gstep}); "
            f"the last good checkpoint is {run.last}; {hint}")


def _check_compatible(state: dict, cfg: Config) -> None:
    saved = state.get("config", {})
    for section, key in (("model", "arch"), ("model", "width"), ("model", "dim"), ("method", "name")):
        a, b = saved.get(section, {}).get(key), getattr(getattr(cfg, section), key)
        if a != b:
            raise UserError(f"checkpoint has {section}.{key}={a!r} but the config asks for {b!r}")


def _tqdm():
    from tqdm.auto import tqdm

    return tqdm
