"""Triplet loss with the two views as anchor and positive."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..base.settings import NON_NEGATIVE, setting
from .contract import BuildContext, checked


@dataclass
class TripletSettings:
    margin: float = setting(0.5, "margin on L2-normalised features", check=NON_NEGATIVE)


class Triplet(nn.Module):
    """mean over anchors a of max(0, d(a, p) - d(a, n) + margin), Euclidean d on L2-normalised z.

    Every row is an anchor; its positive is the other view of its instance;
    its negative is one of the other 2B - 2 rows: drawn uniformly
    (``mining="random"``, from torch's global generator) or the closest one
    (``mining="hard"``).

    Shape: z (2B, D), rows i and B+i the views of instance i -> scalar.
    """

    views = ("augment", "augment")

    def __init__(self, margin: float = 0.5, mining: str = "random") -> None:
        self._setup(checked(TripletSettings(margin)), mining)

    @classmethod
    def from_settings(cls, settings: TripletSettings, ctx: BuildContext, mining: str = "random") -> Triplet:
        """The registry's builder (``triplet``; ``triplet-hard`` with ``mining="hard"``)."""
        obj = cls.__new__(cls)
        obj._setup(settings, mining)
        return obj

    def _setup(self, s: TripletSettings, mining: str) -> None:
        nn.Module.__init__(self)
        if mining not in ("random", "hard"):
            raise ValueError(f"mining must be random or hard, got {mining!r}")
        self.margin = s.margin
        self.mining = mining

    def on_epoch_start(self, ctx) -> None:
        """Nothing to do per epoch."""

    def forward(self, z: torch.Tensor, instance_idx: torch.Tensor | None = None) -> torch.Tensor:
        if z.dim() != 2 or z.shape[0] % 2 or z.shape[0] < 4:
            raise ValueError(f"z must be (2B, D) with B >= 2, got {tuple(z.shape)}")
        n = z.shape[0]
        b = n // 2
        z = z.float()
        rows = torch.arange(n, device=z.device)
        pos = (rows + b) % n
        d = torch.sqrt((2 - 2 * z @ z.t()).clamp_min(0) + 1e-12)  # (2B, 2B) Euclidean, unit vectors
        cand = torch.ones(n, n, dtype=torch.bool, device=z.device)
        cand[rows, rows] = False
        cand[rows, pos] = False  # (2B, 2B) allowed negatives
        if self.mining == "hard":
            neg = d.detach().masked_fill(~cand, float("inf")).argmin(dim=1)  # (2B,)
        else:
            r = torch.randint(0, n - 2, (n,)).to(z.device)  # the r-th allowed column of each row
            order = torch.cumsum(cand.long(), dim=1) - 1
            neg = ((order == r[:, None]) & cand).long().argmax(dim=1)
        return torch.relu(d[rows, pos] - d[rows, neg] + self.margin).mean()
