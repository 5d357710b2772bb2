"""BYOL (Grill et al., NeurIPS 2020): an online network with a predictor learns to predict an EMA target's projection.

    loss = sum over the two orderings (v, v') of  mean_i [ 2 - 2 cos(q(z_v,i), sg(z'_v',i)) ]
    z_v = projector(backbone(x_v)) online;  z'_v = the target's (EMA of the online backbone and projector)
    target <- m target + (1 - m) online after every step, m = 1 - (1 - m0)(cos(pi k/K) + 1)/2 (or m0 throughout)

The loss is the paper's and its official code's. lightly writes it 0.5 sum(-cos): the same gradient divided by 4,
so its recipe (lightly's CIFAR-10 benchmark: SGD 0.06 x B/128, momentum 0.99 held constant, heads 1024 -> 256,
BYOLTransform without blur) takes ``loss_scale`` 0.25, which makes every step equal to lightly's. The paper's own
settings are ImageNet's: heads 4096 -> 256, m0 0.996 with the cosine schedule, LARS. The target gets no gradient
(its parameters are buffers). The embedding is the pooled backbone feature of the online network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.settings import FRACTION, POSITIVE, at_least, one_of, setting
from .contract import BuildContext, OwnHeads, Recipe, checked, per_view
from .heads import mlp
from .momentum import SCHEDULES, MomentumTarget, WithTarget, momentum_at
from .recipes import LIGHTLY_BYOL_VIEWS, LIGHTLY_SGD


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """Predictions p_v of the online network against the target's projections t_v' of the other view."""
    def one(p, t):
        return (2 - 2 * F.cosine_similarity(p, t.detach(), dim=1)).mean()
    return one(p1, t2) + one(p2, t1)


@dataclass
class BYOLSettings:
    target_momentum: float = setting(0.996, "the target's base EMA momentum m0", check=FRACTION)
    momentum_schedule: str = setting("cosine", "cosine (m0 to 1 over the run, the paper's) or constant (m0)",
                                     check=one_of(*SCHEDULES))
    proj_hidden: int | None = setting(4096, "projector and predictor hidden width (none: the backbone's width)",
                                      check=at_least(1))
    proj_dim: int = setting(256, "projection width", check=at_least(1))
    loss_scale: float = setting(1.0, "factor on the loss before the backward pass (lightly's 0.5 sum(-cos) is the "
                                     "paper's loss x 0.25)", check=POSITIVE)


RECIPE = Recipe("lightly's CIFAR-10 benchmark (BYOLModel: heads (512, 1024, 256), momentum 0.99 held constant, "
                "0.5 sum(-cos), BYOLTransform without blur, SGD 0.06 x B/128)",
                {**LIGHTLY_BYOL_VIEWS, **LIGHTLY_SGD, "method.target_momentum": 0.99,
                 "method.momentum_schedule": "constant", "method.proj_hidden": 1024, "method.proj_dim": 256,
                 "method.loss_scale": 0.25}, lr=0.06, lr_batch=128)


class BYOL(WithTarget, OwnHeads):
    """BYOL. Shape: h (2B, F) online backbone features; the target's, (2B, F), from ``target_features``."""

    def __init__(self, backbone: nn.Module, features: int, total_steps: int, **settings) -> None:
        self._setup(checked(BYOLSettings(**settings)),
                    BuildContext(1, features=features, backbone=backbone, total_steps=total_steps))

    def _setup(self, s: BYOLSettings, ctx: BuildContext) -> None:
        OwnHeads.__init__(self)
        if ctx.backbone is None:
            raise ValueError("BYOL needs the network to copy as its target")
        self.s, self.total_steps = s, ctx.total_steps
        self.projector = mlp([ctx.features, s.proj_hidden or ctx.features, s.proj_dim])
        self.predictor = mlp([s.proj_dim, s.proj_hidden or ctx.features, s.proj_dim])
        self.target = MomentumTarget(ctx.backbone, self.projector)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def online_head(self) -> nn.Module:
        return self.projector

    def momentum(self) -> float:
        return momentum_at(self.s.target_momentum, self.s.momentum_schedule, int(self.steps), self.total_steps)

    def outputs(self, h: torch.Tensor, target: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(p1, p2, t1, t2): the online predictions and the target's projections of each view."""
        p1, p2 = (self.predictor(z) for z in per_view(self.projector, h))
        with torch.no_grad():
            t1, t2 = per_view(self.target.head, target)
        return p1, p2, t1, t2

    def loss(self, out: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.s.loss_scale * byol_loss(*out)
