"""Files: atomic writes, content hashes and the cache folder. The bottom layer: imports nothing of isif but
the fault points."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .faults import fault_point


def default_cache_dir() -> Path:
    """``$ISIF_CACHE``, else ``$XDG_CACHE_HOME/isif``, else ``~/.cache/isif``."""
    env = os.environ.get("ISIF_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "isif"


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], object], fault_site: str | None = None) -> None:
    """Write a file through ``write(fileobj)`` to a temporary name, fsync, then rename.

    A crash at any point leaves either the old file or the new one, never a
    mix; a failed write (a full disk) removes the temporary file and raises.
    """
    path = Path(path)
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


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_files(paths: list[Path], root: Path | None = None) -> str:
    """sha256 over each file's name (relative to ``root``, else its base name), size and bytes."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.relative_to(root) if root else p.name).encode() + b"\0")
        h.update(f"{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
