"""Linear probe: a linear classifier trained on frozen, pre-extracted features.

The recipe is fixed so numbers compare across runs: features standardised
with the training set's mean and std; a linear layer (with bias) trained by
SGD (momentum 0.9, no weight decay) with batch 256 and lr 0.1 on a cosine
schedule for 100 epochs; seeded. Top-1 on the test features is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LinearRecipe:
    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0


@dataclass
class Probe:
    """A fitted probe: the standardisation and the linear layer; ``logits(x)`` for raw features."""

    mean: torch.Tensor
    std: torch.Tensor
    layer: torch.nn.Linear

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer((x.float().to(self.mean.device) - self.mean) / self.std)


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int,
              recipe: LinearRecipe = LinearRecipe()) -> Probe:
    """Train the probe on (train_x, train_y) by the module's recipe; rows with a negative label are ignored."""
    keep = train_y >= 0
    train_x, train_y = train_x[keep].float(), train_y[keep].long()
    mean = train_x.mean(0, keepdim=True)
    std = train_x.std(0, keepdim=True).clamp_min(1e-6) if len(train_x) > 1 else torch.ones_like(mean)
    xs = (train_x - mean) / std
    g = torch.Generator().manual_seed(recipe.seed)
    layer = torch.nn.Linear(xs.shape[1], num_classes).to(xs.device)
    with torch.no_grad():
        bound = 1 / math.sqrt(xs.shape[1])
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) * 2 * bound - bound)
        layer.bias.zero_()
    opt = torch.optim.SGD(layer.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay)
    n = xs.shape[0]
    steps = max(1, math.ceil(n / recipe.batch_size))
    total = recipe.epochs * steps
    y = train_y.to(xs.device)
    for epoch in range(recipe.epochs):
        perm = torch.randperm(n, generator=g).to(xs.device)
        for s in range(steps):
            it = epoch * steps + s
            for group in opt.param_groups:
                group["lr"] = recipe.lr * 0.5 * (1 + math.cos(math.pi * it / total))
            idx = perm[s * recipe.batch_size:(s + 1) * recipe.batch_size]
            loss = F.cross_entropy(layer(xs[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return Probe(mean, std, layer)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, recipe: LinearRecipe = LinearRecipe()) -> dict[str, float]:
    """Train the probe on (train_x, train_y); return train and test top-1 in percent.

    Shape: train_x (N, F), train_y (N,), test_x (M, F), test_y (M,). Rows with a
    negative label (unlabelled images) are ignored.
    """
    probe = fit_probe(train_x, train_y, num_classes, recipe)
    keep = train_y >= 0
    with torch.no_grad():
        train_acc = 100.0 * (probe.logits(train_x[keep]).argmax(1) == train_y[keep].to(probe.mean.device)
                             ).double().mean().item()
        test_acc = 100.0 * (probe.logits(test_x).argmax(1).cpu() == test_y.cpu()).double().mean().item()
    return {"train_top1": train_acc, "test_top1": test_acc}
