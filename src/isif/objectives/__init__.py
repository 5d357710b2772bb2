"""Training objectives: ``loss = objective(z, instance_idx)``; one registry line per method below.

See ``contract.py`` for what a method is and what the loop feeds it.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

from .contract import BuildContext, EpochContext, FromSettings, Method, Objective
from .deepcluster import DeepCluster, DeepClusterSettings
from .exemplar import Exemplar, ExemplarSettings
from .instance_discrimination import NCE, MemoryBank, NCESettings, NPSoftmax, NPSoftmaxSettings
from .isif import InvariantSpreading, IsifSettings
from .random import NoSettings, NoTraining
from .registry import build_objective, get_method, method_fields, methods, register
from .triplet import Triplet, TripletSettings

for _m in (
    Method("random", "no training: the randomly initialised network, evaluated once", NoSettings,
           NoTraining.from_settings, trains=False),
    Method("isif", "Invariant and Spreading Instance Feature: softmax over the batch's own features", IsifSettings,
           InvariantSpreading.from_settings),
    Method("npsoftmax", "Instance Discrimination: non-parametric softmax over a memory bank (tau 0.07)",
           NPSoftmaxSettings, NPSoftmax.from_settings),
    Method("nce", "Instance Discrimination with noise-contrastive estimation, 4096 noise samples (tau 0.07)",
           NCESettings, NCE.from_settings),
    Method("exemplar", "Exemplar: parametric classification with one weight vector per instance", ExemplarSettings,
           Exemplar.from_settings),
    Method("triplet", "Triplet: the other view as positive, a random in-batch negative, margin 0.5",
           TripletSettings, Triplet.from_settings),
    Method("triplet-hard", "Triplet with the hardest in-batch negative, margin 0.5", TripletSettings,
           functools.partial(Triplet.from_settings, mining="hard")),
    Method("deepcluster", "DeepCluster: k-means pseudo-labels every epoch, cross-entropy with a fresh head",
           DeepClusterSettings, DeepCluster.from_settings),
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


__all__ = ["NCE", "BuildContext", "DeepCluster", "EpochContext", "Exemplar", "FromSettings", "InvariantSpreading",
           "MemoryBank", "Method", "MethodConfig", "NPSoftmax", "NoTraining", "Objective", "Triplet", "build_objective",
           "get_method", "method_fields", "methods", "register"]
