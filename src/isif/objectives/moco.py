"""MoCo v2 (Chen et al., 2020, "Improved baselines with momentum contrastive learning"): a momentum key encoder, a
queue of keys, an MLP projector.

    q_v = normalise(projector(backbone(x_v)))        a query: view v through the online network
    k_v = normalise(target(x_v))                     a key: view v through the momentum encoder, no gradient
    l(q, k) = mean_i -log( exp(q_i.k_i / tau) / (exp(q_i.k_i / tau) + sum_j exp(q_i.queue_j / tau)) )
    loss = (l(q_0, k_1) + l(q_1, k_0)) / 2            (symmetric; the paper's asymmetric loss is l(q_0, k_1))
    then the batch's keys enter the queue (first in, first out), and target <- m target + (1 - m) online

The paper's settings (ImageNet): tau 0.2, m 0.999, queue 65,536, projector 2048 hidden -> 128 (Linear, ReLU, Linear:
no BatchNorm). The symmetric loss is the official MoCo CIFAR-10 notebook's and solo-learn's: both halves against the
queue of the earlier steps, then both keys enqueued (``--queue-update step``); lightly's benchmark enqueues view 1's
keys between its two halves (``term``), so its second half meets its own images' keys among the negatives. The
recipe is lightly's CIFAR-10 benchmark (MocoModel): tau 0.1, a queue of 4,096, m 0.99, projector 512 -> 128.
lightly also splits the backbone's BatchNorm 8 ways per view (8 simulated GPUs) and shuffles each view's keys:
``--bn-splits 8``. ``LIGHTLY_RECIPE`` has both of lightly's choices; the own recipe, raced before they were
measured, has neither. The queue is state: checkpoints carry it. The embedding is the online backbone's feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.settings import FRACTION, POSITIVE, at_least, one_of, setting
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
    bn_splits: int = setting(1, "the backbone's BatchNorm normalises each view's images in this many contiguous "
                                "groups apart in training, and each view's keys are shuffled before the key encoder "
                                "(MoCo's shuffled BN on one device, lightly's 8 splits); 1: none", check=at_least(1))
    queue_update: str = setting("step", "when the keys enter the queue: after the step, both terms against the earlier "
                                        "steps' keys (MoCo's CIFAR notebook, solo-learn); 'term': after each term of "
                                        "the symmetric loss (lightly's benchmark)", check=one_of("step", "term"))


RECIPE = Recipe("lightly's CIFAR-10 benchmark (MocoModel: MoCoProjectionHead(512, 512, 128), NTXentLoss tau 0.1 with "
                "a 4,096 memory bank, momentum 0.99, symmetric loss, SimCLRTransform, SGD 0.06 x B/128; its BatchNorm "
                "split 8 ways and its queue order are in LIGHTLY_RECIPE)",
                {**LIGHTLY_SIMCLR_VIEWS, **LIGHTLY_SGD, "method.temperature": 0.1, "method.queue": 4096,
                 "method.target_momentum": 0.99, "method.proj_hidden": 512, "method.proj_dim": 128,
                 "method.symmetric": True, "method.projector_bn": False}, lr=0.06, lr_batch=128)
# the same with lightly's split BatchNorm and queue order: what benchmarks/fidelity_lightly.py trains isif's side with
LIGHTLY_RECIPE = Recipe(RECIPE.source, {**RECIPE.settings, "method.bn_splits": 8, "method.queue_update": "term"},
                        lr=RECIPE.lr, lr_batch=RECIPE.lr_batch)


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
        split_batchnorm(ctx.backbone, s.bn_splits, views=2)
        self.target = MomentumTarget(ctx.backbone, self.projector)
        split_batchnorm(self.target.backbone, s.bn_splits, views=len(self.target_views))
        g = torch.Generator().manual_seed(ctx.seed)
        self.register_buffer("queue", F.normalize(torch.randn(s.queue, s.proj_dim, generator=g), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def online_head(self) -> nn.Module:
        return self.projector

    @torch.no_grad()
    def target_features(self, online_backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The key encoder's features; with split BatchNorm, of each view's images shuffled (seeded by the queue's
        position, so a resumed run draws the same) and put back in order."""
        if self.s.bn_splits == 1:
            return super().target_features(online_backbone, x)
        g, n = torch.Generator().manual_seed(int(self.ptr)), x.shape[0] // len(self.target_views)
        perm = torch.cat([v * n + torch.randperm(n, generator=g) for v in range(len(self.target_views))])
        perm = perm.to(x.device)
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
        first = moco_loss(q0, k1, queue, tau)
        if self.s.queue_update == "term":  # a new copy: the first term saved ``queue`` for its backward
            queue = queue.clone()
            enqueue(queue, int(self.ptr), k1)
        return (first + moco_loss(q1, k0, queue, tau)) / 2

    def after_loss(self, out: tuple[torch.Tensor, torch.Tensor]) -> None:
        """The batch's keys replace the oldest ones (a ring; a batch longer than the queue keeps its last keys); in
        the order the loss met them: view 1's keys first with ``queue_update`` 'term'."""
        k = out[1]
        if self.s.symmetric and self.s.queue_update == "term":
            k0, k1 = k.chunk(2)
            k = torch.cat([k1, k0])
        self.ptr.fill_(enqueue(self.queue, int(self.ptr), k))


def enqueue(queue: torch.Tensor, ptr: int, k: torch.Tensor) -> int:
    """Write keys ``k`` into the ring ``queue`` from row ``ptr`` (a batch longer than the ring keeps its last keys);
    returns the next pointer."""
    n = queue.shape[0]
    k = k[-n:].to(queue.dtype)
    queue[(ptr + torch.arange(k.shape[0], device=queue.device)) % n] = k
    return (ptr + k.shape[0]) % n


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises ``splits`` groups of each of the batch's ``views`` contiguous views
    apart (images i of a view with i mod splits equal), as lightly's SplitBatchNorm does in one pass per view; its
    running statistics are the groups' mean, updated once a step; in evaluation a plain one."""

    splits = 1
    views = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, v = self.splits, self.views
        if not self.training or s * v == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % (s * v):
            raise ValueError(f"--bn-splits {s} does not divide the {n // v} images of each view; choose a divisor "
                             f"of the batch size")
        g = s * v
        mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)
        grouped = x.reshape(v, n // g, s * c, h, w).transpose(0, 1).reshape(n // g, g * c, h, w)
        out = F.batch_norm(grouped, mean, var, self.weight.repeat(g), self.bias.repeat(g), True, self.momentum,
                           self.eps)
        out = out.reshape(n // g, v, s * c, h, w).transpose(0, 1).reshape(n, c, h, w)
        self.running_mean.copy_(mean.view(g, c).mean(0))
        self.running_var.copy_(var.view(g, c).mean(0))
        self.num_batches_tracked.add_(1)
        return out


def split_batchnorm(module: nn.Module, splits: int, views: int = 1) -> None:
    """Make every BatchNorm2d of ``module`` a ``SplitBatchNorm2d`` of ``splits`` groups per view over ``views``
    views, in place (the same parameters and state-dict keys)."""
    if splits == 1:
        return
    for m in module.modules():
        if type(m) in (nn.BatchNorm2d, SplitBatchNorm2d):
            m.__class__ = SplitBatchNorm2d
            m.splits, m.views = splits, views
