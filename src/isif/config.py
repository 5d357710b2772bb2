"""The run's config: one section per part, each a dataclass of ``setting`` fields owned by that part.

    data     DataConfig     isif.data.registry     the source and its slices
    model    ModelConfig    isif.models            backbone, width, embedding size, weights
    method   MethodConfig   isif.objectives        the method's name and its own settings dataclass
    augment  AugmentConfig  isif.data.augment      the training views
    optim    OptimConfig    isif.optim             SGD and the lr schedule
    sampler  SamplerConfig  isif.sampler           how instances are drawn (nearest-neighbour positives)
    eval     EvalConfig     isif.evaluate.protocol the evaluation and its schedule
    train    TrainConfig    here                   the loop: epochs, batch, seed, device, precision

A run's resolved config is saved as JSON in its folder and inside every
checkpoint (``to_dict``), so a run can be resumed or evaluated from the
folder alone. Configs written before the sections existed load through
``_migrate_v1``. Named presets are in ``isif.presets``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .data.augment import AugmentConfig
from .data.registry import DataConfig
from .device import PRECISIONS
from .errors import UserError
from .evaluate.protocol import EvalConfig
from .models import ModelConfig
from .objectives import MethodConfig, method_fields, methods
from .optim import OptimConfig
from .sampler import SamplerConfig
from .settings import at_least, check_fields, field_hints, one_of, setting

VERSION = 2


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
    sync_bn: bool = setting(False, "under torchrun on GPUs: BatchNorm statistics over the global batch")


    def resolve_epochs(self, images: int) -> int:
        """The epochs to train: ``epochs``, or from ``budget`` and the number of training images."""
        if self.epochs is not None:
            return self.epochs
        if self.budget is None:
            raise UserError("--epochs none needs --budget INSTANCES (or give --epochs N)")
        return int(min(200, max(2, round(self.budget / images))))


SECTIONS = ("data", "model", "method", "augment", "optim", "sampler", "eval", "train")


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
        if d.pop("version", 1) < 2:
            d = _migrate_v1(d)
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
