"""The embed folder that ``isif embed`` writes, and its one owner: written, read, checked, labelled.

    EMBED_DIR/shards/        NAME.npy features + NAME.json their files, the unit of resuming (``EmbedWriter``),
                             + NAME.pixels.npy their pixel statistics (``pixel_stats.py``; ``EmbedDir.pixels``)
    EMBED_DIR/paths.txt      one image path a line, relative to the image root
    EMBED_DIR/index.json     root (the image folder), checkpoint, checkpoint_sha256, images, dim, shards,
                             segments (which shard rows make the collection, in paths.txt's order), features_id,
                             input (the network's input spec, ``InputSpec.to_dict()``) and calibration (the
                             near-duplicate threshold measured on the collection, ``calibration.py``)
    EMBED_DIR/features.npy   (N, D) float32, row i the embedding of paths.txt's line i: a copy of the segments for
                             other tools, written only up to ``FEATURES_NPY_MAX`` images; isif reads the shards

The features are the shards themselves, memory-mapped (``rows.Rows``): ``segments`` lists [shard, first row, end
row) ranges whose concatenation is the collection, so no consolidated copy is needed and 100M embeddings never
sit in memory. Row ids are stable: a rerun that adds files appends them (in their sorted order) after the rows
kept, so an index over the old rows can be extended (``index.extend_index``); removed and changed files drop out.
``features_id`` names the features exactly (the checkpoint and the segments, whose shard names hash their files),
so an index or a derived file knows which rows it was made for without hashing gigabytes. A folder written before
the segments (features.npy alone) is read as before.

``load_embed_dir(folder, checkpoint_sha256=None, dim=None)`` reads the three files and refuses, in one line naming
the fix, a missing or unreadable file, features that are not a non-empty (N, D) array of finite floats, rows and
paths that disagree in number, an index.json without its image root, features of another checkpoint (when
``checkpoint_sha256`` is given) and features of another size (when ``dim`` is given).

The class of an image (``class_labels``, ``label_of``): the first folder of its path under the image root,
``root/<class>/.../file``. That is the class of ImageFolder and of isif's own labelled folders (``--eval-data``,
``--dataset images``), it stays the class when a class folder has sub-folders (albums by year), and on a one-level
class tree it is the parent folder. Files directly in the root are labelled "(top level)". A collection has labels
only when at least two labels occur and some folder holds several images; else there is nothing to tell apart.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from ..base.errors import UserError
from ..base.faults import fault_point
from ..base.files import atomic_write_bytes, sha256_file
from ..data.input_spec import InputSpec
from .pixel_stats import COLUMNS as PIXEL_COLUMNS
from .pixel_stats import VERSION as PIXELS_VERSION
from .rows import BLOCK, Rows, unit_rows  # noqa: F401  (unit_rows: re-exported)

FEATURES, PATHS, INDEX = "features.npy", "paths.txt", "index.json"
PIXELS_SUFFIX = ".pixels.npy"  # beside each shard: its rows' pixel statistics (pixel_stats.py)
FEATURES_NPY_MAX = 1_000_000  # features.npy is written up to here (512 MiB at 128-d); isif itself reads the shards
FIRST = "run `isif embed CHECKPOINT FOLDER --out DIR` first"
TOP_LEVEL = "(top level)"


@dataclass
class EmbedDir:
    folder: Path
    features: Rows  # (N, D) float32 on disk, rows re-normalised to unit length when read (unless unit=False)
    paths: list[str]  # relative to root, as in paths.txt
    root: Path  # the image folder (index.json's "root")
    meta: dict[str, Any] = field(default_factory=dict)  # index.json

    def image(self, i: int) -> Path:
        return self.root / self.paths[i]

    @property
    def checkpoint(self) -> str | None:
        """The checkpoint that embedded the folder, as recorded (it may have moved since)."""
        return self.meta.get("checkpoint")

    @property
    def checkpoint_sha256(self) -> str | None:
        return self.meta.get("checkpoint_sha256")

    @functools.cached_property
    def features_id(self) -> str:
        """What names these features exactly: index.json's ``features_id``, or for a folder written before the
        segments the sha256 of its features.npy."""
        return self.meta.get("features_id") or sha256_file(self.folder / FEATURES)

    @property
    def segments(self) -> list[tuple[str, int, int]]:
        """The (shard, first row, end row) ranges that make the collection (empty for a features.npy folder)."""
        return [tuple(x) for x in self.meta.get("segments", [])]

    @functools.cached_property
    def input_spec(self) -> InputSpec | None:
        """How the network saw the images (None for a folder written without it)."""
        return InputSpec.from_embed_dir(self.meta, self.folder / INDEX)

    @functools.cached_property
    def pixels(self) -> np.ndarray | None:
        """(N, len(pixel_stats.COLUMNS)) float32, row i the pixel statistics of image i, measured while it was
        embedded; None when some shard was written before isif measured them (or a features.npy folder)."""
        parts, maps = [], {}
        for name, lo, hi in self.segments:
            if name not in maps:
                try:
                    m = json.loads((self.folder / "shards" / f"{name}.json").read_text())
                    if m.get("pixels") != PIXELS_VERSION:
                        return None
                    maps[name] = np.load(self.folder / "shards" / f"{name}{PIXELS_SUFFIX}", mmap_mode="r",
                                         allow_pickle=False)
                except (OSError, ValueError, AttributeError):
                    return None
            p = maps[name]
            if p.ndim != 2 or p.shape[1] != len(PIXEL_COLUMNS) or p.shape[0] < hi or p.dtype != np.float32:
                return None
            parts.append(p[lo:hi])
        return np.concatenate(parts) if parts else None

    def unreadable(self) -> list[tuple[str, str]]:
        """(path, reason) of the files under the root that the embedding met but could not decode (from the
        shards' manifests; files since removed left out)."""
        out = []
        for meta in sorted((self.folder / "shards").glob("*.json")):
            try:
                m = json.loads(meta.read_text())
                out += [(str(k[0]), str(r)) for k, r in m.get("broken", [])
                        if m.get("checkpoint_sha256") == self.checkpoint_sha256]
            except (OSError, ValueError, AttributeError, TypeError, IndexError):
                continue
        return sorted({(p, r) for p, r in out if (self.root / p).is_file()})

    @functools.cached_property
    def labels(self) -> list[str] | None:
        """Each image's class by the module's rule, or None when the collection has none."""
        return class_labels(self.paths)


def is_embed_dir(folder: str | Path) -> bool:
    """Whether ``folder`` holds an embed folder's paths.txt and index.json, and features (segments or
    features.npy): else it may be a folder of images."""
    d = Path(folder)
    if not all((d / n).is_file() for n in (PATHS, INDEX)):
        return False
    if (d / FEATURES).is_file():
        return True
    try:
        return "segments" in json.loads((d / INDEX).read_text())
    except (OSError, ValueError, TypeError):
        return False


def _segment_rows(d: Path, meta: dict) -> list[np.ndarray]:
    """The memory-mapped row ranges index.json's segments name (``ValueError`` for a missing or wrong one)."""
    segs = meta["segments"]
    if not isinstance(segs, list) or not segs:
        raise ValueError("no segments")
    maps: dict[str, np.ndarray] = {}
    parts = []
    for name, lo, hi in segs:
        if not (isinstance(name, str) and name.isalnum() and isinstance(lo, int) and isinstance(hi, int)):
            raise ValueError(f"bad segment {[name, lo, hi]}")
        if name not in maps:
            f = d / "shards" / f"{name}.npy"
            if not f.is_file():
                raise UserError(f"{d}: the shard {f.name} holding rows of the collection is missing (the float "
                                f"features live in shards/); re-run `isif embed` to embed its images again")
            maps[name] = np.load(f, mmap_mode="r", allow_pickle=False)
        z = maps[name]
        if z.ndim != 2 or not 0 <= lo < hi <= len(z):
            raise ValueError(f"segment {name}[{lo}:{hi}] outside the shard's {z.shape} rows")
        parts.append(z[lo:hi])
    return parts


def load_embed_dir(folder: str | Path, checkpoint_sha256: str | None = None, dim: int | None = None,
                   unit: bool = True) -> EmbedDir:
    """Read and check an embed folder (see the module docstring), or refuse in one line. The features stay on disk
    (memory-mapped); ``unit``: rows re-normalised to unit length as they are read (else as written). Finiteness is
    checked block by block, up to ``FEATURES_NPY_MAX`` images (beyond, reading it all would take minutes)."""
    d = Path(folder)
    if not d.is_dir():
        raise UserError(f"{folder}: no such folder; {FIRST}")
    missing = [n for n in (PATHS, INDEX) if not (d / n).is_file()]
    if missing:
        raise UserError(f"{folder}: no {' or '.join(missing)} (not an `isif embed` output); {FIRST}")
    try:
        meta = json.loads((d / INDEX).read_text())
        if not isinstance(meta, dict):
            raise ValueError("index.json is not an object")
        if "segments" in meta:
            parts, where = _segment_rows(d, meta), f"{d}/shards"
        elif (d / FEATURES).is_file():
            parts, where = [np.load(d / FEATURES, allow_pickle=False, mmap_mode="r")], f"{d}/{FEATURES}"
        else:
            raise UserError(f"{folder}: no {FEATURES} and no segments in {INDEX} (not an `isif embed` output); "
                            f"{FIRST}")
        paths = [line for line in (d / PATHS).read_text().splitlines() if line]
        root = meta.get("root")
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as e:
        raise UserError(f"{folder}: unreadable embed output ({str(e)[:80]}); {FIRST}") from None
    bad = [p for p in parts if p.ndim != 2 or p.dtype.kind != "f"]
    widths = {p.shape[1] for p in parts if p.ndim == 2}
    if bad or len(widths) != 1 or sum(len(p) for p in parts) == 0:
        shown = bad[0] if bad else parts[0]
        raise UserError(f"{where}: expected a non-empty (N, D) array of finite floats, got {shown.dtype} "
                        f"{shown.shape}; {FIRST}")
    z = Rows(parts, unit=unit)
    if len(z) <= FEATURES_NPY_MAX and not all(all_finite(p) for p in parts):
        raise UserError(f"{where}: expected a non-empty (N, D) array of finite floats, got values that are not "
                        f"finite; {FIRST}")
    if z.shape[0] != len(paths):
        raise UserError(f"{folder}: {FEATURES} holds {z.shape[0]} rows for {len(paths)} paths in {PATHS}; "
                        "re-run `isif embed`")
    if not isinstance(root, str):
        raise UserError(f"{folder}/{INDEX}: no image root; re-run `isif embed`")
    stored = meta.get("checkpoint_sha256")
    if checkpoint_sha256 and stored and stored != checkpoint_sha256:
        raise UserError(f"the checkpoint given (sha256 {checkpoint_sha256[:12]}...) is not the checkpoint that "
                        f"embedded {folder} (sha256 {stored[:12]}..., recorded as {meta.get('checkpoint')}); pass "
                        "that one, or re-run `isif embed` with this one")
    if dim is not None and z.shape[1] != dim:
        raise UserError(f"{folder}: {FEATURES} holds {z.shape[1]}-d features but the checkpoint gives {dim}-d; "
                        "re-run `isif embed` with it")
    return EmbedDir(d, z, paths, Path(root), meta)


def all_finite(z: np.ndarray, block: int = BLOCK) -> bool:
    """Whether every value of ``z`` is finite, read ``block`` rows at a time (a memory map stays on disk)."""
    return all(bool(np.isfinite(z[s:s + block]).all()) for s in range(0, len(z), block))


def class_labels(paths: list[str]) -> list[str] | None:
    """Each path's first folder ("(top level)" for files directly in the root), when at least two labels occur
    and some folder holds several images; else None (nothing to tell apart). ``paths`` are relative to the root."""
    labels = [PurePath(p).parts[0] if len(PurePath(p).parts) > 1 else TOP_LEVEL for p in paths]
    counts = Counter(labels)
    shared = any(c > 1 for lab, c in counts.items() if lab != TOP_LEVEL)
    return labels if len(counts) > 1 and shared else None


def label_of(path: Path, root: Path) -> str:
    """The class of any file by the same rule: its first folder under ``root`` when it lies inside (both
    resolved); else (a query from elsewhere) its parent folder's name, the first folder of a one-level tree."""
    p, r = Path(path).resolve(), Path(root).resolve()
    if p.is_relative_to(r):
        parts = p.relative_to(r).parts
        return parts[0] if len(parts) > 1 else TOP_LEVEL
    return p.parent.name


def require_images(ed: EmbedDir) -> None:
    if not ed.root.is_dir():
        raise UserError(f"image folder {ed.root} (the root in {ed.folder}/{INDEX}) is missing; the PNGs need the "
                        "images: put them back there or re-run `isif embed`")


def made_from_these(ed: EmbedDir, path: Path, meta_name: str, fix: str) -> bool:
    """Whether the file ``path`` beside ``ed`` was made from its features: its metadata file ``meta_name`` records
    ``ed``'s ``features_id``. Else one warning line ending in ``fix`` (the command that refreshes it)."""
    import sys

    try:
        meta = json.loads((ed.folder / meta_name).read_text())
    except (OSError, ValueError):
        meta = {}
    if isinstance(meta, dict) and meta.get("features_id") == ed.features_id:
        return True
    print(f"isif: warning: {path} was made from other features than {ed.folder}'s (before the last `isif embed`); "
          f"{fix}", file=sys.stderr)
    return False


def output_dir(ed: EmbedDir, out: str | Path | None) -> Path:
    """The output folder (default: the embed folder); never the image folder or a folder inside it."""
    target = Path(out) if out else ed.folder
    t, r = target.resolve(), ed.root.resolve()
    if t == r or r in t.parents:
        raise UserError(f"{target} lies inside the image folder {ed.root}; nothing is written there: pass --out "
                        "with a folder outside it")
    return target


# ----------------------------------------------------------------------------- writing


def file_key(root: Path, f: Path) -> tuple[str, int, int]:
    """A file's key in the shard manifests: (its path relative to the root, size, mtime_ns)."""
    st = f.stat()
    return (str(f.relative_to(root)), int(st.st_size), int(st.st_mtime_ns))


def _shard_name(keys: list[tuple[str, int, int]]) -> str:
    h = hashlib.sha256("\0".join(f"{k[0]}\0{k[1]}\0{k[2]}" for k in keys).encode()).hexdigest()
    return h[:16]


class EmbedWriter:
    """Writes an embed folder: shards (``shards/NAME.npy`` features + ``shards/NAME.json`` the files they are
    for, and the broken files met), consolidated into features.npy, paths.txt and index.json; files are known by
    their ``file_key``."""

    def __init__(self, out: Path) -> None:
        self.out, self.shards = Path(out), Path(out) / "shards"

    def check_owner(self, sha: str, overwrite: bool) -> None:
        """Refuse a folder made with another checkpoint (or replace it with ``overwrite``)."""
        index = self.out / INDEX
        if not index.is_file():
            return
        try:
            other = json.loads(index.read_text()).get("checkpoint_sha256")
        except (OSError, ValueError):
            other = None
        if other and other != sha and not overwrite:
            raise UserError(f"{self.out} holds embeddings of another checkpoint (sha256 {other[:12]}...); pass "
                            "another --out, or --overwrite to replace them")
        if other != sha and overwrite:
            for p in [*self.shards.glob("*"), *(self.out / n for n in (FEATURES, PATHS, INDEX))]:
                p.unlink(missing_ok=True)

    def done(self, sha: str) -> tuple[dict[tuple, tuple[str, int]], dict[tuple, str]]:
        """({file key: (shard, row)}, {file key: reason it is broken}) of every complete shard."""
        rows, broken, _ = self._manifests(sha)
        return rows, broken

    def _manifests(self, sha: str) -> tuple[dict[tuple, tuple[str, int]], dict[tuple, str], dict[str, int]]:
        """``done``'s two maps and {shard: its sequence number} (the order shards were made in; 0 for a shard
        written before they were numbered)."""
        rows: dict[tuple, tuple[str, int]] = {}
        broken: dict[tuple, str] = {}
        seq: dict[str, int] = {}
        for meta in sorted(self.shards.glob("*.json")):
            try:
                m = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue  # a shard is complete only once its manifest is written
            if m.get("checkpoint_sha256") != sha or not (self.shards / f"{meta.stem}.npy").is_file():
                continue
            if m.get("pixels") != PIXELS_VERSION:  # older pixel statistics: its files are embedded again, once
                continue
            seq[meta.stem] = int(m.get("seq", 0))
            for r, k in enumerate(m["files"]):
                rows[tuple(k)] = (meta.stem, r)
            for k, reason in m["broken"]:
                broken[tuple(k)] = reason
        return rows, broken, seq

    def next_seq(self, sha: str) -> int:
        """The sequence number after every complete shard's: where this run's shards are numbered from."""
        return max(self._manifests(sha)[2].values(), default=-1) + 1

    def calibration(self, sha: str) -> dict | None:
        """The near-duplicate calibration index.json holds for checkpoint ``sha``, or None."""
        try:
            meta = json.loads((self.out / INDEX).read_text())
        except (OSError, ValueError):
            return None
        cal = meta.get("calibration") if isinstance(meta, dict) else None
        ok = meta.get("checkpoint_sha256") == sha and isinstance(cal, dict) and cal.get("version") == 1
        return cal if ok else None

    def record_calibration(self, calibration: dict) -> None:
        """Add the calibration (``calibration.calibrate``) to index.json, atomically."""
        meta = json.loads((self.out / INDEX).read_text())
        meta["calibration"] = calibration
        atomic_write_bytes(self.out / INDEX, lambda fh: fh.write(json.dumps(meta, indent=2).encode()))

    def write_shard(self, keys: list, z: np.ndarray, kept: list[int], broken: dict[int, str], sha: str,
                    seq: int = 0, pixels: np.ndarray | None = None) -> str:
        """Features (and their pixel statistics) first, then the manifest that makes the shard count: a kill in
        between leaves no shard. ``seq``: the shard's place in the collection's order (a rerun's shards come after
        the earlier ones)."""
        name = _shard_name(keys)
        self.shards.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.shards / f"{name}.npy", lambda fh: np.save(fh, z))
        meta = {"checkpoint_sha256": sha, "seq": seq, "files": [list(keys[i]) for i in kept],
                "broken": [[list(keys[i]), r] for i, r in sorted(broken.items())]}
        if pixels is not None:
            atomic_write_bytes(self.shards / f"{name}{PIXELS_SUFFIX}", lambda fh: np.save(fh, pixels))
            meta["pixels"] = PIXELS_VERSION
        atomic_write_bytes(self.shards / f"{name}.json", lambda fh: fh.write(json.dumps(meta).encode()))
        fault_point("embed-shard")
        return name

    def consolidate(self, keys: list[tuple], root: Path, checkpoint: Path, sha: str, dim: int,
                    spec: InputSpec) -> tuple[int, int]:
        """paths.txt and index.json (with the segments) for ``keys`` (the folder as it is now), and features.npy up
        to ``FEATURES_NPY_MAX`` images, streamed: removed and changed files drop out, the rows kept keep their
        order and new ones follow (by shard, then file order); shards no row is read from any more are deleted.
        Returns (images, broken)."""
        rows, broken, seq = self._manifests(sha)
        place = {k: i for i, k in enumerate(keys)}
        live = sorted((k for k in keys if k in rows), key=lambda k: (seq[rows[k][0]], place[k]))
        segments: list[list] = []
        for k in live:
            name, r = rows[k]
            if segments and segments[-1][0] == name and segments[-1][2] == r:
                segments[-1][2] = r + 1
            else:
                segments.append([name, r, r + 1])
        used = sorted({name for name, _, _ in segments})
        if 0 < len(live) <= FEATURES_NPY_MAX:
            atomic_write_bytes(self.out / FEATURES, lambda fh: self._write_features(fh, segments, len(live), dim))
        else:
            (self.out / FEATURES).unlink(missing_ok=True)  # never a stale copy beside the segments
        atomic_write_bytes(self.out / PATHS, lambda fh: fh.write("".join(k[0] + "\n" for k in live).encode()))
        fid = hashlib.sha256(json.dumps([sha, segments]).encode()).hexdigest()
        meta = {"root": str(root.resolve()), "checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": sha,
                "images": len(live), "dim": dim, "shards": len(used), "input": spec.to_dict(),
                "segments": segments, "features_id": fid}
        kept = self.calibration(sha)
        if kept:  # measured once per checkpoint, on the collection as it was then (see calibration.py)
            meta["calibration"] = kept
        atomic_write_bytes(self.out / INDEX, lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
        for stale in self.shards.glob("*.json"):
            if stale.stem not in used:
                stale.unlink()
                (self.shards / f"{stale.stem}.npy").unlink(missing_ok=True)
                (self.shards / f"{stale.stem}{PIXELS_SUFFIX}").unlink(missing_ok=True)
        return len(live), sum(1 for k in keys if k in broken)

    def _write_features(self, fh, segments: list[list], n: int, dim: int) -> None:
        """features.npy streamed from the segments: the .npy header, then each range's rows as they are on disk."""
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                  "fortran_order": False, "shape": (n, dim)})
        maps: dict[str, np.ndarray] = {}
        for name, lo, hi in segments:
            z = maps.setdefault(name, np.load(self.shards / f"{name}.npy", mmap_mode="r"))
            for s in range(lo, hi, BLOCK):
                fh.write(np.ascontiguousarray(z[s:min(hi, s + BLOCK)], dtype=np.float32).tobytes())
