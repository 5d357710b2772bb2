"""MoCo v2 (Chen et al., 2020, "Improved baselines with momentum contrastive learning"): a momentum key encoder, a
queue of keys, an MLP projector.

    q_v = normalise(projector(backbone(x_v)))        a query: view v through the online network
    k_v = normalise(target(x_v))                     a key: view v through the momentum encoder, no gradient
    l(q, k) = mean_i -log( exp(q_i.k_i / tau) / (exp(q_i.k_i / tau) + sum_j exp(q_i.queue_j / tau)) )
    loss = (l(q_0, k_1) + l(q_1, k_0)) / 2            (symmetric; the paper's asymmetric loss is l(q_0, k_1))
    then the batch's keys enter the queue (first in, first out), and target <- m target + (1 - m) online

The paper's settings (ImageNet): tau 0.2, m 0.999, queue 65,536, projector 2048 hidden -> 128 (Linear, ReLU, Linear:
no BatchNorm). The symmetric loss is the official MoCo CIFAR-10 notebook's and solo-learn's: both halves against the
queue of the earlier steps, then both keys enqueued (lightly's benchmark enqueues view 1's keys between its two
halves, so its second half meets its own images' keys among the negatives); the backbone runs on both views either
way, and the asymmetric loss uses half of that. The recipe is lightly's CIFAR-10 benchmark (MocoModel): tau 0.1, a
queue of 4,096, m 0.99, projector 512 -> 128. lightly also splits the backbone's BatchNorm 8 ways to imitate 8 GPUs
and shuffles the keys' batch: ``--bn-splits 8`` (not in the recipe until raced); by default the key encoder's
BatchNorm sees the process's whole batch (shuffling a batch that one BatchNorm normalises changes nothing). The
queue is state: checkpoints carry it. The embedding is the pooled backbone feature of the online network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.settings import FRACTION, POSITIVE, at_least, setting
from .contract import BuildContext, OwnHeads, Recipe, checked
from .heads import mlp
from .momentum import MomentumTarget, WithTarget
from .recipes import LIGHTLY_SGD, LIGHTLY_SIMCLR_VIEWS


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
    symmetric: bool = setting(True, "each view is a query against the other's key, averaged (lightly, solo-learn); "
                                    "--no-symmetric: the paper's loss, view 0 against view 1's key")
    projector_bn: bool = setting(False, "BatchNorm after the projector's hidden layer (MoCo v2 has none; runs "
                                        "made before the methods' recipes had it)")
    bn_splits: int = setting(1, "the backbone's BatchNorm normalises this many groups of the batch apart in training, "
                                "and the keys' batch is shuffled before the key encoder (MoCo's shuffled BN on one "
                                "device, lightly's 8 splits); 1: none", check=at_least(1))


RECIPE = Recipe("lightly's CIFAR-10 benchmark (MocoModel: MoCoProjectionHead(512, 512, 128), NTXentLoss tau 0.1 with "
                "a 4,096 memory bank, momentum 0.99, symmetric loss, SimCLRTransform, SGD 0.06 x B/128; its BatchNorm "
                "split 8 ways is --bn-splits 8, not in the recipe until raced)",
                {**LIGHTLY_SIMCLR_VIEWS, **LIGHTLY_SGD, "method.temperature": 0.1, "method.queue": 4096,
                 "method.target_momentum": 0.99, "method.proj_hidden": 512, "method.proj_dim": 128,
                 "method.symmetric": True, "method.projector_bn": False}, lr=0.06, lr_batch=128)
# the same with lightly's split BatchNorm: what benchmarks/fidelity_lightly.py trains isif's side with
LIGHTLY_RECIPE = Recipe(RECIPE.source, {**RECIPE.settings, "method.bn_splits": 8}, lr=RECIPE.lr,
                        lr_batch=RECIPE.lr_batch)


class MoCo(WithTarget, OwnHeads):
    """MoCo v2. Shape: h (2B, F) online backbone features; the key encoder's of ``target_views`` from
    ``target_features``: (2B, F) with the symmetric loss, (B, F) of view 1 without."""

    def __init__(self, backbone: nn.Module, features: int, num_instances: int, seed: int = 0, **settings) -> None:
        self._setup(checked(MoCoSettings(**settings)),
                    BuildContext(num_instances, seed=seed, features=features, backbone=backbone))

    def _setup(self, s: MoCoSettings, ctx: BuildContext) -> None:
        OwnHeads.__init__(self)
        if ctx.backbone is None:
            raise ValueError("MoCo needs the network to copy as its key encoder")
        if s.queue > ctx.num_instances:
            raise ValueError(f"--queue {s.queue} is longer than the training set ({ctx.num_instances} images): "
                             f"the queue would hold the same images twice; choose at most {ctx.num_instances}")
        self.s = s
        self.target_views = (0, 1) if s.symmetric else (1,)
        self.projector = mlp([ctx.features, s.proj_hidden or ctx.features, s.proj_dim], bn=s.projector_bn)
        split_batchnorm(ctx.backbone, s.bn_splits)
        self.target = MomentumTarget(ctx.backbone, self.projector)
        g = torch.Generator().manual_seed(ctx.seed)
        self.register_buffer("queue", F.normalize(torch.randn(s.queue, s.proj_dim, generator=g), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def online_head(self) -> nn.Module:
        return self.projector

    @torch.no_grad()
    def target_features(self, online_backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The key encoder's features; with split BatchNorm, of the batch shuffled (seeded by the queue's position,
        so a resumed run draws the same) and put back in order."""
        if self.s.bn_splits == 1:
            return super().target_features(online_backbone, x)
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(int(self.ptr))).to(x.device)
        return super().target_features(online_backbone, x[perm])[torch.argsort(perm)]

    def momentum(self) -> float:
        return self.s.target_momentum

    def outputs(self, h: torch.Tensor, target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries of the views that are queries, keys of ``target_views``), normalised."""
        q = F.normalize(self.projector(h if self.s.symmetric else h[: h.shape[0] // 2]), dim=1)
        with torch.no_grad():
            k = F.normalize(self.target.head(target), dim=1)
        return q, k

    def loss(self, out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k = out
        queue, tau = self.queue.clone(), self.s.temperature
        if not self.s.symmetric:
            return moco_loss(q, k, queue, tau)
        (q0, q1), (k0, k1) = q.chunk(2), k.chunk(2)
        return (moco_loss(q0, k1, queue, tau) + moco_loss(q1, k0, queue, tau)) / 2

    def after_loss(self, out: tuple[torch.Tensor, torch.Tensor]) -> None:
        """The batch's keys replace the oldest ones (a ring; a batch longer than the queue keeps its last keys)."""
        k = out[1]
        n = self.queue.shape[0]
        k = k[-n:].to(self.queue.dtype)
        rows = (int(self.ptr) + torch.arange(k.shape[0], device=self.queue.device)) % n
        self.queue[rows] = k
        self.ptr.fill_((int(self.ptr) + k.shape[0]) % n)


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises ``splits`` groups of the batch apart (images i with i mod splits
    equal), as that many devices would; its running statistics are the groups' mean; in evaluation a plain one."""

    splits = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.splits
        if not self.training or s == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % s:
            raise ValueError(f"--bn-splits {s} does not divide the {n} images of the step; choose a divisor")
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        out = F.batch_norm(x.reshape(n // s, c * s, h, w), mean, var, self.weight.repeat(s), self.bias.repeat(s),
                           True, self.momentum, self.eps).reshape(n, c, h, w)
        self.running_mean.copy_(mean.view(s, c).mean(0))
        self.running_var.copy_(var.view(s, c).mean(0))
        self.num_batches_tracked.add_(1)
        return out


def split_batchnorm(module: nn.Module, splits: int) -> None:
    """Make every BatchNorm2d of ``module`` a ``SplitBatchNorm2d`` of ``splits`` groups, in place (the same
    parameters and state-dict keys)."""
    if splits == 1:
        return
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SplitBatchNorm2d
            m.splits = splits
