"""The optimisers (SGD, LARS), gradient clipping and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..base.settings import MOMENTUM, NON_NEGATIVE, POSITIVE, one_of, setting


@dataclass
class OptimConfig:
    lr: float = setting(0.03, "learning rate", check=POSITIVE)
    momentum: float = setting(0.9, "SGD momentum", check=MOMENTUM)
    weight_decay: float = setting(5e-4, "SGD weight decay", check=NON_NEGATIVE)
    schedule: str = setting("step", "step (the paper's milestones), cosine (every step) or cosine-epoch (cosine held "
                                    "through each epoch, as torch's CosineAnnealingLR stepped once an epoch)",
                            check=one_of("step", "cosine", "cosine-epoch"))
    milestones: tuple[int, ...] = setting((120, 160), "step schedule: epochs where the factor changes")
    factors: tuple[float, ...] = setting((0.1, 0.01), "step schedule: lr multiplier from each milestone on")
    warmup_epochs: float = setting(0.0, "linear warm-up, in epochs (fractions allowed)", check=NON_NEGATIVE)
    optimizer: str = setting("sgd", "sgd or lars", check=one_of("sgd", "lars"))
    lars_eta: float = setting(0.02, "LARS trust coefficient eta", check=POSITIVE)
    lars_clip: bool = setting(True, "LARS: clip the adaptive rate at the learning rate (solo-learn's clip_lr)")
    exclude_bias_norm: bool = setting(
        False, "no weight decay (nor LARS adaptation) for biases and normalisation parameters (1-d tensors)")
    clip_grad: float | None = setting(
        None, "clip the gradients' global L2 norm to this value (none: no clipping)", check=POSITIVE)

    def check(self) -> None:
        # lars_eta / lars_clip with optimizer sgd are their defaults, unused: not an error.
        if len(self.milestones) != len(self.factors):
            raise ValueError("--milestones and --factors must have the same length")


def lr_at(o: OptimConfig, epochs: int, t: float) -> float:
    """Learning rate at training time ``t``, in epochs (fractional inside an epoch), of an ``epochs``-long run."""
    if o.schedule in ("cosine", "cosine-epoch"):
        at = math.floor(t) if o.schedule == "cosine-epoch" else t
        lr = o.lr * 0.5 * (1.0 + math.cos(math.pi * min(at, epochs) / epochs))
    else:
        lr = o.lr
        for milestone, factor in zip(o.milestones, o.factors, strict=True):
            if t >= milestone:
                lr = o.lr * factor
    if o.warmup_epochs > 0 and t < o.warmup_epochs:
        lr *= t / o.warmup_epochs
    return lr


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as solo-learn's CIFAR recipes use it.

    Per parameter p with gradient g: trust = eta * |p| / (|g| + weight_decay * |p| + eps) when |p| > 0 and
    |g| > 0, else 1; with clip_lr (when the norms are > 0) trust = min(trust / lr, 1); d = (g + weight_decay * p)
    * trust. A group with ``lars_exclude`` gets d = g: no weight decay, no adaptation. Then, as torch's SGD (no
    dampening, buffer started at d): b = momentum * b + d; p -= lr * b.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.02, clip_lr: bool = True, eps: float = 1e-8) -> None:
        if not lr >= 0:
            raise ValueError(f"LARS: invalid learning rate {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS: invalid momentum {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"LARS: invalid weight_decay {weight_decay}")
        if not eta > 0:
            raise ValueError(f"LARS: invalid eta {eta}")
        if not eps >= 0:
            raise ValueError(f"LARS: invalid eps {eps}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip_lr=clip_lr, eps=eps,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                if group["lars_exclude"]:
                    d = g
                else:
                    # The trust ratio stays a tensor (torch.where, no .item()): no host sync per parameter.
                    p_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    trust = group["eta"] * p_norm / (g_norm + wd * p_norm + group["eps"])
                    if group["clip_lr"]:
                        trust = torch.clamp(trust / lr, max=1.0) if lr > 0 else torch.ones_like(trust)
                    trust = torch.where((p_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                    d = (g.add(p, alpha=wd) if wd != 0 else g) * trust
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(d).detach()
                    else:
                        buf.mul_(momentum).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)
        return loss


def param_groups(o: OptimConfig, params: list[torch.nn.Parameter]) -> list[dict]:
    """With ``exclude_bias_norm``: the matrices and kernels (weight decay), then the 1-d and scalar parameters (biases,
    normalisation weights: no weight decay, no LARS adaptation), each group only if it has parameters."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups: list[dict] = []
    if decay:
        groups.append({"params": decay})
    if no_decay:
        group: dict = {"params": no_decay, "weight_decay": 0.0}
        if o.optimizer == "lars":
            group["lars_exclude"] = True
        groups.append(group)
    return groups


def build_optimizer(o: OptimConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (``torch.optim.SGD``) or ``LARS`` over ``params``: one group, or with ``exclude_bias_norm`` two."""
    groups: list = param_groups(o, list(params)) if o.exclude_bias_norm else list(params)
    if o.optimizer == "lars":
        return LARS(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, eta=o.lars_eta,
                    clip_lr=o.lars_clip)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def clip_gradients(o: OptimConfig, params: Iterable[torch.nn.Parameter]) -> None:
    """Clip the gradients' global L2 norm to ``o.clip_grad`` (no-op when it is None). With a GradScaler, call it
    after ``scaler.unscale_(opt)``."""
    if o.clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(params, o.clip_grad)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
