"""DINO (Caron et al., ICCV 2021): a student matches an EMA teacher's centred, sharpened distribution over K outputs.

Views: two global crops (the run's side, area 0.4-1) and ``local_crops`` small ones (area 0.05-0.4, a side of 3/7 of
the input's by default: 96 of 224 in the paper, 16 px of CIFAR-10's 32); the teacher sees the global views only.

    P_s(x) = softmax(g_s(x) / tau_s)                   student: every view
    P_t(x) = softmax((g_t(x) - c) / tau_t)             teacher: the global views, centred and sharpened
    loss   = mean over pairs (t, s), t a global view, s any other view, of  mean_i H(P_t(x_t,i), P_s(x_s,i))
    c      <- m_c c + (1 - m_c) mean of g_t over the global batch's teacher outputs (after each loss)
    teacher <- m teacher + (1 - m) student after every step, m = 1 - (1 - m0)(cos(pi k/K) + 1)/2

g is the backbone followed by DINO's head: a 3-layer MLP (GELU, hidden 2048, bottleneck 256), L2 normalisation and a
weight-normalised linear layer to K outputs whose norm is fixed at 1 (the paper's ``norm_last_layer``). tau_s 0.1;
tau_t warms up linearly from 0.04 to 0.07 over the first 30% of the run (the paper: over the first 30 epochs of
100); m_c 0.9; m0 0.996 to 1 (cosine). The paper pretrains on ImageNet only, so these are its ImageNet settings,
but for K: 4,096 here, against the paper's 65,536, so that the last layer of a CPU-sized run does not outweigh the
network (set it with ``--prototypes``). Not carried over: the paper's schedules of weight decay, its gradient
clipping and its frozen last layer in the first epoch (the run's optimiser applies), and its blur and solarisation
(the run's augmentation applies to every view). The embedding is the pooled backbone feature of the student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.settings import FRACTION, MOMENTUM, POSITIVE, PROBABILITY, at_least, setting
from .contract import BuildContext, Crop, EpochContext, FromSettings, checked
from .momentum import MomentumTarget, cosine_momentum

GLOBAL_SCALE = (0.4, 1.0)  # the paper's code, with multi-crop
LOCAL_SCALE = (0.05, 0.4)
LOCAL_RELATIVE = 96 / 224  # a local crop's side against a global one's


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> a linear layer whose rows have unit norm (weight normalisation with g = 1)."""

    def __init__(self, features: int, hidden: int, bottleneck: int, outputs: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last = nn.Parameter(torch.empty(outputs, bottleneck))
        nn.init.trunc_normal_(self.last, std=0.02)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(h), dim=-1)
        return x @ F.normalize(self.last, dim=1).T


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
    target_momentum: float = setting(0.996, "the teacher's base EMA momentum m0 (cosine schedule to 1)",
                                     check=FRACTION)
    prototypes: int = setting(4096, "K, the head's output width (the paper's ImageNet value: 65,536)",
                              check=at_least(2))
    proj_hidden: int | None = setting(2048, "the head's MLP hidden width (none: the backbone's width)",
                                      check=at_least(1))
    proj_dim: int = setting(256, "the head's bottleneck width, before the L2 normalisation", check=at_least(1))
    local_crops: int = setting(6, "small local views per image besides the two global ones (0: none)",
                               check=at_least(0))
    local_size: int | None = setting(None, "side of a local view in pixels (default: 3/7 of the input's, rounded to "
                                     "a multiple of 8: 16 at 32 px)", check=at_least(8))


class DINO(FromSettings, nn.Module):
    """DINO with multi-crop. Shape: h (V*B, F) student backbone features, the two global views first, then the
    local ones; the teacher's, (2B, F), of the global views, from ``target_features``."""

    input = "backbone"
    embedding = "backbone"
    target_views = (0, 1)

    def __init__(self, backbone: nn.Module, features: int, total_steps: int, **settings) -> None:
        self._setup(checked(DINOSettings(**settings)),
                    BuildContext(1, features=features, backbone=backbone, total_steps=total_steps))

    def _setup(self, s: DINOSettings, ctx: BuildContext) -> None:
        nn.Module.__init__(self)
        if ctx.backbone is None:
            raise ValueError("DINO needs the network to copy as its teacher")
        self.s, self.total_steps = s, ctx.total_steps
        self.views = ("global", "global") + ("local",) * s.local_crops
        self.crops = {"global": Crop(scale=GLOBAL_SCALE),
                      "local": Crop(size=s.local_size, relative=LOCAL_RELATIVE, scale=LOCAL_SCALE,
                                    flag="--local-size")}
        self.head = DINOHead(ctx.features, s.proj_hidden or ctx.features, s.proj_dim, s.prototypes)
        self.target = MomentumTarget(ctx.backbone, self.head)
        self.register_buffer("center", torch.zeros(s.prototypes))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def teacher_temp(self) -> float:
        s = self.s
        return teacher_temperature(s.teacher_temp_start, s.teacher_temp, s.teacher_warmup, int(self.steps),
                                   self.total_steps)

    @torch.no_grad()
    def target_features(self, online_backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The teacher's backbone features of the two global views."""
        self.target.follow_modes(online_backbone, self.head)
        return self.target.backbone(x)

    def networks(self, h: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Every network the method runs on the features (the teacher's head included), without its loss."""
        with torch.no_grad():
            self.target.head(target)
        return self.head(h)

    def forward(self, h: torch.Tensor, instance_idx: torch.Tensor | None = None,
                target: torch.Tensor | None = None) -> torch.Tensor:
        student = self.head(h)
        with torch.no_grad():
            teacher = self.target.head(target)
        loss = dino_loss(student, teacher, self.center.to(teacher.dtype), self.s.temperature, self.teacher_temp(),
                         len(self.views))
        if self.training:
            with torch.no_grad():
                m = self.s.center_momentum
                self.center.mul_(m).add_(teacher.mean(0).to(self.center.dtype), alpha=1 - m)
        return loss

    def momentum(self) -> float:
        return cosine_momentum(self.s.target_momentum, int(self.steps), self.total_steps)

    @torch.no_grad()
    def after_step(self, online_backbone: nn.Module) -> None:
        self.target.update(online_backbone, self.head, self.momentum())
        self.steps += 1

    def on_epoch_start(self, ctx: EpochContext) -> None:
        pass

