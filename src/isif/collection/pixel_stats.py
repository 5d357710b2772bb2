"""Pixel statistics of one decoded image, measured by ``isif embed`` while it holds the pixels (no second decode),
kept beside the features and read by ``isif audit`` (audit.py turns them into scores and flags).

Measured on the image's brightness (CleanVision's perceived brightness, sqrt(0.241 R^2 + 0.691 G^2 + 0.068 B^2),
in [0, 1]) at most ``WORK_SIDE`` pixels on its longer side (box-reduced by an integer factor): the 1st and 99th
percentiles (nearest rank, of the brightness rounded to 256 levels), the sharpness (log of the variance of the
4-neighbour Laplacian over the variance of the image: high frequencies against contrast, so a dark or a
low-contrast image is not called blurred), the entropy of the 256-level histogram in bits, and the colourfulness
(the mean spread of R, G and B); with the full upright width and height.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

COLUMNS = ("width", "height", "bright_p01", "bright_p99", "sharpness", "entropy", "colour")
VERSION = 1
WORK_SIDE = 256
_SQUARES = [(w * (np.arange(256, dtype=np.float32) / 255) ** 2).astype(np.float32) for w in (0.241, 0.691, 0.068)]


def _level(counts: np.ndarray, q: float) -> float:
    """The nearest-rank q-quantile of the levels a 256-bin histogram counts, in [0, 1]."""
    rank = max(1, int(np.ceil(q * counts.sum())))
    return float(np.searchsorted(np.cumsum(counts), rank)) / 255


def pixel_stats(arr: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 -> float32 (len(COLUMNS),); ``size``: the full image's (width, height) when ``arr`` was
    decoded reduced (else ``arr``'s own)."""
    h, w = arr.shape[:2]
    f = -(-max(h, w) // WORK_SIDE)
    small = np.asarray(Image.fromarray(arr).reduce(f)) if f > 1 else arr
    r, g, bl = small[..., 0], small[..., 1], small[..., 2]
    b = np.sqrt(_SQUARES[0][r] + _SQUARES[1][g] + _SQUARES[2][bl])
    counts = np.bincount((b * 255 + 0.5).astype(np.uint8).ravel(), minlength=256)
    if min(b.shape) >= 3:
        lap = 4 * b[1:-1, 1:-1] - b[:-2, 1:-1] - b[2:, 1:-1] - b[1:-1, :-2] - b[1:-1, 2:]
        sharp = float(np.log((lap.var(dtype=np.float64) + 1e-8) / (b.var(dtype=np.float64) + 1e-8)))
    else:
        sharp = 0.0
    p = counts[counts > 0] / b.size
    entropy = float(-(p * np.log2(p)).sum())
    spread = np.maximum(np.maximum(r, g), bl) - np.minimum(np.minimum(r, g), bl)
    width, height = size if size is not None else (w, h)
    return np.array([width, height, _level(counts, 0.01), _level(counts, 0.99), sharp, entropy,
                     spread.mean(dtype=np.float64) / 255], np.float32)
