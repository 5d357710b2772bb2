"""Backbones, their registry, and the embedding head.

A backbone is one registry entry in ``BACKBONES``: its name, a builder
``build(width, weights) -> nn.Module`` returning pooled features (N, F), and
its output width F at ``width`` 1; or ``timm:NAME``, any timm model
(``timm_nets``). ``build_model`` puts the head (FC to ``dim``, L2 norm) on top.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.settings import POSITIVE, at_least, setting
from .resnet_cifar import CifarResNet, resnet18_cifar
from .timm_nets import data_config, is_timm, model_name, timm_backbone
from .torchvision_nets import torchvision_backbone


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[[float, str | None], nn.Module]  # (width, weights) -> pooled features (N, out_dim)
    out_dim: int  # feature width at width 1.0
    summary: str
    widthable: bool = False  # does --width scale it?
    pretrained: bool = False  # does --weights imagenet|PATH apply? (resnet18_cifar: PATH only)

    def features(self, width: float) -> int:
        return max(1, round(self.out_dim * width)) if self.widthable else self.out_dim


def _cifar(width: float, weights: str | None) -> nn.Module:
    net = resnet18_cifar(width)
    if weights == "imagenet":
        raise ValueError("resnet18_cifar has no pretrained weights to download; --weights PATH loads a local file "
                         "(e.g. `isif export RUN --format safetensors` of a run at this width), or --weights none")
    if weights not in (None, "none"):
        from .weights import load_backbone_weights

        load_backbone_weights(net, weights, f"resnet18_cifar width {width:g}")
    return net


def _torchvision(arch: str) -> Callable[[float, str | None], nn.Module]:
    return lambda width, weights: torchvision_backbone(arch, weights, BACKBONES[arch].out_dim)


BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("resnet18_cifar", _cifar, 512, "ResNet-18 with a CIFAR stem (3x3, no max-pool), any input size",
             widthable=True, pretrained=True),
    Backbone("googlenet", _torchvision("googlenet"), 1024, "torchvision GoogLeNet / Inception-V1, pool5",
             pretrained=True),
    Backbone("resnet18", _torchvision("resnet18"), 512, "torchvision ResNet-18", pretrained=True),
    Backbone("resnet50", _torchvision("resnet50"), 2048, "torchvision ResNet-50", pretrained=True),
)}


@dataclass
class ModelConfig:
    arch: str = setting("resnet18_cifar", "backbone: " + ", ".join(BACKBONES) + ", or timm:NAME (any timm model, "
                                          "pip install 'isif[timm]')")
    width: float = setting(1.0, "backbone channel multiplier (resnet18_cifar)", check=POSITIVE)
    dim: int = setting(128, "embedding size", check=at_least(1))
    weights: str | None = setting(None, "torchvision and timm backbones: none, imagenet, or a local file (safetensors "
                                        "or a state dict)")
    freeze_bn: bool = setting(False, "BatchNorm keeps its running statistics while training (eval mode): for "
                                     "fine-tuning, and batch statistics that do not depend on the process count")

    def check(self) -> None:
        if is_timm(self.arch):
            model_name(self.arch)  # a one-line error with the closest names
        elif self.arch not in BACKBONES:
            raise ValueError(f"unknown --arch {self.arch!r}; known: {', '.join(BACKBONES)}, or timm:NAME")


class EmbeddingHead(nn.Module):
    """Linear projection to ``dim`` followed by L2 normalisation.

    Shape: (N, in_dim) -> (N, dim), every row of unit norm, in at least float32.
    """

    def __init__(self, in_dim: int, dim: int = 128) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.fc(h)
        return F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)  # float32 even under autocast


class EmbeddingNet(nn.Module):
    """Backbone -> pooled features -> 128-d L2-normalised embedding (or, for a method that declares the backbone
    as its embedding, the pooled features L2-normalised).

    With ``freeze_bn`` the BatchNorm layers stay in eval mode when the net is
    put in training mode: they normalise with their running statistics and
    never update them.
    """

    def __init__(self, backbone: nn.Module, out_dim: int, dim: int = 128, freeze_bn: bool = False,
                 embedding: str = "head") -> None:
        super().__init__()
        self.backbone = backbone
        self.head = EmbeddingHead(out_dim, dim)
        self.freeze_bn = freeze_bn
        self.features = out_dim
        self.embedding = embedding
        self.train()

    @property
    def embedding(self) -> str:
        """What ``forward`` gives: "head" (the 128-d head) or "backbone" (the pooled features, L2-normalised): the
        training method's declared embedding (``isif.objectives``' registry line)."""
        return self._embedding

    @embedding.setter
    def embedding(self, value: str) -> None:
        if value not in ("head", "backbone"):
            raise ValueError(f"embedding must be 'head' or 'backbone', got {value!r}")
        self._embedding = value

    @property
    def dim(self) -> int:
        """The width of ``forward``'s output."""
        return self.head.fc.out_features if self.embedding == "head" else self.features

    def train(self, mode: bool = True) -> EmbeddingNet:
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor | list[torch.Tensor], part: str | None = None) -> torch.Tensor:
        """The embedding (N, dim), every row of unit length; ``part="backbone"``: the raw pooled backbone
        features (N, features), what a method with its own heads trains on. ``x`` may be a list of batches of
        different sizes (multi-crop): the backbone runs on each, the rows are concatenated in order."""
        if isinstance(x, (list, tuple)):
            h = torch.cat([self.backbone(g) for g in x])
        else:
            h = self.backbone(x)
        if part == "backbone":
            return h
        if self.embedding == "backbone":
            return F.normalize(h.to(torch.promote_types(h.dtype, torch.float32)), dim=1)
        return self.head(h)  # (N, dim)


def build_model(cfg: ModelConfig, size: int | None = None) -> EmbeddingNet:
    """Backbone + FC to ``dim`` + L2 norm; ValueError for an unknown backbone or weights it cannot take. ``size``,
    the input side, matters only to timm models built for one size (ViTs)."""
    if is_timm(cfg.arch):
        backbone, out = timm_backbone(cfg.arch, cfg.weights, size)
        return EmbeddingNet(backbone, out, cfg.dim, cfg.freeze_bn)
    entry = BACKBONES.get(cfg.arch)
    if entry is None:
        raise ValueError(f"unknown architecture {cfg.arch!r}; known: {', '.join(BACKBONES)}, or timm:NAME")
    if not entry.pretrained and cfg.weights not in (None, "none"):
        raise ValueError(f"{cfg.arch} has no pretrained weights; use --weights none")
    backbone = entry.build(cfg.width, cfg.weights)
    return EmbeddingNet(backbone, entry.features(cfg.width), cfg.dim, cfg.freeze_bn)


def input_recipe(cfg: ModelConfig) -> dict | None:
    """The backbone's own input recipe ({"size", "mean", "std"}: timm's data config), or None when the data's
    size and moments apply (the built-in backbones)."""
    return data_config(cfg.arch) if is_timm(cfg.arch) else None


__all__ = ["BACKBONES", "Backbone", "CifarResNet", "EmbeddingHead", "EmbeddingNet", "ModelConfig",
           "build_model", "input_recipe", "is_timm", "resnet18_cifar"]
