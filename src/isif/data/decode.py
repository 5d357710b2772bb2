"""Safe decoding of one image file, and the one-line reports of broken ones."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class BadImage(Exception):
    """An image file that cannot be decoded."""


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTS


def decode_rgb(data: bytes, name: str = "") -> np.ndarray:
    """Decode bytes into an (H, W, 3) uint8 RGB array.

    Grey, palette, RGBA (alpha dropped, as PIL's convert does), CMYK and
    16-bit images are converted; anything unreadable raises ``BadImage``.
    """
    if not data:
        raise BadImage(f"{name}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max() > 255 else 255.0
                im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(f"{name}: {e}") from None


def broken_image(path, reason: str) -> UserError:
    """The one-line refusal of ``--strict`` for an image that cannot be decoded."""
    return UserError(f"{path}: unreadable image ({str(reason).split(': ', 1)[-1][:80]}); drop --strict to skip "
                     "broken files")


def report_skipped(items: list[str], what: str = "", kind: str = "unreadable") -> None:
    """One stderr line: how many images were skipped, and the first few."""
    if items:
        where = f" in {what}" if what else ""
        print(f"isif: skipped {len(items)} {kind} image(s){where}, first: {'; '.join(items[:3])}", file=sys.stderr)
