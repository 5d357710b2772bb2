"""Shared fixtures: small data sets written in the real on-disk layouts."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
CIFAR_ZIP = SHARED / "cifar10-jpeg.zip"

requires_cifar = pytest.mark.skipif(
    not CIFAR_ZIP.is_file(), reason=f"the shared CIFAR-10 copy is not at {CIFAR_ZIP}"
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Decoded-array caches go to one temporary folder per test session, never the user's cache."""
    monkeypatch.setenv("ISIF_CACHE", str(tmp_path_factory.getbasetemp() / "isif-cache"))
    yield


def class_images(rng: np.random.Generator, n_classes: int, per_class: int,
                 size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is visible: a class colour plus noise, so a network can learn something."""
    colors = rng.integers(30, 225, size=(n_classes, 3))
    xs, ys = [], []
    for c in range(n_classes):
        for _ in range(per_class):
            img = colors[c][None, None, :] + rng.normal(0, 25, size=(size, size, 3))
            xs.append(np.clip(img, 0, 255).astype(np.uint8))
            ys.append(c)
    return np.stack(xs), np.asarray(ys)


def write_image_tree(root: Path, n_classes: int = 4, train_per_class: int = 16, test_per_class: int = 6,
                     ext: str = ".png", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        x, y = class_images(rng, n_classes, per)
        for i, (img, c) in enumerate(zip(x, y, strict=True)):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}{ext}")
    return root


def train_tiny_run(base: Path, *flags: str) -> tuple[Path, Path]:
    """(a run folder trained for one epoch of cifar10-tiny at 1/32 width on a small 3-class image tree, the
    tree): seconds; ``flags`` are added to the train command."""
    from isif.cli import main

    tree = write_image_tree(base / "tree", n_classes=3, train_per_class=8, test_per_class=4)
    run = base / "run"
    assert main(["train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data", str(tree), "--width",
                 "0.03125", "--batch-size", "8", "--knn-k", "5", "--epochs", "1", "--out", str(run), "--quiet",
                 *flags]) == 0
    return run, tree


def write_cifar_batches(root: Path, per_batch: int = 20, seed: int = 0) -> Path:
    """torchvision's cifar-10-batches-py layout: pickled dicts of (n, 3072) uint8 rows."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        x, y = class_images(rng, 10, per_batch // 10)
        data = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": y.tolist(), b"data": data,
                         b"filenames": [b"x.png"] * len(x)}, f)
    labels = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": labels, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f)
    return folder


def use_method(cfg, name: str):
    """Switch ``cfg`` to method ``name`` with settings small enough for the fixtures (NCE noise, clusters, the
    successors' heads and MoCo's queue)."""
    from isif.objectives import method_fields

    cfg.set("method.name", name)
    for key, value in (("nce_noise", 16), ("clusters", 4), ("proj_hidden", 32), ("proj_dim", 16), ("pred_hidden", 8),
                       ("queue", 8), ("prototypes", 16), ("local_crops", 2)):
        if key in method_fields(name):
            cfg.set(f"method.{key}", value)
    return cfg


@pytest.fixture
def image_tree(tmp_path) -> Path:
    return write_image_tree(tmp_path / "tree")


def pytest_configure(config):
    os.environ.setdefault("MPLBACKEND", "Agg")
