"""Any folder or ``.zip`` of images, without labels: the user's own photos as a training set.

``find_images(path)`` lists every image under a folder (any depth) or inside a
zip, in a fixed order (sorted by path), and counts what it leaves out:

- hidden files and folders (a name starting with ``.``, and macOS's ``__MACOSX``);
- files that are not images by their extension (upper-case extensions count as images);
- folders reached again through a symbolic link (a link loop is followed once, never forever).

``load_unlabelled`` scans the images once (every file decoded, in parallel,
cached; broken, truncated and oversized files are skipped with a count, or
refused with ``--strict``). Each image is stored at ``side`` x ``side``
pixels: the shorter side resized to ``side`` and the centre square kept, so
mixed sizes and aspect ratios are never stretched. When the stored pixels fit
in ``--memory-gib`` they are decoded once (by the workers) and held in memory,
cached on disk for the next run; larger sets stay files, decoded by DataLoader
workers batch by batch every epoch. The normalisation is the images' own per-channel mean and
standard deviation, measured by the scan. Nothing is ever written into the
folder: caches go to the cache folder.
"""

from __future__ import annotations

import os
import stat
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..base.errors import UserError
from ..base.files import atomic_write_bytes, default_cache_dir
from .decode import is_image_name
from .stream import FileImages, FileReader, scan_files
from .types import ArrayDataset, Images, Request, Splits

DEFAULT_SIDE_MAX = 224  # without --size: the images' median shorter side, at most this


@dataclass
class Found:
    """The images under a folder or in a zip, and what was left out."""

    names: list[str]  # file paths, or member names of ``archive``
    archive: str | None = None
    hidden: int = 0
    other: int = 0
    loops: int = 0

    def note(self, where: str) -> str:
        parts = [f"{self.hidden} hidden" if self.hidden else "", f"{self.other} non-image" if self.other else "",
                 f"{self.loops} repeated folder link(s)" if self.loops else ""]
        parts = [p for p in parts if p]
        return f"isif: {where}: {len(self.names)} images; ignored {', '.join(parts)}" if parts else ""


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _walk(root: Path, found: Found) -> None:
    """Depth-first, sorted by name; a folder (by device and inode) is entered once."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
            if (st.st_dev, st.st_ino) in seen:
                found.loops += 1
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:  # unreadable folder, broken link, a link loop the OS refuses
            found.loops += 1
            continue
        subdirs = []
        for e in entries:
            if _hidden(e.name):
                found.hidden += 1
                continue
            try:
                mode = os.stat(e.path).st_mode  # follows links
            except OSError:
                found.other += 1  # a dangling link or a loop of file links
                continue
            if stat.S_ISDIR(mode):
                subdirs.append(Path(e.path))
            elif stat.S_ISREG(mode) and is_image_name(e.name):
                found.names.append(e.path)
            else:
                found.other += 1
        stack.extend(reversed(subdirs))


def find_images(path: str | os.PathLike) -> Found:
    """Every image under a folder (any depth) or in a .zip, in a fixed order; UserError when there is none."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--data {path}: no such file or folder")
    if p.is_file():
        if not zipfile.is_zipfile(p):
            raise UserError(f"--data {path}: not a folder or a .zip; pass a folder of images or a .zip of one")
        found = Found([], archive=str(p))
        with zipfile.ZipFile(p) as zf:
            for name in sorted(zf.namelist()):
                if name.endswith("/"):
                    continue
                if any(_hidden(part) for part in name.split("/")):
                    found.hidden += 1
                elif is_image_name(name):
                    found.names.append(name)
                else:
                    found.other += 1
    else:
        found = Found([])
        _walk(p, found)
        found.names.sort()
    if not found.names:
        what = "zip" if found.archive else "folder"
        extra = f" (ignored {found.hidden} hidden and {found.other} other files)" if found.hidden + found.other else ""
        raise UserError(f"--data {path}: the {what} holds no images{extra}; isif reads .jpg .png .webp .bmp .tif "
                        ".gif files at any depth")
    return found


def _side(req_size: int | None, short: list[int], bad: dict[int, str]) -> int:
    if req_size is not None:
        return req_size
    sides = [s for i, s in enumerate(short) if i not in bad]
    return int(min(DEFAULT_SIDE_MAX, max(8, int(np.median(sides)))))


def load_unlabelled(req: Request) -> Splits:
    """Every readable image as one unlabelled training set (labels -1; no test split)."""
    if req.path is None:
        raise UserError("dataset unlabelled needs --data PATH: a folder of images (any depth) or a .zip of one")
    found = find_images(req.path)
    if found.note(str(req.path)):
        print(found.note(str(req.path)), file=sys.stderr)
    reader = FileReader(found.archive)
    draft = req.size or DEFAULT_SIDE_MAX  # exact for the median below: JPEGs decode at >= draft pixels
    res = scan_files(found.names, req.strict, req.workers, Path(req.cache_dir) if req.cache_dir else None,
                     "training images", reader, draft)
    keep = [n for i, n in enumerate(found.names) if i not in res.bad]
    if not keep:
        raise UserError(f"--data {req.path}: none of the {len(found.names)} images could be read")
    side = _side(req.size, res.short, res.bad)
    mean, std = res.mean_std()
    images: Images = FileImages(keep, side, req.workers, fit="crop", reader=reader)
    if len(keep) * 3 * side * side <= req.memory_gib * 2**30:
        images = decoded_once(images, Path(req.cache_dir) if req.cache_dir else None, res.key)
    train = ArrayDataset(images, torch.full((len(keep),), -1, dtype=torch.long), [])
    return Splits(train, None, mean, std, fit="crop")  # as FileImages fit them


def decoded_once(images: FileImages, cache_dir: Path | None, key: str | None = None) -> torch.Tensor:
    """Every image decoded by the workers once, exactly as they would be each epoch, as one (N, 3, S, S) uint8
    tensor; cached as .npy (atomically, keyed by the files' fingerprint and the side) for the next run.
    ``key``: that fingerprint when the caller has it (the scan's, of the same files); else computed here."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = key or images.reader.fingerprint(images.paths)
    path = cache_dir / f"pixels-{key[:24]}-{images.store}.npy"
    if path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == images.shape and arr.dtype == np.uint8:
                return torch.from_numpy(arr)
        except (OSError, ValueError):
            pass  # a broken cache is rebuilt
    from tqdm.auto import tqdm

    out = torch.empty(images.shape, dtype=torch.uint8)
    start = 0
    with tqdm(total=len(images), desc="decoding images once", unit="img", disable=None, file=sys.stderr,
              leave=False) as bar:
        for batch in images.sequential(256):
            out[start:start + len(batch)] = batch
            start += len(batch)
            bar.update(len(batch))
    try:
        atomic_write_bytes(path, lambda f: np.save(f, out.numpy(), allow_pickle=False))
    except OSError:
        pass  # the cache is an optimisation
    return out
