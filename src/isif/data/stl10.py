"""STL-10 from torchvision's download or a local ``stl10_binary`` folder.

The binary format: ``*_X.bin`` holds uint8 images of 3x96x96, each channel
stored column-major; ``*_y.bin`` holds labels 1..10. Splits: ``train`` (5,000
labelled), ``test`` (8,000), ``unlabeled`` (100,000) and ``train+unlabeled``
(105,000). The files are already raw pixels, so they are memory-mapped and
copied once, with no decode cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..base.errors import UserError
from ..base.files import default_cache_dir
from .types import ArrayDataset, Request, Splits

STL10_MEAN = (0.4467, 0.4398, 0.4066)
STL10_STD = (0.2603, 0.2566, 0.2713)
SIZE = 96


def _find(p: Path) -> Path | None:
    for cand in (p, p / "stl10_binary"):
        if (cand / "train_X.bin").is_file() and (cand / "test_X.bin").is_file():
            return cand
    return None


def read_images(path: Path) -> torch.Tensor:
    """(N, 3, 96, 96) uint8 from an STL-10 ``*_X.bin`` file."""
    size = path.stat().st_size
    if size % (3 * SIZE * SIZE):
        raise UserError(f"{path}: {size} bytes is not a whole number of 3x96x96 images; the file is truncated")
    raw = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, SIZE, SIZE)
    return torch.from_numpy(np.ascontiguousarray(raw.transpose(0, 1, 3, 2)))  # column-major -> row-major


def read_labels(path: Path, n: int) -> torch.Tensor:
    y = np.fromfile(path, dtype=np.uint8).astype(np.int64) - 1  # 1..10 -> 0..9
    if y.shape[0] != n:
        raise UserError(f"{path}: {y.shape[0]} labels for {n} images; the files do not match")
    return torch.from_numpy(y)


def _download(root: Path) -> Path:
    try:
        from torchvision.datasets import STL10

        STL10(str(root), split="train", download=True)
    except Exception as e:  # network errors come in many types
        raise UserError(f"STL-10 is not in {root} and could not be downloaded ({type(e).__name__}); "
                        "pass --data PATH to a local stl10_binary folder") from None
    found = _find(root)
    assert found is not None
    return found


def load_stl10(req: Request) -> Splits:
    path, split = req.path, req.split
    if path is None:
        root = default_cache_dir() / "downloads"
        folder = _find(root) or _download(root)
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise UserError(f"--data {path}: no such file or folder")
        folder = _find(p)
        if folder is None:
            raise UserError(f"--data {path}: expected an stl10_binary folder with train_X.bin, train_y.bin, "
                            "test_X.bin, test_y.bin (and unlabeled_X.bin)")
    names_file = folder / "class_names.txt"
    classes = names_file.read_text().split() if names_file.is_file() else [str(i) for i in range(10)]
    train_x = read_images(folder / "train_X.bin")
    train = ArrayDataset(train_x, read_labels(folder / "train_y.bin", len(train_x)), classes)
    test_x = read_images(folder / "test_X.bin")
    test = ArrayDataset(test_x, read_labels(folder / "test_y.bin", len(test_x)), classes)
    if split == "train":
        return Splits(train, test, STL10_MEAN, STL10_STD)
    unl_path = folder / "unlabeled_X.bin"
    if not unl_path.is_file():
        raise UserError(f"{folder}: split {split!r} needs unlabeled_X.bin")
    unl_x = read_images(unl_path)
    unl = ArrayDataset(unl_x, torch.full((len(unl_x),), -1, dtype=torch.long), classes)
    if split == "unlabeled":
        return Splits(unl, test, STL10_MEAN, STL10_STD, bank=train)
    both = ArrayDataset(torch.cat([train.images, unl.images]), torch.cat([train.labels, unl.labels]), classes)
    return Splits(both, test, STL10_MEAN, STL10_STD, bank=train)
