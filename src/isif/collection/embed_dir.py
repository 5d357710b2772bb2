"""The embed folder that ``isif embed`` writes (features.npy, paths.txt, index.json): read, checked, and where\noutputs may go."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base.errors import UserError

FIRST = "run `isif embed CHECKPOINT FOLDER --out DIR` first"


@dataclass
class EmbedDir:
    folder: Path
    features: np.ndarray  # (N, D) float32, rows re-normalised to unit length
    paths: list[str]  # relative to root, as in paths.txt
    root: Path  # the image folder (index.json's "root")

    def image(self, i: int) -> Path:
        return self.root / self.paths[i]


def load_embed_dir(folder: str | Path) -> EmbedDir:
    """Read features.npy, paths.txt and index.json, or refuse in one line."""
    d = Path(folder)
    if not d.is_dir():
        raise UserError(f"{folder}: no such folder; {FIRST}")
    missing = [n for n in ("features.npy", "paths.txt", "index.json") if not (d / n).is_file()]
    if missing:
        raise UserError(f"{folder}: no {' or '.join(missing)} (not an `isif embed` output); {FIRST}")
    try:
        z = np.load(d / "features.npy", allow_pickle=False)
        paths = [line for line in (d / "paths.txt").read_text().splitlines() if line]
        root = json.loads((d / "index.json").read_text()).get("root")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{folder}: unreadable embed output ({str(e)[:80]}); {FIRST}") from None
    if z.ndim != 2 or z.dtype.kind != "f" or z.shape[0] == 0 or not np.isfinite(z).all():
        raise UserError(f"{folder}/features.npy: expected a non-empty (N, D) array of finite floats, got "
                        f"{z.dtype} {z.shape}; {FIRST}")
    if z.shape[0] != len(paths):
        raise UserError(f"{folder}: features.npy holds {z.shape[0]} rows for {len(paths)} paths in paths.txt; "
                        "re-run `isif embed`")
    if not isinstance(root, str):
        raise UserError(f"{folder}/index.json: no image root; re-run `isif embed`")
    return EmbedDir(d, unit_rows(z), paths, Path(root))


def unit_rows(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float32)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def require_images(ed: EmbedDir) -> None:
    if not ed.root.is_dir():
        raise UserError(f"image folder {ed.root} (the root in {ed.folder}/index.json) is missing; the PNGs need the "
                        "images: put them back there or re-run `isif embed`")


def output_dir(ed: EmbedDir, out: str | Path | None) -> Path:
    """The output folder (default: the embed folder); never the image folder or a folder inside it."""
    target = Path(out) if out else ed.folder
    t, r = target.resolve(), ed.root.resolve()
    if t == r or r in t.parents:
        raise UserError(f"{target} lies inside the image folder {ed.root}; nothing is written there: pass --out "
                        "with a folder outside it")
    return target
