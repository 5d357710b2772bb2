"""One registry of training methods (see ``contract.py`` for what an entry is)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..base.settings import check_fields
from .contract import BuildContext, Method, Objective

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise KeyError(f"method {method.name!r} registered twice")
    _REGISTRY[method.name] = method
    return method


def methods() -> dict[str, Method]:
    """{name: ``Method``} of every registered training method: its ``summary``, its ``settings`` dataclass (the
    fields ``build_objective`` takes as overrides), and ``trains`` (False only for ``random``)."""
    return dict(_REGISTRY)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_fields(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(get_method(name).settings)}


def build_objective(name: str, num_instances: int = 1, dim: int = 128, seed: int = 0, settings: Any = None,
                    engine: str = "torch", features: int = 0, backbone: nn.Module | None = None,
                    total_steps: int = 0, steps_per_epoch: int = 0, **overrides) -> nn.Module:
    """The objective (an ``nn.Module``, called as ``loss = objective(z, instance_idx)``) of method ``name``, from
    its settings (default: the method's defaults) with ``overrides``.

    ``num_instances`` is the training-set size (memory banks, one weight per instance), ``dim`` the embedding
    size, ``seed`` and ``engine`` DeepCluster's k-means; ``features`` the backbone's width (the input of a
    method's own heads), ``backbone`` the network a momentum target copies, ``total_steps`` and
    ``steps_per_epoch`` the run's length and its epochs' in optimiser steps.
    ``z`` holds the views of the batch's B instances,
    (V*B, D), view v of instance i at row v*B + i; ``objective.views`` says how many views and which.

    Raises KeyError for an unknown method, TypeError for a setting the method does not have, ValueError for a
    bad value.

    Example:
        >>> crit = build_objective("isif", temperature=0.2)
        >>> crit.views
        ('augment', 'augment')
    """
    m = get_method(name)
    s = settings if settings is not None else m.settings()
    unknown = set(overrides) - method_fields(name)
    if unknown:
        raise TypeError(f"method {name} has no setting {', '.join(sorted(unknown))}; it has: "
                        f"{', '.join(sorted(method_fields(name))) or 'none'}")
    s = dataclasses.replace(s, **overrides)
    check_fields(s, flags=False)
    obj = m.build(s, BuildContext(num_instances, dim, seed, engine, features, backbone, total_steps,
                                     steps_per_epoch))
    if not isinstance(obj, Objective):
        raise TypeError(f"method {name}: {type(obj).__name__} does not follow the objective contract (views, "
                        "on_epoch_start)")
    return obj
