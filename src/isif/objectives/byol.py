"""BYOL (Grill et al., NeurIPS 2020): an online network with a predictor learns to predict an EMA target's projection.

    loss = sum over the two orderings (v, v') of  mean_i [ 2 - 2 cos(q(z_v,i), sg(z'_v',i)) ]
    z_v = projector(backbone(x_v)) online;  z'_v = the target's (EMA of the online backbone and projector)
    target <- m target + (1 - m) online after every step, m = 1 - (1 - m0)(cos(pi k/K) + 1)/2

The paper's settings: projector and predictor 4096 -> 256, m0 = 0.996, the symmetric loss. It pretrains on ImageNet
only (CIFAR-10 appears as transfer), so these are its ImageNet values; lightly's and solo-learn's CIFAR recipes use
the same heads with m0 0.99. The target gets no gradient (its parameters are buffers). The embedding is the pooled
backbone feature of the online network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.settings import FRACTION, at_least, setting
from .barlow_twins import per_view
from .contract import BuildContext, EpochContext, FromSettings, checked
from .heads import mlp
from .momentum import MomentumTarget, cosine_momentum


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """Predictions p_v of the online network against the target's projections t_v' of the other view."""
    def one(p, t):
        return (2 - 2 * F.cosine_similarity(p, t.detach(), dim=1)).mean()
    return one(p1, t2) + one(p2, t1)


@dataclass
class BYOLSettings:
    target_momentum: float = setting(0.996, "the target's base EMA momentum m0 (cosine schedule to 1)", check=FRACTION)
    proj_hidden: int | None = setting(4096, "projector and predictor hidden width (none: the backbone's width)",
                                      check=at_least(1))
    proj_dim: int = setting(256, "projection width", check=at_least(1))


class BYOL(FromSettings, nn.Module):
    """BYOL. Shape: h (2B, F) online backbone features; the target's, (2B, F), from ``target_features``."""

    views = ("augment", "augment")
    input = "backbone"
    embedding = "backbone"
    target_views = (0, 1)

    def __init__(self, backbone: nn.Module, features: int, total_steps: int, target_momentum: float = 0.996,
                 proj_hidden: int = 4096, proj_dim: int = 256) -> None:
        self._setup(checked(BYOLSettings(target_momentum, proj_hidden, proj_dim)),
                    BuildContext(1, features=features, backbone=backbone, total_steps=total_steps))

    def _setup(self, s: BYOLSettings, ctx: BuildContext) -> None:
        nn.Module.__init__(self)
        if ctx.backbone is None:
            raise ValueError("BYOL needs the network to copy as its target")
        self.base_momentum, self.total_steps = s.target_momentum, ctx.total_steps
        self.projector = mlp([ctx.features, s.proj_hidden or ctx.features, s.proj_dim])
        self.predictor = mlp([s.proj_dim, s.proj_hidden or ctx.features, s.proj_dim])
        self.target = MomentumTarget(ctx.backbone, self.projector)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def target_features(self, online_backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        self.target.follow_modes(online_backbone, self.projector)
        return self.target.backbone(x)

    def networks(self, h: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Every network the method runs on the features (the target's projector included), without its loss."""
        with torch.no_grad():
            per_view(self.target.head, target, 2)
        return torch.cat([self.predictor(z) for z in per_view(self.projector, h, 2)])

    def forward(self, h: torch.Tensor, instance_idx: torch.Tensor | None = None,
                target: torch.Tensor | None = None) -> torch.Tensor:
        z1, z2 = per_view(self.projector, h, 2)
        with torch.no_grad():
            t1, t2 = per_view(self.target.head, target, 2)
        return byol_loss(self.predictor(z1), self.predictor(z2), t1, t2)

    def momentum(self) -> float:
        return cosine_momentum(self.base_momentum, int(self.steps), self.total_steps)

    @torch.no_grad()
    def after_step(self, online_backbone: nn.Module) -> None:
        self.target.update(online_backbone, self.projector, self.momentum())
        self.steps += 1

    def on_epoch_start(self, ctx: EpochContext) -> None:
        pass
