"""The training state and its checkpoint: what a checkpoint holds, written atomically, loaded safely.

A checkpoint is a plain dict of tensors, numbers, strings and lists, so it
loads with ``torch.load(weights_only=True)``: a file crafted to run code when
unpickled is refused instead of executed. It carries a sha256 of its own
contents (every tensor's bytes, every value), because torch's archive reader
checks no CRC: a flipped byte inside a tensor would otherwise load silently.

The dict's keys (kept since the first release, so old checkpoints resume):

    format, version, checksum     "isif-checkpoint", 1, sha256 of everything else
    config                        the resolved config (Config.to_dict)
    model, objective, optimizer   state dicts; the objective's holds banks, heads, pseudo-labels
    scaler                        fp16 only
    rng                           data_epoch_start (the sampler), augment, torch, cuda
    neighbours                    nearest-neighbour positives (sampler), when used
    epoch, step                   the position: epochs done, steps done inside the next one
    epoch_loss_sum, epoch_loss_steps, train_time_s, history
    input                         size, mean, std, resize, center_crop, fit: how the network sees an image
                                  (``isif.data.input_spec.InputSpec``: written by its ``to_dict(checkpoint=True)``,
                                  read by ``InputSpec.from_checkpoint``)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..base.errors import UserError
from ..base.files import atomic_write_bytes, fsync_dir

if TYPE_CHECKING:
    from .sampler import InstanceSampler
    from .step import Parts

FORMAT = "isif-checkpoint"
VERSION = 1


class CheckpointWriteError(Exception):
    """A checkpoint could not be written; the previous one is untouched."""


@dataclass
class TrainState:
    """Where a run is: epochs done, steps done in the current epoch, its running loss, time and history."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    loss_steps: int = 0
    train_time: float = 0.0
    history: list[dict] = field(default_factory=list)

    def state_dict(self, parts: Parts, sampler: InstanceSampler) -> dict[str, Any]:
        """The checkpoint's contents for this state, the step's parts and the sampler."""
        smp = sampler.state_dict()
        s: dict[str, Any] = {
            "config": parts.cfg.to_dict(),
            "model": parts.model.state_dict(),
            "objective": parts.objective.state_dict(),
            "optimizer": parts.opt.state_dict(),
            "rng": {"data_epoch_start": smp["data_epoch_start"], "augment": parts.aug_gen.get_state(),
                    "torch": torch.get_rng_state()},
            "epoch": self.epoch, "step": self.step,
            "epoch_loss_sum": self.loss_sum, "epoch_loss_steps": self.loss_steps,
            "train_time_s": self.train_time, "history": self.history,
            "input": parts.input_spec.to_dict(checkpoint=True),
        }
        if "neighbours" in smp:
            s["neighbours"] = smp["neighbours"]
        if parts.scaler.is_enabled():
            s["scaler"] = parts.scaler.state_dict()
        if parts.device.type == "cuda":
            s["rng"]["cuda"] = torch.cuda.get_rng_state(parts.device)
        return s

    def load_state_dict(self, sd: dict[str, Any], parts: Parts, sampler: InstanceSampler) -> None:
        """Restore everything ``state_dict`` saved into this state, the parts and the sampler."""
        _check_compatible(sd, parts)
        parts.model.load_state_dict(sd["model"])
        _load_objective(parts.objective, sd["objective"], sampler.n)
        parts.opt.load_state_dict(sd["optimizer"])
        if "scaler" in sd and parts.scaler.is_enabled():
            parts.scaler.load_state_dict(sd["scaler"])
        rng = sd["rng"]
        sampler.load_state_dict({"data_epoch_start": rng["data_epoch_start"], "neighbours": sd.get("neighbours")})
        parts.aug_gen.set_state(rng["augment"])
        torch.set_rng_state(rng["torch"])
        if parts.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], parts.device)
        self.epoch, self.step = int(sd["epoch"]), int(sd["step"])
        self.loss_sum, self.loss_steps = float(sd["epoch_loss_sum"]), int(sd["epoch_loss_steps"])
        self.train_time = float(sd["train_time_s"])
        self.history = list(sd["history"])


def _check_compatible(sd: dict, parts: Parts) -> None:
    from .config import Config

    saved = Config.from_dict(sd.get("config", {}))
    for path in ("model.arch", "model.width", "model.dim", "method.name"):
        a, b = saved.get(path), parts.cfg.get(path)
        if a != b:
            raise UserError(f"checkpoint has {path}={a!r} but the config asks for {b!r}")


def _load_objective(objective: torch.nn.Module, sd: dict, n: int) -> None:
    mine = objective.state_dict()
    for key, value in sd.items():
        if key in mine and mine[key].shape != value.shape:
            raise UserError(f"the checkpoint's {key} has shape {tuple(value.shape)} but this data needs "
                            f"{tuple(mine[key].shape)} ({n} training images); resume with the data it was trained on")
    objective.load_state_dict(sd)


# ----------------------------------------------------------------------------- save and load


def content_checksum(obj: Any) -> str:
    """sha256 of a checkpoint's contents: every tensor's dtype, shape and bytes, every key and value, in order."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, x: Any) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(x, dict):
        h.update(f"D{len(x)}".encode())
        for k in sorted(x, key=str):
            _feed(h, k)
            _feed(h, x[k])
    elif isinstance(x, (list, tuple)):
        h.update(f"L{len(x)}".encode())
        for v in x:
            _feed(h, v)
    else:
        h.update(f"V{x!r}".encode())


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` with its checksum to ``path`` through a temporary file, fsync and rename: never a torn
    file."""
    state = {"format": FORMAT, "version": VERSION, **state}
    state["checksum"] = content_checksum(state)
    try:
        atomic_write_bytes(Path(path), lambda f: torch.save(state, f), fault_site="checkpoint-write")
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        kept = f"the previous checkpoint {path} is intact" if Path(path).is_file() else "no checkpoint was kept"
        raise CheckpointWriteError(f"could not write checkpoint {path} ({_reason(e)}); {kept}; "
                                   "free some disk space, then continue with --resume") from None
    fsync_dir(Path(path).parent)  # make the rename itself durable


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return text[:160]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``; anything else, or a changed byte, is a UserError."""
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
    stored = state.pop("checksum", None)  # checkpoints written before checksums have none
    if stored is not None and stored != content_checksum(state):
        raise UserError(f"checkpoint {p} is corrupted: its contents do not match the checksum stored in it; "
                        "use an intact copy")
    return state


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A .pt file, or a run folder (its checkpoints/last.pt)."""
    p = Path(path)
    return p / "checkpoints" / "last.pt" if p.is_dir() else p


def load_trained(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """(model in eval mode on ``device``, its Config, the checkpoint dict) from a checkpoint or run folder: the
    training side of loading; ``isif.collection.network.load_network`` adds the input spec and safetensors files."""
    from ..base.device import param_dtype
    from ..data.input_spec import InputSpec
    from ..models import build_model
    from .config import Config

    p = resolve_checkpoint(path)
    state = load_checkpoint(p)
    if "config" not in state or "model" not in state:
        raise UserError(f"{p} has no model or config; pass a checkpoint written by `isif train`")
    cfg = Config.from_dict(state["config"])
    try:
        spec = InputSpec.in_checkpoint(state)
        size = spec.size if spec is not None else None  # the side a timm ViT was built for
        model = build_model(dataclasses.replace(cfg.model, weights=None), size)  # the checkpoint has the weights
        model.to(param_dtype(cfg.train.precision)).load_state_dict(state["model"])
        from .step import network_embedding

        model.embedding = network_embedding(cfg)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{p}: the weights do not fit {cfg.model.arch} width {cfg.model.width} "
                        f"({str(e).splitlines()[0][:120]})") from None
    model.to(device).eval()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, cfg, state
