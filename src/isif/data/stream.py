"""Image files streamed through a DataLoader: the unseen-category sets (CUB-200, Cars196, SOP, folders).

These sets are too large, or their images too varied in size, to hold in
memory as one tensor. Workers decode each file and resize it to a fixed
``store`` x ``store`` square (the paper's resize to 256x256); random crops,
flips and colour work then happen on the batch, on the training device, with
parameters from the run's generator, exactly as for the in-memory sources, so
runs stay reproducible and resumable.

Broken files are found once, before training, by a scan that decodes every
image (in parallel, with the workers); its result is cached by the files'
paths, sizes and modification times. Broken files are skipped with a count and
the first few paths, or, with ``strict``, refused naming the first one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..io import atomic_write_bytes, default_cache_dir
from .class_split import Listing
from .decode import BadImage, broken_image, decode_rgb, report_skipped
from .types import ArrayDataset, Request, Splits

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STORE_SIZE = 256  # the paper: resize to 256x256, random (train) or centre (test) 227 crop


def default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def load_file(path: str, store: int) -> torch.Tensor:
    """One image file -> (3, store, store) uint8, resized (bilinear, antialiased) to a square."""
    with open(path, "rb") as f:
        return load_file_array(decode_rgb(f.read(), path), store)


def load_file_array(arr: np.ndarray, store: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, store, store) uint8, as ``load_file``."""
    im = Image.fromarray(arr)
    if im.size != (store, store):
        im = im.resize((store, store), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _quiet_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed from its generator, or else from torch's global RNG; decoding
    needs no randomness, so each loader gets its own generator and the run's global RNG stream (dropout, the
    checkpointed RNG state) does not depend on how many loaders or workers were used."""
    return torch.Generator().manual_seed(0)


class _Decode(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], store: int) -> None:
        self.paths, self.store = paths, store

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_file(self.paths[i], self.store)


class _Check(torch.utils.data.Dataset):
    """For the scan: "" when the file decodes, else the reason."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        try:
            with open(self.paths[i], "rb") as f:
                decode_rgb(f.read(), self.paths[i])
            return ""
        except (BadImage, OSError) as e:
            return str(e) or "unreadable"


class FileImages:
    """A lazy (N, 3, S, S) uint8 image array backed by files.

    ``images[a:b]`` is another lazy view; ``batches(index_lists)`` decodes
    batches in DataLoader workers, in the given order, optionally pinned.
    """

    def __init__(self, paths: list[str], store: int = STORE_SIZE, workers: int | None = None) -> None:
        self.paths = list(paths)
        self.store = store
        self.workers = default_workers() if workers is None else workers

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), 3, self.store, self.store)

    def __getitem__(self, key) -> FileImages | torch.Tensor:
        if isinstance(key, slice):
            return FileImages(self.paths[key], self.store, self.workers)
        idx = key.tolist() if isinstance(key, torch.Tensor) else list(key)
        return self.take(idx)

    def select(self, idx: torch.Tensor) -> FileImages:
        """Another lazy array of the given images."""
        return FileImages([self.paths[int(i)] for i in idx], self.store, self.workers)

    def take(self, idx: Iterable[int]) -> torch.Tensor:
        """Decode the given images now, in this process: (n, 3, S, S) uint8."""
        return torch.stack([load_file(self.paths[int(i)], self.store) for i in idx])

    def batches(self, index_lists: list[list[int]], pin: bool = False) -> Iterator[torch.Tensor]:
        """Decode each list of indices as one batch, in order, ahead of use by the workers."""
        if not index_lists:
            return iter(())
        loader = torch.utils.data.DataLoader(
            _Decode(self.paths, self.store), batch_sampler=index_lists, num_workers=self.workers,
            pin_memory=pin, prefetch_factor=4 if self.workers > 0 else None,
            persistent_workers=False, generator=_quiet_generator())
        return iter(loader)

    def sequential(self, batch_size: int, pin: bool = False) -> Iterator[torch.Tensor]:
        n = len(self.paths)
        return self.batches([list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)], pin)


def _fingerprint(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        except OSError:
            h.update(f"{p}\0missing\0".encode())
    return h.hexdigest()


def scan(paths: list[str], strict: bool = False, workers: int | None = None, cache_dir: Path | None = None,
         what: str = "") -> list[str]:
    """Decode every file once; return the reasons of the broken ones (cached by paths, sizes and mtimes).

    With ``strict``, raise ``UserError`` naming the first broken file.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _fingerprint(paths)
    cache = cache_dir / f"scan-{key[:24]}.json"
    bad: dict[int, str] | None = None
    if cache.is_file():
        try:
            bad = {int(k): v for k, v in json.loads(cache.read_text()).items()}
        except (OSError, ValueError):
            bad = None
    if bad is None:
        w = default_workers() if workers is None else workers
        loader = torch.utils.data.DataLoader(_Check(paths), batch_size=64, num_workers=w,
                                             collate_fn=lambda xs: xs, generator=_quiet_generator())
        bad, i = {}, 0
        for batch in loader:
            for reason in batch:
                if reason:
                    bad[i] = reason
                    if strict:
                        raise broken_image(paths[i], reason)
                i += 1
        try:
            atomic_write_bytes(cache, lambda f: f.write(json.dumps({str(k): v for k, v in bad.items()}).encode()))
        except OSError:
            pass  # the scan cache is an optimisation
    if bad and strict:  # from the cache
        raise broken_image(paths[min(bad)], bad[min(bad)])
    broken = [paths[i] for i in sorted(bad)]
    report_skipped(broken, what)
    return broken


def _dataset(listing: Listing, store: int, strict: bool, workers: int | None, cache_dir: Path | None,
             what: str) -> ArrayDataset:
    paths = [str(p) for p in listing.paths]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing and strict:
        raise UserError(f"{missing[0]}: listed by the annotations but missing; drop --strict to skip it")
    absent = set(missing)
    bad = absent | set(scan([p for p in paths if p not in absent], strict, workers, cache_dir, what))
    report_skipped(missing, what, kind="missing")
    keep = [i for i, p in enumerate(paths) if p not in bad]
    if not keep:
        raise UserError(f"{what}: none of the {len(paths)} listed images could be read")
    labels = torch.tensor([listing.labels[i] for i in keep], dtype=torch.long)
    return ArrayDataset(FileImages([paths[i] for i in keep], store, workers), labels, list(listing.classes))


def streamed(name: str, read: Callable[[Path], dict[str, Listing]], title: str, store: int = STORE_SIZE):
    """The loader of a class-disjoint set whose ``read(root)`` lists its train and test files (see class_split)."""

    def load(req: Request) -> Splits:
        if req.path is None:
            raise UserError(f"dataset {name} needs --data PATH to its folder ({title}; no download exists)")
        root = Path(req.path).expanduser()
        if not root.is_dir():
            raise UserError(f"--data {req.path}: no such folder; dataset {name} reads the {title} folder")
        listings = read(root)
        for split in ("train", "test"):
            if len(listings[split]) == 0:
                raise UserError(f"{root}: no {split} images found in the {title} layout")
        cache = Path(req.cache_dir) if req.cache_dir else None
        sets = [_dataset(listings[s], store, req.strict, req.workers, cache, f"{name} {s}") for s in ("train", "test")]
        return Splits(sets[0], sets[1], IMAGENET_MEAN, IMAGENET_STD)

    return load
