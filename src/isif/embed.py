"""Embed a folder of one's own images with a trained checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_model, resolve_checkpoint
from .data.augment import normalize
from .data.sources import IMAGE_EXTS, BadImage, atomic_write_bytes, decode_rgb
from .errors import UserError
from .precision import autocast


def input_spec(state: dict, cfg) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(size, mean, std) the network was trained with: stored in the checkpoint, else from its data."""
    spec = state.get("input")
    if spec:
        return int(spec["size"]), tuple(spec["mean"]), tuple(spec["std"])
    from .train import load_splits

    splits = load_splits(cfg)[0]
    return int(splits.train.images.shape[-1]), splits.mean, splits.std


def prepare(arr: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float in [0, 1]: shorter side resized to ``size``, centre crop."""
    x = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float().div_(255)[None]  # (1, 3, H, W)
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size]
    return x[0]


@torch.no_grad()
def embed_folder(checkpoint: str, folder: str, out: Path, batch_size: int = 256, device: str = "cpu",
                 strict: bool = False) -> dict:
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{folder}: no such folder; pass a folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(sorted(IMAGE_EXTS))})")
    model, cfg, state = load_model(resolve_checkpoint(checkpoint), device)
    size, mean, std = input_spec(state, cfg)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    kept, skipped, feats, batch = [], [], [], []

    def flush() -> None:
        x = normalize(torch.stack(batch), mean_t, std_t).to(device)
        if cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(torch.device(device), cfg.train.precision):
            feats.append(model(x).float().cpu())
        batch.clear()

    for f in files:
        try:
            arr = decode_rgb(f.read_bytes(), str(f))
        except (BadImage, OSError) as e:
            if strict:
                raise UserError(f"{f}: unreadable image ({str(e).split(': ', 1)[-1][:80]}); drop --strict to skip "
                                "broken files") from None
            skipped.append(str(f))
            continue
        batch.append(prepare(arr, size))
        kept.append(str(f.relative_to(root)))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not kept:
        raise UserError(f"{folder}: none of the {len(files)} images could be read")
    if skipped:
        print(f"isif: skipped {len(skipped)} unreadable image(s), first: {'; '.join(skipped[:3])}", file=sys.stderr)
    z = torch.cat(feats).numpy().astype(np.float32)  # (N, D)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "features.npy", lambda fh: np.save(fh, z))
    atomic_write_bytes(out / "paths.txt", lambda fh: fh.write(("\n".join(kept) + "\n").encode()))
    return {"images": len(kept), "skipped": len(skipped), "dim": int(z.shape[1]), "out": str(out)}
