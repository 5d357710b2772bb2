"""A momentum (EMA) copy of the online network, for the methods that learn against one: MoCo v2, BYOL, DINO.

``MomentumTarget(backbone, head)`` holds deep copies of the online backbone and of the method's head, without
gradients (its parameters are buffers of the objective's state: checkpoints carry them, a resumed run continues
exactly). ``update(online_backbone, online_head, m)`` moves every parameter to m * target + (1 - m) * online after
an optimiser step; buffers (BatchNorm's running statistics) are the target's own, from its own forward passes, as
the references keep them. Its train/eval mode follows the online modules', module by module, at every forward, so
frozen BatchNorm (``--freeze-bn``) is frozen in the target too.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(base: float, step: int, total: int) -> float:
    """BYOL's schedule: m = 1 - (1 - base) (cos(pi k / K) + 1) / 2, from ``base`` at step 0 to 1 at step K."""
    if total <= 0:
        return base
    return 1 - (1 - base) * (math.cos(math.pi * min(step, total) / total) + 1) / 2


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
