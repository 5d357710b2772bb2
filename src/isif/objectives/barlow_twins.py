"""Barlow Twins (Zbontar et al., ICML 2021): the cross-correlation of the two views' batch-standardised projections
pushed to the identity.

    zn_v = (z_v - mean_batch(z_v)) / std_batch(z_v)        (biased std, as BatchNorm without affine; eps 1e-5)
    C = zn_1^T zn_2 / B                                   (d x d)
    loss = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2

The paper's settings are for ImageNet (projector 3 x 8192, lambda 5e-3); it gives none for CIFAR-10. The defaults
here are the common CIFAR-10 ones (a 3-layer projector of 2048, lambda 0.0051, as solo-learn's CIFAR recipe):
an assumption, said so. Each view goes through the projector on its own (the reference does), so BatchNorm
statistics are per view. The embedding is the pooled backbone feature, as the paper evaluates it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..base.settings import POSITIVE, at_least, setting
from .contract import BuildContext, EpochContext, FromSettings, checked
from .heads import mlp

EPS = 1e-5


def standardise(z: torch.Tensor) -> torch.Tensor:
    """Per column: zero mean and unit (biased) standard deviation over the batch."""
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + EPS)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """The loss of two (B, d) projections (rows are instances)."""
    c = standardise(z1).T @ standardise(z2) / z1.shape[0]
    on = (1 - torch.diagonal(c)).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on + lambd * off


@dataclass
class BarlowTwinsSettings:
    redundancy_weight: float = setting(0.0051, "weight of the off-diagonal (redundancy) term", check=POSITIVE)
    proj_hidden: int | None = setting(2048, "projector hidden width (none: the backbone's width)",
                                      check=at_least(1))
    proj_dim: int = setting(2048, "projection width", check=at_least(1))
    loss_scale: float = setting(0.01, "factor on the loss before the backward pass: its d diagonal terms make it "
                                      "~d, and the references step it with LARS; scaled, the run's SGD --lr applies",
                                check=POSITIVE)


def per_view(head: nn.Module, h: torch.Tensor, views: int) -> list[torch.Tensor]:
    """``head`` applied to each view's rows on its own (BatchNorm statistics per view, as the references do)."""
    return [head(c) for c in h.chunk(views)]


class BarlowTwins(FromSettings, nn.Module):
    """Barlow Twins on a 3-layer MLP projection. Shape: h (2B, F), rows i and B+i the two views of instance i."""

    views = ("augment", "augment")
    input = "backbone"
    embedding = "backbone"

    def __init__(self, features: int, lambd: float = 0.0051, proj_hidden: int = 2048, proj_dim: int = 2048,
                 loss_scale: float = 0.01) -> None:
        self._setup(checked(BarlowTwinsSettings(lambd, proj_hidden, proj_dim, loss_scale)),
                    BuildContext(1, features=features))

    def _setup(self, s: BarlowTwinsSettings, ctx: BuildContext) -> None:
        nn.Module.__init__(self)
        self.lambd, self.scale = s.redundancy_weight, s.loss_scale
        self.projector = mlp([ctx.features, s.proj_hidden or ctx.features, s.proj_hidden or ctx.features, s.proj_dim])

    def networks(self, h: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Every network the method runs on the features, without its loss (``isif bench``'s limit)."""
        return torch.cat(per_view(self.projector, h, 2))

    def forward(self, h: torch.Tensor, instance_idx: torch.Tensor | None = None) -> torch.Tensor:
        z1, z2 = per_view(self.projector, h, 2)
        return self.scale * barlow_twins_loss(z1, z2, self.lambd)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        pass
