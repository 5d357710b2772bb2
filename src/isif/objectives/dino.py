"""DINO (Caron et al., ICCV 2021): a student matches an EMA teacher's centred, sharpened distribution over K outputs.

Views: two global crops (the run's side, area 0.4-1) and ``local_crops`` small ones (area 0.05-0.4, a side of 3/7 of
the input's by default: 96 of 224 in the paper); the teacher sees the global views only.

    P_s(x) = softmax(g_s(x) / tau_s)                   student: every view
    P_t(x) = softmax((g_t(x) - c) / tau_t)             teacher: the global views, centred and sharpened
    loss   = mean over pairs (t, s), t a global view, s any other view, of  mean_i H(P_t(x_t,i), P_s(x_s,i))
    c      <- m_c c + (1 - m_c) mean of g_t over the global batch's teacher outputs (after each loss)
    teacher <- m teacher + (1 - m) student after every step (m0 throughout, or cosine from m0 to 1)

g is the backbone followed by DINO's head: an MLP (GELU; 3 layers, hidden 2048, bottleneck 256 in the paper), L2
normalisation and a weight-normalised linear layer to K outputs whose norm is fixed at 1 (``norm_last_layer``).
The defaults are the paper's ImageNet ones but for K (4,096 against 65,536) and the frozen last layer (the
official code freezes it for the first epoch: ``--freeze-last-layer 1``; its gradient clipping at 3 is the run's
``--clip-grad``). The recipe is lightly's CIFAR-10 benchmark (DINOModel): two 32-px global views and no local
ones, a 2-layer head with BatchNorm (2048 -> 256), K 2,048, tau_t 0.04 throughout, teacher momentum 0.99 held
constant, solarisation on the second global view. The embedding is the student's pooled backbone feature, as
lightly's benchmark evaluates it; with local views its BatchNorm statistics also come from them (the paper's
views: ``--blur-p 1,0.1,0.5 --solarize-p 0,0.2,0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.settings import FRACTION, MOMENTUM, NON_NEGATIVE, POSITIVE, PROBABILITY, at_least, one_of, setting
from .contract import BuildContext, Crop, OwnHeads, Recipe, checked
from .momentum import SCHEDULES, MomentumTarget, WithTarget, momentum_at
from .recipes import LIGHTLY_DINO_VIEWS, LIGHTLY_SGD

GLOBAL_SCALE = (0.4, 1.0)  # the paper's code, with multi-crop
LOCAL_SCALE = (0.05, 0.4)
LOCAL_RELATIVE = 96 / 224  # a local crop's side against a global one's


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> a linear layer whose rows have unit norm (weight normalisation with g = 1)."""

    def __init__(self, features: int, hidden: int, bottleneck: int, outputs: int, layers: int = 3,
                 bn: bool = False) -> None:
        super().__init__()
        sizes = [features] + [hidden] * (layers - 1) + [bottleneck]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            hidden_layer = i < layers - 1
            mods += [nn.Linear(a, b)] + ([nn.BatchNorm1d(b)] if bn and hidden_layer else [])
            mods += [nn.GELU()] if hidden_layer else []
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last = nn.Parameter(torch.empty(outputs, bottleneck))
        nn.init.trunc_normal_(self.last, std=0.02)

    def forward(self, h: torch.Tensor, frozen_last: bool = False) -> torch.Tensor:
        x = F.normalize(self.mlp(h), dim=-1)
        last = self.last.detach() if frozen_last else self.last
        return x @ F.normalize(last, dim=1).T


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float,
              teacher_temp: float, n_views: int) -> torch.Tensor:
    """student (V*B, K) logits of every view; teacher (2B, K) of the two global views (views 0 and 1 of the student);
    the mean cross-entropy over the 2(V-1) pairs of a teacher view and a different student view."""
    logp = F.log_softmax(student / student_temp, dim=1).chunk(n_views)
    q = F.softmax((teacher.detach() - center) / teacher_temp, dim=1).chunk(2)
    total, pairs = student.new_zeros(()), 0
    for a, qa in enumerate(q):
        for v, lv in enumerate(logp):
            if v != a:
                total = total + (-(qa * lv).sum(dim=1)).mean()
                pairs += 1
    return total / pairs


def teacher_temperature(start: float, end: float, warmup: float, step: int, total: int) -> float:
    """tau_t at optimiser step ``step`` of ``total``: linear from ``start`` to ``end`` over the first ``warmup`` of
    the run, then ``end``."""
    w = warmup * total
    if total <= 0 or step >= w:
        return end
    return start + (end - start) * step / w


@dataclass
class DINOSettings:
    temperature: float = setting(0.1, "the student's temperature tau_s", check=POSITIVE)
    teacher_temp: float = setting(0.07, "the teacher's temperature tau_t after its warm-up", check=POSITIVE)
    teacher_temp_start: float = setting(0.04, "the teacher's temperature at the start of its warm-up",
                                        check=POSITIVE)
    teacher_warmup: float = setting(0.3, "share of the run over which tau_t rises linearly to --teacher-temp "
                                    "(the paper: 30 of 100 epochs)", check=PROBABILITY)
    center_momentum: float = setting(0.9, "momentum of the centre of the teacher's outputs", check=MOMENTUM)
    target_momentum: float = setting(0.996, "the teacher's base EMA momentum m0", check=FRACTION)
    momentum_schedule: str = setting("cosine", "cosine (m0 to 1 over the run, the paper's) or constant (m0)",
                                     check=one_of(*SCHEDULES))
    prototypes: int = setting(4096, "K, the head's output width (the paper's ImageNet value: 65,536)",
                              check=at_least(2))
    proj_hidden: int | None = setting(2048, "the head's MLP hidden width (none: the backbone's width)",
                                      check=at_least(1))
    proj_dim: int = setting(256, "the head's bottleneck width, before the L2 normalisation", check=at_least(1))
    head_layers: int = setting(3, "the head's MLP depth in Linear layers (lightly's CIFAR-10: 2)", check=at_least(1))
    head_bn: bool = setting(False, "BatchNorm after the head's hidden layers (lightly's CIFAR-10 head has it)")
    freeze_last_layer: float = setting(0.0, "epochs during which the last layer gets no gradient (the official "
                                            "code: 1)", check=NON_NEGATIVE)
    local_crops: int = setting(6, "small local views per image besides the two global ones (0: none)",
                               check=at_least(0))
    local_size: int | None = setting(None, "side of a local view in pixels (default: 3/7 of the input's, rounded to "
                                     "a multiple of 8: 16 at 32 px)", check=at_least(8))


RECIPE = Recipe("lightly's CIFAR-10 benchmark (DINOModel: 2-layer head with BatchNorm 2048 -> 256, K 2,048, "
                "tau_t 0.04, momentum 0.99 held constant, DINOTransform with no local views and no blur, SGD 0.06 x "
                "B/128)",
                {**LIGHTLY_DINO_VIEWS, **LIGHTLY_SGD, "method.local_crops": 0, "method.prototypes": 2048,
                 "method.proj_hidden": 2048, "method.proj_dim": 256, "method.head_layers": 2, "method.head_bn": True,
                 "method.teacher_temp": 0.04, "method.teacher_temp_start": 0.04, "method.target_momentum": 0.99,
                 "method.momentum_schedule": "constant", "method.freeze_last_layer": 0.0}, lr=0.06, lr_batch=128)


class DINO(WithTarget, OwnHeads):
    """DINO with multi-crop. Shape: h (V*B, F) student backbone features, the two global views first, then the
    local ones; the teacher's, (2B, F), of the global views, from ``target_features``."""

    target_views = (0, 1)

    def __init__(self, backbone: nn.Module, features: int, total_steps: int, **settings) -> None:
        self._setup(checked(DINOSettings(**settings)),
                    BuildContext(1, features=features, backbone=backbone, total_steps=total_steps))

    def _setup(self, s: DINOSettings, ctx: BuildContext) -> None:
        OwnHeads.__init__(self)
        if ctx.backbone is None:
            raise ValueError("DINO needs the network to copy as its teacher")
        self.s, self.total_steps = s, ctx.total_steps
        self.frozen_steps = int(round(s.freeze_last_layer * ctx.steps_per_epoch))
        self.views = ("global", "global") + ("local",) * s.local_crops
        self.crops = {"global": Crop(scale=GLOBAL_SCALE),
                      "local": Crop(size=s.local_size, relative=LOCAL_RELATIVE, scale=LOCAL_SCALE,
                                    flag="--local-size")}
        self.head = DINOHead(ctx.features, s.proj_hidden or ctx.features, s.proj_dim, s.prototypes, s.head_layers,
                             s.head_bn)
        self.target = MomentumTarget(ctx.backbone, self.head)
        self.register_buffer("center", torch.zeros(s.prototypes))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def online_head(self) -> nn.Module:
        return self.head

    def momentum(self) -> float:
        return momentum_at(self.s.target_momentum, self.s.momentum_schedule, int(self.steps), self.total_steps)

    def teacher_temp(self) -> float:
        s = self.s
        return teacher_temperature(s.teacher_temp_start, s.teacher_temp, s.teacher_warmup, int(self.steps),
                                   self.total_steps)

    def outputs(self, h: torch.Tensor, target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(student logits of every view, teacher logits of the global views)."""
        student = self.head(h, frozen_last=int(self.steps) < self.frozen_steps)
        with torch.no_grad():
            teacher = self.target.head(target)
        return student, teacher

    def loss(self, out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        student, teacher = out
        return dino_loss(student, teacher, self.center.to(teacher.dtype), self.s.temperature, self.teacher_temp(),
                         len(self.views))

    def after_loss(self, out: tuple[torch.Tensor, torch.Tensor]) -> None:
        m = self.s.center_momentum
        self.center.mul_(m).add_(out[1].mean(0).to(self.center.dtype), alpha=1 - m)
