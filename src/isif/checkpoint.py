"""Checkpoints: written atomically, loaded safely.

A checkpoint is a plain dict of tensors, numbers, strings and lists, so it
loads with ``torch.load(weights_only=True)``: a file crafted to run code when
unpickled is refused instead of executed.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .data.sources import atomic_write_bytes
from .errors import UserError

FORMAT = "isif-checkpoint"
VERSION = 1


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` through a temporary file, fsync and rename: never a torn file."""
    state = {"format": FORMAT, "version": VERSION, **state}
    try:
        atomic_write_bytes(Path(path), lambda f: torch.save(state, f), fault_site="checkpoint-write")
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        kept = f"the previous checkpoint {path} is intact" if Path(path).is_file() else "no checkpoint was kept"
        raise CheckpointWriteError(f"could not write checkpoint {path} ({_reason(e)}); {kept}; "
                                   "free some disk space, then continue with --resume") from None
    try:  # make the rename itself durable
        fd = os.open(Path(path).parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class CheckpointWriteError(Exception):
    """A checkpoint could not be written; the previous one is untouched."""


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return text[:160]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``; anything else is a UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint {p} does not exist; pass the path of a .pt file from a run's checkpoints/ folder")
    if not zipfile.is_zipfile(p):  # torch.save writes a zip archive; a torn write loses its directory
        raise UserError(f"checkpoint {p} is truncated or not a checkpoint; use an intact file")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        raise UserError(
            f"checkpoint {p} was refused: it holds more than weights and plain data ({first[:160]})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(
            f"checkpoint {p} is truncated or not a checkpoint ({type(e).__name__}); use an intact file"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{p} is not an isif checkpoint (no '{FORMAT}' marker)")
    if state.get("version", 0) > VERSION:
        raise UserError(f"{p} was written by a newer isif (format {state['version']}); upgrade isif to read it")
    return state


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A .pt file, or a run folder (its checkpoints/last.pt)."""
    p = Path(path)
    return p / "checkpoints" / "last.pt" if p.is_dir() else p


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """(model in eval mode on ``device``, its Config, the checkpoint dict) from a checkpoint or run folder."""
    from .config import Config
    from .models import build_model

    p = resolve_checkpoint(path)
    state = load_checkpoint(p)
    if "config" not in state or "model" not in state:
        raise UserError(f"{p} has no model or config; pass a checkpoint written by `isif train`")
    cfg = Config.from_dict(state["config"])
    try:
        model = build_model(cfg.model.arch, cfg.model.width, cfg.model.dim)
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{p}: the weights do not fit {cfg.model.arch} width {cfg.model.width} "
                        f"({str(e).splitlines()[0][:120]})") from None
    model.to(device).eval()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, cfg, state
