"""The memory bound of one image decode: refused from the header, exact high-depth conversion, reduced drafts."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from isif.base.errors import UserError
from isif.data import decode
from isif.data.decode import BadImage, TooLarge, decode_rgb

ENV = "ISIF_MAX_DECODE_MIB"


def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _png_header(w: int, h: int, bit_depth: int = 16) -> bytes:
    """A PNG whose header claims w x h grey pixels but whose data stops after a few bytes (truncated)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _reference_grey(arr: np.ndarray) -> np.ndarray:
    """The previous conversion, in float64 on the whole image; NaN pixels 0 and left out of the max."""
    a = np.asarray(arr, dtype=np.float64)
    top = 65535.0 if np.nanmax(a) > 255 else 255.0
    v = np.clip(a / top * 255.0 + 0.5, 0, 255)
    return np.where(np.isnan(v), 0, v).astype(np.uint8)


@pytest.fixture(autouse=True)
def _default_limit(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def test_16bit_png_over_max_bytes_is_refused_in_one_line_before_decoding(monkeypatch):
    data = _encode(Image.fromarray(np.zeros((2000, 2000), np.uint16)))  # 8 MB of pixels, a few KiB on disk
    assert decode_rgb(data, "deep.png").shape == (2000, 2000, 3)  # the default limit lets it through
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded past the limit"))
    with pytest.raises(TooLarge) as e:
        decode_rgb(data, "deep.png", max_bytes=8 << 20)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("deep.png: too large to decode safely (2000x2000 I;16 PNG needs ")
    assert "over the 8 MiB limit" in msg and msg.endswith("pass a larger max_bytes")


def test_the_environment_sets_the_default_limit_and_its_fix_works(monkeypatch):
    data = _encode(Image.fromarray(np.zeros((2000, 2000), np.uint16)))
    monkeypatch.setenv(ENV, "16")
    with pytest.raises(TooLarge, match=r"over the 16 MiB limit\); set ISIF_MAX_DECODE_MIB=\d+ or more") as e:
        decode_rgb(data, "deep.png")
    monkeypatch.setenv(ENV, str(e.value).split("ISIF_MAX_DECODE_MIB=")[1].split()[0])
    assert decode_rgb(data, "deep.png").shape == (2000, 2000, 3)  # exactly the suggested limit decodes it
    for bad in ("lots", "0", "-5", "1.5"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(UserError, match="in whole MiB, e.g. ISIF_MAX_DECODE_MIB=4096") as e:
            decode_rgb(data, "deep.png")
        assert "\n" not in str(e.value)


def test_the_bound_is_checked_from_the_header_alone():
    data = _png_header(8000, 8000)  # 64 megapixels of 16-bit grey claimed, the pixels truncated
    with pytest.raises(TooLarge, match="8000x8000 I;16 PNG needs"):
        decode_rgb(data, "x.png", max_bytes=64 << 20)
    with pytest.raises(BadImage) as e:  # within the limit it is decoded, and found truncated
        decode_rgb(data, "x.png", max_bytes=1 << 30)
    assert not isinstance(e.value, TooLarge)
    assert decode.decode_estimate(data) > 8000 * 8000 * (2 + 1 + 3)  # stored 16-bit, its grey, the RGB output


def test_a_webp_is_refused_before_pil_opens_it(monkeypatch):
    w = h = 16000  # VP8X canvas: libwebp would allocate 2 GB on opening
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    data = b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("opened"))
    with pytest.raises(TooLarge, match="16000x16000 RGBA WEBP needs"):
        decode_rgb(data, "x.webp")


@pytest.mark.parametrize("top", [200, 255, 256, 65535])
def test_16bit_conversion_equals_the_float64_reference_exactly(top, monkeypatch):
    monkeypatch.setattr(decode, "CHUNK_PIXELS", 97, raising=False)  # many row chunks, the last one short
    arr = np.random.default_rng(top).integers(0, top + 1, (41, 29)).astype(np.uint16)
    want = np.repeat(_reference_grey(arr)[..., None], 3, axis=2)
    for data in (_encode(Image.fromarray(arr)), _encode(Image.fromarray(arr), "TIFF"),
                 _encode(Image.fromarray(arr.astype(">u2")), "TIFF")):  # I;16, and big-endian I;16B
        assert np.array_equal(decode_rgb(data), want)


def test_32bit_and_float_conversion_equal_the_float64_reference(monkeypatch):
    monkeypatch.setattr(decode, "CHUNK_PIXELS", 50, raising=False)
    rng = np.random.default_rng(0)
    ints = [rng.integers(-1000, 100_000, (23, 31)), rng.integers(-5, 256, (23, 31))]  # max over 255, and at most 255
    floats = [rng.standard_normal((23, 31)) * 400, rng.random((23, 31)) * 255]
    floats[0][0, :3] = [np.inf, -np.inf, np.nan]
    floats[1][1, 1] = np.nan  # NaN: 0, and not the max (which would have made top 255 for the first one too)
    for arr in [a.astype(np.int32) for a in ints] + [a.astype(np.float32) for a in floats]:
        got = decode_rgb(_encode(Image.fromarray(arr), "TIFF"))
        assert np.array_equal(got, np.repeat(_reference_grey(arr)[..., None], 3, axis=2)), arr.dtype
    assert decode_rgb(_encode(Image.fromarray(floats[0].astype(np.float32)), "TIFF"))[0, 2].tolist() == [0, 0, 0]


def test_every_8bit_mode_matches_pil_and_orientation_applies():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (18, 27, 3), dtype=np.uint8)
    pal = Image.fromarray(rgb).quantize(32)
    exif = Image.Exif()
    exif[0x0112] = 6
    files = [_encode(Image.fromarray(rgb[..., 0])), _encode(Image.fromarray(rgb[..., 0] > 99)),
             _encode(Image.fromarray(np.dstack([rgb, rgb[..., :1]]))), _encode(Image.fromarray(rgb[..., :2], "LA")),
             _encode(pal), _encode(pal, transparency=3), _encode(pal, "GIF", transparency=3),
             _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"), _encode(Image.fromarray(rgb), "PNG", exif=exif),
             _encode(Image.fromarray(rgb), "JPEG", exif=exif.tobytes()), _encode(Image.fromarray(rgb), "WEBP")]
    for data in files:
        im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        want = np.asarray((im.convert("RGBA") if im.mode == "P" else im).convert("RGB"))
        assert np.array_equal(decode_rgb(data), want), im.mode
    arr = np.random.default_rng(2).integers(0, 65536, (18, 27)).astype(np.uint16)
    up = decode_rgb(_encode(Image.fromarray(arr), "PNG", exif=exif))
    assert up.shape == (27, 18, 3) and np.array_equal(up[..., 0], np.rot90(_reference_grey(arr), -1))


def test_truncated_and_broken_files_stay_bad_images():
    good = _encode(Image.fromarray(np.zeros((300, 200), np.uint16)))
    for bad in (good[:60], good[:-30], b"\xff\xd8\xff garbage", b""):
        with pytest.raises(BadImage) as e:
            decode_rgb(bad, "x.png")
        assert not isinstance(e.value, TooLarge)


def test_draft_reduces_other_formats_but_keeps_twice_the_side():
    rgb = np.random.default_rng(3).integers(0, 256, (300, 401, 3), dtype=np.uint8)
    png = _encode(Image.fromarray(rgb))
    small = decode_rgb(png, draft=50)  # 300 // (2 * 50) = 3
    assert np.array_equal(small, np.asarray(Image.fromarray(rgb).reduce(3))) and small.shape == (100, 134, 3)
    assert np.array_equal(decode_rgb(png, draft=100), rgb)  # a shorter side under 4x the draft: untouched
    assert decode.decode_estimate(png, draft=50) < decode.decode_estimate(png)
    jpeg = _encode(Image.fromarray(rgb), "JPEG")
    assert decode_rgb(jpeg, draft=50).shape == (75, 101, 3)  # libjpeg at 1/4: a shorter side of at least 50


def test_scan_reports_over_limit_files_in_one_line_and_strict_refuses_in_one(tmp_path, capsys, monkeypatch):
    from isif.data.stream import scan_files

    Image.fromarray(np.zeros((2000, 2000), np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "ok.png")
    names = [str(tmp_path / "deep.png"), str(tmp_path / "ok.png")]
    monkeypatch.setenv(ENV, "16")
    res = scan_files(names, workers=0, cache_dir=tmp_path / "c")
    err = capsys.readouterr().err
    assert list(res.bad) == [0] and err.count("\n") == 1
    assert "skipped 1 too large to decode safely (over the 16 MiB decode limit, which ISIF_MAX_DECODE_MIB raises" in err
    with pytest.raises(UserError) as e:
        scan_files(names, strict=True, workers=0, cache_dir=tmp_path / "c2")
    msg = str(e.value)
    assert "\n" not in msg and "deep.png: too large to decode safely (2000x2000 I;16 PNG needs" in msg
    assert "set ISIF_MAX_DECODE_MIB=" in msg and msg.endswith("drop --strict to skip such files")
    monkeypatch.setenv(ENV, "1024")  # the default again: a scan of its own, not the cached one under 16 MiB
    assert scan_files(names, workers=0, cache_dir=tmp_path / "c").bad == {}


def test_map_thumbnails_decode_with_a_draft(tmp_path, monkeypatch):
    from isif.collection import render

    Image.fromarray(np.zeros((400, 300, 3), np.uint8)).save(tmp_path / "a.png")
    seen = []
    monkeypatch.setattr(render, "decode_rgb", lambda data, name, **kw: seen.append(kw) or decode_rgb(data, name, **kw))
    tiles = render.thumbnails([tmp_path / "a.png"], 24, [])
    assert seen == [{"draft": 24}] and tiles[0].size == (24, 24)
