"""SimSiam (Chen and He, CVPR 2021): a predictor and a stop-gradient, no negatives.

    D(p, z) = -cos(p, stopgrad(z)),   loss = D(p1, z2) / 2 + D(p2, z1) / 2,   p_v = predictor(z_v), z_v = projector(h_v)

The paper's CIFAR-10 setting (its Appendix): a 2-layer projector of output 2048 with BatchNorm on its output, a
predictor 2048 -> 512 -> 2048 (the bottleneck), SGD with lr 0.03 x B/256, weight decay 5e-4. Its recipe here is
lightly's CIFAR-10 benchmark (SimSiamModel), which keeps those heads and trains with SGD 0.06 (not scaled with the
batch), SimSiamTransform without blur. Each view goes through the heads on its own, as the reference does. The
embedding is the pooled backbone feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..base.settings import at_least, setting
from .contract import BuildContext, OwnHeads, Recipe, checked, per_view
from .heads import mlp
from .recipes import LIGHTLY_SGD, LIGHTLY_SIMSIAM_VIEWS


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The symmetric negative cosine with the targets ``z`` detached (no gradient reaches them)."""
    d1 = F.cosine_similarity(p1, z2.detach(), dim=1).mean()
    d2 = F.cosine_similarity(p2, z1.detach(), dim=1).mean()
    return -(d1 + d2) / 2


@dataclass
class SimSiamSettings:
    proj_dim: int = setting(2048, "projection width", check=at_least(1))
    pred_hidden: int = setting(512, "predictor bottleneck width", check=at_least(1))


RECIPE = Recipe("lightly's CIFAR-10 benchmark (SimSiamModel: projector 2048 with BatchNorm on its output, predictor "
                "2048 -> 512 -> 2048, SimSiamTransform without blur, SGD 0.06 for any batch)",
                {**LIGHTLY_SIMSIAM_VIEWS, **LIGHTLY_SGD, "method.proj_dim": 2048, "method.pred_hidden": 512},
                lr=0.06)


class SimSiam(OwnHeads):
    """SimSiam. Shape: h (2B, F) pooled backbone features, rows i and B+i the two views of instance i."""

    def __init__(self, features: int, **settings) -> None:
        self._setup(checked(SimSiamSettings(**settings)), BuildContext(1, features=features))

    def _setup(self, s: SimSiamSettings, ctx: BuildContext) -> None:
        OwnHeads.__init__(self)
        self.projector = mlp([ctx.features, s.proj_dim, s.proj_dim], bn_last=True)
        self.predictor = mlp([s.proj_dim, s.pred_hidden, s.proj_dim])

    def outputs(self, h: torch.Tensor, target: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(p1, p2, z1, z2): the predictions and projections of each view."""
        z1, z2 = per_view(self.projector, h)
        return self.predictor(z1), self.predictor(z2), z1, z2

    def loss(self, out: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return simsiam_loss(*out)
