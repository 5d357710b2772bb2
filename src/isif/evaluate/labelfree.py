"""Label-free progress: how good an embedding is, measured on held-out images without any labels.

For each held-out image two augmented views are drawn and its plain test
view is embedded. The views come from the default augmentation
(RandomResizedCrop 0.2-1, colour jitter 0.4, grayscale 0.2, flip) at the run's
input size, whatever the run itself trains with, from a fixed seed: every
evaluation of every run sees the same views, so the figures compare across
epochs and across runs. From these:

- ``view_top1`` / ``view_top5`` (%): the view-1 embedding of each image as a query among the view-2
  embeddings of all held-out images: is its own other view the nearest (top 5)? A retrieval score
  that needs no labels;
- ``alignment``: mean ``||z1 - z2||^2`` over the images (Wang and Isola, ICML 2020, alpha = 2; lower is
  better, 0 when views agree exactly);
- ``uniformity``: ``log mean_{i != j} exp(-2 ||z_i - z_j||^2)`` over pairs of different images (the same
  paper, t = 2; lower is more uniform), the mean of the two views' values;
- ``rankme``: the effective rank of the plain embeddings (Garrido et al., ICML 2023): exp of the entropy of
  the normalised singular values; at most min(N, D), near 1 when the embedding collapses;
- ``pos_cos`` / ``neg_cos``: the mean cosine of two views of an image, and of view 1 of two different
  images (what ``isif plot similarity`` histograms).

All are computed in float64 from (N, D) L2-normalised rows, in blocks, so 5,000 held-out images need no
N x N matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..base.device import autocast, param_dtype
from ..data.types import Images
from .features import image_batches

LABEL_FREE = ("view_top1", "view_top5", "alignment", "uniformity", "rankme", "pos_cos", "neg_cos")
VIEW_SEED = 7  # the held-out views: the same at every evaluation of every run
_BLOCK = 1024


def view_retrieval(z1: torch.Tensor, z2: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """{k: % of rows i whose z2[i] is among the k nearest z2 rows of z1[i] (cosine)}; ties count against."""
    z1, z2 = z1.double(), z2.double()
    hits = {k: 0 for k in ks}
    for s in range(0, z1.shape[0], _BLOCK):
        sim = z1[s:s + _BLOCK] @ z2.T  # (b, N)
        own = sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])]
        rank = (sim >= own[:, None]).sum(1) - 1  # other rows at least as similar as the own view
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {k: 100.0 * v / z1.shape[0] for k, v in hits.items()}


def alignment(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """Mean squared distance between the two views of each image."""
    return float((z1.double() - z2.double()).pow(2).sum(1).mean())


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    """log of the mean of exp(-t ||z_i - z_j||^2) over ordered pairs i != j (needs N >= 2)."""
    z = z.double()
    n = z.shape[0]
    parts = []
    for s in range(0, n, _BLOCK):
        d2 = torch.cdist(z[s:s + _BLOCK], z).pow(2)  # (b, N)
        d2[torch.arange(d2.shape[0]), torch.arange(s, s + d2.shape[0])] = math.inf  # leave i == j out
        parts.append(torch.logsumexp((-t * d2).flatten(), 0))
    return float(torch.logsumexp(torch.stack(parts), 0) - math.log(n * (n - 1)))


def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """exp(entropy of p), p = singular values of z / their sum (+eps, as the paper)."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def mean_cosines(z1: torch.Tensor, z2: torch.Tensor) -> tuple[float, float]:
    """(mean cos of two views of one image, mean cos of view 1 of two different images); rows unit-norm."""
    z1, z2 = z1.double(), z2.double()
    n = z1.shape[0]
    pos = float((z1 * z2).sum(1).mean())
    total = z1.sum(0)
    neg = float((total @ total - (z1 * z1).sum()) / (n * (n - 1)))  # sum over i != j of z_i . z_j, in O(N D)
    return pos, neg


def label_free_metrics(z1: torch.Tensor, z2: torch.Tensor, plain: torch.Tensor) -> dict[str, float]:
    """Every label-free metric from the two views' and the plain view's (N, D) embeddings."""
    top = view_retrieval(z1, z2, (1, 5))
    pos, neg = mean_cosines(z1, z2)
    return {"view_top1": top[1], "view_top5": top[5], "alignment": alignment(z1, z2),
            "uniformity": 0.5 * (uniformity(z1) + uniformity(z2)), "rankme": rankme(plain), "pos_cos": pos,
            "neg_cos": neg}


@torch.no_grad()
def holdout_embeddings(model: nn.Module, images: Images, augment: Callable, plain: Callable,
                       device: torch.device, precision: str = "fp32", channels_last: bool = False,
                       batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z1, z2, z_plain) of the held-out images: each batch decoded once, its two views drawn from a generator
    seeded with ``VIEW_SEED``; the network in eval mode."""
    gen = torch.Generator().manual_seed(VIEW_SEED)
    was_training = model.training
    model.eval()
    dtype, out = param_dtype(precision), ([], [], [])
    try:
        for batch in image_batches(images, batch_size, device):
            x = batch.to(device, non_blocking=True)
            for i, view in enumerate((augment(x, gen), augment(x, gen), plain(x))):
                v = view.to(dtype)
                if channels_last:
                    v = v.contiguous(memory_format=torch.channels_last)
                with autocast(device, precision):
                    out[i].append(model(v).to(dtype).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out[0]), torch.cat(out[1]), torch.cat(out[2])
