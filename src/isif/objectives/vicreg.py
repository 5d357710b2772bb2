"""VICReg (Bardes et al., ICLR 2022): variance, invariance and covariance terms on the two views' projections.

    s(Z, Z')  = mean over B and d of (Z - Z')^2                                  invariance
    v(Z)      = mean_j max(0, gamma - sqrt(Var_batch(Z_j) + eps))                 variance (unbiased Var)
    c(Z)      = sum_{i != j} Cov(Z)_ij^2 / d,  Cov = (Z - mean)^T (Z - mean) / (B - 1)   covariance
    loss      = lambda s(Z, Z') + mu [v(Z) + v(Z')] + nu [c(Z) + c(Z')]

with the paper's lambda = mu = 25, nu = 1, gamma = 1, eps = 1e-4. The paper's projector (3 x 8192) is for ImageNet
and it gives no CIFAR-10 recipe; the default projector here is 3 x 2048 (an assumption, said so). Each view goes
through the projector on its own, as the reference does. The embedding is the pooled backbone feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.settings import POSITIVE, at_least, setting
from .barlow_twins import per_view
from .contract import BuildContext, EpochContext, FromSettings, checked
from .heads import mlp

EPS = 1e-4


def variance_term(z: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    return F.relu(gamma - torch.sqrt(z.var(0) + EPS)).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    zc = z - z.mean(0)
    cov = zc.T @ zc / (z.shape[0] - 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / z.shape[1]


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim: float = 25.0, var: float = 25.0,
                cov: float = 1.0) -> torch.Tensor:
    """The loss of two (B, d) projections (rows are instances)."""
    return (sim * F.mse_loss(z1, z2) + var * (variance_term(z1) + variance_term(z2))
            + cov * (covariance_term(z1) + covariance_term(z2)))


@dataclass
class VICRegSettings:
    sim_weight: float = setting(25.0, "lambda: the invariance term's weight", check=POSITIVE)
    var_weight: float = setting(25.0, "mu: the variance term's weight", check=POSITIVE)
    cov_weight: float = setting(1.0, "nu: the covariance term's weight", check=POSITIVE)
    proj_hidden: int | None = setting(2048, "projector hidden width (none: the backbone's width)",
                                      check=at_least(1))
    proj_dim: int = setting(2048, "projection width", check=at_least(1))
    loss_scale: float = setting(0.04, "factor on the loss before the backward pass: 1/25, as the paper's weights make "
                                      "it ~25x ISIF's and the references step it with LARS; scaled, the run's SGD "
                                      "--lr applies",
                                check=POSITIVE)


class VICReg(FromSettings, nn.Module):
    """VICReg on a 3-layer MLP projection. Shape: h (2B, F), rows i and B+i the two views of instance i."""

    views = ("augment", "augment")
    input = "backbone"
    embedding = "backbone"

    def __init__(self, features: int, sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0,
                 proj_hidden: int = 2048, proj_dim: int = 2048, loss_scale: float = 0.04) -> None:
        self._setup(checked(VICRegSettings(sim_weight, var_weight, cov_weight, proj_hidden, proj_dim, loss_scale)),
                    BuildContext(1, features=features))

    def _setup(self, s: VICRegSettings, ctx: BuildContext) -> None:
        nn.Module.__init__(self)
        self.weights, self.scale = (s.sim_weight, s.var_weight, s.cov_weight), s.loss_scale
        self.projector = mlp([ctx.features, s.proj_hidden or ctx.features, s.proj_hidden or ctx.features, s.proj_dim])

    def networks(self, h: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Every network the method runs on the features, without its loss (``isif bench``'s limit)."""
        return torch.cat(per_view(self.projector, h, 2))

    def forward(self, h: torch.Tensor, instance_idx: torch.Tensor | None = None) -> torch.Tensor:
        z1, z2 = per_view(self.projector, h, 2)
        return self.scale * vicreg_loss(z1, z2, *self.weights)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        pass
