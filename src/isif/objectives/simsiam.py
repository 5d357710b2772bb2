"""SimSiam (Chen and He, CVPR 2021): a predictor and a stop-gradient, no negatives.

    D(p, z) = -cos(p, stopgrad(z)),   loss = D(p1, z2) / 2 + D(p2, z1) / 2,   p_v = predictor(z_v), z_v = projector(h_v)

The paper's CIFAR-10 setting (its Appendix): a 2-layer projector of output 2048 with BatchNorm on its output, a
predictor 2048 -> 512 -> 2048 (the bottleneck), SGD with lr 0.03 x B/256, weight decay 5e-4. Each view goes through
the heads on its own, as the reference does. The embedding is the pooled backbone feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.settings import at_least, setting
from .barlow_twins import per_view
from .contract import BuildContext, EpochContext, FromSettings, checked
from .heads import mlp


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The symmetric negative cosine with the targets ``z`` detached (no gradient reaches them)."""
    d1 = F.cosine_similarity(p1, z2.detach(), dim=1).mean()
    d2 = F.cosine_similarity(p2, z1.detach(), dim=1).mean()
    return -(d1 + d2) / 2


@dataclass
class SimSiamSettings:
    proj_dim: int = setting(2048, "projection width", check=at_least(1))
    pred_hidden: int = setting(512, "predictor bottleneck width", check=at_least(1))


class SimSiam(FromSettings, nn.Module):
    """SimSiam. Shape: h (2B, F) pooled backbone features, rows i and B+i the two views of instance i."""

    views = ("augment", "augment")
    input = "backbone"
    embedding = "backbone"

    def __init__(self, features: int, proj_dim: int = 2048, pred_hidden: int = 512) -> None:
        self._setup(checked(SimSiamSettings(proj_dim, pred_hidden)), BuildContext(1, features=features))

    def _setup(self, s: SimSiamSettings, ctx: BuildContext) -> None:
        nn.Module.__init__(self)
        self.projector = mlp([ctx.features, s.proj_dim, s.proj_dim], bn_last=True)
        self.predictor = mlp([s.proj_dim, s.pred_hidden, s.proj_dim])

    def networks(self, h: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Every network the method runs on the features, without its loss (``isif bench``'s limit)."""
        return torch.cat([self.predictor(z) for z in per_view(self.projector, h, 2)])

    def forward(self, h: torch.Tensor, instance_idx: torch.Tensor | None = None) -> torch.Tensor:
        z1, z2 = per_view(self.projector, h, 2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return simsiam_loss(p1, p2, z1, z2)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        pass
