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
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..base.errors import UserError
from ..base.files import atomic_write_bytes, default_cache_dir
from .class_split import Listing
from .decode import (
    DEFAULT_MAX_DECODE_BYTES,
    TOO_LARGE,
    BadImage,
    broken_image,
    decode_rgb,
    fit_square,
    max_decode_bytes,
    report_skipped,
    too_large_kind,
)
from .types import ArrayDataset, Request, Splits

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STORE_SIZE = 256  # the paper: resize to 256x256, random (train) or centre (test) 227 crop


def default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


class FileReader:
    """Reads an image's bytes by name: a file path, or a member of a ``.zip`` archive.

    The archive is opened once per process (DataLoader workers reopen it: an
    open ``ZipFile`` cannot cross a fork safely).
    """

    def __init__(self, archive: str | None = None) -> None:
        self.archive = archive
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1

    def __call__(self, name: str) -> bytes:
        if self.archive is None:
            with open(name, "rb") as f:
                return f.read()
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.archive), os.getpid()
        return self._zip.read(name)

    def __getstate__(self) -> dict:
        return {"archive": self.archive}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["archive"])

    def fingerprint(self, names: list[str]) -> str:
        """Changes when any image changes: paths, sizes and mtimes of files, or the archive's members and CRCs."""
        if self.archive is None:
            return _fingerprint(names)
        h = hashlib.sha256(str(Path(self.archive).resolve()).encode())
        with zipfile.ZipFile(self.archive) as zf:
            info = {i.filename: i for i in zf.infolist()}
        for n in names:
            i = info.get(n)
            h.update(f"{n}\0{i.CRC if i else 'missing'}\0{i.file_size if i else -1}\0".encode())
        return h.hexdigest()


FILES = FileReader()


def load_file(path: str, store: int, fit: str = "square", reader: FileReader = FILES) -> torch.Tensor:
    """One image file -> (3, store, store) uint8: resized to the square (``fit="square"``, the paper's 256x256
    for the unseen-category sets) or its shorter side resized and the centre square kept (``fit="crop"``)."""
    if fit == "crop":
        arr = fit_square(decode_rgb(reader(path), path, draft=store), store)
        return torch.from_numpy(np.array(arr)).permute(2, 0, 1).contiguous()
    return load_file_array(decode_rgb(reader(path), path), store)


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
    def __init__(self, paths: list[str], store: int, fit: str, reader: FileReader) -> None:
        self.paths, self.store, self.fit, self.reader = paths, store, fit, reader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_file(self.paths[i], self.store, self.fit, self.reader)


class _Check(torch.utils.data.Dataset):
    """For the scan: ("" when the file decodes, else the reason; the shorter side; the mean and mean square of
    each channel in [0, 1])."""

    def __init__(self, paths: list[str], reader: FileReader, draft: int | None) -> None:
        self.paths, self.reader, self.draft = paths, reader, draft

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, int, list[float]]:
        try:
            arr = decode_rgb(self.reader(self.paths[i]), self.paths[i], draft=self.draft)
        except (BadImage, OSError, KeyError) as e:
            return str(e) or "unreadable", 0, []
        x = arr.reshape(-1, 3).astype(np.float64) / 255.0
        return "", int(min(arr.shape[:2])), [*x.mean(0).tolist(), *(x * x).mean(0).tolist()]


class FileImages:
    """A lazy (N, 3, S, S) uint8 image array backed by files (or the members of a .zip).

    ``images[a:b]`` is another lazy view; ``batches(index_lists)`` decodes
    batches in DataLoader workers, in the given order, optionally pinned.
    """

    def __init__(self, paths: list[str], store: int = STORE_SIZE, workers: int | None = None, fit: str = "square",
                 reader: FileReader = FILES) -> None:
        self.paths = list(paths)
        self.store, self.fit, self.reader = store, fit, reader
        self.workers = default_workers() if workers is None else workers

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), 3, self.store, self.store)

    def __getitem__(self, key) -> FileImages | torch.Tensor:
        if isinstance(key, slice):
            return self._like(self.paths[key])
        idx = key.tolist() if isinstance(key, torch.Tensor) else list(key)
        return self.take(idx)

    def _like(self, paths: list[str]) -> FileImages:
        return FileImages(paths, self.store, self.workers, self.fit, self.reader)

    def select(self, idx: torch.Tensor) -> FileImages:
        """Another lazy array of the given images."""
        return self._like([self.paths[int(i)] for i in idx])

    def take(self, idx: Iterable[int]) -> torch.Tensor:
        """Decode the given images now, in this process: (n, 3, S, S) uint8."""
        return torch.stack([load_file(self.paths[int(i)], self.store, self.fit, self.reader) for i in idx])

    def batches(self, index_lists: list[list[int]], pin: bool = False) -> Iterator[torch.Tensor]:
        """Decode each list of indices as one batch, in order, ahead of use by the workers."""
        if not index_lists:
            return iter(())
        loader = torch.utils.data.DataLoader(
            _Decode(self.paths, self.store, self.fit, self.reader), batch_sampler=index_lists,
            num_workers=self.workers, pin_memory=pin, prefetch_factor=4 if self.workers > 0 else None,
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


@dataclass
class ScanResult:
    """What the scan learned: the broken files (index -> reason), each readable image's shorter side and the
    mean and mean square of its channels (zeros for broken ones)."""

    bad: dict[int, str]
    short: list[int]
    moments: list[list[float]]
    key: str = ""  # the fingerprint of the files scanned (paths, sizes, mtimes or CRCs)

    def mean_std(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """Per-channel mean and standard deviation over the readable images (each image weighs the same)."""
        m = np.asarray([v for i, v in enumerate(self.moments) if i not in self.bad], dtype=np.float64)
        mean, sq = m[:, :3].mean(0), m[:, 3:].mean(0)
        std = np.sqrt(np.maximum(sq - mean * mean, 1e-12))
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)  # type: ignore[return-value]


def _run_scan(paths: list[str], strict: bool, workers: int | None, reader: FileReader, draft: int | None,
              what: str) -> ScanResult:
    from tqdm.auto import tqdm

    w = default_workers() if workers is None else workers
    loader = torch.utils.data.DataLoader(_Check(paths, reader, draft), batch_size=64, num_workers=w,
                                         collate_fn=lambda xs: xs, generator=_quiet_generator())
    res, i = ScanResult({}, [], []), 0
    with tqdm(total=len(paths), desc=f"scanning {what or 'images'}", unit="img", disable=None, file=sys.stderr,
              mininterval=0.5, leave=False) as bar:
        for batch in loader:
            for reason, short, moments in batch:
                if reason:
                    res.bad[i] = reason
                    if strict:
                        raise broken_image(paths[i], reason)
                res.short.append(short)
                res.moments.append(moments or [0.0] * 6)
                i += 1
            bar.update(len(batch))
    return res


def scan_files(paths: list[str], strict: bool = False, workers: int | None = None, cache_dir: Path | None = None,
               what: str = "", reader: FileReader = FILES, draft: int | None = None) -> ScanResult:
    """Decode every file once (in parallel, with a progress bar); cached by the files' paths, sizes and
    modification times (for an archive: its members' CRCs). With ``strict``, raise ``UserError`` naming the
    first broken file. Broken files are reported in one line, images too large to decode (``TooLarge``) in
    another."""
    limit = max_decode_bytes()  # here: a malformed ISIF_MAX_DECODE_MIB is refused in one line, before the workers
    tag = "" if limit == DEFAULT_MAX_DECODE_BYTES else f"-{limit >> 20}m"  # another limit refuses other files
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = reader.fingerprint(paths)
    cache = cache_dir / f"scan2-{key[:24]}-{draft or 0}{tag}.json"
    res: ScanResult | None = None
    if cache.is_file():
        try:
            d = json.loads(cache.read_text())
            res = ScanResult({int(k): v for k, v in d["bad"].items()}, d["short"], d["moments"])
        except (OSError, ValueError, KeyError):
            res = None
    if res is None:
        res = _run_scan(paths, strict, workers, reader, draft, what)
        body = {"bad": {str(k): v for k, v in res.bad.items()}, "short": res.short, "moments": res.moments}
        try:
            atomic_write_bytes(cache, lambda f: f.write(json.dumps(body).encode()))
        except OSError:
            pass  # the scan cache is an optimisation
    res.key = key
    if res.bad and strict:  # from the cache
        raise broken_image(paths[min(res.bad)], res.bad[min(res.bad)])
    big = [paths[i] for i in sorted(res.bad) if TOO_LARGE in res.bad[i]]
    report_skipped([paths[i] for i in sorted(res.bad) if TOO_LARGE not in res.bad[i]], what)
    report_skipped(big, what, kind=too_large_kind(limit))
    return res


def scan(paths: list[str], strict: bool = False, workers: int | None = None, cache_dir: Path | None = None,
         what: str = "") -> list[str]:
    """The paths of the broken files among ``paths`` (see ``scan_files``)."""
    res = scan_files(paths, strict, workers, cache_dir, what)
    return [paths[i] for i in sorted(res.bad)]


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
