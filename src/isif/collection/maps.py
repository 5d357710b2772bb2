"""``isif map``: a 2-D map of an embed folder (UMAP or PCA) with thumbnails, map.png and map.csv.

UMAP (umap-learn, cosine metric, seeded) or PCA: the top two principal axes of the centred features, from the
eigendecomposition of the D x D covariance in float64 (the SVD of the centred data), each axis's sign fixed so that
its largest-magnitude loading is positive. Deterministic; the seed picks the thumbnails drawn.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from ..base.errors import UserError
from ..data.decode import report_skipped
from .embed_dir import load_embed_dir, output_dir, require_images
from .render import BLACK, PALETTE, WHITE, thumbnails, write_csv, write_png

UMAP_MISSING = ("--method umap needs umap-learn: `pip install umap-learn` (or `pip install -e '.[umap]'`), or use "
                "--method pca")


def pca_2d(z: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, 2) float64: coordinates on the top two principal axes (sign as in the module docstring)."""
    x = np.asarray(z, dtype=np.float64)
    x = x - x.mean(axis=0)
    _, vecs = np.linalg.eigh(x.T @ x)  # ascending eigenvalues
    axes = vecs[:, ::-1][:, :2]
    signs = np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(axes.shape[1])])
    coords = x @ (axes * np.where(signs == 0, 1.0, signs))
    return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))


def umap_module():
    """umap-learn's module, or None when it is not installed."""
    try:
        import umap
    except ImportError:
        return None
    return umap


def embed_2d(z: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """((N, 2) coordinates, the method used): UMAP when asked for or, with "auto", when importable; else PCA."""
    if method not in ("auto", "umap", "pca"):
        raise UserError(f"--method {method}: choose auto, umap or pca")
    umap = umap_module() if method != "pca" else None
    if umap is None and method == "umap":
        raise UserError(UMAP_MISSING)
    if umap is None or z.shape[0] < 4:
        return pca_2d(z), "pca"
    reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_neighbors=min(15, z.shape[0] - 1))
    return np.asarray(reducer.fit_transform(z), dtype=np.float64), "umap"


def map_folder(embed_dir: str, method: str = "auto", out: str | None = None, thumbs: int = 2000, seed: int = 0,
               size: int = 1400, tile: int = 28) -> dict:
    """map.png (points and a seeded subsample of thumbnails at their 2-D positions) and map.csv beside it."""
    if thumbs < 0 or size < 200 or tile < 8:
        raise UserError("--thumbs must be >= 0, --size >= 200 and --tile >= 8 pixels")
    ed = load_embed_dir(embed_dir)
    if method == "umap" and umap_module() is None:
        raise UserError(UMAP_MISSING)  # before any work
    require_images(ed)
    png = Path(out) if out else ed.folder / "map.png"
    output_dir(ed, png.parent)
    xy, used = embed_2d(ed.features, method, seed)
    write_csv(png.parent / "map.csv", ("path", "x", "y"),
              ((p, f"{x:.6g}", f"{y:.6g}") for p, (x, y) in zip(ed.paths, xy, strict=True)))
    n = len(ed.paths)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(thumbs, n), replace=False))
    bad: list[str] = []
    tiles = dict(zip(pick.tolist(), thumbnails([ed.image(i) for i in pick], tile, bad), strict=True))
    labels = ed.labels  # embed_dir's rule (class_labels): the first folder under the root
    title = (f"{used.upper()} map of {n} images ({ed.features.shape[1]}-d), {len(pick)} thumbnails"
             + (", coloured by folder" if labels else ""))
    write_png(png, draw_map(xy, {i: t for i, t in tiles.items() if t is not None}, labels, title, size, tile))
    report_skipped(bad, "the map")
    return {"method": used, "images": n, "thumbnails": len(pick) - len(bad), "png": str(png),
            "csv": str(png.parent / "map.csv"), "classes": len(set(labels)) if labels else 0}


def draw_map(xy: np.ndarray, tiles: dict[int, Image.Image], labels: list[str] | None, title: str, size: int,
             tile: int) -> Image.Image:
    """Every point as a dot and the given thumbnails centred on their points, framed in their label's colour;
    a legend on the right when labelled."""
    top, margin = 28, tile // 2 + 4
    legend_w = 240 if labels else 0
    canvas = Image.new("RGB", (size + legend_w, size + top), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 8), title, fill=BLACK)
    lo, span = xy.min(axis=0), np.ptp(xy, axis=0)
    frac = np.where(span > 0, (xy - lo) / np.where(span > 0, span, 1), 0.5)
    px = np.rint(margin + frac * (size - 2 * margin)).astype(int)
    px[:, 1] = top + (size - px[:, 1])  # y up
    names = [lab for lab, _ in sorted(Counter(labels).items(), key=lambda t: (-t[1], t[0]))] if labels else []
    colour_of = {lab: PALETTE[s % len(PALETTE)] for s, lab in enumerate(names)}
    colours = [colour_of[lab] for lab in labels] if labels else [(90, 90, 90)] * len(xy)
    for (x, y), col in zip(px.tolist(), colours, strict=True):
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=col)
    for i, im in tiles.items():
        framed = ImageOps.expand(im, border=2, fill=colours[i])
        canvas.paste(framed, (int(px[i, 0]) - framed.width // 2, int(px[i, 1]) - framed.height // 2))
    counts = Counter(labels or [])
    for s, lab in enumerate(names[:40]):
        y = top + 10 + 16 * s
        draw.rectangle([size + 10, y, size + 22, y + 12], fill=colour_of[lab])
        draw.text((size + 28, y), f"{lab} ({counts[lab]})"[:34], fill=BLACK)
    if len(names) > 40:
        draw.text((size + 10, top + 10 + 16 * 40), f"... and {len(names) - 40} more folders", fill=BLACK)
    return canvas
