"""What a training method is, in one page. Read this first.

A method is an ``nn.Module`` (the objective) plus a settings dataclass,
registered together as one ``Method`` line in ``objectives/__init__.py``.
The one training loop (``isif.training.loop``) treats every method alike:

    z = model(cat(views))                 # (V*B, D) L2-normalised; view v of instance i at row v*B + i
    loss = objective(z, instance_idx)     # instance_idx: (B,) dataset indices of the global batch
    loss.backward(); optimiser.step()     # the objective's own parameters (Exemplar's weights, DeepCluster's
                                          # head) are in the optimiser too

The objective declares what the loop must feed it and when it must be called:

- ``views``: one name per view of an instance, ``"augment"`` (a random
  augmentation) or ``"plain"`` (the test transform). ISIF has two augmented
  views; memory-bank methods one; the paper's Eq. 7 a plain anchor and an
  augmented view.
- ``on_epoch_start(ctx)``: called at the start of every epoch (not when a run
  resumes mid-epoch), with an ``EpochContext``: DeepCluster clusters the
  training set here. Methods with nothing to do define it as a no-op.
- its state: memory banks, constants, classifier heads and pseudo-labels are
  buffers or parameters, so ``state_dict()`` carries them into checkpoints
  and a resumed run continues exactly.

The ``Method`` entry adds what the loop needs before any objective exists:
its name and one-line summary, its settings class (each field made with
``isif.base.settings.setting``: default, help, check; every field becomes a
command-line flag), how to build the objective from settings and a
``BuildContext``, and whether it trains at all (``random`` does not: the run
evaluates the untrained network once).

The builder is any ``(settings, context) -> objective``: a class whose
``__init__`` takes those two, or, for an objective that keeps a keyword
constructor for the Python API (the built-in ones: ``InvariantSpreading(
temperature=0.1)``), its ``from_settings`` (``FromSettings``). The settings
are checked once, by ``build_objective``, before the builder sees them; a
keyword constructor checks the settings it is given (``checked``).

An objective has no ``.cuda()`` inside and makes no assumption about DDP:
under torchrun the loop gathers ``z`` across processes (gradients kept), so
the objective sees the global batch as one process would.

The methods that came after the paper (SimCLR, MoCo v2, BYOL, SimSiam,
Barlow Twins, VICReg) own networks on top of the backbone and say so:

- ``input = "backbone"``: the loop feeds the pooled backbone features
  ``h = model(views, part="backbone")`` (V*B, F), gathered like ``z``, and
  the objective applies its own heads (``heads.mlp``: projector, predictor)
  to the global batch, so their BatchNorm sees the whole batch on any number
  of processes. The network's own 128-d head is then not trained (its
  parameters are frozen). Default ``"embedding"``: ``z`` as above.
- ``embedding``: what the trained network's embedding is, for kNN, Recall@K,
  ``isif embed``, ``export``, ``serve`` and the Python API: ``"head"`` (the
  128-d L2-normalised head: ISIF and the paper's baselines) or
  ``"backbone"`` (the pooled backbone features, L2-normalised, as the
  successors' papers evaluate them). The registry line carries it too.
- a momentum target (MoCo's key encoder, BYOL's target): the objective
  defines ``target_views`` (which views the target sees) and
  ``target_features(online_backbone, x)`` (its backbone features of those
  views of this process, without gradient); the loop gathers them and passes
  them as ``objective(h, idx, target=...)``. ``after_step(online_backbone)``
  is called after every optimiser step (the EMA update). The target's
  weights, the queue and the step counter are buffers: checkpoints carry them.
- ``outputs(h, target=None)`` and ``loss(outputs)``: a method with heads of its own runs every network it
  owns in ``outputs`` (the heads on ``h``, a momentum target's head on ``target``) and computes its loss as a
  pure function of what ``outputs`` returned (a tensor or a tuple of tensors); ``forward`` is the two in turn,
  then ``after_loss(outputs)`` (MoCo's queue, DINO's centre). ``isif bench`` times ``outputs`` as the limit of
  the step. ``OwnHeads`` below is that shape with its defaults; the successors derive from it.
- a recipe (``Method.recipe``): the method's own training defaults, a ``Recipe`` of config settings (its
  augmentation per view, optimiser, weight decay, heads) and a learning rate at a reference batch size,
  applied over the run's preset unless the run asks for ``--recipe shared``; the user's flags override it.
- views of several sizes (multi-crop, DINO): a view name other than
  ``"augment"`` and ``"plain"`` is a key of the objective's ``crops``, a
  ``Crop`` (its side and crop area). The loop augments each kind of view
  batched, runs the network once per group of consecutive views of one size
  (inside one call, so DDP sees one forward), and concatenates the features in
  view order: the objective still sees (V*B, F), view v at rows v*B to
  (v+1)*B. A view larger than the run's input is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from ..base.settings import check_fields

S = TypeVar("S")


@dataclass
class EpochContext:
    """What an objective's ``on_epoch_start`` may use."""

    epoch: int  # 0-based
    features: Callable[[], torch.Tensor]  # (N, D) embeddings of the training set, test transform, in order
    optimizer: torch.optim.Optimizer

    def reset_optimizer_state(self, params: list[torch.nn.Parameter]) -> None:
        """Forget momentum for re-initialised parameters."""
        for p in params:
            self.optimizer.state.pop(p, None)


@dataclass(frozen=True)
class BuildContext:
    """What a method's builder knows besides its settings."""

    num_instances: int  # training-set size (memory banks, one weight per instance)
    dim: int = 128  # embedding width
    seed: int = 0  # the run's seed (DeepCluster's k-means)
    engine: str = "torch"  # k-means's nearest-centroid search (isif.evaluate.engine): the same result either way
    features: int = 0  # the backbone's pooled feature width (the input of a method's own heads)
    backbone: Any = None  # the online backbone (an nn.Module) a momentum target starts as a copy of
    total_steps: int = 0  # optimiser steps of the whole run (BYOL's momentum schedule)
    steps_per_epoch: int = 0  # optimiser steps of one epoch (DINO's frozen last layer)


@runtime_checkable
class Objective(Protocol):
    """The objective module's side of the contract (it is also an ``nn.Module``)."""

    views: tuple[str, ...]

    def __call__(self, z: torch.Tensor, instance_idx: torch.Tensor) -> torch.Tensor: ...

    def on_epoch_start(self, ctx: EpochContext) -> None: ...


@dataclass(frozen=True)
class Recipe:
    """A method's own training defaults: config settings ``{"section.field": value}`` applied over the run's preset
    (the user's flags still win), and its learning rate ``lr`` for a batch of ``lr_batch`` instances, scaled
    linearly with the run's batch (``lr_batch`` None: not scaled). ``source`` names where they come from."""

    source: str
    settings: dict[str, Any]
    lr: float | None = None
    lr_batch: int | None = None

    def changes(self, batch_size: int) -> dict[str, Any]:
        """The settings this recipe gives a run of ``batch_size`` instances a step."""
        out = dict(self.settings)
        if self.lr is not None:
            out["optim.lr"] = self.lr * (batch_size / self.lr_batch if self.lr_batch else 1.0)
        return out


@dataclass(frozen=True)
class Method:
    """One registry entry: a training method."""

    name: str
    summary: str
    settings: type  # a dataclass of ``setting`` fields: defaults, help, checks
    build: Callable[[Any, BuildContext], torch.nn.Module]  # (settings, context) -> objective
    trains: bool = True  # False: no optimisation step; the run evaluates the untrained network once
    embedding: str | Callable[[Any], str] = "head"  # what the trained network's embedding is: "head" (128-d) or
    # "backbone" (pooled); or a function of the settings (ISIF's --projector mlp embeds with the backbone)
    recipe: Recipe | None = None  # its own augmentation, optimiser and heads (None: the run's preset is its recipe)

    def embedding_of(self, settings: Any = None) -> str:
        """The declared embedding of a run with ``settings`` (default: the method's defaults)."""
        if callable(self.embedding):
            return self.embedding(settings if settings is not None else self.settings())
        return self.embedding


@dataclass(frozen=True)
class Crop:
    """A kind of view of its own size (multi-crop): RandomResizedCrop of ``scale`` of the image's area to a side of
    ``size`` pixels, or, with ``size`` None, ``relative`` times the run's side rounded to a multiple of 8 (at least
    8); both None: the run's side. The rest of the augmentation (jitter, grey, flip) is the run's."""

    size: int | None = None
    relative: float | None = None
    scale: tuple[float, float] = (0.2, 1.0)
    flag: str = ""  # the setting that sets its size, for the refusal of a view larger than the input

    def side(self, run_side: int) -> int:
        if self.size is not None:
            return int(self.size)
        if self.relative is not None:
            return max(8, int(round(run_side * self.relative / 8)) * 8)
        return run_side


Views = torch.Tensor | list[torch.Tensor]  # one tensor of V*b views of one size, or one per group of one size


def view_rows(x: Views) -> int:
    """The number of images in a batch of views (of one size or of several)."""
    return x.shape[0] if isinstance(x, torch.Tensor) else sum(g.shape[0] for g in x)


def select_views(x: Views, which: tuple[int, ...], n_views: int) -> torch.Tensor:
    """The rows of views ``which`` of ``x`` (n_views * b rows, view v at rows v*b to (v+1)*b, possibly split into
    groups of one size), in that order: what a momentum target sees of a batch (``target_views``); the chosen views
    must be of one size."""
    groups = [x] if isinstance(x, torch.Tensor) else list(x)
    b = view_rows(x) // n_views
    per_view = [v for g in groups for v in g.split(b)]
    return torch.cat([per_view[v] for v in which])


def target_of(objective, online_backbone, x: Views) -> torch.Tensor:
    """A momentum target's features of its ``target_views`` of the views ``x`` (no gradient): one process's share,
    before the loop gathers it."""
    return objective.target_features(online_backbone, select_views(x, objective.target_views, len(objective.views)))


def checked(settings: S) -> S:
    """``settings`` once its fields' checks pass (ValueError naming the field): for keyword constructors, which
    the registry's ``build_objective`` does not go through."""
    check_fields(settings, flags=False)
    return settings


class FromSettings:
    """An objective with a keyword constructor (the Python API) that the registry builds from its settings object.

    The class defines ``_setup(settings, ctx)``, which sets the module up from settings that are already checked
    (it calls ``nn.Module.__init__`` first); its ``__init__`` checks its keywords' settings and calls ``_setup``;
    ``from_settings`` is the registry's builder and does not check again."""

    def _setup(self, settings: Any, ctx: BuildContext) -> None:
        raise NotImplementedError

    @classmethod
    def from_settings(cls, settings: Any, ctx: BuildContext):
        obj = cls.__new__(cls)
        obj._setup(settings, ctx)
        return obj


class OwnHeads(FromSettings, nn.Module):
    """A method with networks of its own on the pooled backbone features (``input = "backbone"``): ``outputs``
    runs them, ``loss`` is a pure function of what it returns, ``after_loss`` updates state (a queue, a centre)
    while training. Two augmented views and the backbone embedding unless a method says otherwise."""

    views: tuple[str, ...] = ("augment", "augment")
    input = "backbone"
    embedding = "backbone"

    def outputs(self, h: torch.Tensor, target: torch.Tensor | None = None) -> Any:
        raise NotImplementedError

    def loss(self, out: Any) -> torch.Tensor:
        raise NotImplementedError

    def after_loss(self, out: Any) -> None:
        """State that follows the batch (in training only); nothing by default."""

    def forward(self, h: torch.Tensor, instance_idx: torch.Tensor | None = None,
                target: torch.Tensor | None = None) -> torch.Tensor:
        out = self.outputs(h, target)
        loss = self.loss(out)
        if self.training:
            with torch.no_grad():
                self.after_loss(out)
        return loss

    def on_epoch_start(self, ctx: EpochContext) -> None:
        """Nothing to do per epoch."""


def per_view(head: nn.Module, h: torch.Tensor, views: int = 2) -> list[torch.Tensor]:
    """``head`` applied to each view's rows on its own (BatchNorm statistics per view, as the references do)."""
    return [head(c) for c in h.chunk(views)]
