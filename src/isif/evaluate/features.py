"""Feature extraction: a model applied to an in-memory set with the test transform."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..precision import autocast


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    channels_last: bool = False,
    backbone_only: bool = False,
) -> torch.Tensor:
    """Embed uint8 images (N, 3, H, W) in eval mode; returns float32 (N, D) on ``device``.

    ``images`` is a tensor, or streamed ``FileImages`` decoded by DataLoader workers.

    ``backbone_only`` returns the backbone's pooled features instead of the
    L2-normalised embedding (for the linear probe).
    """
    net = model.backbone if backbone_only else model
    was_training = model.training
    model.eval()
    device = torch.device(device)
    feats = []
    if hasattr(images, "sequential"):  # files decoded by DataLoader workers (isif.data.stream.FileImages)
        batches = images.sequential(batch_size, pin=device.type == "cuda")
    else:
        batches = (images[s : s + batch_size] for s in range(0, images.shape[0], batch_size))
    try:
        for batch in batches:
            x = transform(batch.to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                z = net(x)
            feats.append(z.float())
    finally:
        model.train(was_training)
    return torch.cat(feats)
