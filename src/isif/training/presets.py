"""Named presets: each a row of differences from its parent, one per table of the paper.

``resolve(name, overrides)`` builds the config: the defaults, then every row
from the root down to ``name``, then the method's own recipe (its registry
line's ``Recipe``, unless ``--recipe shared``), then a config file's settings
(``isif train --config``), then ``overrides`` (the command line's flags). A change of
``method.name`` anywhere switches the method first; the other ``method.*``
changes then apply to the chosen method wherever it has that setting (a
preset's ``method.temperature`` reaches every method of a race that has a
temperature).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..base.errors import UserError
from ..objectives import get_method
from .config import Config


@dataclass(frozen=True)
class Preset:
    name: str
    parent: str | None
    doc: str
    changes: dict[str, Any] = field(default_factory=dict)


_CPU = {"model.width": 0.25, "train.epochs": 10, "train.precision": "bf16", "train.channels_last": True,
        "optim.schedule": "cosine", "optim.lr": 0.06, "optim.warmup_epochs": 0.5}
# cifar10-cpu-fast's recipe over cifar10-cpu's: twice the steps (batch 64: +2.8 kNN points after 3 epochs, 8%
# more time an image) and 12 epochs in about the time of 10, evaluated every 4 (a kNN evaluation costs about a
# sixth of an epoch). A new name, not a changed cifar10-cpu: a preset, once released, resolves to the same config.
_CPU_FAST = {"train.batch_size": 64, "train.epochs": 12, "eval.every": 4}
_UNSEEN = {"data.size": 227, "model.arch": "googlenet", "model.weights": "imagenet", "method.temperature": 0.1,
           "augment.crop_mode": "fixed", "augment.crop_scale": None, "augment.jitter": None,
           "augment.grayscale_p": 0.0, "optim.lr": 0.001, "optim.milestones": (), "optim.factors": (),
           "train.batch_size": 64, "train.epochs": 100, "eval.every": 5, "eval.protocol": "retrieval"}
_UNSEEN_DOC = ("files streamed, resized to 256x256, a random 227 crop and flip for training (no colour jitter or "
               "grayscale), the centre 227 crop at test; SGD 0.9, lr 0.001 held constant, tau 0.1, batch 64; "
               "Recall@K and NMI on the held-out classes")

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("cifar10", None, "Table 1: ResNet-18 (CIFAR stem), batch 128, tau 0.1, lr 0.03 x0.1 at 120, x0.01 at "
           "160, 200 epochs"),
    Preset("cifar10-cpu", "cifar10", "A quarter-width ResNet-18 trained for a few epochs: about 15 minutes on 2 "
           "CPU cores", _CPU),
    Preset("cifar10-cpu-fast", "cifar10-cpu", "cifar10-cpu at batch 64 for 12 epochs, kNN every 4: 65% kNN "
           "(JPEG q75) in about the time of cifar10-cpu's 62%", _CPU_FAST),
    Preset("cifar10-tiny", "cifar10", "Seconds on a CPU: a tiny width on a slice of the data. For tests and a "
           "first look", {"model.width": 0.0625, "train.epochs": 2, "train.batch_size": 32,
                          "data.train_subset": 1000, "data.test_subset": 500, "optim.schedule": "cosine",
                          "eval.knn_k": 50}),
    Preset("cifar10-race", "cifar10-cpu", "Fig. 3 at CPU scale: every method on cifar10-cpu's quarter-width "
           "ResNet-18 for 3 epochs; see `isif race`", {"train.epochs": 3}),
    Preset("stl10", "cifar10", "Table 2: ResNet-18 on the 5K labelled STL-10 train images (96x96, pooled over the "
           "whole 12x12 map)", {"data.dataset": "stl10"}),
    Preset("stl10-105k", "stl10", "Table 2: ResNet-18 on STL-10 train + unlabeled (105K images); kNN bank = the 5K "
           "labelled images", {"data.split": "train+unlabeled"}),
    Preset("cifar10-no-crop", "cifar10", "Table 7: cifar10 without RandomResizedCrop (paper: 56.2)",
           {"augment.crop_scale": None}),
    Preset("cifar10-no-gray", "cifar10", "Table 7: cifar10 without RandomGrayscale (paper: 79.3)",
           {"augment.grayscale_p": 0.0}),
    Preset("cifar10-no-jitter", "cifar10", "Table 7: cifar10 without ColorJitter (paper: 75.7)",
           {"augment.jitter": None}),
    Preset("cifar10-no-flip", "cifar10", "Table 7: cifar10 without horizontal flip (paper: 82.6)",
           {"augment.flip": False}),
    Preset("cifar10-no-aug", "cifar10", "Table 8: cifar10 with no augmentation at all (paper: 37.4)",
           {"augment.crop_scale": None, "augment.jitter": None, "augment.grayscale_p": 0.0, "augment.flip": False}),
    Preset("cifar10-hard50", "cifar10", "Table 8: cifar10, only the 50% hardest negatives (paper: 83.2)",
           {"method.negatives": "hard", "method.neg_fraction": 0.5}),
    Preset("cifar10-easy50", "cifar10", "Table 8: cifar10, only the 50% easiest negatives (paper: 57.5)",
           {"method.negatives": "easy", "method.neg_fraction": 0.5}),
    Preset("tiny-imagenet-cpu", "cifar10-cpu", "Unseen classes at CPU scale: quarter-width ResNet-18, 16 epochs on "
           "tiny-imagenet-unseen (about 20 min); 64x64 images, 100 training classes; Recall@K and NMI on 100 other "
           "classes; cifar10-cpu's recipe",
           {"data.dataset": "folder", "train.epochs": 16, "eval.every": 4, "eval.protocol": "retrieval"}),
    Preset("cub200", "cifar10", "Table 3: ImageNet GoogLeNet on CUB-200 classes 1-100, Recall@1/2/4/8 and NMI on "
           "101-200; the positive is the image's pretrained nearest neighbour with probability 1/2; " + _UNSEEN_DOC,
           {**_UNSEEN, "data.dataset": "cub200", "sampler.nn_positive": 0.5}),
    Preset("cars196", "cub200", "Table 4: ImageNet GoogLeNet on Cars196 classes 1-98, Recall@1/2/4/8 and NMI on "
           "99-196", {"data.dataset": "cars196", "sampler.nn_positive": 0.0}),
    Preset("sop", "cars196", "Table 5: ImageNet GoogLeNet on SOP's 11,318 training classes, Recall@1/10/100 and "
           "NMI on the 11,316 others", {"data.dataset": "sop", "eval.retrieval_ks": (1, 10, 100)}),
    Preset("images-cpu", "cifar10-cpu", "Your own unlabelled images on a CPU: a quarter-width ResNet-18 (CIFAR "
           "stem) at 64x64, epochs sized to see about 400,000 images in all (2 to 200 epochs); label-free metrics "
           "on 2% held out (the default for a folder without labels)",
           {"data.dataset": "unlabelled", "data.size": 64, "train.epochs": None, "train.budget": 400_000}),
    Preset("images-gpu", "cifar10", "Your own unlabelled images on a GPU: ResNet-18 (ImageNet stem) at 160x160, "
           "batch 256, bf16, epochs sized to see about 3,000,000 images in all (2 to 200 epochs); label-free "
           "metrics on 2% held out (the default on a GPU)",
           {"data.dataset": "unlabelled", "data.size": 160, "model.arch": "resnet18", "model.weights": None,
            "train.batch_size": 256, "train.precision": "bf16", "train.channels_last": True,
            "optim.schedule": "cosine", "optim.lr": 0.06, "optim.warmup_epochs": 0.5, "train.epochs": None,
            "train.budget": 3_000_000}),
    Preset("sop-resnet18-scratch", "sop", "Table 6: torchvision ResNet-18 from random initialisation on SOP, "
           "Recall@1/10/100 and NMI", {"model.arch": "resnet18", "model.weights": None}),
)}


def default_preset(data: str | None, dataset: str | None, device_type: str) -> str:
    """The preset of ``isif train`` without --preset: images-cpu / images-gpu for unlabelled images (a --data
    path in none of the labelled layouts, or --dataset of a source without labels), else cifar10-cpu."""
    from ..data.registry import SOURCES, labelled_layout

    unlabelled = dataset in SOURCES and not SOURCES[dataset].labelled
    if unlabelled or (dataset is None and data is not None and not labelled_layout(data)):
        return "images-gpu" if device_type == "cuda" else "images-cpu"
    return "cifar10-cpu"


def lineage(name: str) -> list[Preset]:
    """The rows from the root down to ``name``; none for "custom" (a config of the defaults, built in Python)."""
    if name == "custom":
        return []
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; known: {', '.join(PRESETS)} (see `isif presets`)")
    rows: list[Preset] = []
    p: str | None = name
    while p is not None:
        rows.insert(0, PRESETS[p])
        p = PRESETS[p].parent
    return rows


def resolve(name: str, overrides: dict[str, Any] | None = None, strict_method: bool = True,
            file: dict[str, Any] | None = None) -> Config:
    """The config of preset ``name``, then the method's own recipe (unless ``train.recipe`` is "shared"), then a
    config file's settings ``file``, then ``overrides`` (the flags), each {"section.field": value}.

    A method setting in ``overrides`` that the chosen method does not have is a UserError when
    ``strict_method``; preset rows' and the file's method settings apply only where the method has them. The
    recipe's learning rate follows the batch size the rest resolves to.
    """
    overrides = dict(overrides or {})
    preset = [(k, v, False) for p in lineage(name) for k, v in p.changes.items()]
    given = [(k, v, False) for k, v in (file or {}).items()] + [(k, v, True) for k, v in overrides.items()]
    cfg = _apply(name, preset + given, strict_method)
    recipe = get_method(cfg.method.name).recipe
    if recipe is not None and cfg.train.recipe == "own":
        own = [(k, v, False) for k, v in recipe.changes(cfg.train.batch_size).items()]
        cfg = _apply(name, preset + own + given, strict_method)
    _check_contradictions(cfg, {**(file or {}), **overrides})
    return cfg


def _apply(name: str, rows: list[tuple[str, Any, bool]], strict_method: bool) -> Config:
    """A config of the defaults with ``rows`` (key, value, given by the user) set in order, the method first."""
    cfg = Config(preset=name)
    names = [v for k, v, _ in rows if k == "method.name"]
    if names:
        cfg.set("method.name", names[-1])
    for key, value, from_user in rows:
        if key == "method.name":
            continue
        try:
            cfg.set(key, value)
        except KeyError:
            if key.startswith("method."):
                if from_user and strict_method:
                    raise UserError(not_a_setting(key, cfg.method.name)) from None
                continue
            raise
    return cfg


# a setting that only means something when another one says so: (setting, is it honoured, the fix)
_NEEDS = (
    ("optim.lars_eta", lambda c: c.optim.optimizer == "lars", "add --optimizer lars"),
    ("optim.lars_clip", lambda c: c.optim.optimizer == "lars", "add --optimizer lars"),
    ("augment.blur_sigma", lambda c: any(p > 0 for p in c.augment.blur_p), "add --blur-p P"),
    ("augment.solarize_threshold", lambda c: any(p > 0 for p in c.augment.solarize_p), "add --solarize-p P"),
    ("method.local_size", lambda c: getattr(c.method.settings, "local_crops", 0) > 0, "add --local-crops N"),
)


def _check_contradictions(cfg: Config, given: dict[str, Any]) -> None:
    """Settings given at other than their defaults that the resolved run would ignore: a UserError naming the fix
    (a run's recipe can turn off what a flag tunes: DINO's has no local views)."""
    for key, honoured, fix in _NEEDS:
        sec, name = key.split(".")
        if key not in given or honoured(cfg) or not hasattr(cfg.section(sec), name):
            continue
        if given[key] != getattr(type(cfg.section(sec))(), name):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} has no effect in this run ({cfg.method.name}, recipe {cfg.train.recipe}); "
                            f"{fix} or drop {flag}")


def not_a_setting(key: str, method: str) -> str:
    from ..objectives import method_fields, methods

    field_name = key.split(".", 1)[1]
    owners = [m for m in methods() if field_name in method_fields(m)]
    return (f"--{field_name.replace('_', '-')} is a setting of {', '.join(owners)}, not of method {method}; "
            "drop it or choose one of those methods")
