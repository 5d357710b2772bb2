"""Embed a folder of one's own images with a trained checkpoint."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..base.device import autocast, param_dtype
from ..base.errors import UserError
from ..base.faults import fault_point
from ..base.files import atomic_write_bytes, sha256_file
from ..data.augment import normalize
from ..data.decode import IMAGE_EXTS, BadImage, broken_image, decode_rgb, fit_square, max_decode_bytes, report_skipped
from ..training.checkpoint import load_model, resolve_checkpoint


def input_spec(state: dict, cfg) -> dict:
    """How the network saw test images: size, mean, std, and for the unseen-category protocol the square
    side images were resized to before a centre crop. Stored in the checkpoint, else from its data."""
    spec = state.get("input")
    if spec:
        return {"size": int(spec["size"]), "mean": tuple(spec["mean"]), "std": tuple(spec["std"]),
                "resize": int(spec["resize"]) if spec.get("center_crop") else None,
                "fit": spec.get("fit", "square")}
    from ..data.registry import load_dataset

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
        from ..data.stream import load_file_array

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


def decode_for(data: bytes, name: str, spec: dict) -> np.ndarray:
    """An encoded image -> (H, W, 3) uint8 by the safe decoder, as ``isif embed`` decodes it for a network with
    input ``spec`` (a JPEG drafted near the input size when the run stored images so); raises ``BadImage``."""
    return decode_rgb(data, name, draft=spec["size"] if spec.get("fit") == "crop" else None)


def prepare_for(arr: np.ndarray, spec: dict) -> torch.Tensor:
    """``prepare`` with the resize, crop and size of input ``spec``: (3, size, size) float in [0, 1]."""
    return prepare(arr, spec["size"], spec["resize"], spec.get("fit", "square"))


@torch.no_grad()
def run_network(model: torch.nn.Module, x: torch.Tensor, device: torch.device, precision: str,
                channels_last: bool) -> torch.Tensor:
    """Normalised images (N, 3, S, S) -> features (N, D) float32 on the CPU, through ``model`` on ``device`` with
    the run's precision (autocast) and memory format."""
    x = x.to(device, param_dtype(precision))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, precision):
        return model(x).float().cpu()


def list_images(folder: str) -> list[Path]:
    """Every image under ``folder`` (any depth; hidden files and folder-link loops left out), sorted."""
    from ..data.unlabelled import find_images

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

    def files(self, files: list[Path], strict: bool = False) -> tuple[torch.Tensor, list[Path], list[str]]:
        """(features (n, D) float32 on the CPU, the files embedded, the broken files skipped), decoded in this
        process (``embed_files`` without workers)."""
        z, kept, broken = embed_files(self, files, 0, strict)
        skipped = [str(files[i]) for i in sorted(broken)]
        report_skipped(skipped)
        return torch.from_numpy(z), [files[i] for i in kept], skipped

    @torch.no_grad()
    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """Prepared images ((3, s, s) in [0, 1], from ``prepare``) -> features (n, D) float32 on the CPU, with the
        checkpoint's normalisation, precision and memory format."""
        sp, t = self.spec, self.cfg.train
        mean_t, std_t = torch.tensor(sp["mean"]).view(1, 3, 1, 1), torch.tensor(sp["std"]).view(1, 3, 1, 1)
        return run_network(self.model, normalize(torch.stack(xs), mean_t, std_t), self.device, t.precision,
                           t.channels_last)

    def image_bytes(self, data: bytes, name: str = "upload") -> torch.Tensor:
        """One encoded image (an upload) -> its feature (D,), decoded by the same safe decoder and test transform
        as the files; raises ``BadImage`` (``TooLarge`` for a decompression bomb or one over the decode limit)."""
        return self.forward([prepare_for(decode_for(data, name, self.spec), self.spec)])[0]


SHARD_SIZE = 50_000  # images per shard: the unit of resuming (a shard is written whole or not at all)


class _Prepared(torch.utils.data.Dataset):
    """For the DataLoader workers: one file decoded and brought to the network's input, or the reason it could
    not be."""

    def __init__(self, files: list[Path], spec: dict) -> None:
        self.files, self.spec = files, spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        f = self.files[i]
        try:
            arr = decode_for(f.read_bytes(), str(f), self.spec)
        except (BadImage, OSError) as e:
            return i, None, str(e) or "unreadable"
        return i, prepare_for(arr, self.spec), ""


def _collate(items: list) -> list:
    return items


@torch.no_grad()
def embed_files(embedder: Embedder, files: list[Path], workers: int = 0, strict: bool = False,
                progress=None) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """(features (n, D) float32, the indices of ``files`` embedded, {index: reason} of the broken ones), the
    files decoded by ``workers`` DataLoader workers, in order, ``embedder.batch_size`` at a time."""
    max_decode_bytes()  # a malformed ISIF_MAX_DECODE_MIB: refused here in one line, not in every worker
    sp = embedder.spec
    loader = torch.utils.data.DataLoader(_Prepared(files, sp), batch_size=embedder.batch_size, num_workers=workers,
                                         collate_fn=_collate, generator=torch.Generator().manual_seed(0))
    feats, kept, broken = [], [], {}
    for batch in loader:
        good = [(i, x) for i, x, _ in batch if x is not None]
        for i, _, reason in batch:
            if reason:
                if strict:
                    raise broken_image(files[i], reason)
                broken[i] = reason
        if good:
            feats.append(embedder.forward([x for _, x in good]))
            kept += [i for i, _ in good]
        fault_point("embed-batch")
        if progress is not None:
            progress.update(len(batch))
    z = torch.cat(feats).numpy() if feats else np.zeros((0, embedder.cfg.model.dim), np.float32)
    return z.astype(np.float32, copy=False), kept, broken


def _key(root: Path, f: Path) -> tuple[str, int, int]:
    st = f.stat()
    return (str(f.relative_to(root)), int(st.st_size), int(st.st_mtime_ns))


def _shard_name(keys: list[tuple[str, int, int]]) -> str:
    h = hashlib.sha256("\0".join(f"{k[0]}\0{k[1]}\0{k[2]}" for k in keys).encode()).hexdigest()
    return h[:16]


class EmbedDir:
    """An ``isif embed`` output folder: shards (``shards/NAME.npy`` features + ``shards/NAME.json`` the files they
    are for, and the broken files met), consolidated into features.npy, paths.txt and index.json."""

    def __init__(self, out: Path) -> None:
        self.out, self.shards = Path(out), Path(out) / "shards"

    def check_owner(self, sha: str, overwrite: bool) -> None:
        """Refuse a folder made with another checkpoint (or replace it with ``overwrite``)."""
        index = self.out / "index.json"
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
            for p in [*self.shards.glob("*"), *(self.out / n for n in ("features.npy", "paths.txt", "index.json"))]:
                p.unlink(missing_ok=True)

    def done(self, sha: str) -> tuple[dict[tuple, tuple[str, int]], dict[tuple, str]]:
        """({file key: (shard, row)}, {file key: reason it is broken}) of every complete shard."""
        rows: dict[tuple, tuple[str, int]] = {}
        broken: dict[tuple, str] = {}
        for meta in sorted(self.shards.glob("*.json")):
            try:
                m = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue  # a shard is complete only once its manifest is written
            if m.get("checkpoint_sha256") != sha or not (self.shards / f"{meta.stem}.npy").is_file():
                continue
            for r, k in enumerate(m["files"]):
                rows[tuple(k)] = (meta.stem, r)
            for k, reason in m["broken"]:
                broken[tuple(k)] = reason
        return rows, broken

    def write_shard(self, keys: list, z: np.ndarray, kept: list[int], broken: dict[int, str], sha: str) -> str:
        """Features first, then the manifest that makes the shard count: a kill in between leaves no shard."""
        name = _shard_name(keys)
        self.shards.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.shards / f"{name}.npy", lambda fh: np.save(fh, z))
        meta = {"checkpoint_sha256": sha, "files": [list(keys[i]) for i in kept],
                "broken": [[list(keys[i]), r] for i, r in sorted(broken.items())]}
        atomic_write_bytes(self.shards / f"{name}.json", lambda fh: fh.write(json.dumps(meta).encode()))
        fault_point("embed-shard")
        return name

    def consolidate(self, keys: list[tuple], root: Path, embedder: Embedder) -> tuple[int, int]:
        """features.npy, paths.txt and index.json for ``keys`` (the folder as it is now): removed and changed
        files drop out; shards no row is read from any more are deleted. Returns (images, broken)."""
        rows, broken = self.done(embedder.fingerprint)
        live = [k for k in keys if k in rows]
        used = sorted({rows[k][0] for k in live})
        arrays = {name: np.load(self.shards / f"{name}.npy", mmap_mode="r") for name in used}
        dim = int(embedder.cfg.model.dim)
        z = np.stack([arrays[rows[k][0]][rows[k][1]] for k in live]) if live else np.zeros((0, dim), np.float32)
        atomic_write_bytes(self.out / "features.npy", lambda fh: np.save(fh, z.astype(np.float32)))
        atomic_write_bytes(self.out / "paths.txt", lambda fh: fh.write("".join(k[0] + "\n" for k in live).encode()))
        meta = {"root": str(root.resolve()), "checkpoint": str(embedder.path.resolve()),
                "checkpoint_sha256": embedder.fingerprint, "images": len(live), "dim": dim, "shards": len(used),
                "input": {k: v for k, v in embedder.spec.items()}}
        atomic_write_bytes(self.out / "index.json", lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
        for stale in self.shards.glob("*.json"):
            if stale.stem not in used:
                stale.unlink()
                (self.shards / f"{stale.stem}.npy").unlink(missing_ok=True)
        return len(live), sum(1 for k in keys if k in broken)


def embed_folder(checkpoint: str, folder: str, out: Path, batch_size: int = 256, device: str = "auto",
                 strict: bool = False, workers: int = 0, shard_size: int = SHARD_SIZE, overwrite: bool = False,
                 progress: bool = False) -> dict:
    """Embed every image under ``folder`` into ``out``, shard by shard: resumable (a rerun keeps the finished
    shards), incremental (a rerun embeds only new or changed files; removed ones drop out); under torchrun each
    process embeds every W-th shard and the first consolidates."""
    from tqdm.auto import tqdm

    from ..base.device import resolve_device
    from ..base.dist import barrier, device_for, setup

    world = setup(device)
    device = str(resolve_device(device_for(world, device)))
    root = Path(folder)
    files = list_images(folder)
    if Path(out).resolve().is_relative_to(root.resolve()):
        raise UserError(f"--out {out} is inside the image folder {folder}; isif never writes there: pass --out "
                        "somewhere else")
    embedder = Embedder(checkpoint, device, batch_size)
    store = EmbedDir(out)
    if world.main:
        store.check_owner(embedder.fingerprint, overwrite)
    barrier(world)
    keys = [_key(root, f) for f in files]
    rows, broken = store.done(embedder.fingerprint)
    if strict and any(k in broken for k in keys):
        k = next(k for k in keys if k in broken)
        raise broken_image(root / k[0], broken[k])
    pending = [i for i, k in enumerate(keys) if k not in rows and k not in broken]
    chunks = [pending[s:s + shard_size] for s in range(0, len(pending), shard_size)]
    bar = tqdm(total=len(pending), desc="embedding", unit="img", disable=None if progress and world.main else True,
               file=sys.stderr)
    for c, chunk in enumerate(chunks):
        if c % world.size != world.rank:
            continue
        z, kept, bad = embed_files(embedder, [files[i] for i in chunk], workers, strict, bar)
        store.write_shard([keys[i] for i in chunk], z, kept, bad, embedder.fingerprint)
    bar.close()
    barrier(world)
    n, skipped = (store.consolidate(keys, root, embedder) if world.main else (0, 0))
    if world.main and skipped:
        _, broken = store.done(embedder.fingerprint)
        report_skipped([str(root / k[0]) for k in keys if k in broken], str(folder))
    barrier(world)
    if world.main and n == 0:
        raise UserError(f"{folder}: none of the {len(files)} images could be read")
    return {"images": n, "skipped": skipped, "new": len(pending), "dim": int(embedder.cfg.model.dim),
            "out": str(out), "shards": len(chunks)}
