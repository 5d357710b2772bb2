"""The optimiser and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..base.settings import MOMENTUM, NON_NEGATIVE, POSITIVE, one_of, setting


@dataclass
class OptimConfig:
    lr: float = setting(0.03, "learning rate", check=POSITIVE)
    momentum: float = setting(0.9, "SGD momentum", check=MOMENTUM)
    weight_decay: float = setting(5e-4, "SGD weight decay", check=NON_NEGATIVE)
    schedule: str = setting("step", "step (the paper's milestones) or cosine", check=one_of("step", "cosine"))
    milestones: tuple[int, ...] = setting((120, 160), "step schedule: epochs where the factor changes")
    factors: tuple[float, ...] = setting((0.1, 0.01), "step schedule: lr multiplier from each milestone on")
    warmup_epochs: float = setting(0.0, "linear warm-up, in epochs (fractions allowed)", check=NON_NEGATIVE)

    def check(self) -> None:
        if len(self.milestones) != len(self.factors):
            raise ValueError("--milestones and --factors must have the same length")


def lr_at(o: OptimConfig, epochs: int, t: float) -> float:
    """Learning rate at training time ``t``, in epochs (fractional inside an epoch), of an ``epochs``-long run."""
    if o.schedule == "cosine":
        lr = o.lr * 0.5 * (1.0 + math.cos(math.pi * min(t, epochs) / epochs))
    else:
        lr = o.lr
        for milestone, factor in zip(o.milestones, o.factors, strict=True):
            if t >= milestone:
                lr = o.lr * factor
    if o.warmup_epochs > 0 and t < o.warmup_epochs:
        lr *= t / o.warmup_epochs
    return lr


def build_optimizer(o: OptimConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
