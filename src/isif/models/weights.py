"""Weights as plain files: safetensors (no pickle at all) and torch state dicts, read the same way.

``isif export CHECKPOINT --format safetensors`` writes the embedding network's ``state_dict()`` (keys
``backbone.*`` and ``head.fc.*``) with one metadata entry, ``"isif"``: a JSON object of

    format_version   FORMAT_VERSION
    model            the model config: arch, width, dim, weights, freeze_bn
    input            how the network sees an image: size, mean, std, resize (or null), fit; written by
                     ``InputSpec.to_dict()``, read by ``InputSpec.from_safetensors`` (``isif.data.input_spec``)
    precision        the run's precision (fp32, bf16, fp16, fp64): the autocast the embeddings were made with
    channels_last    the run's memory format
    checkpoint_sha256, isif_version

``read_state_dict`` reads such a file, any other safetensors file, or a torch state dict (loaded with
``weights_only=True``); every failure is one ``UserError`` line naming the fix.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ..base.errors import UserError

FORMAT_VERSION = 1
META_KEY = "isif"
EXPORT = "isif export CHECKPOINT --format safetensors"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError("safetensors files need the safetensors package: pip install safetensors") from None
    return safetensors


def write_safetensors(path: str | os.PathLike, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``state`` (every tensor contiguous, on the CPU) and ``meta`` as the ``"isif"`` metadata entry,
    atomically."""
    from ..base.files import atomic_write_bytes

    st = _safetensors()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    data = st.torch.save(tensors, metadata={"format": "pt", META_KEY: json.dumps(meta, sort_keys=True)})
    atomic_write_bytes(Path(path), lambda f: f.write(data))


def read_state_dict(path: str | os.PathLike, need_metadata: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, the isif metadata or None) of a ``.safetensors`` file or a torch state-dict file.

    A torch file is loaded with ``weights_only=True`` (a pickle that would run code is refused); a dict with a
    ``"state_dict"`` entry gives that entry. The metadata is that of an isif export (see the module docstring);
    with ``need_metadata`` a file without it is refused. Raises ``UserError`` (one line, naming the fix) for a
    missing or unreadable file, or metadata that is missing (when needed) or malformed.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{path}: no such file; pass a .safetensors file (from `{EXPORT}`) or a state-dict file")
    if p.suffix.lower() == ".safetensors":
        state, raw = _read_safetensors(p)
        meta = parse_metadata(raw, p) if raw is not None else None
    else:
        if need_metadata:
            raise UserError(f"{path}: not a .safetensors file; pass a run folder, a checkpoint, or a file written "
                            f"by `{EXPORT}`")
        state, meta = _read_torch(p), None
    if need_metadata and meta is None:
        raise UserError(f"{path} has no isif metadata (its architecture and input recipe); write it with "
                        f"`{EXPORT}`, or pass it to --weights, which needs none")
    return state, meta


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    st = _safetensors()
    try:
        with st.safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, RuntimeError, st.SafetensorError) as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{p}: not a readable safetensors file ({first}); use an intact file, or export it again "
                        f"with `{EXPORT}`") from None
    return state, raw


def _read_torch(p: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{p}: refused, it holds more than weights (a pickle that would run code); pass a "
                        "state dict saved with torch.save(model.state_dict()) or a .safetensors file") from None
    except Exception as e:  # a file that is no torch archive fails anywhere in the unpickler (struct.error, ...)
        raise UserError(f"{p}: not a loadable state dict ({type(e).__name__}); pass a state dict saved with "
                        "torch.save(model.state_dict()) or a .safetensors file") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{p}: not a state dict (a dict of tensors); pass one saved with "
                        "torch.save(model.state_dict()) or a .safetensors file")
    return state


def parse_metadata(raw: str, source: str | os.PathLike = "the file") -> dict[str, Any]:
    """The ``"isif"`` metadata entry, checked: a JSON object with format_version, model (with arch, dim) and
    input (with size, mean, std)."""
    fix = f"export the checkpoint again with `{EXPORT}`"
    try:
        meta = json.loads(raw)
    except ValueError:
        raise UserError(f"{source}: its isif metadata is not valid JSON; {fix}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{source}: its isif metadata is not a JSON object; {fix}")
    version = meta.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise UserError(f"{source} was exported by a newer isif (format {version}); upgrade isif to read it")
    need = {"format_version": None, "model": ("arch", "dim"), "input": ("size", "mean", "std")}
    for key, inner in need.items():
        value = meta.get(key)
        if value is None or (inner and (not isinstance(value, dict) or any(k not in value for k in inner))):
            what = f"{key} ({', '.join(inner)})" if inner else key
            raise UserError(f"{source}: its isif metadata has no valid {what}; {fix}")
    return meta


def isif_backbone(state: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The backbone's own keys: of an isif export (metadata given, or every key outside ``head.*`` under
    ``backbone.``) its ``backbone.*`` entries with the prefix removed (the head is not used); any other state
    dict as it is."""
    keys = [k for k in state if not k.startswith("head.")]
    if meta is not None or (keys and all(k.startswith("backbone.") for k in keys)):
        return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state


def load_backbone_weights(net: torch.nn.Module, path: str, what: str) -> None:
    """Load a local file (safetensors or a torch state dict; of an isif export its ``backbone.*`` weights) into
    ``net``, a backbone, through ``load_state``."""
    state, meta = read_state_dict(path)
    load_state(net, isif_backbone(state, meta), what, f"--weights {path}")


def load_state(net: torch.nn.Module, state: dict[str, torch.Tensor], what: str, source: str) -> None:
    """Load ``state`` into ``net``, a backbone: every key of ``net`` must be there with its shape (a ``module.``
    prefix is dropped; the state's other keys, a classifier's, are ignored); else one line naming ``source``,
    ``what`` it should fit, and the first key that does not."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    mine = net.state_dict()
    bad = [k for k in mine if k in state and tuple(state[k].shape) != tuple(mine[k].shape)]
    if bad:
        k = bad[0]
        raise UserError(f"{source} does not fit {what}: {k} has shape {tuple(state[k].shape)} in the file, "
                        f"{tuple(mine[k].shape)} in the model; pass weights of that model (and size)")
    missing = [k for k in mine if k not in state]
    if missing:
        raise UserError(f"{source} does not fit {what}: {len(missing)} of its keys are missing (the first: "
                        f"{missing[0]}); pass weights of that model")
    net.load_state_dict({k: state[k] for k in mine}, strict=True)
