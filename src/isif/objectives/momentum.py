"""A momentum (EMA) copy of the online network, for the methods that learn against one: MoCo v2, BYOL, DINO.

``MomentumTarget(backbone, head)`` holds deep copies of the online backbone and of the method's head, without
gradients (its parameters are buffers of the objective's state: checkpoints carry them, a resumed run continues
exactly). ``update(online_backbone, online_head, m)`` moves every parameter to m * target + (1 - m) * online after
an optimiser step; buffers (BatchNorm's running statistics) are the target's own, from its own forward passes, as
the references keep them. Its train/eval mode follows the online modules', module by module, at every forward, so
frozen BatchNorm (``--freeze-bn``) is frozen in the target too. ``WithTarget`` is the contract's momentum-target
part (``target_views``, ``target_features``, ``after_step``) written once for the three methods.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

SCHEDULES = ("cosine", "constant")


def cosine_momentum(base: float, step: int, total: int) -> float:
    """BYOL's schedule: m = 1 - (1 - base) (cos(pi k / K) + 1) / 2, from ``base`` at step 0 to 1 at step K."""
    if total <= 0:
        return base
    return 1 - (1 - base) * (math.cos(math.pi * min(step, total) / total) + 1) / 2


def momentum_at(base: float, schedule: str, step: int, total: int) -> float:
    """The EMA momentum at optimiser step ``step`` of ``total``: ``base`` throughout (constant), or cosine to 1."""
    return base if schedule == "constant" else cosine_momentum(base, step, total)


class MomentumTarget(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.head = copy.deepcopy(head)
        for p in self.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, online_backbone: nn.Module, online_head: nn.Module, m: float) -> None:
        for target, online in ((self.backbone, online_backbone), (self.head, online_head)):
            for t, o in zip(target.parameters(), online.parameters(), strict=True):
                t.mul_(m).add_(o.detach().to(t.dtype), alpha=1 - m)

    def follow_modes(self, online_backbone: nn.Module, online_head: nn.Module) -> None:
        for target, online in ((self.backbone, online_backbone), (self.head, online_head)):
            for t, o in zip(target.modules(), online.modules(), strict=True):
                t.training = o.training

    @torch.no_grad()
    def features(self, online_backbone: nn.Module, online_head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The target backbone's features of ``x``, in the online modules' train/eval modes."""
        self.follow_modes(online_backbone, online_head)
        return self.backbone(x)


class WithTarget:
    """A method whose ``target`` (a ``MomentumTarget``) follows the online backbone and ``online_head()`` with
    momentum ``momentum()``; a ``steps`` buffer, where the method has one, counts the optimiser steps."""

    target: MomentumTarget
    target_views: tuple[int, ...] = (0, 1)

    def online_head(self) -> nn.Module:
        raise NotImplementedError

    def momentum(self) -> float:
        raise NotImplementedError

    @torch.no_grad()
    def target_features(self, online_backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The target's backbone features of this process's ``target_views`` (the loop gathers them)."""
        return self.target.features(online_backbone, self.online_head(), x)

    @torch.no_grad()
    def after_step(self, online_backbone: nn.Module) -> None:
        self.target.update(online_backbone, self.online_head(), self.momentum())
        steps = getattr(self, "steps", None)
        if steps is not None:
            steps += 1
