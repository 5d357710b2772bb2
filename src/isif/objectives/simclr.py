"""SimCLR (Chen et al., ICML 2020): NT-Xent over the gathered batch of projected views.

Each of the 2B views is the anchor once; its positive is the other view of its instance and the other 2B - 2 views
are its negatives:

    l(i) = -log( exp(s(i, i+) / tau) / sum_{k != i} exp(s(i, k) / tau) ),   s = cosine,   loss = mean over 2B.

The projector is the paper's: a 2-layer MLP (hidden width the backbone's, output 128), applied to both views at once
(the reference concatenates them, so its BatchNorm sees 2B rows); temperature 0.5, the paper's CIFAR-10 value.
Its recipe is lightly's CIFAR-10 benchmark (SimCLRModel). The embedding is the pooled backbone feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..base.settings import POSITIVE, at_least, setting
from .contract import BuildContext, OwnHeads, Recipe, checked
from .heads import mlp
from .recipes import LIGHTLY_SGD, LIGHTLY_SIMCLR_VIEWS


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


RECIPE = Recipe("lightly's CIFAR-10 benchmark (SimCLRModel: SimCLRProjectionHead(512, 512, 128), SimCLRTransform "
                "with cj_strength 0.5 and no blur, SGD 0.06 x B/128)",
                {**LIGHTLY_SIMCLR_VIEWS, **LIGHTLY_SGD, "method.proj_hidden": 512, "method.proj_dim": 128},
                lr=0.06, lr_batch=128)


class SimCLR(OwnHeads):
    """NT-Xent on a 2-layer MLP projection. Shape: h (2B, F) pooled backbone features, rows i and B+i the two views
    of instance i."""

    def __init__(self, features: int, **settings) -> None:
        self._setup(checked(SimCLRSettings(**settings)), BuildContext(1, features=features))

    def _setup(self, s: SimCLRSettings, ctx: BuildContext) -> None:
        OwnHeads.__init__(self)
        self.temperature = s.temperature
        self.projector = mlp([ctx.features, s.proj_hidden or ctx.features, s.proj_dim])

    def outputs(self, h: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        return self.projector(h)

    def loss(self, out: torch.Tensor) -> torch.Tensor:
        return nt_xent(out, self.temperature)
