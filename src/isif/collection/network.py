"""A trained network and its input spec, loaded from a run folder, a checkpoint or an isif safetensors export, and
used on images; ``isif.api`` re-exports the public names (``load_model``, ``LoadedModel``, ``ImageTransform``,
``embed``). ``embed`` goes through the same decoding, test transform, precision and memory format as
``isif embed``, so its features equal the command's."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..base.errors import UserError
from ..data.decode import BadImage, rgb_array
from ..data.input_spec import InputSpec

if TYPE_CHECKING:
    from ..models import ModelConfig
    from ..training.config import Config

ImageLike = str | os.PathLike | Image.Image | np.ndarray
"""An image: a file path, a PIL image, or an (H, W, 3) uint8 RGB array."""


class ImageTransform:
    """The test transform of a trained network: one image -> the (3, S, S) float32 tensor the network expects.

    Accepts a path (read and decoded exactly as ``isif embed`` decodes files: EXIF orientation applied, any mode
    converted to RGB), a PIL image (orientation applied, converted to RGB) or an (H, W, 3) uint8 RGB array. The
    image is resized and centre-cropped to S x S as the network saw its test images, scaled to [0, 1] and
    normalised with the run's mean and std. (For a run on unlabelled images, ``isif embed`` decodes a JPEG file
    at a reduced scale near S; a path gets that too, an image already decoded is used at its full size.)
    """

    def __init__(self, input_spec: InputSpec | Mapping[str, Any]) -> None:
        self.spec = input_spec if isinstance(input_spec, InputSpec) else InputSpec.from_recipe(
            input_spec, "ImageTransform's input spec")
        self.size: int = self.spec.size
        self.mean = torch.tensor(self.spec.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(self.spec.std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, resize={self.spec.resize}, fit={self.spec.fit!r})"

    def __call__(self, image: ImageLike) -> torch.Tensor:
        """(3, S, S) float32, normalised; raises ``UserError`` for an unreadable file, ``TypeError`` or
        ``ValueError`` for something that is no image."""
        return (self.spec.prepare(self.to_array(image)) - self.mean) / self.std

    def to_array(self, image: ImageLike) -> np.ndarray:
        """The image as upright (H, W, 3) uint8 RGB, before any resizing."""
        if isinstance(image, (str, os.PathLike)):
            try:
                return self.spec.decode(Path(image).read_bytes(), str(image))
            except (BadImage, OSError) as e:
                reason = str(e).split(": ", 1)[-1][:80] or type(e).__name__
                raise UserError(f"{image}: unreadable image ({reason}); pass a readable image file") from None
        if isinstance(image, Image.Image):
            return rgb_array(image)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"an image array must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}; "
                                 "convert others with PIL.Image.fromarray(a).convert('RGB')")
            return image
        raise TypeError(f"an image is a path, a PIL image or an (H, W, 3) uint8 array, not {type(image).__name__}")


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A trained embedding network and what it needs to be used; unpacks as ``network, transform``.

    Attributes:
        network: the ``nn.Module`` in eval mode: (N, 3, S, S) normalised images -> (N, D) L2-normalised
            embeddings.
        transform: an ``ImageTransform``: one image -> the (3, S, S) tensor ``network`` expects.
        input_spec: how the network sees an image, an ``InputSpec``: size, mean, std, resize (or None), fit
            (``input_spec["size"]`` works too).
        model_config: the architecture (arch, width, dim, ...).
        precision: the run's precision (fp32, bf16, fp16, fp64): ``embed`` runs the network under its autocast.
        channels_last: the run's memory format.
        source: the file the weights came from (a checkpoint or a .safetensors file).
        config: the run's whole training config when loaded from a checkpoint; None from a .safetensors file.
    """

    network: nn.Module
    transform: ImageTransform
    input_spec: InputSpec
    model_config: ModelConfig
    precision: str
    channels_last: bool
    source: Path
    config: Config | None = None

    def __iter__(self) -> Iterator[Any]:
        yield self.network
        yield self.transform

    @property
    def device(self) -> torch.device:
        """Where the network's weights are."""
        return next(self.network.parameters()).device

    @property
    def dim(self) -> int:
        """The embedding size D."""
        return int(getattr(self.network, "dim", self.model_config.dim))


def load_model(source: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a trained network from a run folder, a checkpoint (.pt) or a ``.safetensors`` export.

    ``device``: cpu, cuda, cuda:N or auto. Returns a ``LoadedModel``; ``network, transform = load_model(run)``
    also works. Raises ``UserError`` (one line naming the fix) for a missing, damaged or foreign file.

    Example:
        >>> network, transform = load_model("runs/my-run")  # doctest: +SKIP
        >>> z = network(transform("photo.jpg")[None])        # (1, 128)  # doctest: +SKIP
    """
    from ..base.device import resolve_device

    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    p = Path(source)
    if p.suffix.lower() == ".safetensors":
        return load_from_safetensors(p, dev)
    return load_from_checkpoint(p, dev)


def load_from_checkpoint(source: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """A checkpoint's (or a run folder's checkpoints/last.pt) network, config and input spec."""
    from ..training.checkpoint import load_trained, resolve_checkpoint

    path = resolve_checkpoint(source)
    model, cfg, state = load_trained(path, device)
    spec = InputSpec.from_checkpoint(state, cfg)
    return LoadedModel(model, ImageTransform(spec), spec, cfg.model, cfg.train.precision,
                       bool(cfg.train.channels_last), path, cfg)


def load_from_safetensors(p: Path, device: torch.device) -> LoadedModel:
    """An isif safetensors export's network: its architecture, input spec and precision from its metadata."""
    from ..base.device import PRECISIONS, param_dtype
    from ..models import build_model
    from ..models.weights import EXPORT, read_state_dict

    state, meta = read_state_dict(p, need_metadata=True)
    mc = _model_config(meta["model"], p)
    spec = InputSpec.from_safetensors(meta, p)
    precision = meta.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise UserError(f"{p}: its isif metadata has precision {precision!r}; export the checkpoint again with "
                        f"`{EXPORT}`")
    try:
        net = build_model(mc, spec.size)
        net.to(param_dtype(precision)).load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{p}: the weights do not fit {mc.arch} width {mc.width} ({str(e).splitlines()[0][:120]}); "
                        f"export the checkpoint again with `{EXPORT}`") from None
    embedding = meta.get("embedding", "head")  # exports made before methods declared their embedding: the head
    try:
        net.embedding = embedding
    except ValueError:
        raise UserError(f"{p}: its isif metadata has embedding {embedding!r}; export the checkpoint again with "
                        f"`{EXPORT}`") from None
    net.to(device).eval()
    channels_last = bool(meta.get("channels_last", False))
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return LoadedModel(net, ImageTransform(spec), spec, mc, precision, channels_last, p)


def _model_config(d: dict[str, Any], p: Path) -> ModelConfig:
    from ..models import ModelConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"{p}: its model has a setting this isif does not know ({unknown[0]}); upgrade isif")
    return dataclasses.replace(ModelConfig(**d), weights=None)  # the file has the weights


def embed(model: LoadedModel | str | os.PathLike, images: Iterable[ImageLike] | ImageLike,
          batch_size: int = 256) -> torch.Tensor:
    """(N, D) float32 L2-normalised embeddings of ``images``, on the CPU, row i for the i-th image.

    ``model``: a ``LoadedModel`` (or a run folder, checkpoint or .safetensors file, loaded on the CPU).
    ``images``: paths, PIL images or (H, W, 3) uint8 arrays, or one of them alone. Each goes through the
    network's ``transform``, and the network runs ``batch_size`` images at a time with the run's precision and
    memory format: the features of files equal ``isif embed``'s. An unreadable file is a ``UserError`` naming it.
    """
    from .embedding import run_network

    if not isinstance(model, LoadedModel):
        model = load_model(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    single = isinstance(images, (str, os.PathLike, Image.Image)) or (
        isinstance(images, np.ndarray) and images.ndim == 3)
    items = [images] if single else list(images)
    out = []
    for s in range(0, len(items), batch_size):
        x = torch.stack([model.transform(im) for im in items[s:s + batch_size]])
        out.append(run_network(model.network, x, model.device, model.precision, model.channels_last))
    return torch.cat(out) if out else torch.zeros(0, model.dim)
