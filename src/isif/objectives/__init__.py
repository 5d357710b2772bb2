"""Training objectives: ``loss = objective(z, instance_idx)``; one registry line per method below.

See ``contract.py`` for what a method is and what the loop feeds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .contract import BuildContext, EpochContext, Method, Objective
from .deepcluster import DeepCluster, DeepClusterSettings, NoSettings, NoTraining
from .exemplar import Exemplar, ExemplarSettings
from .instance_discrimination import NCE, MemoryBank, NCESettings, NPSoftmax, NPSoftmaxSettings
from .isif import InvariantSpreading, IsifSettings
from .registry import build_objective, get_method, method_fields, methods, register
from .triplet import Triplet, TripletSettings

for _m in (
    Method("random", "no training: the randomly initialised network, evaluated once", NoSettings,
           lambda s, c: NoTraining(), trains=False),
    Method("isif", "Invariant and Spreading Instance Feature: softmax over the batch's own features", IsifSettings,
           lambda s, c: InvariantSpreading(s.temperature, s.variant, s.neg_weight, s.negatives, s.neg_fraction)),
    Method("npsoftmax", "Instance Discrimination: non-parametric softmax over a memory bank (tau 0.07)",
           NPSoftmaxSettings, lambda s, c: NPSoftmax(c.num_instances, c.dim, s.temperature, s.memory_momentum)),
    Method("nce", "Instance Discrimination with noise-contrastive estimation, 4096 noise samples (tau 0.07)",
           NCESettings, lambda s, c: NCE(c.num_instances, c.dim, s.temperature, s.memory_momentum,
                                         min(s.nce_noise, c.num_instances))),
    Method("exemplar", "Exemplar: parametric classification with one weight vector per instance", ExemplarSettings,
           lambda s, c: Exemplar(c.num_instances, c.dim, s.temperature)),
    Method("triplet", "Triplet: the other view as positive, a random in-batch negative, margin 0.5",
           TripletSettings, lambda s, c: Triplet(s.margin, "random")),
    Method("triplet-hard", "Triplet with the hardest in-batch negative, margin 0.5", TripletSettings,
           lambda s, c: Triplet(s.margin, "hard")),
    Method("deepcluster", "DeepCluster: k-means pseudo-labels every epoch, cross-entropy with a fresh head",
           DeepClusterSettings, lambda s, c: DeepCluster(c.num_instances, c.dim, s.clusters, s.temperature,
                                                         s.kmeans_iters, c.seed, c.engine)),
):
    register(_m)


@dataclass
class MethodConfig:
    """The method's name and its own settings (a dataclass from its registry entry)."""

    name: str = "isif"
    settings: Any = dataclasses.field(default_factory=IsifSettings)

    @classmethod
    def of(cls, name: str) -> MethodConfig:
        """Method ``name`` with its default settings."""
        return cls(name, get_method(name).settings())

    def check(self) -> None:
        if self.name not in methods():
            raise ValueError(f"unknown --method {self.name!r}; known: {', '.join(sorted(methods()))}")
        if not isinstance(self.settings, get_method(self.name).settings):
            raise ValueError(f"method {self.name} was given the settings of another method; switch methods with "
                             f"Config.set('method.name', {self.name!r}) or MethodConfig.of({self.name!r})")


__all__ = ["NCE", "BuildContext", "DeepCluster", "EpochContext", "Exemplar", "InvariantSpreading", "MemoryBank",
           "Method", "MethodConfig", "NPSoftmax", "NoTraining", "Objective", "Triplet", "build_objective",
           "get_method", "method_fields", "methods", "register"]
