"""Exemplar: parametric instance classification, one weight vector per training instance."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.settings import POSITIVE, setting
from .contract import BuildContext, FromSettings, checked


@dataclass
class ExemplarSettings:
    temperature: float = setting(0.1, "temperature on the logits", check=POSITIVE)


class Exemplar(FromSettings, nn.Module):
    """Cross-entropy of every augmented view against its own instance's class.

    logits = z W^T / tau with W (N, D) learned (initialised N(0, 1/D)); both
    views of each instance are classified, so a step sees the same images as
    ISIF's. W is a parameter of the objective: the optimiser trains it and
    checkpoints keep it.

    Shape: z (2B, D), view v of instance i at row v*B + i; instance_idx (B,) -> scalar.
    """

    views = ("augment", "augment")

    def __init__(self, num_instances: int, dim: int = 128, temperature: float = 0.1) -> None:
        self._setup(checked(ExemplarSettings(temperature)), BuildContext(num_instances, dim))

    def _setup(self, s: ExemplarSettings, ctx: BuildContext) -> None:
        nn.Module.__init__(self)
        self.temperature = s.temperature
        self.weight = nn.Parameter(torch.randn(ctx.num_instances, ctx.dim) / math.sqrt(ctx.dim))

    def on_epoch_start(self, ctx) -> None:
        """Nothing to do per epoch."""

    def forward(self, z: torch.Tensor, instance_idx: torch.Tensor | None = None) -> torch.Tensor:
        if instance_idx is None:
            raise ValueError("Exemplar needs instance_idx of shape (B,)")
        v = z.shape[0] // instance_idx.shape[0]
        if z.shape[0] != v * instance_idx.shape[0]:
            raise ValueError(f"z has {z.shape[0]} rows, not a multiple of the {instance_idx.shape[0]} instances")
        target = instance_idx.to(z.device).long().repeat(v)  # (V*B,)
        dt = torch.promote_types(torch.promote_types(z.dtype, self.weight.dtype), torch.float32)
        logits = z.to(dt) @ self.weight.to(dt).t() / self.temperature  # (V*B, N)
        return F.cross_entropy(logits, target)
