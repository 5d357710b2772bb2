"""Image sources held in memory as one uint8 tensor.

CIFAR-10 is read from any of:

- torchvision's ``cifar-10-batches-py`` folder (or the folder holding it);
- an image-folder tree ``train/<class>/*`` and ``test/<class>/*``;
- a ``.zip`` of that tree (e.g. the shared JPEG copy);
- torchvision's download, when no path is given and the machine is online.

Decoding happens once; the decoded arrays are cached (``.npz``, written
atomically, keyed by the source's content) so the next run starts in seconds.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..faults import fault_point

CACHE_VERSION = 1
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


@dataclass
class ArrayDataset:
    """A labelled image set in memory.

    images: (N, 3, H, W) uint8; labels: (N,) int64; classes: names by label.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> ArrayDataset:
        return ArrayDataset(self.images.to(device), self.labels.to(device), self.classes)

    def subset(self, n: int | None) -> ArrayDataset:
        """The first ``n`` images of each class, interleaved by class (a stratified slice)."""
        if n is None or n >= len(self):
            return self
        idx = stratified_index(self.labels, len(self.classes), n)
        return ArrayDataset(self.images[idx].contiguous(), self.labels[idx].contiguous(), self.classes)


def stratified_index(labels: torch.Tensor, num_classes: int, n: int) -> torch.Tensor:
    """Sorted indices of the first ``n // num_classes`` items of each class."""
    per_class = max(1, n // max(1, num_classes))
    keep = [torch.nonzero(labels == c).squeeze(1)[:per_class] for c in range(num_classes)]
    return torch.sort(torch.cat(keep)).values


@dataclass
class Splits:
    train: ArrayDataset
    test: ArrayDataset
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    source: str
    bank: ArrayDataset | None = None  # labelled set for kNN when ``train`` holds unlabelled images


class BadImage(Exception):
    """An image file that cannot be decoded."""


def decode_rgb(data: bytes, name: str = "") -> np.ndarray:
    """Decode bytes into an (H, W, 3) uint8 RGB array.

    Grey, palette, RGBA (alpha dropped, as PIL's convert does), CMYK and
    16-bit images are converted; anything unreadable raises ``BadImage``.
    """
    if not data:
        raise BadImage(f"{name}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max() > 255 else 255.0
                im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(f"{name}: {e}") from None


def broken_image(path, reason: str) -> UserError:
    """The one-line refusal of ``--strict`` for an image that cannot be decoded."""
    return UserError(f"{path}: unreadable image ({str(reason).split(': ', 1)[-1][:80]}); drop --strict to skip "
                     "broken files")


def report_skipped(items: list[str], what: str = "", kind: str = "unreadable") -> None:
    """One stderr line: how many images were skipped, and the first few."""
    if items:
        where = f" in {what}" if what else ""
        print(f"isif: skipped {len(items)} {kind} image(s){where}, first: {'; '.join(items[:3])}", file=sys.stderr)


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    env = os.environ.get("ISIF_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "isif"


def atomic_write_bytes(path: Path, write, fault_site: str | None = None) -> None:
    """Write a file through ``write(fileobj)`` to a temporary name, fsync, then rename.

    A crash at any point leaves either the old file or the new one, never a
    mix; a failed write (a full disk) removes the temporary file and raises.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if fault_site:
            fault_point(fault_site)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _hash_files(paths: list[Path], root: Path | None = None) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.relative_to(root) if root else p.name).encode() + b"\0")
        h.update(f"{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


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
                raise UserError(
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


def _zip_entries(zf: zipfile.ZipFile) -> list[tuple[str, str, str]]:
    entries = []
    for name in zf.namelist():
        if name.endswith("/") or Path(name).suffix.lower() not in IMAGE_EXTS:
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
                if f.suffix.lower() in IMAGE_EXTS:
                    entries.append((split, cdir.name, str(f)))
    return entries


def _tree_fingerprint(root: Path, entries: list[tuple[str, str, str]]) -> str:
    """The cache key of an image tree: every file's relative path and bytes."""
    return _hash_files([Path(k) for _, _, k in entries], root)


def _find_batches(p: Path) -> Path | None:
    for cand in (p, p / "cifar-10-batches-py"):
        if (cand / "data_batch_1").is_file() and (cand / "test_batch").is_file():
            return cand
    return None


def _torchvision_download(root: Path) -> Path:
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)
    except Exception as e:  # network errors come in many types
        raise UserError(
            f"CIFAR-10 is not in {root} and could not be downloaded ({type(e).__name__}); "
            "pass --data PATH to a local copy (cifar-10-batches-py folder, train/test image folders, or a .zip)"
        ) from None
    found = _find_batches(root)
    assert found is not None
    return found


def load_arrays(path: str | os.PathLike | None, name: str, cache_dir: Path | None = None,
                download_root: Path | None = None) -> tuple[dict[str, np.ndarray], str]:
    """Decode a train/test image source into arrays (cached). Returns (arrays, description)."""
    if path is None:
        root = download_root or default_cache_dir() / "downloads"
        batches = _find_batches(root) or _torchvision_download(root)
        key = _hash_files(sorted(batches.glob("*_batch*")))
        return _cached(key, name, cache_dir, lambda: _read_cifar_batches(batches)), str(batches)
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--data {path}: no such file or folder")
    if p.is_file():
        if not zipfile.is_zipfile(p):
            raise UserError(f"--data {path}: not a .zip; pass a folder or a .zip of train/<class>/ and test/<class>/")
        key = _hash_files([p])

        def build_zip() -> dict[str, np.ndarray]:
            with zipfile.ZipFile(p) as zf:
                return _split_tree(_zip_entries(zf), zf.read)

        return _cached(key, name, cache_dir, build_zip), str(p)
    batches = _find_batches(p)
    if batches is not None:
        key = _hash_files(sorted(batches.glob("*_batch*")))
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


def _to_dataset(arrays: dict[str, np.ndarray], split: str) -> ArrayDataset:
    return ArrayDataset(
        torch.from_numpy(np.ascontiguousarray(arrays[f"{split}_x"])),
        torch.from_numpy(arrays[f"{split}_y"].astype(np.int64)),
        [str(c) for c in arrays["classes"]],
    )


def load_cifar10(path: str | os.PathLike | None = None, cache_dir: Path | None = None,
                 download_root: Path | None = None) -> Splits:
    arrays, desc = load_arrays(path, "cifar10", cache_dir, download_root)
    train, test = _to_dataset(arrays, "train"), _to_dataset(arrays, "test")
    if train.images.shape[1:] != (3, 32, 32):
        raise UserError(f"{desc}: CIFAR-10 images must be 32x32 RGB, got {tuple(train.images.shape[1:])}")
    return Splits(train, test, CIFAR10_MEAN, CIFAR10_STD, "cifar10", desc)


def load_image_folder(path: str | os.PathLike, cache_dir: Path | None = None) -> Splits:
    """Any train/<class>/, test/<class>/ tree (or .zip) of same-size images, in memory."""
    arrays, desc = load_arrays(path, "folder", cache_dir)
    train, test = _to_dataset(arrays, "train"), _to_dataset(arrays, "test")
    x = train.images.float() / 255
    mean = tuple(float(v) for v in x.mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in x.std(dim=(0, 2, 3)))
    return Splits(train, test, mean, std, "folder", desc)  # type: ignore[arg-type]


def _load_stl10(path, cache_dir=None, split="train"):
    from .stl10 import load_stl10

    return load_stl10(path, split)


def _streaming(name: str):
    def load(path, cache_dir=None, **kw):
        from .stream import load_streaming

        return load_streaming(name, path, cache_dir, **kw)

    return load


# in memory: cifar10, folder (same-size images), stl10; streamed from files: cub200, cars196, sop, images
DATASETS = {"cifar10": load_cifar10, "folder": load_image_folder, "stl10": _load_stl10,
            "cub200": _streaming("cub200"), "cars196": _streaming("cars196"), "sop": _streaming("sop"),
            "images": _streaming("images")}
STREAMING = ("cub200", "cars196", "sop", "images")
SPLITS = {"cifar10": ("train",), "folder": ("train",), "stl10": ("train", "unlabeled", "train+unlabeled"),
          **{k: ("train",) for k in STREAMING}}


def load_dataset(name: str, path: str | None, cache_dir: Path | None = None, split: str = "train", *,
                 strict: bool = False, workers: int | None = None) -> Splits:
    """The named source's training and test sets; ``strict`` / ``workers`` apply to streamed sources."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if split not in SPLITS[name]:
        raise UserError(f"dataset {name} has no training split {split!r}; known: {', '.join(SPLITS[name])}")
    if name == "folder" and path is None:
        raise UserError("dataset 'folder' needs --data PATH")
    if name == "stl10":
        return _load_stl10(path, cache_dir, split)
    if name in STREAMING:
        return DATASETS[name](path, cache_dir, strict=strict, workers=workers)  # type: ignore[operator]
    return DATASETS[name](path, cache_dir)  # type: ignore[operator]
