"""The data types every source produces and every consumer reads."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LazyImages(Protocol):
    """An (N, 3, S, S) uint8 image array decoded on demand (files streamed through DataLoader workers).

    In-memory sources hold a plain ``torch.Tensor`` instead; consumers tell the
    two apart with ``isinstance(images, LazyImages)``.
    """

    @property
    def shape(self) -> tuple[int, int, int, int]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, key) -> LazyImages | torch.Tensor: ...

    def select(self, idx: torch.Tensor) -> LazyImages:
        """Another lazy array of the images at ``idx``."""
        ...

    def batches(self, index_lists: list[list[int]], pin: bool = False) -> Iterator[torch.Tensor]:
        """Decode each list of indices as one batch, in order."""
        ...

    def sequential(self, batch_size: int, pin: bool = False) -> Iterator[torch.Tensor]:
        """All images in order, in batches."""
        ...


Images = torch.Tensor | LazyImages


@dataclass
class ArrayDataset:
    """A labelled image set: images (N, 3, H, W) uint8, in memory or lazy; labels (N,) int64 (-1: unlabelled);
    classes: names by label."""

    images: Images
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, n: int | None) -> ArrayDataset:
        """The first ``n // classes`` images of each class, in the original order (a stratified slice)."""
        if n is None or n >= len(self):
            return self
        if not self.classes:  # unlabelled: the first n
            return self.take(torch.arange(n))
        return self.take(stratified_index(self.labels, len(self.classes), n))

    def take(self, idx: torch.Tensor) -> ArrayDataset:
        """The images at the (sorted) indices ``idx``; lazy images stay lazy."""
        images = self.images.select(idx) if isinstance(self.images, LazyImages) else self.images[idx].contiguous()
        return ArrayDataset(images, self.labels[idx].contiguous(), self.classes)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def stratified_index(labels: torch.Tensor, num_classes: int, n: int) -> torch.Tensor:
    """Sorted indices of the first ``n // num_classes`` items of each class."""
    per_class = max(1, n // max(1, num_classes))
    keep = [torch.nonzero(labels == c).squeeze(1)[:per_class] for c in range(num_classes)]
    return torch.sort(torch.cat(keep)).values


@dataclass
class Splits:
    """What a source gives: the training instances, the test set (``None`` for an unlabelled source), the
    normalisation, the labelled kNN bank when ``train`` holds unlabelled images (STL-10's unlabeled split), and how
    the source fitted a file of any shape into a training image (recorded in the run's input spec)."""

    train: ArrayDataset
    test: ArrayDataset | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bank: ArrayDataset | None = None
    fit: str = "square"  # how a file became a training image: "square" (stored at one size), "crop" (fit_square)


@dataclass
class Sets:
    """The configured slices of a source: the training instances; the labelled bank and test set (``None``
    without labels: an unlabelled source and no ``--eval-data``); the held-out unlabelled images of the
    label-free metrics (``None`` without a holdout)."""

    splits: Splits
    train: ArrayDataset
    bank: ArrayDataset | None
    test: ArrayDataset | None
    holdout: ArrayDataset | None = None


@dataclass(frozen=True)
class Request:
    """What a source's loader is asked for: where the data is and how to read it."""

    path: str | None
    cache_dir: str | None = None
    split: str = "train"
    strict: bool = False  # streamed sources: refuse the first broken file instead of skipping it
    workers: int | None = None  # streamed sources: DataLoader workers
    size: int | None = None  # the network's input side, when set (unlabelled images are stored at it)
    memory_gib: float = 2.0  # unlabelled images: held in memory, decoded once, when their pixels fit
