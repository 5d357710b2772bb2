"""Feature extraction: a model applied to an image set with the test transform, sharded under torchrun."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..base.device import autocast, param_dtype
from ..base.dist import SINGLE, World, gather_rows, shard
from ..data.types import Images, LazyImages


def image_batches(images: Images, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """The uint8 images in order, ``batch_size`` at a time: decoded by the workers (pinned for a GPU) when lazy,
    sliced when in memory."""
    if isinstance(images, LazyImages):
        return images.sequential(batch_size, pin=device.type == "cuda")
    return (images[s : s + batch_size] for s in range(0, images.shape[0], batch_size))


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: Images,
    transform: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    channels_last: bool = False,
    backbone_only: bool = False,
) -> torch.Tensor:
    """Embed uint8 images (N, 3, H, W) in eval mode; returns (N, D) on ``device``, float32 (float64 for fp64).

    ``images`` is a tensor, or ``LazyImages`` (files decoded by DataLoader workers).
    ``backbone_only`` returns the backbone's pooled features instead of the
    L2-normalised embedding (for the linear probe).
    """
    net = model.backbone if backbone_only else model
    was_training = model.training
    model.eval()
    device = torch.device(device)
    dtype = param_dtype(precision)
    feats = []
    try:
        for batch in image_batches(images, batch_size, device):
            x = transform(batch.to(device, non_blocking=True)).to(dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                z = net(x)
            feats.append(z.to(dtype))
    finally:
        model.train(was_training)
    return torch.cat(feats)


def sharded_features(model: nn.Module, images: Images, transform: Callable[[torch.Tensor], torch.Tensor],
                     world: World = SINGLE, **kw) -> torch.Tensor:
    """``extract_features`` of every image; under torchrun each process embeds one contiguous shard and all
    processes receive the whole (N, D) result."""
    if not world.active:
        return extract_features(model, images, transform, **kw)
    start, stop, per = shard(images.shape[0], world)
    feats = extract_features(model, images[start:stop], transform, **kw)
    pad = torch.zeros(per - feats.shape[0], feats.shape[1], device=feats.device, dtype=feats.dtype)
    return gather_rows(torch.cat([feats, pad]), world)[: images.shape[0]]
