"""The registry of data sources, and the data settings.

A source is one module with a loader ``load(Request) -> Splits`` plus one line
in ``SOURCES`` below: its name, loader, training splits, and whether its files
are streamed (decoded by DataLoader workers batch by batch) or held in memory
as one uint8 tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UserError
from ..settings import at_least, setting
from . import cifar, class_split, stl10, stream
from .types import Request, Sets, Splits


@dataclass(frozen=True)
class Source:
    name: str
    load: Callable[[Request], Splits]
    summary: str
    splits: tuple[str, ...] = ("train",)  # training splits; the test split is always "test"
    streamed: bool = False


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("cifar10", cifar.load_cifar10, "CIFAR-10: cifar-10-batches-py, train/ test/ image folders, a .zip, or "
           "torchvision's download"),
    Source("folder", cifar.load_image_folder, "train/<class>/ and test/<class>/ images of one size (or a .zip), "
           "in memory"),
    Source("stl10", stl10.load_stl10, "STL-10 from an stl10_binary folder or torchvision's download",
           splits=("train", "unlabeled", "train+unlabeled")),
    Source("cub200", stream.streamed("cub200", class_split.read_cub, "CUB-200-2011"),
           "CUB-200-2011: classes 1-100 train, 101-200 test", streamed=True),
    Source("cars196", stream.streamed("cars196", class_split.read_cars, "Cars196"),
           "Cars196: classes 1-98 train, 99-196 test", streamed=True),
    Source("sop", stream.streamed("sop", class_split.read_sop, "Stanford Online Products"),
           "Stanford Online Products: Ebay_train.txt / Ebay_test.txt", streamed=True),
    Source("images", stream.streamed("images", class_split.read_class_folders, "image folder"),
           "any image folders: train/<class>/ and test/<class>/, or <class>/ folders split in half", streamed=True),
)}


@dataclass
class DataConfig:
    dataset: str = setting("cifar10", "dataset kind: " + ", ".join(SOURCES) + " (see the README)")
    split: str = setting("train", "training split: train; stl10 also unlabeled, train+unlabeled")
    path: str | None = setting(None, "dataset path: cifar-10-batches-py folder, train/ test/ image folders, a .zip, "
                                     "or the data set's folder", flag="--data", resume=True)
    cache_dir: str | None = setting(None, "where decoded arrays are cached (default $ISIF_CACHE or ~/.cache/isif)",
                                    resume=True)
    train_subset: int | None = setting(None, "train on a stratified slice of N images", check=at_least(1))
    test_subset: int | None = setting(None, "evaluate on a stratified slice of N images", check=at_least(1))
    size: int | None = setting(None, "network input side in pixels (default: the images' own size)",
                               check=at_least(8))
    strict: bool = setting(False, "streamed data sets: stop at the first unreadable image instead of skipping it",
                           resume=True)
    workers: int | None = setting(None, "streamed data sets: DataLoader workers (default cores-1, max 8)",
                                  check=at_least(0), resume=True)

    def check(self) -> None:
        if self.dataset not in SOURCES:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {', '.join(SOURCES)}")


def load_dataset(cfg: DataConfig) -> Splits:
    """The configured source's training and test sets."""
    src = SOURCES.get(cfg.dataset)
    if src is None:
        raise UserError(f"unknown dataset {cfg.dataset!r}; known: {', '.join(SOURCES)}")
    if cfg.split not in src.splits:
        raise UserError(f"dataset {src.name} has no training split {cfg.split!r}; known: {', '.join(src.splits)}")
    return src.load(Request(cfg.path, cfg.cache_dir, cfg.split, cfg.strict, cfg.workers))


def load_sets(cfg: DataConfig) -> Sets:
    """The source's sets with the configured slices applied: training instances, kNN bank, test set."""
    splits = load_dataset(cfg)
    train = splits.train.subset(cfg.train_subset)
    bank = train if splits.bank is None else splits.bank.subset(cfg.train_subset)
    return Sets(splits, train, bank, splits.test.subset(cfg.test_subset))
