"""Typed configuration and named presets.

Every default lives here. A run's resolved config is saved as JSON in its
folder and inside every checkpoint, so a run can be resumed or evaluated
from the folder alone.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

from .errors import UserError
from .precision import PRECISIONS


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    split: str = "train"  # the training instances; stl10 also has "unlabeled" and "train+unlabeled"
    path: str | None = None  # None: torchvision's download into the cache
    cache_dir: str | None = None  # None: $ISIF_CACHE or ~/.cache/isif
    train_subset: int | None = None  # a stratified slice of the training set (tests, quick looks)
    test_subset: int | None = None
    size: int | None = None  # network input side; None: the images' own size (in-memory sources)
    strict: bool = False  # streamed sources: stop at the first broken image instead of skipping it
    workers: int | None = None  # streamed sources: DataLoader workers (None: cores - 1, at most 8)


@dataclass
class ModelConfig:
    arch: str = "resnet18_cifar"
    width: float = 1.0  # channel multiplier (resnet18_cifar)
    dim: int = 128  # embedding size
    weights: str | None = None  # torchvision backbones: None, "imagenet" or a state-dict path


@dataclass
class MethodConfig:
    name: str = "isif"
    temperature: float | None = None  # None: the method's default (isif 0.1, npsoftmax/nce 0.07, ...)
    variant: str = "official"  # isif: "official" (reference code) or "paper" (Eq. 7)
    neg_weight: float = 1.0  # isif: the reference code's negM
    negatives: str = "all"  # isif: "all", or Table 8's "hard" / "easy" half
    neg_fraction: float = 0.5  # isif: share of negatives kept by "hard" / "easy"
    memory_momentum: float = 0.5  # npsoftmax, nce: bank update momentum
    nce_noise: int = 4096  # nce: noise samples per instance
    margin: float = 0.5  # triplet: margin on L2-normalised features
    clusters: int = 100  # deepcluster: k of k-means
    kmeans_iters: int = 20  # deepcluster
    nn_positive: float = 0.0  # probability that the second view comes from the image's nearest neighbour
    # in the initial network's feature space (the paper's CUB-200 setting: 0.5)


@dataclass
class AugmentConfig:
    crop_scale: tuple[float, float] | None = (0.2, 1.0)  # None: no RandomResizedCrop
    jitter: tuple[float, float, float, float] | None = (0.4, 0.4, 0.4, 0.4)  # None: no ColorJitter
    grayscale_p: float = 0.2
    flip: bool = True
    crop_mode: str = "resized"  # "resized" (RandomResizedCrop) or "fixed" (RandomCrop of data.size, centre at test)


@dataclass
class OptimConfig:
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"  # "step" or "cosine"
    milestones: tuple[int, ...] = (120, 160)  # step: epochs where the factor changes
    factors: tuple[float, ...] = (0.1, 0.01)  # step: lr multiplier from each milestone on
    warmup_epochs: float = 0.0  # linear warm-up, in epochs (fractions allowed)


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128  # instances per step; a step sees 2 x batch_size images
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    precision: str = "fp32"  # fp32 | bf16 | fp16
    channels_last: bool = False
    compile: bool = False  # torch.compile the network
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch
    eval_every: int = 1  # evaluation every N epochs (and always after the last)
    eval_protocol: str = "auto"  # "knn" (seen classes), "retrieval" (unseen classes), "auto": by the split
    retrieval_ks: tuple[int, ...] = (1, 2, 4, 8)  # Recall@K during training (SOP: 1, 10, 100)
    knn_k: int = 200
    knn_sigma: float = 0.1
    eval_batch_size: int = 256


@dataclass
class Config:
    preset: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return _build(cls, d)

    def validate(self) -> Config:
        """Raise UserError naming the first bad value and its fix."""
        from .data.sources import DATASETS
        from .models import ARCHS
        from .objectives import methods
        from .objectives.isif import VARIANTS

        t, o, m, a = self.train, self.optim, self.method, self.augment
        _check(self.data.dataset in DATASETS, f"unknown dataset {self.data.dataset!r}; known: {', '.join(DATASETS)}")
        _check(self.model.arch in ARCHS, f"unknown --arch {self.model.arch!r}; known: {', '.join(ARCHS)}")
        _check(m.name in methods(), f"unknown --method {m.name!r}; known: {', '.join(sorted(methods()))}")
        _check(m.variant in VARIANTS, f"unknown --variant {m.variant!r}; known: {', '.join(VARIANTS)}")
        _check(m.temperature is None or _pos(m.temperature), f"--temperature must be > 0, got {m.temperature}")
        _check(m.negatives in ("all", "hard", "easy"), f"--negatives must be all, hard or easy, got {m.negatives!r}")
        _check(m.negatives == "all" or m.variant == "official", "--negatives hard/easy needs --variant official")
        _check(0 < m.neg_fraction <= 1, f"neg_fraction must be in (0, 1], got {m.neg_fraction}")
        _check(0 <= m.memory_momentum < 1, f"memory momentum must be in [0, 1), got {m.memory_momentum}")
        _check(m.nce_noise >= 1, f"--nce-noise must be >= 1, got {m.nce_noise}")
        _check(m.margin >= 0, f"--margin must be >= 0, got {m.margin}")
        _check(m.clusters >= 2, f"--clusters must be >= 2, got {m.clusters}")
        _check(0 <= m.nn_positive <= 1, f"--nn-positive must be in [0, 1], got {m.nn_positive}")
        _check(m.kmeans_iters >= 1, f"k-means iterations must be >= 1, got {m.kmeans_iters}")
        _check(_pos(m.neg_weight) and m.neg_weight >= 1, f"--neg-weight must be >= 1, got {m.neg_weight}")
        _check(t.batch_size >= 2, f"--batch-size must be >= 2 (the objective contrasts instances), got {t.batch_size}")
        _check(t.epochs >= 1, f"--epochs must be >= 1, got {t.epochs}")
        _check(t.eval_every >= 1, f"--eval-every must be >= 1, got {t.eval_every}")
        _check(t.eval_protocol in ("auto", "knn", "retrieval"),
               f"--eval-protocol must be auto, knn or retrieval, got {t.eval_protocol!r}")
        _check(len(t.retrieval_ks) >= 1 and all(int(k) >= 1 for k in t.retrieval_ks),
               f"retrieval K values must be >= 1, got {t.retrieval_ks}")
        _check(self.data.size is None or self.data.size >= 8, f"--size must be >= 8 pixels, got {self.data.size}")
        _check(t.knn_k >= 1, f"--knn-k must be >= 1, got {t.knn_k}")
        _check(_pos(t.knn_sigma), f"--knn-sigma must be > 0, got {t.knn_sigma}")
        _check(t.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {t.eval_batch_size}")
        _check(t.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
        _check(_pos(self.model.width), f"--width must be > 0, got {self.model.width}")
        _check(self.model.dim >= 1, f"--dim must be >= 1, got {self.model.dim}")
        _check(_pos(o.lr), f"--lr must be > 0, got {o.lr}")
        _check(0 <= o.momentum < 1, f"momentum must be in [0, 1), got {o.momentum}")
        _check(o.weight_decay >= 0, f"weight decay must be >= 0, got {o.weight_decay}")
        _check(o.schedule in ("step", "cosine"), f"--schedule must be step or cosine, got {o.schedule!r}")
        _check(len(o.milestones) == len(o.factors), "milestones and factors must have the same length")
        _check(o.warmup_epochs >= 0, f"warmup must be >= 0 epochs, got {o.warmup_epochs}")
        if a.crop_scale is not None:
            lo, hi = a.crop_scale
            _check(0 < lo <= hi <= 1, f"crop scale must satisfy 0 < min <= max <= 1, got {a.crop_scale}")
        if a.jitter is not None:
            _check(len(a.jitter) == 4 and all(j >= 0 for j in a.jitter), "jitter needs 4 strengths >= 0")
            _check(a.jitter[3] <= 0.5, f"hue jitter must be <= 0.5, got {a.jitter[3]}")
        _check(a.crop_mode in ("resized", "fixed"), f"crop mode must be resized or fixed, got {a.crop_mode!r}")
        _check(self.data.workers is None or self.data.workers >= 0, f"--workers must be >= 0, got {self.data.workers}")
        _check(0 <= a.grayscale_p <= 1, f"grayscale probability must be in [0, 1], got {a.grayscale_p}")
        for name in ("train_subset", "test_subset"):
            v = getattr(self.data, name)
            _check(v is None or v >= 1, f"--{name.replace('_', '-')} must be >= 1, got {v}")
        return self


def _pos(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise UserError(msg)


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _build(cls, d: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in d.items():
        if key not in names:
            raise UserError(f"unknown config key {cls.__name__}.{key}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value)
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


# ----------------------------------------------------------------------------- presets


def _cifar10() -> Config:
    """Table 1: ResNet-18 (CIFAR stem), batch 128, tau 0.1, lr 0.03 x0.1 at 120, x0.01 at 160, 200 epochs."""
    return Config(preset="cifar10")


def _cifar10_cpu() -> Config:
    """A quarter-width ResNet-18 trained for a few epochs: about 15 minutes on 2 CPU cores."""
    c = Config(preset="cifar10-cpu")
    c.model.width = 0.25
    c.train.epochs = 10
    c.train.precision = "bf16"
    c.train.channels_last = True
    c.train.eval_every = 1
    c.optim.schedule = "cosine"
    c.optim.lr = 0.06
    c.optim.warmup_epochs = 0.5
    return c


def _cifar10_tiny() -> Config:
    """Seconds on a CPU: a tiny width on a slice of the data. For tests and a first look."""
    c = Config(preset="cifar10-tiny")
    c.model.width = 0.0625
    c.train.epochs = 2
    c.train.batch_size = 32
    c.data.train_subset = 1000
    c.data.test_subset = 500
    c.optim.schedule = "cosine"
    c.train.knn_k = 50
    return c


def _stl10() -> Config:
    """Table 2: ResNet-18 on the 5K labelled STL-10 train images (96x96, pooled over the whole 12x12 map)."""
    c = Config(preset="stl10")
    c.data.dataset = "stl10"
    return c


def _stl10_105k() -> Config:
    """Table 2: ResNet-18 on STL-10 train + unlabeled (105K images); kNN bank = the 5K labelled images."""
    c = _stl10()
    c.preset = "stl10-105k"
    c.data.split = "train+unlabeled"
    return c


def _cifar10_race() -> Config:
    """Fig. 3 at CPU scale: every method on cifar10-cpu's quarter-width ResNet-18 for 3 epochs; see `isif race`."""
    c = _cifar10_cpu()
    c.preset = "cifar10-race"
    c.train.epochs = 3
    c.train.precision = "bf16"
    return c


def _tiny_imagenet_cpu() -> Config:
    """Unseen classes at CPU scale: quarter-width ResNet-18, 16 epochs on tiny-imagenet-unseen (about 20 min).

    64x64 images, 100 training classes; Recall@K and NMI on 100 other classes; cifar10-cpu's recipe."""
    c = _cifar10_cpu()
    c.preset = "tiny-imagenet-cpu"
    c.data.dataset = "folder"
    c.train.epochs = 16
    c.train.eval_every = 4
    c.train.eval_protocol = "retrieval"
    return c


def _unseen(name: str, dataset: str, doc: str, arch: str = "googlenet", weights: str | None = "imagenet",
            nn_positive: float = 0.0, ks: tuple[int, ...] = (1, 2, 4, 8)) -> typing.Callable[[], Config]:
    """The unseen-category protocol (Tables 3-6): files streamed, resized to 256x256, a random 227 crop and
    flip for training (no colour jitter or grayscale), the centre 227 crop at test; SGD 0.9, lr 0.001 held
    constant, tau 0.1, batch 64; Recall@K and NMI on the held-out classes."""

    def make() -> Config:
        c = Config(preset=name)
        c.data.dataset = dataset
        c.data.size = 227
        c.model.arch = arch
        c.model.weights = weights
        c.method.temperature = 0.1
        c.method.nn_positive = nn_positive
        c.augment.crop_mode = "fixed"
        c.augment.crop_scale = None
        c.augment.jitter = None
        c.augment.grayscale_p = 0.0
        c.augment.flip = True
        c.optim.lr = 0.001
        c.optim.milestones = ()
        c.optim.factors = ()
        c.train.batch_size = 64
        c.train.epochs = 100
        c.train.eval_every = 5
        c.train.eval_protocol = "retrieval"
        c.train.retrieval_ks = ks
        return c

    make.__doc__ = doc
    return make


def _ablation(name: str, doc: str, change: typing.Callable[[Config], None]) -> typing.Callable[[], Config]:
    def make() -> Config:
        c = Config(preset=name)
        change(c)
        return c

    make.__doc__ = doc
    return make


def _set(section: str, **kw) -> typing.Callable[[Config], None]:
    def change(c: Config) -> None:
        for k, v in kw.items():
            setattr(getattr(c, section), k, v)

    return change


def _no_aug(c: Config) -> None:
    c.augment.crop_scale = None
    c.augment.jitter = None
    c.augment.grayscale_p = 0.0
    c.augment.flip = False


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "cifar10": _cifar10,
    "cifar10-cpu": _cifar10_cpu,
    "cifar10-tiny": _cifar10_tiny,
    "cifar10-race": _cifar10_race,
    "stl10": _stl10,
    "stl10-105k": _stl10_105k,
    "cifar10-no-crop": _ablation("cifar10-no-crop", "Table 7: cifar10 without RandomResizedCrop (paper: 56.2)",
                                 _set("augment", crop_scale=None)),
    "cifar10-no-gray": _ablation("cifar10-no-gray", "Table 7: cifar10 without RandomGrayscale (paper: 79.3)",
                                 _set("augment", grayscale_p=0.0)),
    "cifar10-no-jitter": _ablation("cifar10-no-jitter", "Table 7: cifar10 without ColorJitter (paper: 75.7)",
                                   _set("augment", jitter=None)),
    "cifar10-no-flip": _ablation("cifar10-no-flip", "Table 7: cifar10 without horizontal flip (paper: 82.6)",
                                 _set("augment", flip=False)),
    "cifar10-no-aug": _ablation("cifar10-no-aug", "Table 8: cifar10 with no augmentation at all (paper: 37.4)",
                                _no_aug),
    "cifar10-hard50": _ablation("cifar10-hard50", "Table 8: cifar10, only the 50% hardest negatives (paper: 83.2)",
                                _set("method", negatives="hard", neg_fraction=0.5)),
    "cifar10-easy50": _ablation("cifar10-easy50", "Table 8: cifar10, only the 50% easiest negatives (paper: 57.5)",
                                _set("method", negatives="easy", neg_fraction=0.5)),
    "tiny-imagenet-cpu": _tiny_imagenet_cpu,
    "cub200": _unseen("cub200", "cub200", "Table 3: ImageNet GoogLeNet on CUB-200 classes 1-100, Recall@1/2/4/8 "
                      "and NMI on 101-200; the positive is the image's pretrained nearest neighbour with "
                      "probability 1/2",
                      nn_positive=0.5),
    "cars196": _unseen("cars196", "cars196", "Table 4: ImageNet GoogLeNet on Cars196 classes 1-98, Recall@1/2/4/8 "
                       "and NMI on 99-196"),
    "sop": _unseen("sop", "sop", "Table 5: ImageNet GoogLeNet on SOP's 11,318 training classes, Recall@1/10/100 "
                   "and NMI on the 11,316 others", ks=(1, 10, 100)),
    "sop-resnet18-scratch": _unseen("sop-resnet18-scratch", "sop", "Table 6: torchvision ResNet-18 from random "
                                    "initialisation on SOP, Recall@1/10/100 and NMI", arch="resnet18", weights=None,
                                    ks=(1, 10, 100)),
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; known: {', '.join(PRESETS)} (see `isif presets`)")
    return PRESETS[name]()
