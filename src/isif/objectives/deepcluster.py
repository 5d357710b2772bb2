"""DeepCluster (Caron et al., ECCV 2018): k-means pseudo-labels, re-computed every epoch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.settings import POSITIVE, at_least, setting
from ..evaluate.kmeans import kmeans
from .contract import BuildContext, EpochContext, FromSettings, checked


@dataclass
class DeepClusterSettings:
    temperature: float = setting(0.1, "temperature on the classifier's logits", check=POSITIVE)
    clusters: int = setting(100, "k of k-means (the paper: 10, 100, 1000)", check=at_least(2))
    kmeans_iters: int = setting(20, "k-means iterations per epoch", check=at_least(1))


class DeepCluster(FromSettings, nn.Module):
    """Cross-entropy on pseudo-labels from k-means over the training set's embeddings.

    At the start of every epoch the loop calls ``on_epoch_start``: k-means
    (k clusters, seeded by seed + epoch) on the L2-normalised 128-d
    embeddings of the whole training set under the test transform, then a
    freshly initialised linear classifier (logits scaled by 1/tau) whose
    optimiser state is cleared. Pseudo-labels and classifier are part of the
    state_dict, so a resumed run needs no re-clustering mid-epoch.

    Shape: z (B, D), instance_idx (B,) -> scalar.
    """

    views = ("augment",)

    def __init__(self, num_instances: int, dim: int = 128, clusters: int = 100, temperature: float = 0.1,
                 iters: int = 20, seed: int = 0, engine: str = "torch") -> None:
        self._setup(checked(DeepClusterSettings(temperature, clusters, iters)),
                    BuildContext(num_instances, dim, seed, engine))

    def _setup(self, s: DeepClusterSettings, ctx: BuildContext) -> None:
        nn.Module.__init__(self)
        if not 2 <= s.clusters <= ctx.num_instances:
            raise ValueError(f"clusters must be in [2, {ctx.num_instances}], got {s.clusters}")
        self.clusters, self.temperature, self.iters, self.seed = s.clusters, s.temperature, s.kmeans_iters, ctx.seed
        self.engine = ctx.engine  # k-means's search (isif.evaluate.engine): the same pseudo-labels either way
        self.head = nn.Linear(ctx.dim, s.clusters)
        self.register_buffer("pseudo_labels", torch.zeros(ctx.num_instances, dtype=torch.long))

    def on_epoch_start(self, ctx: EpochContext) -> None:
        feats = ctx.features()  # (N, D)
        labels, _ = kmeans(feats, self.clusters, self.iters, seed=self.seed + ctx.epoch, engine=self.engine)
        self.pseudo_labels.copy_(labels.to(self.pseudo_labels.device))
        self.head.reset_parameters()
        ctx.reset_optimizer_state(list(self.head.parameters()))

    def forward(self, z: torch.Tensor, instance_idx: torch.Tensor | None = None) -> torch.Tensor:
        if instance_idx is None:
            raise ValueError("DeepCluster needs instance_idx of shape (B,)")
        target = self.pseudo_labels[instance_idx.to(self.pseudo_labels.device).long()]
        v = z.shape[0] // instance_idx.shape[0]
        return F.cross_entropy(self.head(z.to(self.head.weight.dtype)) / self.temperature, target.repeat(v))

