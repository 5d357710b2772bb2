"""Training objectives: ``loss = objective(z, instance_idx)``."""

from __future__ import annotations

from torch import nn

from .isif import InvariantSpreading
from .registry import Method, build_objective, methods, register


@register("isif", "Invariant and Spreading Instance Feature: softmax over the batch's own features")
def _build_isif(
    temperature: float = 0.1, variant: str = "official", neg_weight: float = 1.0, **_: object
) -> nn.Module:
    return InvariantSpreading(temperature=temperature, variant=variant, neg_weight=neg_weight)


__all__ = ["InvariantSpreading", "Method", "build_objective", "methods", "register"]
