"""Batched augmentation of uint8 images, on the device where training runs.

One call transforms a whole batch, each image with its own random
parameters, drawn from the same distributions as torchvision's per-image
transforms of the paper:

    RandomResizedCrop(size, scale=(0.2, 1.0), ratio=(3/4, 4/3))
    RandomHorizontalFlip()
    RandomApply([ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4)], p=jitter_p)  # paper: p=1
    RandomGrayscale(p=0.2)
    RandomApply([GaussianBlur(k, sigma=(0.1, 2.0))], p=blur_p)  # off by default
    RandomSolarize(threshold=0.5, p=solarize_p)  # off by default
    Normalize(mean, std)

The optional parts (jitter probability, blur, solarisation: the successors' recipes) draw random numbers only
when on, so the default configuration consumes the generator exactly as before they existed. Parameters are
drawn on the CPU from an explicit ``torch.Generator``, so a run is reproducible and resumable on any device;
the pixel work (``pixels``) runs where the images are.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..base.errors import UserError
from ..base.settings import PROBABILITY, one_of, setting
from .pixels import JITTER_OPS, blur_kernel_size, gaussian_blur, rgb_to_gray, solarize, to_uint8_levels
from .types import Splits


@dataclass(frozen=True)
class CropParams:
    """Per-image crop boxes, in pixels of the source image. All shapes (N,)."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor

    def select(self, sl: slice) -> CropParams:
        return CropParams(self.top[sl], self.left[sl], self.height[sl], self.width[sl])


def sample_crop_params(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> CropParams:
    """RandomResizedCrop's box sampler, vectorised over ``n`` images.

    As torchvision: up to ``attempts`` tries of an area fraction uniform in
    ``scale`` and a log-uniform aspect ratio; the first box that fits is taken,
    at a uniform integer position; if none fits, a centre crop with the ratio
    clamped into ``ratio``.
    """
    area = float(height * width)
    u = torch.rand(n, attempts, generator=generator, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u)  # (n, attempts)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(lo + (hi - lo) * torch.rand(n, attempts, generator=generator, dtype=torch.float64))
    w = torch.round(torch.sqrt(target * r)).long()  # (n, attempts)
    h = torch.round(torch.sqrt(target / r)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(ok.int(), dim=1, keepdim=True)  # first fitting attempt
    found = ok.any(dim=1)
    w = torch.gather(w, 1, first).squeeze(1)
    h = torch.gather(h, 1, first).squeeze(1)
    # fallback: centre crop with the aspect ratio clamped into `ratio`
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    uy, ux = torch.rand(2, n, generator=generator, dtype=torch.float64)
    top = torch.floor(uy * (height - h + 1).double()).long()
    left = torch.floor(ux * (width - w + 1).double()).long()
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return CropParams(top, left, h, w)


def sample_fixed_crop_params(n: int, height: int, width: int, size: int,
                             generator: torch.Generator | None = None) -> CropParams:
    """RandomCrop(size)'s boxes: a size x size window at a uniform integer position, as torchvision."""
    if size > height or size > width:
        raise ValueError(f"crop {size} is larger than the {width}x{height} images")
    uy, ux = torch.rand(2, n, generator=generator, dtype=torch.float64)
    top = torch.floor(uy * (height - size + 1)).long()
    left = torch.floor(ux * (width - size + 1)).long()
    full = torch.full((n,), size, dtype=torch.long)
    return CropParams(top, left, full, full)


def resized_crop(
    images: torch.Tensor, params: CropParams, size: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop each image to its box and resize it to ``size`` x ``size``, bilinearly.

    Sampling positions follow ``F.interpolate(..., align_corners=False)`` on the
    cropped box, clamped to the box's edge pixels, so the result equals
    torchvision's ``resized_crop`` without antialiasing (which only matters
    when shrinking). ``flip`` (N,) bool mirrors the chosen images.

    Shape: images (N, C, H, W) float -> (N, C, size, size).
    """
    n, _, height, width = images.shape
    dev = images.device
    p = torch.arange(size, device=dev, dtype=torch.float32) + 0.5  # (S,) output pixel centres

    def axis(start: torch.Tensor, extent: torch.Tensor, full: int) -> torch.Tensor:
        start = start.to(dev, torch.float32)[:, None]
        extent = extent.to(dev, torch.float32)[:, None]
        src = start + p[None, :] * extent / size - 0.5  # (N, S) source pixel coordinates
        src = torch.minimum(torch.maximum(src, start), start + extent - 1)
        return (2 * src + 1) / full - 1  # normalised for grid_sample(align_corners=False)

    ys = axis(params.top, params.height, height)  # (N, S)
    xs = axis(params.left, params.width, width)  # (N, S)
    if flip is not None:
        xs = torch.where(flip.to(dev)[:, None], xs.flip(1), xs)
    grid = torch.stack(
        (xs[:, None, :].expand(n, size, size), ys[:, :, None].expand(n, size, size)), dim=-1
    )  # (N, S, S, 2) as (x, y)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)




@dataclass(frozen=True)
class JitterParams:
    factors: torch.Tensor  # (N, 4): brightness, contrast, saturation, hue
    order: torch.Tensor  # (N, 4): a permutation of 0..3 per image
    on: torch.Tensor | None = None  # (N,) bool: the images jittered (RandomApply); None: every image

    def select(self, sl: slice) -> JitterParams:
        return JitterParams(self.factors[sl], self.order[sl], self.on[sl] if self.on is not None else None)


def sample_jitter_params(
    n: int, strength: tuple[float, float, float, float], generator: torch.Generator | None = None
) -> JitterParams:
    """ColorJitter's parameters: factors uniform in [max(0, 1-s), 1+s] (hue: [-s, s]); a random order."""
    b, c, s, h = strength
    lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
    hi = torch.tensor([1 + b, 1 + c, 1 + s, h])
    u = torch.rand(n, 4, generator=generator)
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)
    return JitterParams(lo + (hi - lo) * u, order)



def color_jitter(x: torch.Tensor, params: JitterParams, active: tuple[bool, ...] = (True,) * 4,
                 round_uint8: bool = False) -> torch.Tensor:
    """Apply the four jitter operations in each image's own order, to the images of ``params.on`` (all if None).
    ``x`` is float (N, 3, H, W) in [0, 1]; ``round_uint8``: round to 8-bit levels after each operation."""
    factors = params.factors.to(x.device)
    order = params.order.to(x.device)
    on = params.on.to(x.device) if params.on is not None else None
    for pos in range(4):
        for op in range(4):
            if not active[op]:
                continue
            hit = order[:, pos] == op
            sel = torch.nonzero(hit & on if on is not None else hit).squeeze(1)
            if sel.numel():
                y = JITTER_OPS[op](x[sel], factors[sel, op])
                x[sel] = to_uint8_levels(y) if round_uint8 else y
    return x



@dataclass(frozen=True)
class AugmentParams:
    crop: CropParams | None
    jitter: JitterParams | None
    gray: torch.Tensor  # (N,) bool
    flip: torch.Tensor  # (N,) bool
    blur: torch.Tensor | None = None  # (N,) bool; None: blur off (blur_p 0)
    blur_sigma: torch.Tensor | None = None  # (N,) float32, drawn for every image when blur is on
    solarize: torch.Tensor | None = None  # (N,) bool; None: solarisation off (solarize_p 0)

    def select(self, sl: slice) -> AugmentParams:
        """The parameters of images ``sl`` of the batch (a process's share of a global batch)."""
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return t[sl] if t is not None else None

        return AugmentParams(self.crop.select(sl) if self.crop is not None else None,
                             self.jitter.select(sl) if self.jitter is not None else None,
                             self.gray[sl], self.flip[sl], cut(self.blur), cut(self.blur_sigma), cut(self.solarize))


class BatchAugment:
    """The paper's training augmentation for a batch of uint8 images.

    Args:
        size: output side in pixels.
        mean, std: per-channel normalisation.
        crop_scale: RandomResizedCrop's area range; ``None`` disables the crop
            (the whole image is resized to ``size``).
        crop_mode: "resized" (RandomResizedCrop, the CIFAR/STL protocol) or "fixed" (RandomCrop(size) out of
            larger stored images: the unseen-category protocol's random 227 crop of a 256x256 image).
        jitter: ColorJitter strengths (brightness, contrast, saturation, hue);
            ``None`` or all zero disables it.
        grayscale_p: probability of RandomGrayscale.
        flip: RandomHorizontalFlip with probability 1/2.
        round_uint8: round to 8-bit levels after the crop, after each jitter operation, after the grey
            conversion, the blur and the solarisation, as the reference code's PIL pipeline holds uint8 images
            between operations (round to nearest; PIL's own arithmetic truncates in places and shifts hue in
            8-bit HSV, not modelled).
        jitter_p: probability that an image is jittered at all (RandomApply; lightly/solo-learn use 0.8).
        blur_p, blur_sigma: probability of a Gaussian blur, its sigma uniform in ``blur_sigma``, its kernel
            ``blur_kernel_size(size)``.
        solarize_p, solarize_threshold: probability of solarisation, pixels >= the threshold becoming 1 - x.

    The settings are one view's; ``view_augment`` makes a view's copy. A part draws random numbers only when
    it is on (jitter_p < 1, blur_p > 0, solarize_p > 0), after the others, so the defaults' stream is unchanged.

    Call: ``aug(images_uint8, generator) -> float32 (N, 3, size, size)``.
    """

    def __init__(
        self,
        size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        crop_scale: tuple[float, float] | None = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        jitter: tuple[float, float, float, float] | None = (0.4, 0.4, 0.4, 0.4),
        grayscale_p: float = 0.2,
        flip: bool = True,
        crop_mode: str = "resized",
        round_uint8: bool = False,
        *,
        jitter_p: float = 1.0,
        blur_p: float = 0.0,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_p: float = 0.0,
        solarize_threshold: float = 0.5,
    ) -> None:
        if crop_mode not in ("resized", "fixed"):
            raise ValueError(f"crop_mode must be resized or fixed, got {crop_mode!r}")
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {blur_sigma}")
        self.size = size
        self.crop_mode = crop_mode
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.crop_scale = crop_scale
        self.crop_ratio = crop_ratio
        self.jitter = tuple(jitter) if jitter is not None and any(j > 0 for j in jitter) else None
        self.grayscale_p = grayscale_p
        self.flip = flip
        self.round_uint8 = round_uint8
        self.jitter_p = float(jitter_p)
        self.blur_p = float(blur_p)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.solarize_p = float(solarize_p)
        self.solarize_threshold = float(solarize_threshold)

    def sample(self, n: int, height: int, width: int, generator: torch.Generator | None) -> AugmentParams:
        crop = None
        if self.crop_mode == "fixed":
            crop = sample_fixed_crop_params(n, height, width, self.size, generator)
        elif self.crop_scale is not None:
            crop = sample_crop_params(n, height, width, self.crop_scale, self.crop_ratio, generator)
        jit = sample_jitter_params(n, self.jitter, generator) if self.jitter is not None else None
        gray = torch.rand(n, generator=generator) < self.grayscale_p
        flip = torch.rand(n, generator=generator) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        # the optional parts draw after the paper's, and only when on: the defaults' stream is unchanged
        if jit is not None and self.jitter_p < 1:
            jit = dataclasses.replace(jit, on=torch.rand(n, generator=generator) < self.jitter_p)
        blur = sigma = sol = None
        if self.blur_p > 0:
            blur = torch.rand(n, generator=generator) < self.blur_p
            lo, hi = self.blur_sigma
            sigma = lo + (hi - lo) * torch.rand(n, generator=generator)
        if self.solarize_p > 0:
            sol = torch.rand(n, generator=generator) < self.solarize_p
        return AugmentParams(crop, jit, gray, flip, blur, sigma, sol)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        n, _, height, width = images.shape
        x = images.float().div_(255)
        crop = params.crop
        if crop is None:
            full = torch.zeros(n, dtype=torch.long)
            crop = CropParams(full, full, full + height, full + width)
        x = resized_crop(x, crop, self.size, params.flip)
        if self.round_uint8:
            x = to_uint8_levels(x)
        if params.jitter is not None:
            active = tuple(j > 0 for j in self.jitter)  # type: ignore[union-attr]
            x = color_jitter(x, params.jitter, active, self.round_uint8)
        gray = params.gray.to(x.device)
        if bool(gray.any()):
            sel = torch.nonzero(gray).squeeze(1)
            g = rgb_to_gray(x[sel])
            x[sel] = (to_uint8_levels(g) if self.round_uint8 else g).expand(-1, 3, -1, -1)
        if params.blur is not None and bool(params.blur.any()):  # CPU tensors: no device sync
            assert params.blur_sigma is not None
            sel = torch.nonzero(params.blur).squeeze(1)
            sigma, sel = params.blur_sigma[sel], sel.to(x.device)
            y = gaussian_blur(x[sel], sigma, blur_kernel_size(self.size))
            x[sel] = to_uint8_levels(y) if self.round_uint8 else y
        if params.solarize is not None and bool(params.solarize.any()):
            x = solarize(x, self.solarize_threshold, params.solarize)
            if self.round_uint8:
                x = to_uint8_levels(x)
        return normalize(x, self.mean, self.std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        params = self.sample(images.shape[0], images.shape[2], images.shape[3], generator)
        return self.apply(images, params)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean.to(x.device)) / std.to(x.device)


class PlainTransform:
    """The test transform: resize to ``size`` if needed (or, with ``center_crop``, take the centre
    ``size`` x ``size`` window, as CenterCrop), then normalise."""

    def __init__(self, size: int, mean: tuple[float, float, float], std: tuple[float, float, float],
                 center_crop: bool = False) -> None:
        self.size = size
        self.center_crop = center_crop
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.float().div_(255)
        h, w = x.shape[-2:]
        if self.center_crop and h >= self.size and w >= self.size:
            top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
            x = x[..., top:top + self.size, left:left + self.size]
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return normalize(x, self.mean, self.std)


@dataclass
class AugmentConfig:
    crop_scale: tuple[float, float] | None = setting(
        (0.2, 1.0), "RandomResizedCrop's area range MIN,MAX, or none (no crop)")
    jitter: tuple[float, float, float, float] | None = setting(
        (0.4, 0.4, 0.4, 0.4), "ColorJitter strengths B,C,S,H, or none")
    grayscale_p: float = setting(0.2, "RandomGrayscale probability", check=PROBABILITY)
    flip: bool = setting(True, "random horizontal flip")
    crop_mode: str = setting("resized", "resized (RandomResizedCrop) or fixed (RandomCrop of --size, centre at test)",
                             check=one_of("resized", "fixed"))
    round_uint8: bool = setting(False, "round the views to 8-bit levels after every operation, as the reference "
                                "code's PIL pipeline does")
    jitter_p: float = setting(1.0, "probability that ColorJitter is applied (the paper: always)", check=PROBABILITY)
    blur_p: tuple[float, ...] = setting(
        (0.0,), "Gaussian blur probability: one value for every view, or one per view (V1,V2)")
    blur_sigma: tuple[float, float] = setting((0.1, 2.0), "Gaussian blur sigma range MIN,MAX")
    solarize_p: tuple[float, ...] = setting(
        (0.0,), "solarisation probability: one value for every view, or one per view")
    solarize_threshold: float = setting(
        0.5, "solarisation threshold on [0, 1]: pixels >= it become 1 - x (0.5: 8-bit values >= 128)",
        check=PROBABILITY)

    def check(self) -> None:
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"--crop-scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if self.jitter is not None:
            if len(self.jitter) != 4 or not all(j >= 0 for j in self.jitter):
                raise ValueError("--jitter needs 4 strengths >= 0")
            if self.jitter[3] > 0.5:
                raise ValueError(f"hue jitter must be <= 0.5, got {self.jitter[3]}")
        if not 0 <= self.jitter_p <= 1:
            raise ValueError(f"--jitter-p must be in [0, 1], got {self.jitter_p}")
        for flag, values in (("--blur-p", self.blur_p), ("--solarize-p", self.solarize_p)):
            if len(values) == 0:
                raise ValueError(f"{flag} needs one value for every view, or one per view")
            for v in values:
                if not 0 <= v <= 1:
                    raise ValueError(f"{flag} must be in [0, 1], got {v}")
        if len(self.blur_sigma) != 2 or not 0 < self.blur_sigma[0] <= self.blur_sigma[1] < math.inf:
            raise ValueError(f"--blur-sigma must satisfy 0 < min <= max, got {self.blur_sigma}; give MIN,MAX, "
                             "e.g. 0.1,2.0")
        if not 0 <= self.solarize_threshold <= 1:
            raise ValueError(f"--solarize-threshold must be in [0, 1], got {self.solarize_threshold}")


def _per_view(values: tuple[float, ...], view: int, flag: str) -> float:
    """One view's value of a per-view setting: the single value, the view's entry, or past the end the last
    (multi-crop: the last value is every further local view's)."""
    if view < 0 or not values:
        raise ValueError(f"{flag}: no value for view {view}; give one value for every view, or one per view")
    return float(values[min(view, len(values) - 1)])


def view_augment(base: BatchAugment, cfg: AugmentConfig, view: int) -> BatchAugment:
    """A copy of ``base`` with view ``view``'s blur and solarisation probabilities (BYOL's views differ); a view
    past the values' end takes the last value (the caller refuses more values than views)."""
    aug = copy.copy(base)
    aug.blur_p = _per_view(cfg.blur_p, view, "--blur-p")
    aug.solarize_p = _per_view(cfg.solarize_p, view, "--solarize-p")
    return aug


def build_transforms(cfg: AugmentConfig, size: int | None, splits: Splits) -> tuple[BatchAugment, PlainTransform]:
    """(training augmentation, test transform) at ``size`` (default: the stored images' side). The augmentation
    has the first view's blur and solarisation probabilities; ``view_augment`` gives each view its own."""
    stored = int(splits.train.images.shape[-1])
    size = size or stored
    if cfg.crop_mode == "fixed" and size > stored:
        raise UserError(f"--size {size} is larger than the stored {stored}x{stored} images; a fixed crop needs "
                        "a smaller size")
    aug = BatchAugment(size, splits.mean, splits.std, cfg.crop_scale, jitter=cfg.jitter,
                       grayscale_p=cfg.grayscale_p, flip=cfg.flip, crop_mode=cfg.crop_mode,
                       round_uint8=cfg.round_uint8, jitter_p=cfg.jitter_p, blur_p=cfg.blur_p[0],
                       blur_sigma=cfg.blur_sigma, solarize_p=cfg.solarize_p[0],
                       solarize_threshold=cfg.solarize_threshold)
    return aug, PlainTransform(size, splits.mean, splits.std, center_crop=cfg.crop_mode == "fixed")
