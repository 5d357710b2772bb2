"""One registry of training methods.

Each entry builds the objective module from the method config. The module
declares what the training loop must feed it:

- ``views``: a tuple naming each view of an instance, ``"augment"`` for a
  random augmentation or ``"plain"`` for the test transform. ``z`` then holds
  ``len(views) * B`` rows, view v of instance i at row ``v * B + i``.
- optional hooks, looked up with ``getattr``, so that methods with a memory
  bank or a clustering step can join without a base class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    build: Callable[..., nn.Module]


_REGISTRY: dict[str, Method] = {}


def register(name: str, summary: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise KeyError(f"method {name!r} registered twice")
        _REGISTRY[name] = Method(name, summary, fn)
        return fn

    return deco


def methods() -> dict[str, Method]:
    return dict(_REGISTRY)


def build_objective(name: str, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name].build(**kwargs)
