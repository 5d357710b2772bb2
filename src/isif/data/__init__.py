"""Data: sources (one module each, one line in ``registry.SOURCES``), their shared types, batched augmentation."""

from .augment import AugmentConfig, BatchAugment, PlainTransform, build_transforms
from .registry import SOURCES, DataConfig, Source, load_dataset, load_sets
from .types import ArrayDataset, LazyImages, Request, Sets, Splits

__all__ = ["SOURCES", "ArrayDataset", "AugmentConfig", "BatchAugment", "DataConfig", "LazyImages", "PlainTransform",
           "Request", "Sets", "Source", "Splits", "build_transforms", "load_dataset", "load_sets"]
