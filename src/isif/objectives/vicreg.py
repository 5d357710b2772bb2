"""VICReg (Bardes et al., ICLR 2022): variance, invariance and covariance terms on the two views' projections.

    s(Z, Z')  = mean over B and d of (Z - Z')^2                                  invariance
    v(Z)      = mean_j max(0, gamma - sqrt(Var_batch(Z_j) + eps))                 variance (unbiased Var)
    c(Z)      = sum_{i != j} Cov(Z)_ij^2 / d,  Cov = (Z - mean)^T (Z - mean) / (B - 1)   covariance
    loss      = lambda s(Z, Z') + mu [v(Z) + v(Z')] / 2 + nu [c(Z) + c(Z')]

with the paper's lambda = mu = 25, nu = 1, gamma = 1, eps = 1e-4; the two variance terms are averaged and the two
covariance terms added, as the official code and lightly do. The recipe is solo-learn's CIFAR config
(``vicreg.yaml``): projector 3 x 2048, LARS lr 0.3 x B/256 (eta 0.02, clipped, biases and norms excluded), weight
decay 1e-4, crops from 20%, solarisation 0.1 on both views, the loss unscaled. ``loss_scale`` 0.04 (1/25) is the
default for the run's own SGD (``--recipe shared``), where the unscaled loss is ~25x ISIF's. Each view goes through
the projector on its own, as the reference does. The embedding is the pooled backbone feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..base.settings import POSITIVE, at_least, setting
from .barlow_twins import ProjectedPair
from .contract import Recipe
from .recipes import SOLO_LARS, SOLO_VICREG_VIEWS

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
    return (sim * F.mse_loss(z1, z2) + var * (variance_term(z1) + variance_term(z2)) / 2
            + cov * (covariance_term(z1) + covariance_term(z2)))


@dataclass
class VICRegSettings:
    sim_weight: float = setting(25.0, "lambda: the invariance term's weight", check=POSITIVE)
    var_weight: float = setting(25.0, "mu: the variance term's weight", check=POSITIVE)
    cov_weight: float = setting(1.0, "nu: the covariance term's weight", check=POSITIVE)
    proj_hidden: int | None = setting(2048, "projector hidden width (none: the backbone's width)",
                                      check=at_least(1))
    proj_dim: int = setting(2048, "projection width", check=at_least(1))
    proj_layers: int = setting(3, "projector depth in Linear layers", check=at_least(1))
    loss_scale: float = setting(0.04, "factor on the loss before the backward pass: 1/25 for SGD (the paper's "
                                      "weights make it ~25x ISIF's); its own recipe (LARS): 1", check=POSITIVE)


RECIPE = Recipe("solo-learn's CIFAR config vicreg.yaml (projector 3 x 2048, LARS 0.3 x B/256 with eta 0.02, weight "
                "decay 1e-4, crops from 20%, solarisation 0.1, no blur)",
                {**SOLO_VICREG_VIEWS, **SOLO_LARS, "method.proj_hidden": 2048, "method.proj_dim": 2048,
                 "method.proj_layers": 3, "method.loss_scale": 1.0}, lr=0.3, lr_batch=256)


class VICReg(ProjectedPair):
    """VICReg on an MLP projection."""

    Settings = VICRegSettings

    def loss(self, out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        s = self.s
        return s.loss_scale * vicreg_loss(*out, s.sim_weight, s.var_weight, s.cov_weight)
