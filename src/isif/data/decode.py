"""Safe decoding of one image file, and the one-line reports of broken ones.

Real folders are messy. ``decode_rgb`` takes any file PIL reads (JPEG, PNG,
WEBP, BMP, TIFF, GIF: the first frame) and gives upright 8-bit RGB:

- EXIF orientation is applied (a phone photo stored rotated comes out upright);
- grey, palette (with or without transparency), RGBA and LA (alpha dropped),
  CMYK, 16-bit and float images are converted; 16-bit, 32-bit integer and
  float images map to grey as ``v / top * 255 + 0.5`` clipped to 0..255 and
  truncated, ``top`` being 65535 when the largest value is over 255, else 255
  (a float image's NaN pixels come out 0, and do not count for ``top``); this
  runs in row chunks (a 16-bit image through a 65536-entry table), never on a
  float64 copy of the whole image;
- an image past PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``,
  about 89 megapixels) is refused as ``TooLarge`` before its pixels are
  decoded, instead of PIL's warning-then-decode between one and two times the
  limit;
- so is an image whose decoding would need more than ``max_bytes`` of memory
  (default ``DEFAULT_MAX_DECODE_BYTES``, 1 GiB; the environment variable
  ``ISIF_MAX_DECODE_MIB`` sets another default for every decode: training
  scans and epochs, ``isif embed``, thumbnails, uploads). The need is
  estimated from the header alone (``decode_estimate``), and summed as if
  nothing were freed, so one decode's peak stays under it: the pixels as PIL
  stores them (1 byte for 1/L/P, 2 for 16-bit grey, 4 for every other mode:
  RGB is stored in 4), the decoder's own buffers (a progressive JPEG's
  coefficients, libwebp's canvases: a WEBP is checked before PIL opens it,
  since libwebp allocates them then), each conversion's image, the box
  reduction, an EXIF rotation's copy (unless the header rules one out), the
  RGB output (copied out in row chunks, never held twice) and the row chunks.
  ``benchmarks/decode_memory.py`` compares it with measured peaks. A 16-bit
  PNG of 9000x9000 zeros is 150 KiB on disk and needs about 0.56 GiB; every
  baseline 8-bit RGB JPEG under PIL's pixel limit, and any 8-bit JPEG of 50
  megapixels, fits in the default;
- with ``draft``, a JPEG is decoded by libjpeg at the smallest 1/2, 1/4 or 1/8
  scale whose shorter side still has ``draft`` pixels: a 12-megapixel photo
  needed at 64 pixels decodes many times faster, and the full-size image is
  never allocated. Only JPEG allows that: any other format (PNG, WEBP, TIFF,
  ...) is decoded whole by PIL, then box-reduced by an integer factor that
  keeps its shorter side at least ``2 * draft`` (PIL's ``reducing_gap=2``), so
  the conversions and the output are small but the full-size pixels are
  allocated once, and for those formats the bound is the refusal above.
"""

from __future__ import annotations

import io
import math
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import ExifTags, Image

from ..base.errors import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

DEFAULT_MAX_DECODE_BYTES = 1 << 30  # 1 GiB: an 89-megapixel RGB JPEG (PIL's pixel limit) needs 0.94 GiB at most
MAX_DECODE_ENV = "ISIF_MAX_DECODE_MIB"  # another default limit, in MiB, for every decode of the process
HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # mapped to 8-bit grey by ``_grey8``
WEBP_OPEN_BPP = 8  # libwebp allocates two RGBA canvases when PIL opens a WEBP: checked before opening it
REDUCING_GAP = 2  # a non-JPEG with ``draft`` is box-reduced to a shorter side of at least this times ``draft``
CHUNK_PIXELS = 1 << 20  # the rows converted or copied at once (a high-depth image's: a few 8 MiB float64 buffers)
_STORED_BPP = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}  # PIL's; others: 4
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transpose that makes the image upright
_LUT16: dict[float, np.ndarray] = {}


class BadImage(Exception):
    """An image file that cannot be decoded."""


class TooLarge(BadImage):
    """An image past the decompression-bomb limit, or whose decoding would need more memory than allowed."""


TOO_LARGE = "too large to decode safely"


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTS


def max_decode_bytes(max_bytes: int | None = None) -> int:
    """The memory one decode may need: ``max_bytes``, else ``ISIF_MAX_DECODE_MIB`` MiB when set, else
    ``DEFAULT_MAX_DECODE_BYTES``. A malformed variable raises ``UserError``."""
    if max_bytes is not None:
        return int(max_bytes)
    env = os.environ.get(MAX_DECODE_ENV, "").strip()
    if not env:
        return DEFAULT_MAX_DECODE_BYTES
    if not env.isdigit() or int(env) < 1:
        raise UserError(f"{MAX_DECODE_ENV}={env!r}: give the memory one image decode may use in whole MiB, e.g. "
                        f"{MAX_DECODE_ENV}=4096, or unset it for the default of {DEFAULT_MAX_DECODE_BYTES >> 20}")
    return int(env) << 20


def too_large_kind(limit: int) -> str:
    """What the skip summary calls the images refused as ``TooLarge`` under ``limit`` bytes: both limits, and the
    override."""
    return (f"{TOO_LARGE} (over the {limit / 2**20:,.0f} MiB decode limit, which {MAX_DECODE_ENV} raises, or PIL's "
            f"{Image.MAX_IMAGE_PIXELS:,}-pixel limit)")


# ----------------------------------------------------------------------------- conversion


def _lut16(top: float) -> np.ndarray:
    """Every 16-bit value's 8-bit grey, by the float64 formula itself (so the table is exact)."""
    if top not in _LUT16:
        _LUT16[top] = np.clip(np.arange(65536, dtype=np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return _LUT16[top]


def _row_chunks(im: Image.Image) -> Iterator[tuple[int, int, np.ndarray]]:
    """(first row, end row, the rows as an array) of ``im``, about ``CHUNK_PIXELS`` pixels at a time."""
    w, h = im.size
    step = max(1, CHUNK_PIXELS // max(1, w))
    for y in range(0, h, step):
        y1 = min(h, y + step)
        yield y, y1, np.asarray(im.crop((0, y, w, y1)))


def _grey8(im: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit integer or float image -> (H, W) uint8 grey, exactly as
    ``clip(v / top * 255 + 0.5, 0, 255).astype(uint8)`` in float64 with ``top = 65535 if max > 255 else 255``,
    in row chunks; NaN pixels give 0 and are left out of the max."""
    top = -math.inf
    for _, _, a in _row_chunks(im):
        if a.size:
            top = max(top, float(np.fmax.reduce(a, axis=None)))  # fmax skips NaN
    top = 65535.0 if top > 255 else 255.0
    out = np.empty((im.size[1], im.size[0]), np.uint8)
    for y, y1, a in _row_chunks(im):
        if a.dtype.kind == "u" and a.dtype.itemsize == 2:
            out[y:y1] = _lut16(top)[a]
            continue
        v = a.astype(np.float64)
        v /= top
        v *= 255.0
        v += 0.5
        np.clip(v, 0, 255, out=v)
        v[np.isnan(v)] = 0
        out[y:y1] = v  # truncated, as astype(uint8)
    return out


def _eight_bit(im: Image.Image) -> Image.Image:
    """``im`` itself when it is L or RGB, else a new L (grey sources) or RGB image with the same pixels as
    PIL's ``convert("RGB")`` gives (alpha dropped)."""
    if im.mode in HIGH_DEPTH:
        return Image.fromarray(_grey8(im))
    if im.mode in ("L", "RGB"):
        return im
    if im.mode in ("1", "LA"):
        return im.convert("L")
    if im.mode == "P" and "transparency" in im.info:
        return im.convert("RGBA").convert("RGB")  # PIL warns when a palette with transparency goes straight to RGB
    return im.convert("RGB")


def _is_jpeg(fmt: str | None) -> bool:
    """JPEG, or MPO (the JPEG with extra frames many cameras and phones write), whose decoder takes a draft."""
    return fmt in ("JPEG", "MPO")


def _orientation(im: Image.Image) -> int:
    """The EXIF (or XMP) orientation, 1 when none, as ``ImageOps.exif_transpose`` reads it."""
    return int(im.getexif().get(ExifTags.Base.Orientation, 1) or 1)


def _reduce_factor(size: tuple[int, int], draft: int | None) -> int:
    """The integer box reduction of a non-JPEG decoded for ``draft``: 1 (none) unless its shorter side is at
    least ``2 * REDUCING_GAP * draft``."""
    if not draft or draft < 1:
        return 1
    f = min(size) // (REDUCING_GAP * draft)
    return f if f >= 2 else 1


def _upright_rgb(cur: Image.Image, orientation: int, factor: int = 1) -> np.ndarray:
    """An L or RGB image -> (H, W, 3) uint8: box-reduced by ``factor``, then turned upright, then copied out in
    row chunks (``np.asarray`` of the whole image would hold its bytes twice: PIL joins them in ``tobytes``)."""
    if factor > 1:
        cur = cur.reduce(factor)
    if orientation in _TRANSPOSE:
        cur = cur.transpose(_TRANSPOSE[orientation])
    out = np.empty((cur.size[1], cur.size[0], 3), np.uint8)
    for y, y1, a in _row_chunks(cur):
        out[y:y1] = a if cur.mode == "RGB" else np.stack([a, a, a], axis=-1)  # grey: as convert("RGB") gives
    return out


def rgb_array(im: Image.Image) -> np.ndarray:
    """A PIL image -> upright (H, W, 3) uint8 RGB: its EXIF orientation applied, any mode converted as
    ``decode_rgb`` converts it (``im`` is loaded, and otherwise left as it was; no memory limit applies)."""
    im.load()  # before the orientation: PIL turns a TIFF upright itself while loading it
    orientation = _orientation(im)
    return _upright_rgb(_eight_bit(im), orientation)


# ----------------------------------------------------------------------------- the memory estimate


class _Header(NamedTuple):
    """What the estimate reads from a header: the mode and size PIL will decode (after any JPEG draft), the size
    before the draft, the format, PIL's ``info``, a JPEG's (id, h, v, table) sampling per component, and whether
    an EXIF rotation may follow (known before decoding only for JPEG and WEBP, whose metadata PIL reads on
    opening; a PNG's may follow its pixels, and a TIFF's is read from the file while loading)."""

    mode: str
    size: tuple[int, int]
    full: tuple[int, int]
    format: str | None
    info: dict
    layers: list
    rotates: bool = True

    @classmethod
    def of(cls, im: Image.Image, full: tuple[int, int]) -> _Header:
        known = _is_jpeg(im.format) or im.format == "WEBP"
        return cls(im.mode, im.size, full, im.format, im.info, list(getattr(im, "layer", None) or []),
                   _orientation(im) in _TRANSPOSE if known else True)


def _decoder_bytes(hd: _Header) -> int:
    """What the format's decoder holds beyond the image PIL stores. A progressive JPEG keeps every DCT
    coefficient (2 bytes) of its full-size components until the last scan, whatever the draft; libwebp keeps
    two 4-byte canvases and hands PIL the frame as 4-byte bytes; other decoders work in rows (``_work_bytes``)."""
    if hd.format == "WEBP":
        return (WEBP_OPEN_BPP + 4) * hd.full[0] * hd.full[1]
    if not _is_jpeg(hd.format) or not hd.info.get("progressive"):
        return 0
    layers = hd.layers or [(0, 1, 1, 0)] * len(hd.mode)  # a JPEG's modes (L, RGB, CMYK) have one letter a band
    hmax, vmax = max(c[1] for c in layers), max(c[2] for c in layers)
    return sum(math.ceil(hd.full[0] * c[1] / hmax / 8) * math.ceil(hd.full[1] * c[2] / vmax / 8)
               for c in layers) * 64 * 2


def _work_bytes(hd: _Header) -> int:
    """The row chunks being converted (a high-depth chunk as PIL's crop, its bytes twice, float64 and the NaN
    mask) or copied out (an 8-bit chunk: the crop, its bytes twice, a grey one's three planes), and 8 MiB for a
    decoder's row buffers and read blocks and the allocator's slack."""
    return (24 if hd.mode in HIGH_DEPTH else 14) * min(hd.size[0] * hd.size[1], CHUNK_PIXELS) + (8 << 20)


def _conversion(hd: _Header) -> tuple[int, int]:
    """(bytes per pixel of the images ``_eight_bit`` makes, bytes per pixel of its result as PIL stores it: 1 for
    L, 4 for RGB)."""
    if hd.mode in HIGH_DEPTH or hd.mode in ("1", "LA"):
        return 1, 1
    if hd.mode in ("L", "RGB"):
        return 0, 1 if hd.mode == "L" else 4
    return (8 if hd.mode == "P" and "transparency" in hd.info else 4), 4


def _estimate(hd: _Header, draft: int | None) -> int:
    """The bytes one decode allocates, from the header, summed as if nothing were freed: the pixels as PIL
    stores them, the decoder's own buffers, the conversion's images, the box reduction, an EXIF rotation's copy
    (unless the header rules it out; PIL rotates a TIFF itself, at its stored size), the RGB output and the row
    chunks."""
    w, h = hd.size
    p, stored = w * h, _STORED_BPP.get(hd.mode, 4)
    converted, bpp = _conversion(hd)
    total = (stored + converted) * p + _decoder_bytes(hd) + _work_bytes(hd)
    factor = 1 if _is_jpeg(hd.format) else _reduce_factor(hd.size, draft)
    q = math.ceil(w / factor) * math.ceil(h / factor)
    rotated = 0 if not hd.rotates else stored * p if hd.format == "TIFF" else bpp * q
    return total + (bpp * q if factor > 1 else 0) + rotated + 3 * q


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """A WEBP's canvas size from its first 30 bytes (VP8, VP8L or VP8X), None for anything else."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    kind = data[12:16]
    if kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if kind == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if kind == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


# ----------------------------------------------------------------------------- decoding


@contextmanager
def _opened(data: bytes, name: str) -> Iterator[Image.Image]:
    """The image's header parsed (pixels not yet decoded); PIL's errors, raised here or in the body, become
    ``BadImage`` (``TooLarge`` past the decompression-bomb limit)."""
    if not data:
        raise BadImage(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                yield im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise TooLarge(f"{name}: {TOO_LARGE} ({str(e).split(', could')[0][:80]})") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError,
            ZeroDivisionError) as e:  # PIL's plugins raise all of these on malformed files
        raise BadImage(f"{name}: {e or type(e).__name__}") from None


def _header(im: Image.Image, draft: int | None) -> _Header:
    """Apply a JPEG draft for ``draft`` pixels (nothing for other formats), then read the header."""
    full = im.size
    if draft is not None and _is_jpeg(im.format):
        im.draft("RGB", (draft, draft))
    return _Header.of(im, full)


def _check(name: str, hd: _Header, draft: int | None, limit: int, default_limit: bool) -> None:
    """Raise the one-line ``TooLarge`` when decoding ``hd`` would need more than ``limit`` bytes."""
    need = _estimate(hd, draft)
    if need <= limit:
        return
    mib = -(-need // 2**20)
    fix = f"set {MAX_DECODE_ENV}={mib} or more to decode it" if default_limit else "pass a larger max_bytes"
    raise TooLarge(f"{name}: {TOO_LARGE} ({hd.size[0]}x{hd.size[1]} {hd.mode} {hd.format or 'image'} needs "
                   f"{mib:,} MiB to decode, over the {limit / 2**20:,.0f} MiB limit); {fix}")


def _check_webp(name: str, data: bytes, draft: int | None, limit: int, default_limit: bool) -> None:
    """A WEBP is checked from its bytes before PIL opens it (libwebp allocates its canvases then), as if RGBA."""
    size = _webp_size(data)
    if size is not None:
        _check(name, _Header("RGBA", size, size, "WEBP", {}, [], rotates=False), draft, limit, default_limit)


def decode_estimate(data: bytes, name: str = "", draft: int | None = None) -> int:
    """The bytes ``decode_rgb(data, name, draft)`` may allocate at most, from the header alone (nothing decoded);
    raises ``BadImage`` for a header PIL cannot read."""
    with _opened(data, name) as im:
        return _estimate(_header(im, draft), draft)


def decode_rgb(data: bytes, name: str = "", draft: int | None = None, max_bytes: int | None = None,
               info: dict | None = None) -> np.ndarray:
    """Decode bytes into an upright (H, W, 3) uint8 RGB array; anything unreadable raises ``BadImage``.

    ``TooLarge`` (one line: the size, the limit and the fix) when the image is past PIL's pixel limit or its
    decoding would need more than ``max_bytes`` (None: ``max_decode_bytes()``), both checked from the header
    before any pixel is decoded. ``draft``: the caller needs a shorter side of about that many pixels (a JPEG
    is decoded at a reduced scale, anything else reduced after decoding; see the module docstring). ``info``, when
    given, receives ``size``: the upright (width, height) of the full image, before any reduction."""
    limit = max_decode_bytes(max_bytes)
    _check_webp(name, data, draft, limit, max_bytes is None)
    with _opened(data, name) as im:
        hd = _header(im, draft)
        _check(name, hd, draft, limit, max_bytes is None)
        im.load()
        orientation = _orientation(im)
        if info is not None:
            info["size"] = hd.full[::-1] if orientation in (5, 6, 7, 8) else hd.full
        cur = _eight_bit(im)
        if cur is not im:
            im.close()  # frees the decoded pixels now
        return _upright_rgb(cur, orientation, 1 if _is_jpeg(im.format) else _reduce_factor(cur.size, draft))


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
    """The one-line refusal of ``--strict`` for an image that cannot be decoded (for one too large, the reason
    whole: it names the limit and how to raise it)."""
    why = str(reason).split(": ", 1)[-1]
    if why.startswith(TOO_LARGE):
        return UserError(f"{path}: {why[:200]}; drop --strict to skip such files")
    return UserError(f"{path}: unreadable image ({why[:80]}); drop --strict to skip broken files")


def report_skipped(items: list[str], what: str = "", kind: str = "unreadable") -> None:
    """One stderr line: how many images were skipped, and the first few."""
    if items:
        where = f" in {what}" if what else ""
        print(f"isif: skipped {len(items)} {kind} image(s){where}, first: {'; '.join(items[:3])}", file=sys.stderr)
