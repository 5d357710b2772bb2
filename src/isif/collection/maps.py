"""``isif map``: a map of an embed folder one can read: thumbnails on a grid, placed by UMAP or PCA.

    OUT/map.png        screen size (--tile 28 px a cell: 1360 px wide at 2000 thumbnails), a title and, with few
                       class folders, a legend right of the grid (about 200 px more)
    OUT/map-full.png   the same grid at --full-tile 96 px a cell, for zooming
    OUT/map.csv        path, x, y, col, row: every image's 2-D point; col and row only for the thumbnailed ones
    OUT/map.json       ``MapLayout``: the grid and where each thumbnail lies in map-full.png (its format and
                       reader: ``map_layout.py``)

The 2-D points: UMAP (umap-learn, cosine metric, seeded) or PCA: the top two principal axes of the centred
features, from the eigendecomposition of the D x D covariance in float64 (the SVD of the centred data), each axis's
sign fixed so that its largest-magnitude loading is positive.

The grid (``grid_shape``, ``grid_assign``): a seeded sample of --thumbs images (the readable ones) is placed on a grid
of cols x rows cells with cols = ceil(sqrt(SLACK n)), rows = ceil(SLACK n / cols), SLACK = 1.15: about 15% of the
cells stay empty, so that groups of the map keep gaps between them instead of being packed into a full square. The
points are normalised per axis (min-max) to the grid's extent (x to the right, y up: the highest point is in row 0)
and assigned one per cell minimising the sum of squared distances between a point and its cell's centre: exactly
(``scipy.optimize.linear_sum_assignment``) up to EXACT_LIMIT points, greedily above (each point, in a seeded order,
takes the nearest free cell). Neighbours on the map stay neighbours on the grid, and no two thumbnails overlap.

The colour (``map_colours``): by class folder (``EmbedDir.labels``) with a legend when there are at most 12; else by
cluster when ``isif cluster`` left a clusters.csv for these very images in the embed folder (palette colours repeat
above 20 clusters); else none. Each coloured thumbnail is framed in its colour. Deterministic: the seed picks the
thumbnails and seeds UMAP and the greedy order.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..base.errors import UserError
from ..base.settings import at_least, one_of, setting
from ..data.decode import report_skipped
from .embed_dir import EmbedDir, load_embed_dir, output_dir, require_images
from .map_layout import MAP_CSV, MAP_FULL, MAP_JSON, MapLayout, write_map_layout
from .options import embed_dir_arg
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
    with warnings.catch_warnings():  # a seeded UMAP runs on one thread, and says so
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        xy = reducer.fit_transform(z)
    return np.asarray(xy, dtype=np.float64), "umap"


# ----------------------------------------------------------------------------- the grid

SLACK = 1.15  # cells per thumbnail
# linear_sum_assignment on the n x 1.15 n squared-distance matrix of 10 Gaussian blobs (clustered like a UMAP map; the
# hard case, uniform points take 0.07 s at 2000), measured once each on 2 cores shared with a training run: 0.96 s at
# 1000 points, 4.4 s at 2000, 32 s at 4000 (about n^2.8); the greedy assignment: 0.03, 0.06 and 0.09 s, at a cost
# (the sum of squared distances) 1.5 to 1.7 times the exact one. The default --thumbs 2000 is placed exactly.
EXACT_LIMIT = 2000


def grid_shape(n: int, slack: float = SLACK) -> tuple[int, int]:
    """(cols, rows) of the grid of n thumbnails: about slack * n cells, nearly square; (1, 1) for none."""
    cells = max(n, math.ceil(slack * n), 1)
    cols = math.ceil(math.sqrt(cells))
    return cols, math.ceil(cells / cols)


def grid_points(xy: np.ndarray, cols: int, rows: int) -> np.ndarray:
    """(n, 2) points -> (n, 2) float64 positions in cell units (cell (c, r) spans [c, c+1) x [r, r+1)): each axis
    min-max normalised so the extreme points fall on the centres of the outer cells; y up (the highest y in row 0);
    a flat axis in the middle."""
    p = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if len(p) == 0:
        return p.copy()
    lo, span = p.min(axis=0), np.ptp(p, axis=0)
    u = np.where(span > 0, (p - lo) / np.where(span > 0, span, 1.0), 0.5)
    u[:, 1] = 1.0 - u[:, 1]
    return 0.5 + u * (np.array([cols, rows], dtype=np.float64) - 1.0)


def assignment_cost(xy: np.ndarray, cells: np.ndarray, cols: int, rows: int) -> float:
    """The sum of squared distances (in cell units) between each point and its cell's centre."""
    p = grid_points(xy, cols, rows)
    return float(((p - (np.asarray(cells, dtype=np.float64) + 0.5)) ** 2).sum())


def grid_assign(xy: np.ndarray, cols: int, rows: int, exact_limit: int = EXACT_LIMIT, seed: int = 0) -> np.ndarray:
    """(n, 2) points -> (n, 2) int64 cells (col, row), one point a cell, minimising the sum of squared distances of
    the points (``grid_points``) to their cells' centres: exactly up to ``exact_limit`` points, greedily above."""
    n = len(xy)
    if cols < 1 or rows < 1 or n > cols * rows:
        raise ValueError(f"{n} points do not fit a {cols} x {rows} grid")
    p = grid_points(xy, cols, rows)
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    return _exact(p, cols, rows) if n <= exact_limit else _greedy(p, cols, rows, seed)


def _exact(p: np.ndarray, cols: int, rows: int) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    cy, cx = np.divmod(np.arange(cols * rows), cols)
    cost = (p[:, :1] - (cx + 0.5)) ** 2 + (p[:, 1:] - (cy + 0.5)) ** 2  # (n, cells)
    row_ind, cell = linear_sum_assignment(cost)
    out = np.empty((len(p), 2), dtype=np.int64)
    out[row_ind] = np.stack([cell % cols, cell // cols], axis=1)
    return out


def _greedy(p: np.ndarray, cols: int, rows: int, seed: int) -> np.ndarray:
    """Each point, in a seeded order, takes the nearest free cell (ties: the first in row-major order): its own cell
    when free, else the nearest free one in square windows of growing radius d around it, taken once no cell outside
    the window can be nearer (those lie at least d + 1 - max |offset from the own cell's centre| away)."""
    free = np.ones((rows, cols), dtype=bool)
    out = np.empty((len(p), 2), dtype=np.int64)
    own = np.minimum(np.floor(p).astype(np.int64), [cols - 1, rows - 1])
    for i in np.random.default_rng(seed).permutation(len(p)):
        c, r = own[i]
        if free[r, c]:
            free[r, c] = False
            out[i] = c, r
            continue
        slack = 1.0 - np.abs(p[i] - own[i] - 0.5).max()
        d = 1
        while True:
            r0, r1, c0, c1 = max(r - d, 0), min(r + d + 1, rows), max(c - d, 0), min(c + d + 1, cols)
            ys, xs = np.nonzero(free[r0:r1, c0:c1])
            if len(ys):
                dist = (xs + c0 + 0.5 - p[i, 0]) ** 2 + (ys + r0 + 0.5 - p[i, 1]) ** 2
                k = int(dist.argmin())
                whole = r0 == 0 and c0 == 0 and r1 == rows and c1 == cols
                if whole or dist[k] <= (d + slack) ** 2:
                    cc, rr = int(xs[k] + c0), int(ys[k] + r0)
                    free[rr, cc] = False
                    out[i] = cc, rr
                    break
            d *= 2
    return out


# ----------------------------------------------------------------------------- colour

LEGEND_MAX = 12  # class folders coloured, with a legend; more are not coloured by folder


@dataclass
class Colouring:
    kind: str  # "folder", "cluster" or "none"
    key: list[str] | None  # per image: its folder, or its cluster as a string; None when not coloured
    colour_of: dict[str, tuple[int, int, int]]  # key -> colour
    names: list[str]  # the keys in legend order (the most images first)
    title: str  # "coloured by 3 folders", "coloured by 12 clusters (isif cluster)" or ""


def map_colours(ed: EmbedDir) -> Colouring:
    """By folder when there are 2 to LEGEND_MAX class folders; else by ``isif cluster``'s clusters when its
    clusters.csv in the embed folder is for these images; else none (see the module docstring)."""
    labels = ed.labels
    if labels and len(set(labels)) <= LEGEND_MAX:
        counts = Counter(labels)
        names = [lab for lab, _ in sorted(counts.items(), key=lambda t: (-t[1], t[0]))]
        return Colouring("folder", labels, {lab: PALETTE[s % len(PALETTE)] for s, lab in enumerate(names)}, names,
                         f"coloured by {len(names)} folders")
    clusters = load_cluster_ids(ed)
    if clusters is None:
        return Colouring("none", None, {}, [], "")
    key = [str(c) for c in clusters]
    names = [str(c) for c in sorted(set(clusters))]
    k = len(names)
    return Colouring("cluster", key, {name: PALETTE[int(name) % len(PALETTE)] for name in names}, names,
                     f"coloured by {k} cluster{'s' if k != 1 else ''} (isif cluster)")


def load_cluster_ids(ed: EmbedDir) -> list[int] | None:
    """Each image's cluster from the embed folder's clusters.csv (``isif cluster``, read by its owner), or None."""
    from .cluster import read_clusters

    table = read_clusters(ed, "the map is not coloured by cluster")
    return None if table is None else table.of.tolist()


# ----------------------------------------------------------------------------- the command

MAX_PIXELS = 250_000_000  # per picture: about 750 MB of RGB in memory


def _checked(embed_dir: str, method: str, out: str | None, thumbs: int, seed: int, tile: int,
             full_tile: int) -> tuple[EmbedDir, Path, np.ndarray]:
    """(the embed folder, map.png's path, the thumbnailed rows), or a one-line refusal before any work."""
    if thumbs < 0 or tile < 8 or full_tile < 16:
        raise UserError(f"--thumbs must be >= 0, --tile >= 8 and --full-tile >= 16 pixels (got {thumbs}, {tile}, "
                        f"{full_tile})")
    ed = load_embed_dir(embed_dir)
    if method == "umap" and umap_module() is None:
        raise UserError(UMAP_MISSING)  # before any work
    require_images(ed)
    png = Path(out) if out else ed.folder / "map.png"
    output_dir(ed, png.parent)
    if png.name in (MAP_FULL, MAP_JSON, MAP_CSV):
        raise UserError(f"--out {out}: {png.name} is one of the files written beside map.png; name the PNG otherwise")
    n = len(ed.paths)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(thumbs, n), replace=False))
    cols, rows = grid_shape(len(pick))
    side = max(cols, rows) * full_tile
    if side * side > MAX_PIXELS:
        raise UserError(f"--thumbs {thumbs} at --full-tile {full_tile} makes a map-full.png of about {side} x {side} "
                        f"pixels (the limit is {MAX_PIXELS // 10**6} million): lower --thumbs or --full-tile")
    return ed, png, pick


@dataclass(kw_only=True)
class MapOptions:
    embed_dir: str = embed_dir_arg()
    method: str = setting("auto", "auto: UMAP when umap-learn is installed, else PCA",
                          check=one_of("auto", "umap", "pca"))
    out: str | None = setting(None, "the screen-size PNG (default EMBED_DIR/map.png); map-full.png, map.csv and "
                                    "map.json are written beside it")
    thumbs: int = setting(2000, "thumbnails drawn, a seeded sample, one per grid cell", check=at_least(0))
    seed: int = setting(0, "seed of UMAP, of the thumbnail sample and of the greedy grid placement")
    tile: int = setting(28, "pixels per grid cell in map.png", check=at_least(8))
    full_tile: int = setting(96, "pixels per grid cell in map-full.png, the picture to zoom into", check=at_least(16))


@dataclass
class MapResult:
    method: str  # "umap" or "pca", as used
    images: int
    thumbnails: int
    png: Path
    full_png: Path
    csv: Path
    json: Path
    colour: str  # "folder", "cluster" or "none"
    coloured_by: str  # the title's words for it ("" when not coloured)
    classes: int
    umap_missing: bool  # auto fell back to PCA for want of umap-learn
    screen: dict  # map.png's grid: tile, left, top, width, height
    cols: int
    rows: int


def map_folder(o: MapOptions) -> MapResult:
    """map.png, map-full.png, map.csv and map.json (see the module docstring); ``o.out`` is map.png's path
    (default EMBED_DIR/map.png), the other three are written beside it."""
    method, seed, tile, full_tile = o.method, o.seed, o.tile, o.full_tile
    ed, png, pick = _checked(o.embed_dir, method, o.out, o.thumbs, seed, tile, full_tile)
    n = len(ed.paths)
    colouring = map_colours(ed)
    xy, used = embed_2d(np.asarray(ed.features), method, seed)
    full_style, screen_style = TileStyle(full_tile, colouring.kind != "none"), TileStyle(tile, colouring.kind != "none")
    bad: list[str] = []
    kept, ims = [], []
    for i, im in zip(pick.tolist(), thumbnails([ed.image(i) for i in pick], full_style.inner, bad), strict=True):
        if im is not None:
            kept.append(i)
            ims.append(im)
    cols, rows = grid_shape(len(kept))
    cells = grid_assign(xy[kept], cols, rows, seed=seed)
    colours = [colouring.colour_of[colouring.key[i]] if colouring.key else None for i in kept]
    n_str = f"{n:,}" if n >= 10_000 else str(n)
    title = f"{used.upper()} map of {n_str} images ({ed.features.shape[1]}-d), {len(kept)} thumbnails"
    title += f", {colouring.title}" if colouring.title else ""
    counts = Counter(colouring.key or [])
    legend = ([(colouring.colour_of[name], f"{_short(name)} ({counts[name]})") for name in colouring.names]
              if colouring.kind == "folder" else [])
    full, (f_left, f_top) = draw_grid(cells, ims, colours, cols, rows, full_style, title, [])
    screen, (s_left, s_top) = draw_grid(cells, [im.resize((screen_style.inner,) * 2, Image.Resampling.LANCZOS)
                                                for im in ims], colours, cols, rows, screen_style, title, legend)
    dest = png.parent
    full_png = dest / MAP_FULL
    write_png(full_png, full)
    write_png(png, screen)
    where = {i: (int(c), int(r)) for i, (c, r) in zip(kept, cells, strict=True)}
    write_csv(dest / MAP_CSV, ("path", "x", "y", "col", "row"),
              ((p, f"{x:.6g}", f"{y:.6g}", *where.get(i, ("", ""))) for i, (p, (x, y)) in
               enumerate(zip(ed.paths, xy, strict=True))))
    layout = MapLayout(cols, rows, full_png.resolve(), full_tile, f_left, f_top, full.width, full.height, used,
                       colouring.kind, [(c, r, ed.paths[i]) for i, (c, r) in where.items()])
    write_map_layout(dest / MAP_JSON, layout)
    report_skipped(bad, "the map")
    return MapResult(used, n, len(kept), png, full_png, dest / MAP_CSV, dest / MAP_JSON, colouring.kind,
                     colouring.title, len(set(ed.labels)) if ed.labels else 0,
                     method == "auto" and used == "pca" and umap_module() is None,
                     {"tile": tile, "left": s_left, "top": s_top, "width": screen.width, "height": screen.height},
                     cols, rows)


# ----------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class TileStyle:
    """One cell of ``tile`` pixels: a 1-pixel white gap all round, then (when coloured) a frame of ``border``
    pixels in the image's colour, then the thumbnail, ``inner`` pixels square."""

    tile: int
    coloured: bool

    @property
    def border(self) -> int:
        return max(2, self.tile // 32) if self.coloured else 0

    @property
    def inner(self) -> int:
        return self.tile - 2 - 2 * self.border


def _short(text: str, most: int = 24) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."


def _font(size: int):
    try:
        return ImageFont.load_default(size)
    except (TypeError, OSError):  # a Pillow without FreeType: its one bitmap font
        return ImageFont.load_default()


def draw_grid(cells: np.ndarray, tiles: list[Image.Image], colours: list[tuple[int, int, int] | None], cols: int,
              rows: int, style: TileStyle, title: str,
              legend: list[tuple[tuple[int, int, int], str]]) -> tuple[Image.Image, tuple[int, int]]:
    """(the picture, (left, top) of cell (0, 0)): the title, the grid of tiles (cell i of ``cells`` shows
    ``tiles[i]``, framed in ``colours[i]``), empty cells white, and the legend right of the grid."""
    t = style.tile
    font = _font(max(13, min(32, t // 3)))
    pad, line = 8, int(font.size if hasattr(font, "size") else 11) + 6
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top = pad, pad + line + 4
    lfont = _font(13)
    legend_w = (24 + max(int(draw.textlength(text, font=lfont)) for _, text in legend) + pad) if legend else 0
    width = max(left + cols * t + pad + legend_w, int(draw.textlength(title, font=font)) + 2 * pad)
    height = max(top + rows * t + pad, top + 18 * len(legend) + pad)
    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill=BLACK, font=font)
    for (c, r), im, colour in zip(cells.tolist(), tiles, colours, strict=True):
        x, y = left + c * t + 1, top + r * t + 1
        if colour is not None and style.border:
            draw.rectangle([x, y, x + t - 3, y + t - 3], fill=colour)
        canvas.paste(im, (x + style.border, y + style.border))
    lx = left + cols * t + pad + 8
    for s, (colour, text) in enumerate(legend):
        y = top + 18 * s
        draw.rectangle([lx, y + 1, lx + 12, y + 13], fill=colour)
        draw.text((lx + 18, y), text, fill=BLACK, font=lfont)
    return canvas, (left, top)
