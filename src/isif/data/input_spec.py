"""How a trained network sees an image: the input spec, one typed record from every source, and its test transform.

    InputSpec(size, mean, std, resize=None, fit="square", stored=None, version=1)

- ``size``: the side S of the (3, S, S) input;
- ``mean``, ``std``: the per-channel normalisation (a timm backbone's own, else the training data's moments);
- ``resize``: for a centre crop (``--crop-mode fixed``, the unseen-category protocol), the square side an image is
  resized to before the centre S x S crop; None when there is no crop;
- ``fit``: how a file of any shape became a training image: "square" (the shorter side resized to S, the centre
  crop) or "crop" (a run on unlabelled images: ``fit_square``, as its source stored them, and JPEGs drafted near S);
- ``stored``: the side of the stored training images (the checkpoint records it; None from the other sources);
- ``version``: of this record's layout; the layout without a ``version`` key is version 1, so a version 1 spec is
  written without one and the files stay as they always were.

One reader per source: ``from_checkpoint(state, cfg)`` (a checkpoint's ``"input"``; a checkpoint from before it
was recorded gets what training at that config saw), ``from_safetensors(meta)`` and ``from_embed_dir(meta)`` (the
``"input"`` of an isif safetensors file's metadata, of an embed folder's index.json); ``for_run`` is what a run
records. One writer, ``to_dict()``: the recipe of index.json and the safetensors metadata, or with
``checkpoint=True`` the checkpoint's dict (keys size, mean, std, resize (the stored side), center_crop, fit).

The test transform: ``transform()`` for stored uint8 images (evaluation), ``decode`` and ``prepare`` for files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..base.errors import UserError
from .augment import PlainTransform, build_transforms

if TYPE_CHECKING:
    from .augment import AugmentConfig, BatchAugment
    from .types import Splits

VERSION = 1
FITS = ("square", "crop")
RECIPE_KEYS = ("size", "mean", "std", "resize", "fit")


@dataclass(frozen=True)
class InputSpec:
    """How a trained network sees an image (see the module docstring)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None = None
    fit: str = "square"
    stored: int | None = field(default=None, compare=False)  # bookkeeping, not how the network sees an image
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.size < 1 or len(self.mean) != 3 or len(self.std) != 3 or self.fit not in FITS:
            raise ValueError(f"not an input spec: size {self.size}, mean {self.mean}, std {self.std}, fit {self.fit}")

    def __getitem__(self, key: str) -> Any:
        """``spec["size"]`` as well as ``spec.size``: the recipe's keys, as the dict that ``LoadedModel.input_spec``
        was before (mean and std as tuples)."""
        if key not in RECIPE_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    # ------------------------------------------------------------------ readers

    @classmethod
    def for_run(cls, size: int | None, crop_mode: str, splits: Splits, recipe: dict | None = None) -> InputSpec:
        """What a run on ``splits`` sees: side ``size`` (--size), else the backbone's own (``recipe``, a timm data
        config), else the stored images'; the recipe's mean and std, else the data's; a centre crop of the stored
        side with ``crop_mode`` "fixed"; the source's fit."""
        stored = int(splits.train.images.shape[-1])
        side = size or (recipe["size"] if recipe else None) or stored
        mean, std = (recipe["mean"], recipe["std"]) if recipe else (splits.mean, splits.std)
        return cls(int(side), _three(mean), _three(std), stored if crop_mode == "fixed" else None,
                   splits.fit, stored)

    @classmethod
    def in_checkpoint(cls, state: dict) -> InputSpec | None:
        """The spec a checkpoint recorded (its ``"input"``), or None when it recorded none. Older keys: no
        ``fit`` is "square", no ``center_crop`` no crop."""
        d = state.get("input")
        if not d:
            return None
        try:
            _check_version(d)
            stored = int(d["resize"]) if d.get("resize") is not None else None
            return cls(int(d["size"]), _three(d["mean"]), _three(d["std"]), stored if d.get("center_crop") else None,
                       d.get("fit", "square"), stored, int(d.get("version", VERSION)))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"the checkpoint's input spec is malformed ({e}); use a checkpoint written by "
                            "`isif train`") from None

    @classmethod
    def from_checkpoint(cls, state: dict, cfg: Any, splits: Splits | None = None) -> InputSpec:
        """The checkpoint's spec; for a checkpoint from before specs were recorded (no timm backbone then), what
        training at its config saw of its data (``splits``, else loaded from ``cfg.data``)."""
        spec = cls.in_checkpoint(state)
        if spec is not None:
            return spec
        if splits is None:
            from .registry import load_dataset

            splits = load_dataset(cfg.data)
        return cls.for_run(cfg.data.size, cfg.augment.crop_mode, splits)

    @classmethod
    def from_safetensors(cls, meta: dict, source: object = "the file") -> InputSpec:
        """The ``"input"`` of an isif safetensors file's metadata (checked by ``parse_metadata``)."""
        return cls.from_recipe(meta["input"], f"{source}: its isif metadata")

    @classmethod
    def from_embed_dir(cls, meta: dict, source: object = "index.json") -> InputSpec | None:
        """The ``"input"`` of an embed folder's index.json, or None when it has none (a folder not written by
        ``isif embed``)."""
        d = meta.get("input")
        return cls.from_recipe(d, f"{source}: its input") if d else None

    @classmethod
    def from_recipe(cls, d: Any, where: str) -> InputSpec:
        try:
            _check_version(d)
            resize = d.get("resize")
            return cls(int(d["size"]), _three(d["mean"]), _three(d["std"]), int(resize) if resize else None,
                       d.get("fit", "square"), None, int(d.get("version", VERSION)))
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where} is malformed ({type(e).__name__}: {str(e)[:80]}); write it again with isif") \
                from None

    # ------------------------------------------------------------------ writer

    def to_dict(self, checkpoint: bool = False) -> dict[str, Any]:
        """The stored form: index.json's and the safetensors metadata's ``"input"`` (size, mean, std, resize, fit),
        or with ``checkpoint`` the checkpoint's (size, mean, std, resize: the stored side, center_crop, fit)."""
        d: dict[str, Any] = {"size": int(self.size), "mean": [float(v) for v in self.mean],
                             "std": [float(v) for v in self.std]}
        if checkpoint:
            d.update(resize=int(self.stored if self.stored is not None else self.resize or self.size),
                     center_crop=self.resize is not None)
        else:
            d["resize"] = self.resize
        d["fit"] = self.fit
        if self.version != 1:  # version 1 is the layout without the key
            d["version"] = self.version
        return d

    # ------------------------------------------------------------------ the test transform

    def transform(self) -> PlainTransform:
        """The test transform of stored (N, 3, H, W) uint8 images: the centre crop (with ``resize``) or resize to
        ``size``, then the normalisation; training evaluates with it."""
        return PlainTransform(self.size, self.mean, self.std, center_crop=self.resize is not None)

    def transforms(self, augment: AugmentConfig, splits: Splits) -> tuple[BatchAugment, PlainTransform]:
        """(the training augmentation, the test transform) of ``splits`` at this spec's size and normalisation."""
        return build_transforms(augment, self.size, dataclasses.replace(splits, mean=self.mean, std=self.std))

    def decode(self, data: bytes, name: str, info: dict | None = None) -> np.ndarray:
        """An encoded image -> (H, W, 3) uint8 by the safe decoder (a JPEG drafted near ``size`` for fit "crop");
        raises ``BadImage``. ``info``: as ``decode_rgb``'s."""
        from .decode import decode_rgb

        return decode_rgb(data, name, draft=self.size if self.fit == "crop" else None, info=info)

    def prepare(self, arr: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, size, size) float in [0, 1], the test transform of a file (``prepare``)."""
        return prepare(arr, self.size, self.resize, self.fit)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Prepared images (N, 3, S, S) in [0, 1] -> the network's input."""
        from .augment import normalize

        return normalize(x, torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1))


def _three(v: Any) -> tuple[float, float, float]:
    t = tuple(float(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"expected 3 channels, got {len(t)}")
    return t  # type: ignore[return-value]


def _check_version(d: dict) -> None:
    v = d.get("version", VERSION)
    if not isinstance(v, int) or v > VERSION:
        raise UserError(f"input spec version {v!r} is newer than this isif reads ({VERSION}); upgrade isif")


def prepare(arr: np.ndarray, size: int, resize: int | None = None, fit: str = "square") -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float in [0, 1], the test transform of training:

    - ``resize`` given (the unseen-category protocol): resized to resize x resize, then the centre
      size x size crop, as the streamed sources;
    - ``fit="crop"`` (a run on unlabelled images): exactly as training stored them, the shorter side resized
      to ``size`` and the centre square (``fit_square``);
    - otherwise the shorter side resized to ``size`` and the centre crop.
    """
    if fit == "crop" and resize is None:
        from .decode import fit_square

        return torch.from_numpy(np.array(fit_square(arr, size))).permute(2, 0, 1).float().div_(255)
    if resize is not None:
        from .stream import load_file_array

        x = load_file_array(arr, resize).float().div_(255)
        top, left = int(round((resize - size) / 2.0)), int(round((resize - size) / 2.0))
        return x[:, top:top + size, left:left + size]
    # resized in uint8 (torch's antialiased kernel, rounded to the nearest level): a full-size float copy of a large
    # photo would cost 4 bytes a subpixel before any resize
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # torch wraps only writable arrays (a decoder's own output is)
        arr = arr.copy()
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8, channels last
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size]
    return x[0].float().div_(255)
