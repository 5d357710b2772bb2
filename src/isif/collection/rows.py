"""The features of an embed folder as one (N, D) array that stays on disk: memory-mapped segments of the shards.

``Rows`` concatenates row ranges of memory-mapped ``.npy`` files without copying them. Reading a slice, a list of
rows or one row copies just those rows into memory (re-normalised to unit length when ``unit``), so search, the
index, serve, cluster and the Parquet export work on a collection larger than memory; ``np.asarray(rows)`` reads
all of it, for the commands that need every row at once on a small collection. ``blocks(size)`` walks the rows in
order, ``size`` at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

BLOCK = 1 << 16  # rows read at a time when walking the collection (32 MiB of 128-d float32)
IN_MEMORY_MAX = 1_000_000  # up to here a command reads the rows into memory once (512 MiB at 128-d)


def unit_rows(z: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32 (a zero row stays zero)."""
    z = np.asarray(z, dtype=np.float32)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


class Rows:
    """Row ranges of 2-d arrays (memory maps), seen as one (N, D) float32 array (see the module docstring)."""

    def __init__(self, parts: Sequence[np.ndarray], unit: bool = False) -> None:
        if not parts:
            raise ValueError("Rows needs at least one part")
        dims = {p.shape[1] for p in parts}
        if len(dims) != 1 or any(p.ndim != 2 for p in parts):
            raise ValueError(f"parts of different widths {sorted(dims)}")
        self.parts = list(parts)
        self.unit = unit
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)
        self.shape = (int(self.starts[-1]), dims.pop())
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def _out(self, z: np.ndarray) -> np.ndarray:
        return unit_rows(z) if self.unit else np.array(z, dtype=np.float32)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {key} of {len(self)}")
            return self[np.array([i])][0]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            chunks = []
            for p, s0 in zip(self.parts, self.starts[:-1], strict=True):
                lo, hi = max(start, s0), min(stop, s0 + len(p))
                if lo < hi:
                    chunks.append(p[lo - s0:hi - s0])
            if not chunks:
                return np.zeros((0, self.shape[1]), np.float32)
            return self._out(chunks[0] if len(chunks) == 1 else np.concatenate(chunks))
        ids = np.asarray(key)
        if ids.dtype == bool:
            ids = np.nonzero(ids)[0]
        ids = ids.astype(np.int64).reshape(-1)
        if ids.size and (ids.min() < -len(self) or ids.max() >= len(self)):
            raise IndexError(f"rows out of range 0..{len(self) - 1}")
        ids = np.where(ids < 0, ids + len(self), ids)
        out = np.empty((len(ids), self.shape[1]), np.float32)
        part = np.searchsorted(self.starts, ids, side="right") - 1
        for j in np.unique(part):
            sel = np.nonzero(part == j)[0]
            local = ids[sel] - self.starts[j]
            order = np.argsort(local, kind="stable")  # read each memory map forwards
            out[sel[order]] = self.parts[j][local[order]]
        return unit_rows(out) if self.unit else out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        z = self[:]
        return z if dtype is None else z.astype(dtype, copy=False)

    def blocks(self, size: int = BLOCK) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) for consecutive blocks of ``size`` rows, in order."""
        for s in range(0, len(self), size):
            yield s, self[s:s + size]


def resident(rows: Rows | np.ndarray) -> Rows | np.ndarray:
    """The rows as a command that walks them many times reads them: in memory up to ``IN_MEMORY_MAX`` rows (as
    fast as before the rows lived on disk), else left on disk to be read a block at a time."""
    return np.asarray(rows) if len(rows) <= IN_MEMORY_MAX else rows
