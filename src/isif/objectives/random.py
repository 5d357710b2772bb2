"""The ``random`` method: no training, the randomly initialised network evaluated once (Table 1's baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .contract import BuildContext, EpochContext


@dataclass
class NoSettings:
    """The untrained network has no settings."""


class NoTraining(nn.Module):
    """The untrained network: the run evaluates it once and takes no step."""

    views: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: NoSettings, ctx: BuildContext) -> NoTraining:
        return cls()

    def on_epoch_start(self, ctx: EpochContext) -> None:
        """Never called: the method does not train."""

    def forward(self, z: torch.Tensor, instance_idx: torch.Tensor | None = None) -> torch.Tensor:
        raise RuntimeError("the 'random' method takes no training step")
