"""The Invariant and Spreading Instance Feature objective (Ye et al., CVPR 2019).

A softmax over the real-time features of the batch, with no memory bank: the
second view of an instance must be recognised as that instance (invariance)
and every other instance must not be (spreading).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.settings import FRACTION, POSITIVE, at_least, one_of, setting
from .contract import BuildContext, FromSettings, checked
from .heads import mlp

VARIANTS = ("official", "paper")
NEGATIVES = ("all", "hard", "easy")
PROJECTORS = ("none", "mlp")
_LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate over the whole range.

    Both branches are evaluated on inputs where they are finite, so the unused
    branch never feeds inf or nan into the gradient.
    """
    small = x < -_LN2
    safe_small = torch.where(small, x, torch.full_like(x, -1.0))
    safe_large = torch.where(small, torch.full_like(x, -1.0), x)
    return torch.where(small, torch.log1p(-torch.exp(safe_small)), torch.log(-torch.expm1(safe_large)))


def _masked_log1mexp(log_p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(1 - p) where ``mask``, 0 elsewhere. Entries outside the mask (the positive and the
    self term, whose p can round to 1) never reach log1mexp, so they cannot make a NaN gradient."""
    safe = torch.where(mask, log_p, torch.full_like(log_p, -1.0))
    return torch.where(mask, log1mexp(safe), torch.zeros_like(log_p))


def _check_batch(z: torch.Tensor) -> int:
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D (2B, D), got shape {tuple(z.shape)}")
    if z.shape[0] % 2:
        raise ValueError(f"z must have an even number of rows (two views per instance), got {z.shape[0]}")
    b = z.shape[0] // 2
    if b < 2:
        raise ValueError(f"the batch needs at least 2 instances (4 rows), got {z.shape[0]} rows")
    return b


@dataclass
class IsifSettings:
    temperature: float = setting(0.1, "softmax temperature tau", check=POSITIVE)
    variant: str = setting("official", "official (the reference code's BatchCriterion) or paper (Eq. 7)",
                           check=one_of(*VARIANTS))
    neg_weight: float = setting(1.0, "the reference code's negM: a factor >= 1 on the negatives", check=at_least(1))
    negatives: str = setting("all", "all, or Table 8's hard / easy half of them", check=one_of(*NEGATIVES))
    neg_fraction: float = setting(0.5, "share of negatives kept by --negatives hard / easy", check=FRACTION)
    projector: str = setting("none", "none (the paper: the loss on the network's 128-d head) or mlp (SimCLR's "
                             "2-layer projector on the backbone features instead, the embedding then the backbone's)",
                             check=one_of(*PROJECTORS))

    def check(self) -> None:
        if self.negatives != "all" and self.variant != "official":
            raise ValueError("--negatives hard/easy needs --variant official")


class InvariantSpreading(FromSettings, nn.Module):
    """Instance softmax over the batch's own features.

    Args:
        temperature: tau in exp(s / tau); must be > 0. The paper uses 0.1.
        variant: ``"official"`` reproduces the reference code's BatchCriterion;
            ``"paper"`` is Eq. 7 of the paper.
        neg_weight: the reference code's ``negM``: a factor on the negatives,
            in the denominators and on the spreading term; >= 1 (below 1 a
            negative's probability can exceed 1). 1 is the paper.

    Shape:
        z: (2B, D), L2-normalised. Rows i and B+i are the two views of
        instance i. For ``"paper"``, rows 0..B-1 are the un-augmented anchors
        f_i and rows B..2B-1 the augmented features f^_i.
        instance_idx: (B,) dataset indices; unused (no memory bank), accepted
        so that every objective has the same call.
        Output: scalar loss.

    ``"official"``: every row a is an anchor; its positive is the other view
    (a ± B); its denominator sums exp(x_a . x_j / tau) over the 2B-1 rows
    j != a, with x_j detached (gradient flows only through the anchor row);
    the spreading term sums log(1 - p_aj) over j not in {a, pos(a)}:

        loss = -(sum_a log p_a,pos(a) + neg_weight * sum_a sum_j log(1 - p_aj)) / 2B

    ``"paper"``: with P(i|x) = exp(f_i . x / tau) / sum_k exp(f_k . x / tau),
    k over the B anchors (the self term kept),

        loss = -(sum_i log P(i|f^_i) + neg_weight * sum_i sum_{j!=i} log(1 - P(i|f_j))) / B

    Everything is computed from log-probabilities (logsumexp), in at least
    float32, so bf16/fp16 features cannot overflow exp().

    Example:
        >>> crit = InvariantSpreading(temperature=0.1)
        >>> z = torch.nn.functional.normalize(torch.randn(8, 128), dim=1)
        >>> loss = crit(z, torch.arange(4))
    """

    def __init__(self, temperature: float = 0.1, variant: str = "official", neg_weight: float = 1.0,
                 negatives: str = "all", neg_fraction: float = 0.5, projector: str = "none", features: int = 0,
                 dim: int = 128) -> None:
        self._setup(checked(IsifSettings(temperature, variant, neg_weight, negatives, neg_fraction, projector)),
                    BuildContext(1, dim=dim, features=features))

    def _setup(self, s: IsifSettings, ctx: BuildContext | None = None) -> None:
        nn.Module.__init__(self)
        if s.projector == "mlp":  # SimCLR's head, trained with this loss: the objective owns it, on the backbone
            if ctx is None or ctx.features <= 0:
                raise ValueError("--projector mlp needs the backbone's feature width")
            self.input, self.embedding = "backbone", "backbone"
            self.projector = mlp([ctx.features, ctx.features, ctx.dim])
        # below 1, neg_weight lets a negative's probability e_j / (negM * sum_neg + e_pos) exceed 1: log(1-p) NaN
        self.temperature = float(s.temperature)
        self.variant = s.variant
        self.neg_weight = float(s.neg_weight)
        self.negatives = s.negatives
        self.neg_fraction = float(s.neg_fraction)

    @property
    def views(self) -> tuple[str, str]:
        """What the training loop feeds as the two views: the paper's anchor is un-augmented."""
        return ("plain", "augment") if self.variant == "paper" else ("augment", "augment")

    def on_epoch_start(self, ctx) -> None:
        """Nothing to do per epoch: no bank, no clustering."""

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, variant={self.variant!r}, neg_weight={self.neg_weight}, "
                f"negatives={self.negatives!r}")

    def outputs(self, h: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """With ``--projector mlp``: the projector, the one network the method runs on the features (the bench)."""
        return self.projector(h)

    def forward(self, z: torch.Tensor, instance_idx: torch.Tensor | None = None) -> torch.Tensor:
        """z: the embeddings (2B, D); with ``--projector mlp`` the backbone features (2B, F), projected here."""
        if hasattr(self, "projector"):
            z = F.normalize(self.projector(z), dim=1)
        b = _check_batch(z)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        if self.variant == "official":
            return self._official(z, b)
        return self._paper(z, b)

    def _official(self, z: torch.Tensor, b: int) -> torch.Tensor:
        n = 2 * b
        rows = torch.arange(n, device=z.device)
        pos = (rows + b) % n  # (2B,) index of the other view
        logits = z @ z.detach().t() / self.temperature  # (2B, 2B): anchors x detached keys
        self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        pos_logit = logits[rows, pos]  # (2B,)
        neg_mask = ~self_mask
        neg_mask[rows, pos] = False  # (2B, 2B): j != a and j != pos(a)
        if self.negatives != "all":
            m = max(1, round(self.neg_fraction * (n - 2)))
            hard = self.negatives == "hard"
            scores = logits.detach().masked_fill(~neg_mask, float("-inf") if hard else float("inf"))
            keep = torch.topk(scores, m, dim=1, largest=hard).indices  # (2B, m)
            neg_mask = torch.zeros_like(neg_mask).scatter_(1, keep, True)
        neg_lse = torch.logsumexp(logits.masked_fill(~neg_mask, float("-inf")), dim=1)  # (2B,)
        log_den = torch.logaddexp(pos_logit, neg_lse + math.log(self.neg_weight))  # (2B,)
        log_p_pos = pos_logit - log_den  # (2B,)
        log_p = logits - log_den[:, None]  # (2B, 2B)
        spread = _masked_log1mexp(log_p, neg_mask).sum()
        return -(log_p_pos.sum() + self.neg_weight * spread) / n

    def _paper(self, z: torch.Tensor, b: int) -> torch.Tensor:
        f, f_hat = z[:b], z[b:]  # (B, D) anchors, (B, D) augmented
        inv_logits = f_hat @ f.t() / self.temperature  # (B, B): [i, k] = f_k . f^_i / tau
        log_p_inv = torch.diagonal(inv_logits) - torch.logsumexp(inv_logits, dim=1)  # (B,)
        sp_logits = f @ f.t() / self.temperature  # (B, B): [j, i] = f_i . f_j / tau, self term kept
        log_p_sp = sp_logits - torch.logsumexp(sp_logits, dim=1, keepdim=True)  # [j, i] = log P(i | x_j)
        off_diag = ~torch.eye(b, dtype=torch.bool, device=z.device)
        spread = _masked_log1mexp(log_p_sp, off_diag).sum()
        return -(log_p_inv.sum() + self.neg_weight * spread) / b
