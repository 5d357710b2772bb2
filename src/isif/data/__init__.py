"""Data sources and batched augmentation."""

from .augment import BatchAugment, PlainTransform
from .sources import ArrayDataset, Splits, load_cifar10, load_dataset

__all__ = ["ArrayDataset", "BatchAugment", "PlainTransform", "Splits", "load_cifar10", "load_dataset"]
