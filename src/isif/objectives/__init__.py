"""Training objectives: ``loss = objective(z, instance_idx)``.

Every method is built from the same keyword arguments (the method config,
plus ``num_instances``, ``dim`` and ``seed``); each builder takes what it needs.
``temperature=None`` means the method's own default.
"""

from __future__ import annotations

from torch import nn

from .deepcluster import DeepCluster, NoTraining
from .exemplar import Exemplar
from .instance_discrimination import NCE, MemoryBank, NPSoftmax
from .isif import InvariantSpreading
from .registry import Method, build_objective, methods, register
from .triplet import Triplet


def _tau(temperature: float | None, default: float) -> float:
    return default if temperature is None else temperature


@register("isif", "Invariant and Spreading Instance Feature: softmax over the batch's own features")
def _isif(temperature=None, variant="official", neg_weight=1.0, negatives="all", neg_fraction=0.5, **_) -> nn.Module:
    return InvariantSpreading(_tau(temperature, 0.1), variant, neg_weight, negatives, neg_fraction)


@register("npsoftmax", "Instance Discrimination: non-parametric softmax over a memory bank (tau 0.07)")
def _npsoftmax(num_instances, dim=128, temperature=None, memory_momentum=0.5, **_) -> nn.Module:
    return NPSoftmax(num_instances, dim, _tau(temperature, 0.07), memory_momentum)


@register("nce", "Instance Discrimination with noise-contrastive estimation, 4096 noise samples (tau 0.07)")
def _nce(num_instances, dim=128, temperature=None, memory_momentum=0.5, nce_noise=4096, **_) -> nn.Module:
    return NCE(num_instances, dim, _tau(temperature, 0.07), memory_momentum, min(nce_noise, num_instances))


@register("exemplar", "Exemplar: parametric classification with one weight vector per instance")
def _exemplar(num_instances, dim=128, temperature=None, **_) -> nn.Module:
    return Exemplar(num_instances, dim, _tau(temperature, 0.1))


@register("triplet", "Triplet: the other view as positive, a random in-batch negative, margin 0.5")
def _triplet(margin=0.5, **_) -> nn.Module:
    return Triplet(margin, "random")


@register("triplet-hard", "Triplet with the hardest in-batch negative, margin 0.5")
def _triplet_hard(margin=0.5, **_) -> nn.Module:
    return Triplet(margin, "hard")


@register("deepcluster", "DeepCluster: k-means pseudo-labels every epoch, cross-entropy with a fresh head")
def _deepcluster(num_instances, dim=128, temperature=None, clusters=100, kmeans_iters=20, seed=0, **_) -> nn.Module:
    return DeepCluster(num_instances, dim, clusters, _tau(temperature, 0.1), kmeans_iters, seed)


@register("random", "no training: the randomly initialised network, evaluated once")
def _random(**_) -> nn.Module:
    return NoTraining()


__all__ = ["DeepCluster", "Exemplar", "InvariantSpreading", "MemoryBank", "Method", "NCE", "NPSoftmax",
           "NoTraining", "Triplet", "build_objective", "methods", "register"]
