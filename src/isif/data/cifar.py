"""In-memory sources: CIFAR-10 and same-size image trees, decoded once into one uint8 tensor.

CIFAR-10 is read from any of:

- torchvision's ``cifar-10-batches-py`` folder (or the folder holding it);
- an image-folder tree ``train/<class>/*`` and ``test/<class>/*``;
- a ``.zip`` of that tree (e.g. the shared JPEG copy);
- torchvision's download, when no path is given and the machine is online.

Decoding happens once; the decoded arrays are cached (``.npz``, written
atomically, keyed by the source's content) so the next run starts in seconds.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..base.errors import UserError
from ..base.files import atomic_write_bytes, default_cache_dir, hash_files
from .decode import BadImage, decode_rgb, is_image_name, report_skipped
from .types import ArrayDataset, Request, Splits

CACHE_VERSION = 1


class MixedSizes(UserError):
    """An in-memory source met images of different sizes."""
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def _cached(key: str, name: str, cache_dir: Path | None, build) -> dict[str, np.ndarray]:
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"{name}-v{CACHE_VERSION}-{key[:20]}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            pass  # a broken cache is rebuilt
    arrays = build()
    try:
        atomic_write_bytes(path, lambda f: np.savez(f, **arrays))
    except OSError:
        pass  # caching is an optimisation; a read-only or full disk must not stop a run
    return arrays


# ----------------------------------------------------------------------------- readers


def _read_cifar_batches(folder: Path) -> dict[str, np.ndarray]:
    def load(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")  # the official format is a pickle of arrays
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return x, np.asarray(d[b"labels"], dtype=np.int64)

    parts = [load(f"data_batch_{i}") for i in range(1, 6)]
    tx, ty = load("test_batch")
    with open(folder / "batches.meta", "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    classes = [c.decode() for c in meta[b"label_names"]]
    return {
        "train_x": np.concatenate([p[0] for p in parts]),
        "train_y": np.concatenate([p[1] for p in parts]),
        "test_x": tx,
        "test_y": ty,
        "classes": np.array(classes),
    }


def _split_tree(entries: list[tuple[str, str, str]], read) -> dict[str, np.ndarray]:
    """entries: (split, class, key). ``read(key) -> bytes``. Classes sorted by name, as ImageFolder."""
    # classes of both splits: for unseen-category sets the test classes differ from the training ones
    classes = sorted({c for _, c, _ in entries})
    if not any(s == "train" for s, _, _ in entries):
        raise UserError("found no train/<class>/ images; expected train/<class>/*.jpg and test/<class>/*.jpg")
    cidx = {c: i for i, c in enumerate(classes)}
    out: dict[str, np.ndarray] = {"classes": np.array(classes)}
    for split in ("train", "test"):
        items = sorted((c, k) for s, c, k in entries if s == split and c in cidx)
        if not items:
            raise UserError(f"found no {split}/<class>/ images; expected train/<class>/* and test/<class>/*")
        xs, ys, bad = [], [], []
        shape = None
        for c, k in items:
            try:
                arr = decode_rgb(read(k), k)
            except BadImage as e:
                bad.append(str(e))
                continue
            if shape is None:
                shape = arr.shape
            elif arr.shape != shape:
                raise MixedSizes(
                    f"{k}: size {arr.shape[1]}x{arr.shape[0]} differs from {shape[1]}x{shape[0]}; "
                    "an in-memory source needs images of one size"
                )
            xs.append(arr)
            ys.append(cidx[c])
        report_skipped(bad)
        if not xs:
            raise UserError(f"no readable images under {split}/")
        out[f"{split}_x"] = np.ascontiguousarray(np.stack(xs).transpose(0, 3, 1, 2))
        out[f"{split}_y"] = np.asarray(ys, dtype=np.int64)
    return out


def zip_entries(zf: zipfile.ZipFile) -> list[tuple[str, str, str]]:
    entries = []
    for name in zf.namelist():
        if name.endswith("/") or not is_image_name(name):
            continue
        parts = name.split("/")
        for i in range(len(parts) - 2):  # allow a top-level folder above train/ and test/
            if parts[i] in ("train", "test") and i + 2 == len(parts) - 1:
                entries.append((parts[i], parts[i + 1], name))
                break
    return entries


def _dir_entries(root: Path) -> list[tuple[str, str, str]]:
    entries = []
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir():
            continue
        for cdir in sorted(p for p in d.iterdir() if p.is_dir()):
            for f in sorted(cdir.iterdir()):
                if is_image_name(f):
                    entries.append((split, cdir.name, str(f)))
    return entries


def _tree_fingerprint(root: Path, entries: list[tuple[str, str, str]]) -> str:
    """The cache key of an image tree: every file's relative path and bytes."""
    return hash_files([Path(k) for _, _, k in entries], root)


def find_batches(p: Path) -> Path | None:
    for cand in (p, p / "cifar-10-batches-py"):
        if (cand / "data_batch_1").is_file() and (cand / "test_batch").is_file():
            return cand
    return None


def split_folders(p: Path) -> bool:
    """Does folder ``p`` hold ``train/`` and ``test/`` folders (of class folders)?"""
    return (p / "train").is_dir() and (p / "test").is_dir()


def detect(p: Path) -> bool:
    """Is ``p`` in one of the layouts read here: a CIFAR batches folder (or its parent), ``train/`` and ``test/``
    folders, or a .zip of ``train/<class>/`` and ``test/<class>/`` images?"""
    if p.is_dir():
        return find_batches(p) is not None or split_folders(p)
    if p.is_file() and zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as zf:
            return bool(zip_entries(zf))
    return False


def _torchvision_download(root: Path) -> Path:
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)
    except Exception as e:  # network errors come in many types
        raise UserError(
            f"CIFAR-10 is not in {root} and could not be downloaded ({type(e).__name__}); "
            "pass --data PATH to a local copy (cifar-10-batches-py folder, train/test image folders, or a .zip)"
        ) from None
    found = find_batches(root)
    assert found is not None
    return found


def load_arrays(path: str | os.PathLike | None, name: str, cache_dir: Path | None = None,
                download_root: Path | None = None) -> tuple[dict[str, np.ndarray], str]:
    """Decode a train/test image source into arrays (cached). Returns (arrays, description)."""
    if path is None:
        root = download_root or default_cache_dir() / "downloads"
        batches = find_batches(root) or _torchvision_download(root)
        key = hash_files(sorted(batches.glob("*_batch*")))
        return _cached(key, name, cache_dir, lambda: _read_cifar_batches(batches)), str(batches)
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--data {path}: no such file or folder")
    if p.is_file():
        if not zipfile.is_zipfile(p):
            raise UserError(f"--data {path}: not a .zip; pass a folder or a .zip of train/<class>/ and test/<class>/")
        key = hash_files([p])

        def build_zip() -> dict[str, np.ndarray]:
            with zipfile.ZipFile(p) as zf:
                return _split_tree(zip_entries(zf), zf.read)

        return _cached(key, name, cache_dir, build_zip), str(p)
    batches = find_batches(p)
    if batches is not None:
        key = hash_files(sorted(batches.glob("*_batch*")))
        return _cached(key, name, cache_dir, lambda: _read_cifar_batches(batches)), str(batches)
    entries = _dir_entries(p)
    if not entries:
        raise UserError(
            f"--data {path}: found neither cifar-10-batches-py nor train/<class>/ and test/<class>/ images"
        )
    key = _tree_fingerprint(p, entries)

    def read_file(k: str) -> bytes:
        with open(k, "rb") as f:
            return f.read()

    return _cached(key, name, cache_dir, lambda: _split_tree(entries, read_file)), str(p)


def to_dataset(arrays: dict[str, np.ndarray], split: str) -> ArrayDataset:
    return ArrayDataset(
        torch.from_numpy(np.ascontiguousarray(arrays[f"{split}_x"])),
        torch.from_numpy(arrays[f"{split}_y"].astype(np.int64)),
        [str(c) for c in arrays["classes"]],
    )


def load_cifar10(req: Request) -> Splits:
    arrays, desc = load_arrays(req.path, "cifar10", _cache(req))
    train, test = to_dataset(arrays, "train"), to_dataset(arrays, "test")
    if train.images.shape[1:] != (3, 32, 32):
        raise UserError(f"{desc}: CIFAR-10 images must be 32x32 RGB, got {tuple(train.images.shape[1:])}")
    return Splits(train, test, CIFAR10_MEAN, CIFAR10_STD)


def load_image_folder(req: Request) -> Splits:
    """Any train/<class>/, test/<class>/ tree (or .zip) of same-size images, in memory; normalised with the
    training images' own mean and std."""
    if req.path is None:
        raise UserError("dataset 'folder' needs --data PATH")
    arrays, _ = load_arrays(req.path, "folder", _cache(req))
    train, test = to_dataset(arrays, "train"), to_dataset(arrays, "test")
    x = train.images.float() / 255
    mean = tuple(float(v) for v in x.mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in x.std(dim=(0, 2, 3)))
    return Splits(train, test, mean, std)  # type: ignore[arg-type]


def _cache(req: Request) -> Path | None:
    return Path(req.cache_dir) if req.cache_dir else None
