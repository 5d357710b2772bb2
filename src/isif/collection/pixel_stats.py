"""Pixel statistics of one decoded image, measured by ``isif embed`` while it holds the pixels (no second decode),
kept beside the features and read by ``isif audit`` (audit.py turns them into scores and flags).

Measured on the image's brightness (CleanVision's perceived brightness, sqrt(0.241 R^2 + 0.691 G^2 + 0.068 B^2),
in [0, 1]) at most ``WORK_SIDE`` pixels on its longer side (box-reduced by an integer factor): the 1st and 99th
percentiles (nearest rank, of the brightness rounded to 256 levels), the sharpness (log of the variance of the
4-neighbour Laplacian over the variance of the image: high frequencies against contrast, so a dark or a
low-contrast image is not called blurred), the entropy of the 256-level histogram in bits, and the colourfulness
(the mean spread of R, G and B); with the full upright width and height. And a perceptual hash that a mirror
image shares (``mirror_hash``), kept as four 16-bit columns, for ``isif duplicates`` and ``isif audit --against``
to find copies whatever the network has learned.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HASH_COLUMNS = ("hash0", "hash1", "hash2", "hash3")  # the 64-bit mirror_hash, 16 bits a column (exact in float32)
COLUMNS = ("width", "height", "bright_p01", "bright_p99", "sharpness", "entropy", "colour", *HASH_COLUMNS)
VERSION = 2
HASH_SIDE = 32
WORK_SIDE = 256
_SQUARES = [(w * (np.arange(256, dtype=np.float32) / 255) ** 2).astype(np.float32) for w in (0.241, 0.691, 0.068)]


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: row v is frequency v."""
    k = np.arange(n)
    d = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * np.sqrt(2 / n)
    d[0] /= np.sqrt(2)
    return d


_DCT = _dct_matrix(HASH_SIDE)


def mirror_hash(b: np.ndarray) -> np.ndarray:
    """A 64-bit DCT perceptual hash (pHash) of a brightness image in [0, 1], equal for the image and its mirror:
    the image averaged with its mirror (the same array for both) is box-reduced to 32 x 32, where its horizontal
    DCT has only even frequencies; of the lowest 8 x 8 of those (8 vertical, the even 0-14 horizontal), DC left
    out, each above their median is a 1 bit. Returns four uint16 values as float32."""
    sym = (b + b[:, ::-1]) * (255 / 2) + 0.5  # the same array for the image and its mirror
    g = np.asarray(Image.fromarray(sym.astype(np.uint8)).resize((HASH_SIDE, HASH_SIDE), Image.BOX), np.float64)
    c = (_DCT[:8] @ g @ _DCT[0:16:2].T).ravel()
    bits = np.zeros(64, bool)
    bits[1:] = c[1:] > np.median(c[1:])
    return np.packbits(bits).view(">u2").astype(np.float32)


def hash_words(pixels: np.ndarray) -> np.ndarray:
    """(N,) uint64 mirror hashes from the statistics rows (N, len(COLUMNS))."""
    w = pixels[:, [COLUMNS.index(c) for c in HASH_COLUMNS]].astype(np.uint64)
    return (w[:, 0] << np.uint64(48)) | (w[:, 1] << np.uint64(32)) | (w[:, 2] << np.uint64(16)) | w[:, 3]


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
    return np.concatenate([np.array([width, height, _level(counts, 0.01), _level(counts, 0.99), sharp, entropy,
                                     spread.mean(dtype=np.float64) / 255], np.float32), mirror_hash(b)])
