"""map.json, the grid of ``isif map``, and its one owner: written by ``isif map``, read by ``isif serve``.

``MapLayout`` says where each thumbnail lies in map-full.png; ``write_map_layout`` writes it atomically with a
version; ``load_map_layout`` reads it back as hostile input (types, the grid inside the picture, unique cells, a
plain file name for the picture, paths of the embed folder), or warns in one line and gives None.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..base.files import atomic_write_bytes

MAP_JSON, MAP_FULL, MAP_CSV = "map.json", "map-full.png", "map.csv"
MAP_JSON_VERSION = 1
RERUN = "re-run `isif map EMBED_DIR`"


@dataclass(frozen=True)
class MapLayout:
    """Where each thumbnail lies in map-full.png: cell (col, row) covers the pixels
    [left + col * tile, left + (col + 1) * tile) x [top + row * tile, top + (row + 1) * tile)."""

    cols: int
    rows: int
    full_png: Path  # absolute path of map-full.png
    tile: int  # pixels per cell in map-full.png
    left: int  # x pixel of cell (0, 0)'s top-left corner in map-full.png
    top: int  # y pixel of cell (0, 0)'s top-left corner in map-full.png
    width: int  # map-full.png's size in pixels
    height: int
    method: str  # "umap" or "pca"
    colour: str  # "folder", "cluster" or "none"
    cells: list[tuple[int, int, str]]  # (col, row, path relative to the image root), one per thumbnail

    def to_json(self) -> dict:
        """map.json's object: ``version`` and the fields, full_png as the file name (it lies beside map.json)."""
        return {"version": MAP_JSON_VERSION, "cols": self.cols, "rows": self.rows, "full_png": self.full_png.name,
                "tile": self.tile, "left": self.left, "top": self.top, "width": self.width, "height": self.height,
                "method": self.method, "colour": self.colour, "cells": [[c, r, p] for c, r, p in self.cells]}


def write_map_layout(path: Path, layout: MapLayout) -> None:
    """map.json at ``path``, atomically; ``layout.full_png`` must lie in the same folder."""
    data = (json.dumps(layout.to_json(), indent=1) + "\n").encode()
    atomic_write_bytes(Path(path), lambda f: f.write(data))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_map_layout(obj: object, folder: Path) -> MapLayout:
    """map.json's object -> MapLayout (full_png resolved against ``folder``), or ValueError saying what is wrong.
    The file is input: every field's type and range, the grid inside the picture, cells inside the grid and
    unique, are checked."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if obj.get("version") != MAP_JSON_VERSION:
        raise ValueError(f"version {obj.get('version')!r}, expected {MAP_JSON_VERSION}")
    ints = {k: obj.get(k) for k in ("cols", "rows", "tile", "left", "top", "width", "height")}
    bad = [k for k, v in ints.items() if not _is_int(v)]
    if bad:
        raise ValueError(f"{', '.join(bad)}: not integers")
    cols, rows, tile, left, top, width, height = ints.values()
    if min(cols, rows, tile) < 1 or min(left, top) < 0:
        raise ValueError("cols, rows and tile must be >= 1, left and top >= 0")
    if left + cols * tile > width or top + rows * tile > height or max(width, height) > 1 << 20:
        raise ValueError(f"a {cols} x {rows} grid of {tile} px at ({left}, {top}) does not fit a {width} x {height} "
                         "picture")
    name = obj.get("full_png")
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError("full_png: not a file name")
    method, colour = obj.get("method"), obj.get("colour")
    if method not in ("umap", "pca"):
        raise ValueError(f"method {method!r}: not umap or pca")
    if colour not in ("folder", "cluster", "none"):
        raise ValueError(f"colour {colour!r}: not folder, cluster or none")
    raw = obj.get("cells")
    if not isinstance(raw, list):
        raise ValueError("cells: not a list")
    cells: list[tuple[int, int, str]] = []
    for cell in raw:
        if not (isinstance(cell, list) and len(cell) == 3 and _is_int(cell[0]) and _is_int(cell[1])
                and isinstance(cell[2], str)):
            raise ValueError("cells: each must be [col, row, path]")
        c, r, p = cell
        if not (0 <= c < cols and 0 <= r < rows):
            raise ValueError(f"cell ({c}, {r}) outside the {cols} x {rows} grid")
        cells.append((c, r, p))
    if len({(c, r) for c, r, _ in cells}) != len(cells):
        raise ValueError("two thumbnails in one cell")
    if len({p for _, _, p in cells}) != len(cells):
        raise ValueError("one image in two cells")
    return MapLayout(cols, rows, (Path(folder) / name).resolve(), tile, left, top, width, height, method, colour,
                     cells)


def load_map_layout(folder: Path, paths: list[str]) -> MapLayout | None:
    """The map.json of `isif map` in ``folder`` (an embed folder), or None when there is none. When it is
    unreadable, or names a path not in ``paths`` (made before the last `isif embed`), or its map-full.png is
    missing: one warning line on stderr naming the fix (re-run `isif map EMBED_DIR`) and None."""
    path = Path(folder) / MAP_JSON
    if not path.is_file():
        return None
    try:
        layout = parse_map_layout(json.loads(path.read_bytes()), Path(folder))
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return _warn(f"{path}: unreadable ({str(e)[:80]})")
    known = set(paths)
    stale = [p for _, _, p in layout.cells if p not in known]
    if stale:
        return _warn(f"{path} names {len(stale)} images not in the embed folder (e.g. {stale[0][:60]!r}; made "
                     "before the last `isif embed`)")
    if not layout.full_png.is_file():
        return _warn(f"{path}: its {layout.full_png.name} is missing")
    return layout


def _warn(msg: str) -> None:
    print(f"isif: warning: {msg}; {RERUN}", file=sys.stderr)
    return None
