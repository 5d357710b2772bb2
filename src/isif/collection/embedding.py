"""Embed a folder of one's own images with a trained checkpoint."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..base.device import autocast, param_dtype
from ..base.errors import UserError
from ..base.faults import fault_point
from ..base.files import sha256_file
from ..base.settings import at_least, setting
from ..data.decode import IMAGE_EXTS, BadImage, broken_image, max_decode_bytes, report_skipped
from ..data.input_spec import InputSpec
from ..training.checkpoint import load_trained, resolve_checkpoint
from .embed_dir import EmbedWriter, file_key
from .options import checkpoint_arg
from .pixel_stats import COLUMNS as PIXEL_COLUMNS
from .pixel_stats import pixel_stats


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
        self.model, self.cfg, self.state = load_trained(self.path, self.device)
        self.spec = InputSpec.from_checkpoint(self.state, self.cfg)
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        """The width of the embedding (the 128-d head, or the backbone's for a method that declares it)."""
        return int(getattr(self.model, "dim", self.cfg.model.dim))

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
        t = self.cfg.train
        return run_network(self.model, self.spec.normalise(torch.stack(xs)), self.device, t.precision,
                           t.channels_last)

    def image_bytes(self, data: bytes, name: str = "upload") -> torch.Tensor:
        """One encoded image (an upload) -> its feature (D,), decoded by the same safe decoder and test transform
        as the files; raises ``BadImage`` (``TooLarge`` for a decompression bomb or one over the decode limit)."""
        return self.forward([self.spec.prepare(self.spec.decode(data, name))])[0]


SHARD_SIZE = 50_000  # images per shard: the unit of resuming (a shard is written whole or not at all)


class _Prepared(torch.utils.data.Dataset):
    """For the DataLoader workers: one file decoded and brought to the network's input, or the reason it could
    not be."""

    def __init__(self, files: list[Path], spec: InputSpec) -> None:
        self.files, self.spec = files, spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str, np.ndarray | None]:
        f = self.files[i]
        info: dict = {}
        try:
            arr = self.spec.decode(f.read_bytes(), str(f), info)
        except (BadImage, OSError) as e:
            return i, None, str(e) or "unreadable", None
        return i, self.spec.prepare(arr), "", pixel_stats(arr, info.get("size"))


def _collate(items: list) -> list:
    return items


@torch.no_grad()
def embed_files(embedder: Embedder, files: list[Path], workers: int = 0, strict: bool = False,
                progress=None, stats: list | None = None) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """(features (n, D) float32, the indices of ``files`` embedded, {index: reason} of the broken ones), the
    files decoded by ``workers`` DataLoader workers, in order, ``embedder.batch_size`` at a time; ``stats``, when
    given, receives each embedded file's ``pixel_stats`` row, in the same order."""
    max_decode_bytes()  # a malformed ISIF_MAX_DECODE_MIB: refused here in one line, not in every worker
    sp = embedder.spec
    loader = torch.utils.data.DataLoader(_Prepared(files, sp), batch_size=embedder.batch_size, num_workers=workers,
                                         collate_fn=_collate, generator=torch.Generator().manual_seed(0))
    feats, kept, broken = [], [], {}
    for batch in loader:
        good = [(i, x) for i, x, _, _ in batch if x is not None]
        if stats is not None:
            stats += [p for _, x, _, p in batch if x is not None]
        for i, _, reason, _ in batch:
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
    z = torch.cat(feats).numpy() if feats else np.zeros((0, embedder.dim), np.float32)
    return z.astype(np.float32, copy=False), kept, broken


@dataclass(kw_only=True)
class EmbedOptions:
    checkpoint: str = checkpoint_arg()
    folder: str = setting(help="a folder of images (searched recursively)", positional=True)
    out: str | None = setting(None, "output folder (default FOLDER-embeddings beside the folder)")
    batch_size: int = setting(256, "images per forward pass", check=at_least(1))
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    workers: int | None = setting(None, "DataLoader workers decoding the files (default cores-1, max 8)",
                                  check=at_least(0))
    shard_size: int = setting(50_000, "images per shard, the unit a rerun resumes from", check=at_least(1))
    overwrite: bool = setting(False, "replace embeddings made with another checkpoint")
    strict: bool = setting(False, "stop at the first broken file instead of skipping it")
    quiet: bool = setting(False, "no progress bar")


@dataclass
class EmbedResult:
    images: int  # in the collection now
    skipped: int  # unreadable files
    new: int  # files embedded by this run (new or changed)
    dim: int
    out: Path
    shards: int  # written by this run
    calibration: dict | None  # the near-duplicate calibration, when this run measured it (calibration.py)
    index: dict | None  # the index's metadata, when this run brought an existing one up to date


def embed_folder(o: EmbedOptions) -> EmbedResult:
    """Embed every image under ``o.folder`` into ``o.out``, shard by shard: resumable (a rerun keeps the finished
    shards), incremental (a rerun embeds only new or changed files; removed ones drop out); under torchrun each
    process embeds every W-th shard and the first consolidates."""
    from tqdm.auto import tqdm

    from ..base.device import resolve_device
    from ..base.dist import barrier, device_for, setup, shared_folder
    from ..data.stream import default_workers

    folder, strict, shard_size = o.folder, o.strict, o.shard_size
    out = Path(o.out) if o.out else Path(str(Path(folder).resolve()) + "-embeddings")
    workers = default_workers() if o.workers is None else o.workers
    world = setup(o.device)
    device = str(resolve_device(device_for(world, o.device)))
    root = Path(folder)
    files = list_images(folder)
    if Path(out).resolve().is_relative_to(root.resolve()):
        raise UserError(f"--out {out} is inside the image folder {folder}; isif never writes there: pass --out "
                        "somewhere else")
    embedder = Embedder(o.checkpoint, device, o.batch_size)
    shared_folder(Path(out), world, "the embed folder rank 0 consolidates; under torchrun every node writes its "
                                    "shards there, so it must be on storage every node shares: put --out there")
    store = EmbedWriter(out)
    if world.main:
        store.check_owner(embedder.fingerprint, o.overwrite)
    barrier(world)
    keys = [file_key(root, f) for f in files]
    rows, broken = store.done(embedder.fingerprint)
    if strict and any(k in broken for k in keys):
        k = next(k for k in keys if k in broken)
        raise broken_image(root / k[0], broken[k])
    pending = [i for i, k in enumerate(keys) if k not in rows and k not in broken]
    chunks = [pending[s:s + shard_size] for s in range(0, len(pending), shard_size)]
    first_seq = store.next_seq(embedder.fingerprint)
    barrier(world)  # every process has read the same finished shards before any writes a new one
    bar = tqdm(total=len(pending), desc="embedding", unit="img", disable=None if not o.quiet and world.main else True,
               file=sys.stderr)
    for c, chunk in enumerate(chunks):
        if c % world.size != world.rank:
            continue
        pixels: list[np.ndarray] = []
        z, kept, bad = embed_files(embedder, [files[i] for i in chunk], workers, strict, bar, pixels)
        store.write_shard([keys[i] for i in chunk], z, kept, bad, embedder.fingerprint, first_seq + c,
                          np.stack(pixels) if pixels else np.zeros((0, len(PIXEL_COLUMNS)), np.float32))
    bar.close()
    barrier(world)
    n, skipped = (store.consolidate(keys, root, embedder.path, embedder.fingerprint, int(embedder.dim),
                                    embedder.spec) if world.main else (0, 0))
    if world.main and skipped:
        _, broken = store.done(embedder.fingerprint)
        report_skipped([str(root / k[0]) for k in keys if k in broken], str(folder))
    barrier(world)
    if world.main and n == 0:
        raise UserError(f"{folder}: none of the {len(files)} images could be read")
    calibrated, index = _after(embedder, store, Path(out)) if world.main else (None, None)
    barrier(world)
    return EmbedResult(n, skipped, len(pending), int(embedder.dim), Path(out), len(chunks), calibrated, index)


def _after(embedder: Embedder, store: EmbedWriter, out: Path) -> tuple[dict | None, dict | None]:
    """What follows a consolidated embed folder: the near-duplicate calibration, measured once per checkpoint, and
    an existing index brought up to date (extended with the new rows, as row ids are stable, or rebuilt after
    removals)."""
    calibrated = index = None
    if store.calibration(embedder.fingerprint) is None:
        from .calibration import calibrate
        from .embed_dir import load_embed_dir

        ed = load_embed_dir(out, unit=False)
        calibrated = calibrate(embedder, [ed.image(i) for i in range(len(ed.paths))], ed.features)
        if calibrated:
            store.record_calibration(calibrated)
    if (out / "index.faiss").is_file():
        from .index import extend_index

        index = extend_index(out)
    return calibrated, index
