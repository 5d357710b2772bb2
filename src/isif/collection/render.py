"""Pictures and files of the collection commands: thumbnails, contact-sheet rows, and atomic CSV/PNG writes."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..base.files import atomic_write_bytes
from ..data.decode import BadImage, decode_rgb

BLACK, GREY, WHITE = (0, 0, 0), (190, 190, 190), (255, 255, 255)


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
           (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
           (219, 219, 141), (158, 218, 229)]  # matplotlib's tab10, then tab20's light shades


def thumbnails(paths: list[Path], tile: int, bad: list[str]) -> list[Image.Image | None]:
    """tile x tile RGB thumbnails (centre-cropped), decoded safely and drafted near ``tile`` (a JPEG decoded at a
    reduced scale, anything else reduced once decoded); None (and the path added to ``bad``) for a file that cannot
    be read."""
    out: list[Image.Image | None] = []
    for p in paths:
        try:
            arr = decode_rgb(p.read_bytes(), str(p), draft=tile)
        except (BadImage, OSError):
            bad.append(str(p))
            out.append(None)
            continue
        out.append(ImageOps.fit(Image.fromarray(arr), (tile, tile)))
    return out


def rows_image(title: str, rows: list[tuple[str, list[Image.Image | None], list[str]]], tile: int) -> Image.Image:
    """A white canvas: the title, then per row an optional heading, its tiles left to right (a grey square for an
    unreadable image) and an optional caption under each tile."""
    pad, line = 4, 12
    font = ImageFont.load_default()
    cols = max([len(t) for _, t, _ in rows] + [1])
    heights = [(line if head else 0) + tile + (line if caps else 0) + pad for head, _, caps in rows]
    width = max(pad + cols * (tile + pad), int(font.getlength(title)) + 2 * pad)
    canvas = Image.new("RGB", (width, 2 * pad + line + sum(heights)), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill=BLACK, font=font)
    y = 2 * pad + line
    for (head, tiles, caps), h in zip(rows, heights, strict=True):
        if head:
            draw.text((pad, y), head, fill=BLACK, font=font)
        top = y + (line if head else 0)
        for j, im in enumerate(tiles):
            x = pad + j * (tile + pad)
            canvas.paste(im if im is not None else Image.new("RGB", (tile, tile), GREY), (x, top))
            if j < len(caps):
                draw.text((x, top + tile + 1), caps[j], fill=BLACK, font=font)
        y += h
    return canvas


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write_bytes(Path(path), lambda f: f.write(data))


def write_csv(path: Path, header: tuple[str, ...], rows: Iterable[tuple]) -> None:
    """A CSV table, atomically, streamed from ``rows`` (a generator of millions of rows costs no memory)."""
    def write(fh) -> None:
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="", write_through=False)
        w = csv.writer(text, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        text.flush()
        text.detach()  # leave the file to atomic_write_bytes to fsync and close

    atomic_write_bytes(Path(path), write)


def read_csv(path: Path, parse: Callable[[dict], tuple], fix: str) -> list[tuple] | None:
    """The rows of a CSV table that ``write_csv`` wrote, each through ``parse``; None and one warning line ending in
    ``fix`` when the file is unreadable or a row does not parse."""
    import sys

    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return [parse(r) for r in csv.DictReader(fh)]
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, csv.Error) as e:
        print(f"isif: warning: {path} is unreadable ({str(e)[:60]}); {fix}", file=sys.stderr)
        return None


def write_png(path: Path, img: Image.Image) -> None:
    atomic_write_bytes(Path(path), lambda f: img.save(f, format="PNG"))
