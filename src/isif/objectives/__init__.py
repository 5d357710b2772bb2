"""Training objectives: ``loss = objective(z, instance_idx)``; one registry line per method below (the paper's
methods, then its successors).

See ``contract.py`` for what a method is and what the loop feeds it.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

from . import barlow_twins, byol, dino, moco, simclr, simsiam, vicreg
from .barlow_twins import BarlowTwins, BarlowTwinsSettings
from .byol import BYOL, BYOLSettings
from .contract import BuildContext, EpochContext, FromSettings, Method, Objective, OwnHeads, Recipe
from .deepcluster import DeepCluster, DeepClusterSettings
from .dino import DINO, DINOSettings
from .exemplar import Exemplar, ExemplarSettings
from .instance_discrimination import NCE, MemoryBank, NCESettings, NPSoftmax, NPSoftmaxSettings
from .isif import InvariantSpreading, IsifSettings
from .moco import MoCo, MoCoSettings
from .random import NoSettings, NoTraining
from .registry import build_objective, get_method, method_fields, methods, register
from .simclr import SimCLR, SimCLRSettings
from .simsiam import SimSiam, SimSiamSettings
from .triplet import Triplet, TripletSettings
from .vicreg import VICReg, VICRegSettings

for _m in (
    Method("random", "no training: the randomly initialised network, evaluated once", NoSettings,
           NoTraining.from_settings, trains=False),
    Method("isif", "Invariant and Spreading Instance Feature: softmax over the batch's own features", IsifSettings,
           InvariantSpreading.from_settings, embedding=lambda s: "backbone" if s.projector == "mlp" else "head"),
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
    Method("simclr", "SimCLR: NT-Xent over the gathered batch of MLP projections (tau 0.5)", SimCLRSettings,
           SimCLR.from_settings, embedding="backbone", recipe=simclr.RECIPE),
    Method("moco", "MoCo v2: a momentum key encoder, a queue of keys, a symmetric InfoNCE", MoCoSettings,
           MoCo.from_settings, embedding="backbone", recipe=moco.RECIPE),
    Method("byol", "BYOL: predict an EMA target's projection of the other view", BYOLSettings, BYOL.from_settings,
           embedding="backbone", recipe=byol.RECIPE),
    Method("simsiam", "SimSiam: a predictor and a stop-gradient, no negatives", SimSiamSettings,
           SimSiam.from_settings, embedding="backbone", recipe=simsiam.RECIPE),
    Method("barlow-twins", "Barlow Twins: the views' cross-correlation pushed to the identity", BarlowTwinsSettings,
           BarlowTwins.from_settings, embedding="backbone", recipe=barlow_twins.RECIPE),
    Method("vicreg", "VICReg: variance, invariance and covariance terms (25, 25, 1)", VICRegSettings,
           VICReg.from_settings, embedding="backbone", recipe=vicreg.RECIPE),
    Method("dino", "DINO: match an EMA teacher's centred, sharpened outputs, multi-crop on request", DINOSettings,
           DINO.from_settings, embedding="backbone", recipe=dino.RECIPE),
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


__all__ = ["BYOL", "BarlowTwins", "BuildContext", "DINO", "DeepCluster", "EpochContext", "Exemplar",
           "FromSettings", "InvariantSpreading", "MemoryBank", "Method", "MethodConfig", "MoCo", "NCE", "NPSoftmax",
           "NoTraining", "Objective", "OwnHeads", "Recipe", "SimCLR", "SimSiam", "Triplet", "VICReg",
           "build_objective", "get_method", "method_fields", "methods", "register"]
