"""Per-pixel operations on a batch of float images in [0, 1]: the colour operations of ColorJitter and
RandomGrayscale (as torchvision's tensor path: float32, clamped after each), Gaussian blur, solarisation, and
rounding to 8-bit levels. ``augment`` draws their parameters and applies them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L") and torchvision


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * a + (1 - factor) * b).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    return _blend(x, mean, f.view(-1, 1, 1, 1))


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, rgb_to_gray(x), f.view(-1, 1, 1, 1))


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``f`` (in turns, |f| <= 0.5) through HSV.

    RGB -> (H, S, V) with the max channel deciding the hue sector (ties: red,
    then green, then blue); back through the closed form
    c_n = V - V*S*clamp(min(k, 4 - k), 0, 1), k = (n + 6H) mod 6, n = 5, 3, 1,
    where V*S is the chroma max - min.
    """
    r, g, b = x.unbind(1)  # (N, H, W) each
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    h6 = torch.where(
        maxc == r,
        torch.remainder((g - b) / safe, 6.0),
        torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    h6 = torch.where(chroma > 0, h6, torch.zeros_like(h6))
    h6 = torch.remainder(h6 + 6.0 * f.view(-1, 1, 1), 6.0)  # (N, H, W) rotated hue, in sixths
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        out.append(maxc - chroma * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def to_uint8_levels(x: torch.Tensor) -> torch.Tensor:
    """``x`` in [0, 1] rounded to the nearest of the 256 levels of an 8-bit image (what a PIL image holds after
    every operation)."""
    return x.mul(255).round_().clamp_(0, 255).div_(255)


def blur_kernel_size(side: int) -> int:
    """SimCLR's kernel side for a ``side`` px image: the odd integer nearest 10% of it (ties up), at least 3.

    2 * (side // 20) + 1 is that odd number exactly: 3 at 32 px, 7 at 64, 9 at 96, 23 at 224.
    """
    return max(3, 2 * (side // 20) + 1)


def gaussian_kernels(sigma: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) sigmas -> (N, k) normalised 1-d Gaussian kernels, built as torchvision's ``_get_gaussian_kernel1d``."""
    lim = (k - 1) / (2.0 * math.sqrt(2.0))
    t = torch.linspace(-lim, lim, steps=k, dtype=torch.float32, device=sigma.device)
    return torch.softmax(t[None, :].div(sigma.float()[:, None]).pow(2).neg(), dim=1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """Blur each image with its own ``sigma`` and a k x k kernel: two separable grouped 1-d convolutions on
    reflect-padded images, as ``torchvision.transforms.v2.functional.gaussian_blur(img, [k, k], [s, s])``.

    Shape: x (N, C, H, W) float, sigma (N,) -> (N, C, H, W), clamped to [0, 1].
    """
    n, c, h, w = x.shape
    kern = gaussian_kernels(sigma.to(x.device), k).to(x.dtype).repeat_interleave(c, dim=0)  # (N*C, k)
    pad = k // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, 0, 0), mode="reflect")
    y = F.conv2d(y, kern.view(n * c, 1, 1, k), groups=n * c)  # along the width
    y = F.pad(y, (0, 0, pad, pad), mode="reflect")
    y = F.conv2d(y, kern.view(n * c, 1, k, 1), groups=n * c)  # along the height
    return y.view(n, c, h, w).clamp_(0, 1)


def solarize(x: torch.Tensor, threshold: float, on: torch.Tensor | None = None) -> torch.Tensor:
    """Invert the pixels >= ``threshold`` (to 1 - x) of the images of ``on`` (all if None), as ``TF.solarize``.

    On 8-bit levels k/255, a threshold of 0.5 inverts k >= 128: PIL's ``ImageOps.solarize(img, 128)``.
    """
    hit = x >= threshold
    if on is not None:
        hit &= on.to(x.device).view(-1, 1, 1, 1)
    return torch.where(hit, 1.0 - x, x)
