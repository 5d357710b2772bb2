"""Embed a folder of one's own images with a trained checkpoint."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_model, resolve_checkpoint
from .data.augment import normalize
from .data.decode import IMAGE_EXTS, BadImage, broken_image, decode_rgb, fit_square, report_skipped
from .device import autocast, param_dtype
from .errors import UserError
from .io import atomic_write_bytes, sha256_file


def input_spec(state: dict, cfg) -> dict:
    """How the network saw test images: size, mean, std, and for the unseen-category protocol the square
    side images were resized to before a centre crop. Stored in the checkpoint, else from its data."""
    spec = state.get("input")
    if spec:
        return {"size": int(spec["size"]), "mean": tuple(spec["mean"]), "std": tuple(spec["std"]),
                "resize": int(spec["resize"]) if spec.get("center_crop") else None,
                "fit": spec.get("fit", "square")}
    from .data.registry import load_dataset

    splits = load_dataset(cfg.data)
    return {"size": int(splits.train.images.shape[-1]), "mean": splits.mean, "std": splits.std, "resize": None,
            "fit": "square"}


def prepare(arr: np.ndarray, size: int, resize: int | None = None, fit: str = "square") -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float in [0, 1], the test transform of training:

    - ``resize`` given (the unseen-category protocol): resized to resize x resize, then the centre
      size x size crop, as the streamed sources;
    - ``fit="crop"`` (a run on unlabelled images): exactly as training stored them, the shorter side resized
      to ``size`` and the centre square (``fit_square``);
    - otherwise the shorter side resized to ``size`` and the centre crop.
    """
    if fit == "crop" and resize is None:
        return torch.from_numpy(np.array(fit_square(arr, size))).permute(2, 0, 1).float().div_(255)
    if resize is not None:
        from .data.stream import load_file_array

        x = load_file_array(arr, resize).float().div_(255)
        top, left = int(round((resize - size) / 2.0)), int(round((resize - size) / 2.0))
        return x[:, top:top + size, left:left + size]
    x = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float().div_(255)[None]  # (1, 3, H, W)
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size]
    return x[0]


def list_images(folder: str) -> list[Path]:
    """Every image under ``folder`` (any depth; hidden files and folder-link loops left out), sorted."""
    from .data.unlabelled import find_images

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{folder}: no such folder; pass a folder of images")
    try:
        return [Path(n) for n in find_images(root).names]
    except UserError:
        raise UserError(f"{folder}: no images ({', '.join(sorted(IMAGE_EXTS))})") from None


class Embedder:
    """A trained checkpoint applied to image files with its test transform."""

    def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int = 256) -> None:
        self.device = torch.device(device)
        self.path = resolve_checkpoint(checkpoint)
        self.model, self.cfg, self.state = load_model(self.path, self.device)
        self.spec = input_spec(self.state, self.cfg)
        self.batch_size = batch_size

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the checkpoint file: which weights produced a set of features."""
        return sha256_file(self.path)

    @torch.no_grad()
    def files(self, files: list[Path], strict: bool = False) -> tuple[torch.Tensor, list[Path], list[str]]:
        """(features (n, D) float32 on the CPU, the files embedded, the broken files skipped)."""
        sp = self.spec
        mean_t = torch.tensor(sp["mean"]).view(1, 3, 1, 1)
        std_t = torch.tensor(sp["std"]).view(1, 3, 1, 1)
        kept: list[Path] = []
        skipped: list[str] = []
        feats: list[torch.Tensor] = []
        batch: list[torch.Tensor] = []

        def flush() -> None:
            x = normalize(torch.stack(batch), mean_t, std_t).to(self.device, param_dtype(self.cfg.train.precision))
            if self.cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.cfg.train.precision):
                feats.append(self.model(x).float().cpu())
            batch.clear()

        for f in files:
            try:
                arr = decode_rgb(f.read_bytes(), str(f), draft=sp["size"] if sp.get("fit") == "crop" else None)
            except (BadImage, OSError) as e:
                if strict:
                    raise broken_image(f, str(e)) from None
                skipped.append(str(f))
                continue
            batch.append(prepare(arr, sp["size"], sp["resize"], sp.get("fit", "square")))
            kept.append(f)
            if len(batch) == self.batch_size:
                flush()
        if batch:
            flush()
        report_skipped(skipped)
        dim = self.cfg.model.dim
        return (torch.cat(feats) if feats else torch.zeros(0, dim)), kept, skipped


def embed_folder(checkpoint: str, folder: str, out: Path, batch_size: int = 256, device: str = "cpu",
                 strict: bool = False) -> dict:
    root = Path(folder)
    files = list_images(folder)
    embedder = Embedder(checkpoint, device, batch_size)
    z_t, kept, skipped = embedder.files(files, strict)
    if not kept:
        raise UserError(f"{folder}: none of the {len(files)} images could be read")
    z = z_t.numpy().astype(np.float32)  # (N, D)
    names = [str(p.relative_to(root)) for p in kept]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "features.npy", lambda fh: np.save(fh, z))
    atomic_write_bytes(out / "paths.txt", lambda fh: fh.write(("\n".join(names) + "\n").encode()))
    meta = {"root": str(root.resolve()), "checkpoint": str(embedder.path.resolve()),
            "checkpoint_sha256": embedder.fingerprint, "images": len(kept), "dim": int(z.shape[1])}
    atomic_write_bytes(out / "index.json", lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
    return {"images": len(kept), "skipped": len(skipped), "dim": int(z.shape[1]), "out": str(out)}
