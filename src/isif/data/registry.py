"""The registry of data sources, and the data settings.

A source is one module with a loader ``load(Request) -> Splits`` plus one line
in ``SOURCES`` below: its name, loader, training splits, whether its files
are streamed (decoded by DataLoader workers batch by batch) or held in memory
as one uint8 tensor, how a path in its layout is recognised (``markers``,
``detect``), and whether it has labels (``labelled``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..base.errors import UserError
from ..base.settings import NON_NEGATIVE, at_least, setting
from . import cifar, class_split, stl10, stream, unlabelled
from .evaldata import load_eval_data
from .types import ArrayDataset, Request, Sets, Splits


@dataclass(frozen=True)
class Source:
    name: str
    load: Callable[[Request], Splits]
    summary: str
    splits: tuple[str, ...] = ("train",)  # training splits; the test split is always "test"
    streamed: bool = False
    markers: tuple[str, ...] = ()  # files that, all present in a folder, mark it as this source's layout
    detect: Callable[[Path], bool] | None = None  # for a layout marker files cannot name: is this path one?
    labelled: bool = True  # False: images without labels (label-free metrics; labelled ones come by --eval-data)

    def detects(self, path: Path) -> bool:
        """Is ``path`` (a folder or a file) in this source's layout, by its markers or its ``detect``?"""
        if self.markers and path.is_dir() and all((path / m).exists() for m in self.markers):
            return True
        return self.detect is not None and self.detect(path)


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("cifar10", cifar.load_cifar10, "CIFAR-10: cifar-10-batches-py, train/ test/ image folders, a .zip, or "
           "torchvision's download", detect=cifar.detect),
    Source("folder", cifar.load_image_folder, "train/<class>/ and test/<class>/ images of one size (or a .zip), "
           "in memory", detect=cifar.detect),
    Source("stl10", stl10.load_stl10, "STL-10 from an stl10_binary folder or torchvision's download",
           splits=("train", "unlabeled", "train+unlabeled")),
    Source("cub200", stream.streamed("cub200", class_split.read_cub, "CUB-200-2011"),
           "CUB-200-2011: classes 1-100 train, 101-200 test", streamed=True, markers=("images.txt",)),
    Source("cars196", stream.streamed("cars196", class_split.read_cars, "Cars196"),
           "Cars196: classes 1-98 train, 99-196 test", streamed=True, markers=("cars_annos.mat",)),
    Source("sop", stream.streamed("sop", class_split.read_sop, "Stanford Online Products"),
           "Stanford Online Products: Ebay_train.txt / Ebay_test.txt", streamed=True, markers=("Ebay_train.txt",)),
    Source("images", stream.streamed("images", class_split.read_class_folders, "image folder"),
           "any image folders: train/<class>/ and test/<class>/, or <class>/ folders split in half", streamed=True,
           detect=cifar.split_folders),
    Source("unlabelled", unlabelled.load_unlabelled, "any folder (any depth) or .zip of images, no labels: "
           "label-free metrics on a held-out slice, labelled evaluation with --eval-data", streamed=True,
           labelled=False),
)}

HOLDOUT_SEED = 20190615  # the held-out images depend on the image list only, not on the run's seed
HOLDOUT_MAX = 5000


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
    memory_gib: float = setting(2.0, "unlabelled images: decode them once and hold them in memory when their "
                                     "stored pixels fit in this many GiB (cached on disk for the next run); larger "
                                     "sets are decoded by the workers every epoch; 0: always", check=NON_NEGATIVE,
                                resume=True)
    holdout: float | None = setting(None, "images held out of training for the label-free metrics: a fraction "
                                          "(<1) or a count; default 2% (at least min(64, 10%), at most 5,000) for "
                                          "unlabelled data, none for labelled data; 0 turns them off",
                                    check=NON_NEGATIVE)
    eval_path: str | None = setting(None, "labelled images to evaluate on while training on unlabelled ones: "
                                          "train/ and test/ class folders (kNN) or one tree of class folders "
                                          "(Recall@K), a folder or a .zip", flag="--eval-data", resume=True)

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
    return src.load(Request(cfg.path, cfg.cache_dir, cfg.split, cfg.strict, cfg.workers, cfg.size, cfg.memory_gib))


def holdout_count(holdout: float | None, n: int, labelled: bool) -> int:
    """How many of ``n`` training images to hold out (see ``DataConfig.holdout``)."""
    if holdout is None:  # 2%, at least min(64, 10%) and 2, at most 5,000; none below 8 images
        return 0 if labelled or n < 8 else min(HOLDOUT_MAX, max(round(0.02 * n), min(64, n // 10), 2))
    if holdout >= 1 and holdout != int(holdout):
        raise UserError(f"--holdout {holdout}: a count must be a whole number (or a fraction below 1)")
    count = int(holdout) if holdout >= 1 else round(holdout * n)
    if count >= n:
        raise UserError(f"--holdout {holdout:g} holds out {count} of the {n} training images and leaves none to "
                        "train on; lower it")
    return count


def split_holdout(train: ArrayDataset, count: int) -> tuple[ArrayDataset, ArrayDataset | None]:
    """(the images to train on, the held-out ones): a seeded choice that depends on the images alone."""
    if count == 0:
        return train, None
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    held, kept = torch.sort(perm[:count]).values, torch.sort(perm[count:]).values
    return train.take(kept), train.take(held)


def load_sets(cfg: DataConfig) -> Sets:
    """The source's sets with the configured slices applied: training instances, kNN bank, test set, and the
    held-out images; with ``eval_path``, bank and test come from there."""
    splits = load_dataset(cfg)
    train = splits.train.subset(cfg.train_subset)
    labelled = splits.test is not None
    train, holdout = split_holdout(train, holdout_count(cfg.holdout, len(train), labelled))
    if cfg.eval_path is not None:
        bank, test = load_eval_data(cfg.eval_path, int(train.images.shape[-1]), cfg.strict, cfg.workers,
                                    cfg.cache_dir)
        return Sets(splits, train, bank, test.subset(cfg.test_subset), holdout)
    if splits.test is None:
        return Sets(splits, train, None, None, holdout)
    bank = train if splits.bank is None else splits.bank.subset(cfg.train_subset)
    return Sets(splits, train, bank, splits.test.subset(cfg.test_subset), holdout)


def labelled_layout(path: str) -> bool:
    """Is ``path`` in the layout of a labelled source (by each ``Source``'s ``markers`` and ``detect``: CIFAR
    batches, train/ and test/ class folders or their .zip, CUB-200, Cars196, SOP)? If not, ``isif train --data
    PATH`` treats it as unlabelled images."""
    p = Path(path).expanduser()
    return any(s.labelled and s.detects(p) for s in SOURCES.values())
