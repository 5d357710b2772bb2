"""Barlow Twins (Zbontar et al., ICML 2021): the cross-correlation of the two views' batch-standardised projections
pushed to the identity.

    zn_v = (z_v - mean_batch(z_v)) / std_batch(z_v)        (biased std, as BatchNorm without affine; eps 1e-5)
    C = zn_1^T zn_2 / B                                   (d x d)
    loss = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2

The paper's settings are for ImageNet (projector 3 x 8192, lambda 5e-3, LARS); it gives none for CIFAR-10. The
recipe is solo-learn's CIFAR config (LARS, the loss x 0.1, a 3-layer projector 2048 wide, solarisation on the
second view); lightly's CIFAR-10 recipe (SGD 0.06, the loss unscaled as in the official code) is kept as
``LIGHTLY_RECIPE`` for the side-by-side benchmark. ``loss_scale`` 0.01 is the default for the run's own SGD
(``--recipe shared``), as VICReg's 0.04: unscaled, the loss (~2,000 at the start) steps SGD so hard that 3 epochs of
``cifar10-race`` end below the untrained network (docs/results.md). Each view goes through the
projector on its own (the reference does), so BatchNorm statistics are per view. The embedding is the pooled
backbone feature, as the paper evaluates it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base.settings import POSITIVE, at_least, setting
from .contract import BuildContext, OwnHeads, Recipe, checked, per_view
from .heads import mlp
from .recipes import LIGHTLY_BYOL_VIEWS, LIGHTLY_SGD, SOLO_LARS

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
    proj_layers: int = setting(3, "projector depth in Linear layers (the paper: 3; lightly's CIFAR-10: 2)",
                               check=at_least(1))
    loss_scale: float = setting(0.01, "factor on the loss before the backward pass: 0.01 for SGD (--recipe shared); "
                                      "its own recipe (LARS): 0.1; the official code and lightly: 1", check=POSITIVE)


RECIPE = Recipe("solo-learn's CIFAR config barlow.yaml (projector 3 x 2048, lambda 5.1e-3, loss x 0.1, LARS 0.3 x "
                "B/256 with eta 0.02, weight decay 1e-4, its asymmetric views: solarisation 0.2 on the second)",
                {**LIGHTLY_BYOL_VIEWS, **SOLO_LARS, "method.redundancy_weight": 0.0051, "method.proj_hidden": 2048,
                 "method.proj_dim": 2048, "method.proj_layers": 3, "method.loss_scale": 0.1}, lr=0.3, lr_batch=256)
# lightly's CIFAR-10 benchmark (BarlowTwinsModel): what benchmarks/fidelity_lightly.py trains isif's side with; it
# does not learn in 3 epochs of cifar10-race (docs/results.md), so it is not the recipe
LIGHTLY_RECIPE = Recipe("lightly's CIFAR-10 benchmark (BarlowTwinsModel: projector (512, 2048, 2048), "
                        "BarlowTwinsLoss lambda 5e-3 unscaled, BYOLTransform without blur, SGD 0.06 x B/128)",
                        {**LIGHTLY_BYOL_VIEWS, **LIGHTLY_SGD, "method.redundancy_weight": 0.005,
                         "method.proj_hidden": 2048, "method.proj_dim": 2048, "method.proj_layers": 2,
                         "method.loss_scale": 1.0}, lr=0.06, lr_batch=128)


def projector(features: int, hidden: int | None, out: int, layers: int):
    """An MLP of ``layers`` Linear layers: ``hidden`` wide (the backbone's width when None), then ``out``."""
    return mlp([features] + [hidden or features] * (layers - 1) + [out])


class ProjectedPair(OwnHeads):
    """The two views through one MLP projector, each on its own (Barlow Twins, VICReg): its settings (``Settings``)
    have ``proj_hidden``, ``proj_dim`` and ``proj_layers``. Shape: h (2B, F), rows i and B+i the views of i."""

    Settings: type

    def __init__(self, features: int, **settings) -> None:
        self._setup(checked(self.Settings(**settings)), BuildContext(1, features=features))

    def _setup(self, s, ctx: BuildContext) -> None:
        OwnHeads.__init__(self)
        self.s = s
        self.projector = projector(ctx.features, s.proj_hidden, s.proj_dim, s.proj_layers)

    def outputs(self, h: torch.Tensor, target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z1, z2 = per_view(self.projector, h)
        return z1, z2


class BarlowTwins(ProjectedPair):
    """Barlow Twins on an MLP projection."""

    Settings = BarlowTwinsSettings

    def loss(self, out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.s.loss_scale * barlow_twins_loss(*out, self.s.redundancy_weight)
