"""Backbones and the embedding head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet_cifar import CifarResNet, resnet18_cifar

ARCHS = ("resnet18_cifar", "googlenet", "resnet18", "resnet50")


class EmbeddingHead(nn.Module):
    """Linear projection to ``dim`` followed by L2 normalisation.

    Shape: (N, in_dim) -> (N, dim), every row of unit norm.
    """

    def __init__(self, in_dim: int, dim: int = 128) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.fc(h)
        return F.normalize(z.float(), dim=1)  # normalise in float32 even under autocast


class EmbeddingNet(nn.Module):
    """Backbone -> pooled features -> 128-d L2-normalised embedding."""

    def __init__(self, backbone: nn.Module, out_dim: int, dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = EmbeddingHead(out_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # (N, dim)


def build_model(arch: str = "resnet18_cifar", width: float = 1.0, dim: int = 128,
                weights: str | None = None) -> EmbeddingNet:
    """Backbone + FC to ``dim`` + L2 norm. ``width`` applies to resnet18_cifar; ``weights`` to the
    torchvision backbones (none, imagenet, or a state-dict path)."""
    if arch == "resnet18_cifar":
        if weights not in (None, "none"):
            raise ValueError("resnet18_cifar has no pretrained weights; use --weights none")
        backbone = resnet18_cifar(width)
        return EmbeddingNet(backbone, backbone.out_dim, dim)
    if arch in ("googlenet", "resnet18", "resnet50"):
        from .torchvision_nets import torchvision_backbone

        net, out_dim = torchvision_backbone(arch, weights)
        return EmbeddingNet(net, out_dim, dim)
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")


__all__ = ["ARCHS", "CifarResNet", "EmbeddingHead", "EmbeddingNet", "build_model", "resnet18_cifar"]
