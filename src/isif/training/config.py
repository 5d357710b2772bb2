"""The run's config: one section per part, each a dataclass of ``setting`` fields owned by that part.

    data     DataConfig     isif.data.registry     the source and its slices
    model    ModelConfig    isif.models            backbone, width, embedding size, weights
    method   MethodConfig   isif.objectives        the method's name and its own settings dataclass
    augment  AugmentConfig  isif.data.augment      the training views
    optim    OptimConfig    isif.training.optim             SGD and the lr schedule
    sampler  SamplerConfig  isif.training.sampler           how instances are drawn (nearest-neighbour positives)
    eval     EvalConfig     isif.evaluate.protocol the evaluation and its schedule
    train    TrainConfig    here                   the loop: epochs, batch, seed, device, precision
    log      LogConfig      isif.training.runlog            the logger and the step-level scalars

A run's resolved config is saved as JSON in its folder and inside every
checkpoint (``to_dict``), so a run can be resumed or evaluated from the
folder alone. Configs written before the sections existed load through
``_migrate_v1``. Named presets are in ``isif.training.presets``. ``read_config_file``
reads a JSON or YAML file (``isif train --config``) into checked
``{"section.field": value}`` settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..base.device import PRECISIONS
from ..base.errors import UserError
from ..base.settings import at_least, check_fields, field_hints, one_of, optional_inner, setting
from ..data.augment import AugmentConfig
from ..data.registry import DataConfig
from ..evaluate.protocol import EvalConfig
from ..models import ModelConfig
from ..objectives import MethodConfig, method_fields, methods
from .optim import OptimConfig
from .runlog import LogConfig
from .sampler import SamplerConfig

VERSION = 3


@dataclass
class TrainConfig:
    epochs: int | None = setting(200, "training epochs (none: from --budget and the number of images)",
                                 check=at_least(1), resume=True)
    budget: int | None = setting(None, "with --epochs none: the instances to train on in all; epochs = budget / "
                                       "images, between 2 and 200", check=at_least(1))
    batch_size: int = setting(128, "instances per step (a step sees twice as many images)", check=at_least(2))
    seed: int = setting(0, "seed of the model, data order and augmentation")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", resume=True)
    precision: str = setting("fp32", "fp32, bf16, fp16, or fp64 (reference checks)", check=one_of(*PRECISIONS))
    channels_last: bool = setting(False, "channels_last memory format", resume=True)
    compile: bool = setting(False, "torch.compile the network", resume=True)
    deterministic: bool = setting(False, "deterministic algorithms (torch.use_deterministic_algorithms, no cuDNN "
                                         "benchmark): GPU runs resume bit-exact, slower", resume=True)
    sync_bn: bool = setting(False, "under torchrun on GPUs: BatchNorm statistics over the global batch")
    recipe: str = setting("own", "own: each method trains with its recipe (its registry line: augmentation, "
                                 "optimiser, learning rate, heads) over the preset; shared: every method with the "
                                 "preset's", check=one_of("own", "shared"))
    checkpoint_every: int = setting(0, "also write the checkpoint every N optimiser steps inside an epoch (0: at "
                                       "epoch ends only): a resumed or restarted run then redoes at most N steps",
                                    check=at_least(0), resume=True)


    def resolve_epochs(self, images: int) -> int:
        """The epochs to train: ``epochs``, or from ``budget`` and the number of training images."""
        if self.epochs is not None:
            return self.epochs
        if self.budget is None:
            raise UserError("--epochs none needs --budget INSTANCES (or give --epochs N)")
        return int(min(200, max(2, round(self.budget / images))))


SECTIONS = ("data", "model", "method", "augment", "optim", "sampler", "eval", "train", "log")


@dataclass
class Config:
    preset: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def section(self, name: str) -> Any:
        """The dataclass holding a section's fields (for ``method``: the method's settings)."""
        return self.method.settings if name == "method" else getattr(self, name)

    def get(self, path: str) -> Any:
        sec, key = path.split(".")
        return self.method.name if path == "method.name" else getattr(self.section(sec), key)

    def set(self, path: str, value: Any) -> None:
        """Set ``section.field``; ``method.name`` switches to that method with its default settings."""
        sec, key = path.split(".")
        if path == "method.name":
            if value not in methods():
                raise UserError(f"unknown --method {value!r}; known: {', '.join(sorted(methods()))}")
            self.method = MethodConfig.of(value)
            return
        target = self.section(sec)
        if key not in {f.name for f in dataclasses.fields(target)}:
            raise KeyError(path)
        setattr(target, key, value)

    def to_dict(self) -> dict:
        d = {"version": VERSION, "preset": self.preset}
        for name in SECTIONS:
            if name == "method":
                d[name] = {"name": self.method.name, **_plain(dataclasses.asdict(self.method.settings))}
            else:
                d[name] = _plain(dataclasses.asdict(getattr(self, name)))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        d = dict(d)
        version = d.pop("version", 1)
        if version < 2:
            d = _migrate_v1(d)
        if version < 3:
            d = _migrate_v2(d)
        unknown = set(d) - set(SECTIONS) - {"preset"}
        if unknown:
            raise UserError(f"unknown config key {sorted(unknown)[0]!r}; known: preset, {', '.join(SECTIONS)}")
        cfg = cls(preset=d.get("preset", "custom"))
        for name in SECTIONS:
            values = dict(d.get(name, {}))
            if name == "method":
                cfg.set("method.name", values.pop("name", "isif"))
            target = cfg.section(name)
            hints = field_hints(type(target))
            for key, value in values.items():
                if key not in hints:
                    raise UserError(f"unknown config key {name}.{key}")
                setattr(target, key, tuple(value) if isinstance(value, list) else value)
        return cfg

    def validate(self) -> Config:
        """Raise UserError naming the first bad value and its fix."""
        for name in SECTIONS:
            try:
                if name == "method":
                    self.method.check()
                check_fields(self.section(name))
            except ValueError as e:
                raise UserError(str(e)) from None
        return self


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


_EVAL_V1 = {"eval_every": "every", "eval_protocol": "protocol", "retrieval_ks": "retrieval_ks", "knn_k": "knn_k",
            "knn_sigma": "knn_sigma", "eval_batch_size": "batch_size"}


def _looks_v1(d: dict) -> bool:
    """A config without "version": v1 when it holds a key only v1 had (the evaluation inside ``train``, the
    nearest-neighbour positive inside ``method``); else a current one, written by hand."""
    train, method = d.get("train"), d.get("method")
    return ((isinstance(train, dict) and any(k in train for k in _EVAL_V1))
            or (isinstance(method, dict) and "nn_positive" in method))


def _migrate_v1(d: dict) -> dict:
    """A config from before the sections: one flat method dict of every method's fields, the evaluation and the
    nearest-neighbour positive inside ``train`` and ``method``."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    method, train = d.get("method", {}), d.get("train", {})
    name = method.get("name", "isif")
    keep = method_fields(name) if name in methods() else set()
    d["sampler"] = {"nn_positive": method.get("nn_positive", 0.0)}
    d["method"] = {"name": name, **{k: v for k, v in method.items() if k in keep and v is not None}}
    d["eval"] = {new: train.pop(old) for old, new in _EVAL_V1.items() if old in train}
    if d.get("model", {}).get("weights") == "none":
        d["model"]["weights"] = None
    return d


_V2_METHODS = {"moco": {"symmetric": False, "projector_bn": True}}  # what runs made before version 3 trained with


def _migrate_v2(d: dict) -> dict:
    """A config from before the methods' own recipes: settings added since, at the values those runs used (MoCo:
    the asymmetric loss and a BatchNorm in its projector), so an old run resumes and loads as it was; a method that
    has a recipe now trained with the preset's then."""
    from ..objectives import get_method

    method = dict(d.get("method", {}))
    name = method.get("name", "isif")
    d = {**d, "method": {**_V2_METHODS.get(name, {}), **method}}
    if name in methods() and get_method(name).recipe is not None:
        d["train"] = {"recipe": "shared", **d.get("train", {})}
    return d


# ----------------------------------------------------------------------------- config files


def read_config_file(path: str | os.PathLike) -> tuple[str | None, dict[str, Any]]:
    """(the file's "preset" or None, its settings as {"section.field": value}), from JSON or YAML.

    Any part of a config dict will do (a run's config.json is a whole one; v1 ones migrate). Every mistake is a
    UserError of one line: a parse error with its line and column, an unknown key with the nearest valid one, a
    value of the wrong type with its key. Method settings are checked against the method by ``check_method_keys``.
    """
    where = f"--config {path}"
    d = _parse(Path(path), where)
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a mapping of sections ({', '.join(SECTIONS)}), got {_kind(d)}")
    for key in d:
        if key not in ("version", "preset", *SECTIONS):
            raise UserError(f"{where}: unknown key {key}{_nearest(str(key), ('version', 'preset', *SECTIONS))}")
    version = d.get("version", 1 if _looks_v1(d) else VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
        raise UserError(f"{where}: version {version!r} is not one this isif reads (1 to {VERSION}); is the file from "
                        "a newer isif?")
    d = _migrate_v1(d) if version < 2 else d
    name = d.get("preset")
    if name is not None and not isinstance(name, str):
        raise UserError(f"{where}: preset must be a preset's name, got {name!r}")
    hints = {sec: _method_hints() if sec == "method" else field_hints(type(Config().section(sec))) for sec in SECTIONS}
    out: dict[str, Any] = {}
    for sec in SECTIONS:
        values = d.get(sec, {})
        if not isinstance(values, dict):
            raise UserError(f"{where}: {sec} must be a mapping of its settings, got {_kind(values)}")
        for key in values:
            if key not in hints[sec] and not (sec == "method" and key == "name"):
                other = [f"{o}.{key}" for o in SECTIONS if key in hints[o]]  # a setting in the wrong section
                near = f"; did you mean {other[0]}?" if other else _nearest(str(key), hints[sec], f"{sec}.")
                raise UserError(f"{where}: unknown key {sec}.{key}{near}")
        for key, value in values.items():
            if sec == "method" and key == "name":
                if value not in methods():
                    raise UserError(f"{where}: unknown method {value!r}{_nearest(str(value), methods())}")
                out["method.name"] = value
            else:
                out[f"{sec}.{key}"] = _typed(value, hints[sec][key], f"{where}: {sec}.{key}")
    return name, out


def check_method_keys(settings: dict[str, Any], allowed: set[str], path: str | os.PathLike) -> None:
    """Refuse a file's method setting that none of the ``allowed`` methods (the file's, and the one a --method
    flag chose) has."""
    have = set().union(*(method_fields(m) for m in allowed))
    for key in settings:
        sec, name = key.split(".")
        if sec == "method" and name != "name" and name not in have:
            owners = [m for m in sorted(methods()) if name in method_fields(m)]
            raise UserError(f"--config {path}: {key} is a setting of {', '.join(owners)}, not of method "
                            f"{' or '.join(sorted(allowed))}; drop it or choose one of those methods")


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading 1e-3 as a number as YAML 1.2 does (1.1 needs a dot: 1.0e-3)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$"), list("-+0123456789."))


def _parse(path: Path, where: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if path.suffix.lower() == ".json" or (path.suffix.lower() not in (".yaml", ".yml")
                                          and text.lstrip().startswith("{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where} is not valid YAML: {what}{at}") from None


def _nearest(key: str, valid, prefix: str = "") -> str:
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    if near:
        return f"; did you mean {prefix}{near[0]}?"
    valid = list(valid)
    return f"; valid: {', '.join(prefix + v for v in valid[:12])}{', ...' if len(valid) > 12 else ''}"


def _method_hints() -> dict[str, Any]:
    """Every method setting's type (a name means one thing in every method that has it)."""
    return {k: h for m in methods().values() for k, h in field_hints(m.settings).items()}


_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _typed(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the setting's type (a list becomes a tuple, an integer a float where a number is wanted; null
    or "none" clears an optional setting, as ``none`` does on the command line), or a UserError naming ``key``."""
    inner, optional = optional_inner(hint)
    if optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
        return None
    if typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        n = None if args[-1] is Ellipsis else len(args)
        if isinstance(value, (list, tuple)) and (n is None or len(value) == n):
            items = [_scalar(v, args[0]) for v in value]
            if all(v is not _BAD for v in items):
                return tuple(items)
        words = f"a list of {n or ''} {'integers' if args[0] is int else 'numbers'}".replace("  ", " ")
    else:
        typed = _scalar(value, inner)
        if typed is not _BAD:
            return typed
        words = _WORDS.get(inner, str(inner))
    got = "null" if value is None else repr(value)
    raise UserError(f"{key} must be {words}{' or null' if optional else ''}, got {got}")


_BAD = object()


def _scalar(value: Any, kind: Any) -> Any:
    if kind is bool:
        return value if isinstance(value, bool) else _BAD
    if isinstance(value, bool):
        return _BAD
    if kind is int:
        return value if isinstance(value, int) else _BAD
    if kind is float:
        return float(value) if isinstance(value, (int, float)) else _BAD
    return value if isinstance(value, kind) else _BAD


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false",
            type(None): "null"}.get(
        type(value), type(value).__name__)
