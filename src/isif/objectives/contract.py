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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

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


@runtime_checkable
class Objective(Protocol):
    """The objective module's side of the contract (it is also an ``nn.Module``)."""

    views: tuple[str, ...]

    def __call__(self, z: torch.Tensor, instance_idx: torch.Tensor) -> torch.Tensor: ...

    def on_epoch_start(self, ctx: EpochContext) -> None: ...


@dataclass(frozen=True)
class Method:
    """One registry entry: a training method."""

    name: str
    summary: str
    settings: type  # a dataclass of ``setting`` fields: defaults, help, checks
    build: Callable[[Any, BuildContext], torch.nn.Module]  # (settings, context) -> objective
    trains: bool = True  # False: no optimisation step; the run evaluates the untrained network once


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
