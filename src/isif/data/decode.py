"""Safe decoding of one image file, and the one-line reports of broken ones.

Real folders are messy. ``decode_rgb`` takes any file PIL reads (JPEG, PNG,
WEBP, BMP, TIFF, GIF: the first frame) and gives upright 8-bit RGB:

- EXIF orientation is applied (a phone photo stored rotated comes out upright);
- grey, palette (with or without transparency), RGBA and LA (alpha dropped),
  CMYK, 16-bit and float images are converted;
- an image past PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``,
  about 89 megapixels) is refused as ``TooLarge`` before its pixels are
  decoded, instead of PIL's warning-then-decode between one and two times the
  limit;
- with ``draft``, a JPEG is decoded by libjpeg at the smallest 1/2, 1/4 or 1/8
  scale whose shorter side still has ``draft`` pixels: a 12-megapixel photo
  needed at 64 pixels decodes many times faster.
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class BadImage(Exception):
    """An image file that cannot be decoded."""


class TooLarge(BadImage):
    """An image past the decompression-bomb limit."""


TOO_LARGE = "too large to decode safely"


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTS


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    return im if im.mode == "RGB" else im.convert("RGB")


def rgb_array(im: Image.Image) -> np.ndarray:
    """A PIL image -> upright (H, W, 3) uint8 RGB: its EXIF orientation applied, any mode converted as
    ``decode_rgb`` converts it."""
    return np.asarray(_to_rgb(ImageOps.exif_transpose(im)), dtype=np.uint8)


def decode_rgb(data: bytes, name: str = "", draft: int | None = None) -> np.ndarray:
    """Decode bytes into an upright (H, W, 3) uint8 RGB array; anything unreadable raises ``BadImage``
    (``TooLarge`` for a decompression bomb)."""
    if not data:
        raise BadImage(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if draft is not None and im.format == "JPEG":
                    im.draft("RGB", (draft, draft))
                im.load()
                return rgb_array(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise TooLarge(f"{name}: {TOO_LARGE} ({str(e).split(', could')[0][:80]})") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError,
            ZeroDivisionError) as e:  # PIL's plugins raise all of these on malformed files
        raise BadImage(f"{name}: {e or type(e).__name__}") from None


def fit_square(arr: np.ndarray, side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (side, side, 3): the shorter side resized to ``side`` (bilinear, antialiased), then
    the centre crop. Any size and aspect ratio goes in; nothing is stretched."""
    h, w = arr.shape[:2]
    if (h, w) == (side, side):
        return arr
    scale = side / min(h, w)
    nw, nh = max(side, round(w * scale)), max(side, round(h * scale))
    im = Image.fromarray(arr).resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    left, top = (nw - side) // 2, (nh - side) // 2
    return np.asarray(im.crop((left, top, left + side, top + side)), dtype=np.uint8)


def broken_image(path, reason: str) -> UserError:
    """The one-line refusal of ``--strict`` for an image that cannot be decoded."""
    return UserError(f"{path}: unreadable image ({str(reason).split(': ', 1)[-1][:80]}); drop --strict to skip "
                     "broken files")


def report_skipped(items: list[str], what: str = "", kind: str = "unreadable") -> None:
    """One stderr line: how many images were skipped, and the first few."""
    if items:
        where = f" in {what}" if what else ""
        print(f"isif: skipped {len(items)} {kind} image(s){where}, first: {'; '.join(items[:3])}", file=sys.stderr)
