"""SimCLR (Chen et al., ICML 2020): NT-Xent over the gathered batch of projected views.

Each of the 2B views is the anchor once; its positive is the other view of its instance and the other 2B - 2 views
are its negatives:

    l(i) = -log( exp(s(i, i+) / tau) / sum_{k != i} exp(s(i, k) / tau) ),   s = cosine,   loss = mean over 2B.

The projector is the paper's: a 2-layer MLP (hidden width the backbone's, output 128), applied to both views at once
(the reference concatenates them, so its BatchNorm sees 2B rows). CIFAR-10 settings of the paper (Appendix B.9):
temperature 0.5, batch 1024 with LARS; the optimiser here is the run's (see the README's race for what differs).
The embedding is the pooled backbone feature, as the paper evaluates it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.settings import POSITIVE, at_least, setting
from .contract import BuildContext, EpochContext, FromSettings, checked
from .heads import mlp


def nt_xent(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of (2B, d) projections, rows i and B+i the two views of instance i (normalised here)."""
    n = p.shape[0]
    b = n // 2
    q = F.normalize(p, dim=1)
    logits = q @ q.T / temperature
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=p.device), float("-inf"))
    target = torch.cat([torch.arange(b, n), torch.arange(0, b)]).to(p.device)
    return F.cross_entropy(logits, target)


@dataclass
class SimCLRSettings:
    temperature: float = setting(0.5, "NT-Xent temperature (the paper's CIFAR-10 value)", check=POSITIVE)
    proj_hidden: int | None = setting(None, "projector hidden width (default: the backbone's)", check=at_least(1))
    proj_dim: int = setting(128, "projection width", check=at_least(1))


class SimCLR(FromSettings, nn.Module):
    """NT-Xent on a 2-layer MLP projection of the backbone features.

    Shape: h (2B, F) pooled backbone features, rows i and B+i the two views of instance i.
    """

    views = ("augment", "augment")
    input = "backbone"
    embedding = "backbone"

    def __init__(self, features: int, temperature: float = 0.5, proj_hidden: int | None = None,
                 proj_dim: int = 128) -> None:
        self._setup(checked(SimCLRSettings(temperature, proj_hidden, proj_dim)), BuildContext(1, features=features))

    def _setup(self, s: SimCLRSettings, ctx: BuildContext) -> None:
        nn.Module.__init__(self)
        self.temperature = s.temperature
        self.projector = mlp([ctx.features, s.proj_hidden or ctx.features, s.proj_dim])

    def networks(self, h: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Every network the method runs on the features, without its loss (``isif bench``'s limit)."""
        return self.projector(h)

    def forward(self, h: torch.Tensor, instance_idx: torch.Tensor | None = None) -> torch.Tensor:
        return nt_xent(self.projector(h), self.temperature)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        pass
