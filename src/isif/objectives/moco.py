"""MoCo v2 (Chen et al., 2020, "Improved baselines with momentum contrastive learning"): a momentum key encoder, a
queue of keys, an MLP projector.

    q = normalise(projector(backbone(x_0)))          the query: view 0 through the online network
    k = normalise(target(x_1))                       the key: view 1 through the momentum encoder, no gradient
    loss = mean_i -log( exp(q_i.k_i / tau) / (exp(q_i.k_i / tau) + sum_j exp(q_i.queue_j / tau)) )
    then the batch's keys enter the queue (first in, first out), and target <- m target + (1 - m) online

The paper's settings (ImageNet): tau 0.2, m 0.999, queue 65,536, projector 2048 hidden -> 128. It gives no
CIFAR-10 recipe; the defaults here keep tau and the heads, and use a queue of 4,096 and m 0.99, the values common
for CIFAR-10 (lightly's and solo-learn's recipes): an assumption, said so. The loss is the paper's asymmetric one.
Shuffling BatchNorm (the paper's fix for BN leaking batch information across GPUs) is not done: the key encoder's
BatchNorm sees the process's batch. The queue is state: checkpoints carry it. The embedding is the pooled backbone
feature of the online network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.settings import FRACTION, POSITIVE, at_least, setting
from .contract import BuildContext, EpochContext, FromSettings, checked
from .heads import mlp
from .momentum import MomentumTarget


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of normalised queries (B, d) against their keys (B, d) and the queue's negatives (K, d)."""
    pos = (q * k.detach()).sum(1, keepdim=True)
    logits = torch.cat([pos, q @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@dataclass
class MoCoSettings:
    temperature: float = setting(0.2, "InfoNCE temperature", check=POSITIVE)
    target_momentum: float = setting(0.99, "the key encoder's EMA momentum", check=FRACTION)
    queue: int = setting(4096, "keys kept as negatives (at most the training set's size)", check=at_least(1))
    proj_hidden: int | None = setting(2048, "projector hidden width (none: the backbone's width)",
                                      check=at_least(1))
    proj_dim: int = setting(128, "projection width", check=at_least(1))


class MoCo(FromSettings, nn.Module):
    """MoCo v2. Shape: h (2B, F) online backbone features; the key encoder's, (2B, F), from ``target_features``."""

    views = ("augment", "augment")
    input = "backbone"
    embedding = "backbone"
    target_views = (1,)

    def __init__(self, backbone: nn.Module, features: int, num_instances: int, temperature: float = 0.2,
                 target_momentum: float = 0.99, queue: int = 4096, proj_hidden: int = 2048, proj_dim: int = 128,
                 seed: int = 0) -> None:
        self._setup(checked(MoCoSettings(temperature, target_momentum, queue, proj_hidden, proj_dim)),
                    BuildContext(num_instances, seed=seed, features=features, backbone=backbone))

    def _setup(self, s: MoCoSettings, ctx: BuildContext) -> None:
        nn.Module.__init__(self)
        if ctx.backbone is None:
            raise ValueError("MoCo needs the network to copy as its key encoder")
        if s.queue > ctx.num_instances:
            raise ValueError(f"--queue {s.queue} is longer than the training set ({ctx.num_instances} images): "
                             f"the queue would hold the same images twice; choose at most {ctx.num_instances}")
        self.temperature, self.m = s.temperature, s.target_momentum
        self.projector = mlp([ctx.features, s.proj_hidden or ctx.features, s.proj_dim])
        self.target = MomentumTarget(ctx.backbone, self.projector)
        g = torch.Generator().manual_seed(ctx.seed)
        self.register_buffer("queue", F.normalize(torch.randn(s.queue, s.proj_dim, generator=g), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def target_features(self, online_backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The key encoder's backbone features of ``target_views`` (view 1 only: keys need no view 0)."""
        self.target.follow_modes(online_backbone, self.projector)
        return self.target.backbone(x)

    def networks(self, h: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Every network the method runs on the features (the key encoder's projector included), without its loss."""
        with torch.no_grad():
            self.target.head(target)
        return self.projector(h[: h.shape[0] // 2])

    def forward(self, h: torch.Tensor, instance_idx: torch.Tensor | None = None,
                target: torch.Tensor | None = None) -> torch.Tensor:
        b = h.shape[0] // 2
        q = F.normalize(self.projector(h[:b]), dim=1)
        with torch.no_grad():
            k = F.normalize(self.target.head(target), dim=1)
        loss = moco_loss(q, k, self.queue.clone(), self.temperature)
        self._enqueue(k)
        return loss

    @torch.no_grad()
    def _enqueue(self, k: torch.Tensor) -> None:
        """The batch's keys replace the oldest ones (a ring; a batch longer than the queue keeps its last keys)."""
        n = self.queue.shape[0]
        k = k[-n:].to(self.queue.dtype)
        rows = (int(self.ptr) + torch.arange(k.shape[0], device=self.queue.device)) % n
        self.queue[rows] = k
        self.ptr.fill_((int(self.ptr) + k.shape[0]) % n)

    @torch.no_grad()
    def after_step(self, online_backbone: nn.Module) -> None:
        self.target.update(online_backbone, self.projector, self.m)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        pass
