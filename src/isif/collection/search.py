"""Nearest-neighbour search over a gallery of one's own images, and the retrieval grid (the paper's Fig. 4).

The gallery is a folder of images (embedded on the fly) or the output folder
of ``isif embed`` (read by ``embed_dir.load_embed_dir``), which skips the
embedding. Labels are the class folders of ``embed_dir.class_labels`` (an image's
first folder under the gallery's root): a neighbour is then marked green when it
shares the query's class (``embed_dir.label_of``), red otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from ..base.errors import UserError
from ..base.files import atomic_write_bytes
from ..base.settings import at_least, setting
from ..data.decode import IMAGE_EXTS, is_image_name
from ..evaluate.engine import order_candidates
from .embed_dir import class_labels, is_embed_dir, label_of, load_embed_dir
from .embedding import Embedder, list_images
from .options import checkpoint_arg
from .rows import BLOCK, Rows, resident

GREEN, RED, GREY, BLUE = (40, 170, 60), (210, 40, 40), (150, 150, 150), (50, 110, 220)


@dataclass
class Gallery:
    features: torch.Tensor | Rows  # (N, D) L2-normalised: in memory, or an embed folder's rows on disk
    paths: list[Path]  # absolute
    labels: list[str] | None  # class-folder names (``embed_dir.class_labels``), when the gallery has classes
    index: object | None = None  # the embed folder's faiss index (isif index), unless --exact
    root: Path | None = None  # the image folder the labels are relative to
    rerank: int = 0  # candidates of the index re-scored exactly on the features (the index's --rerank), 0: none

    def row(self, i: int) -> torch.Tensor:
        """Gallery row i as a float32 tensor (D,)."""
        f = self.features
        return f[i].float() if isinstance(f, torch.Tensor) else torch.from_numpy(f[i])

    def label_of(self, query: Path) -> str | None:
        """The query's class by the gallery's rule, or None when the gallery has no labels."""
        return None if self.labels is None or self.root is None else label_of(query, self.root)


def _labels(paths: list[Path], root: Path) -> list[str] | None:
    """The labels of absolute ``paths`` under ``root`` (kept for serve's Collection until it reads
    ``EmbedDir.labels``)."""
    return class_labels([str(p.relative_to(root)) for p in paths])


def gallery_features(rows: Rows) -> torch.Tensor | Rows:
    """An embed folder's rows as a search reads them (``rows.resident``): in memory up to ``rows.IN_MEMORY_MAX``
    (one matrix product a query), else on disk, searched a block at a time."""
    z = resident(rows)
    return torch.from_numpy(z) if isinstance(z, np.ndarray) else z


def load_gallery(embedder: Embedder, gallery: str, strict: bool = False, exact: bool = False) -> Gallery:
    root = Path(gallery)
    if is_embed_dir(root):
        # the features as written (unit=False): the scores of an embed folder are those of the network's output
        ed = load_embed_dir(root, embedder.fingerprint, int(embedder.dim), unit=False)
        from .index import load_index

        loaded = None if exact else load_index(root, ed.features_id)
        return Gallery(gallery_features(ed.features), [ed.image(i) for i in range(len(ed.paths))], ed.labels,
                       loaded[0] if loaded else None, ed.root, loaded[1].get("rerank", 0) if loaded else 0)
    files = list_images(gallery)
    z, kept, _ = embedder.files(files, strict)
    if not kept:
        raise UserError(f"{gallery}: none of the {len(files)} gallery images could be read")
    paths = [p.resolve() for p in kept]
    return Gallery(z, paths, _labels(paths, root.resolve()), root=root.resolve())


def query_files(queries: list[str]) -> list[Path]:
    files: list[Path] = []
    for q in queries:
        p = Path(q)
        if p.is_dir():
            files += list_images(q)
        elif p.is_file():
            if not is_image_name(p):
                raise UserError(f"{q}: not an image file ({', '.join(sorted(IMAGE_EXTS))})")
            files.append(p)
        else:
            raise UserError(f"{q}: no such query image or folder")
    return files


def search(query: torch.Tensor, gallery: torch.Tensor, k: int,
           exclude: list[int | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (q, k), indices (q, k)) of the k most similar gallery rows by inner product (cosine for
    L2-normalised rows), exactly; ``exclude[i]`` (a query's own gallery row, if it is in the gallery) is left
    out. Ties go to the lower gallery index.

    The top k + 1 per query are found by ``topk`` and ordered by (score, index); only a row whose k-th and
    (k + 1)-th scores tie, where the top-k set itself is ambiguous, is sorted in full (stable)."""
    dt = torch.promote_types(torch.promote_types(query.dtype, gallery.dtype), torch.float32)
    sim = query.to(dt) @ gallery.to(dt).t()  # (q, N), at least float32
    for i, j in enumerate(exclude or []):
        if j is not None:
            sim[i, j] = float("-inf")
    n = sim.shape[1]
    vals, idx = order_candidates(*torch.topk(sim, min(k + 1, n), dim=1))  # (q, k+1) by score, then by index
    if vals.shape[1] > k:
        tied = torch.nonzero(vals[:, k - 1] == vals[:, k]).squeeze(1)
        vals, idx = vals[:, :k].clone(), idx[:, :k].clone()
        if tied.numel():
            order = torch.sort(sim[tied], dim=1, descending=True, stable=True).indices[:, :k]
            idx[tied] = order
            vals[tied] = torch.gather(sim[tied], 1, order)
    return vals, idx


def search_rows(query: torch.Tensor, rows: Rows, k: int, exclude: list[int | None] | None = None,
                block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``search`` over rows on disk, ``block`` gallery rows at a time: each block's exact top k (ties to the lower
    index), then the best k of those by (score, index), the answer of one ``search`` over all rows."""
    if len(rows) <= block:
        return search(query, torch.from_numpy(rows[:]), k, exclude)
    cand_s, cand_i = [], []
    for s0, z in rows.blocks(block):
        ex = [None if j is None or not s0 <= j < s0 + len(z) else j - s0 for j in (exclude or [None] * len(query))]
        kk = min(k, len(z) - (1 if any(e is not None for e in ex) else 0))
        if kk < 1:
            continue
        v, i = search(query, torch.from_numpy(z), kk, ex)
        cand_s.append(v)
        cand_i.append(i + s0)
    vals, idx = torch.cat(cand_s, 1), torch.cat(cand_i, 1)
    out_s, out_i = order_candidates(vals, idx)  # by score, then by index
    return out_s[:, :k], out_i[:, :k]


def search_gallery(query: torch.Tensor, gal: Gallery, k: int,
                   exclude: list[int | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """``search`` through the gallery's faiss index when it has one (asking for one more to leave the query's
    own row out, or for ``rerank`` candidates re-scored exactly on the features), else exactly (block by block for
    rows on disk)."""
    if gal.index is None:
        if isinstance(gal.features, Rows):
            return search_rows(query, gal.features, k, exclude)
        return search(query, gal.features, k, exclude)
    q = np.ascontiguousarray(query.float().numpy())
    if gal.rerank:
        from .index import exact_rescore

        f = gal.features
        rows = f if isinstance(f, Rows) else Rows([f.float().numpy()])
        _, ids = gal.index.search(q, max(gal.rerank, k + 1))
        scores, ids = exact_rescore(q, rows, ids, k, exclude)
        return torch.from_numpy(scores), torch.from_numpy(ids.astype(np.int64))
    scores, ids = gal.index.search(q, k + 1)
    out_s, out_i = [], []
    for i, j in enumerate(exclude):
        keep = [c for c in range(k + 1) if ids[i, c] >= 0 and ids[i, c] != j][:k]
        out_s.append(scores[i, keep])
        out_i.append(ids[i, keep])
    return torch.from_numpy(np.stack(out_s)), torch.from_numpy(np.stack(out_i).astype(np.int64))


def _tile(path: Path, size: int, color: tuple[int, int, int] | None, border: int) -> Image.Image:
    try:
        with Image.open(path) as im:
            im = ImageOps.fit(im.convert("RGB"), (size, size))
    except OSError:
        im = Image.new("RGB", (size, size), (0, 0, 0))
    if color is not None:
        im = ImageOps.expand(im.crop((border, border, size - border, size - border)), border=border, fill=color)
    return im


def grid(rows: list[tuple[Path, list[Path], list[bool | None], list[float]]], path: Path, size: int = 112) -> None:
    """One row per query: the query (blue frame), then its neighbours, framed green (same label), red
    (different) or grey (unknown), with the cosine similarity under each."""
    k = max(len(r[1]) for r in rows)
    pad, text_h, border = 6, 14, 5
    width = pad + (k + 1) * (size + pad)
    height = pad + len(rows) * (size + text_h + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (q, neigh, same, scores) in enumerate(rows):
        y = pad + r * (size + text_h + pad)
        canvas.paste(_tile(q, size, BLUE, border), (pad, y))
        draw.text((pad, y + size + 1), "query", fill=(0, 0, 0))
        for j, (p, s, sc) in enumerate(zip(neigh, same, scores, strict=True)):
            x = pad + (j + 1) * (size + pad)
            color = GREY if s is None else (GREEN if s else RED)
            canvas.paste(_tile(p, size, color, border), (x, y))
            draw.text((x, y + size + 1), f"{j + 1}: {sc:.3f}", fill=(0, 0, 0))

    def write(f) -> None:
        canvas.save(f, format="PNG")

    atomic_write_bytes(Path(path), write)


@dataclass(kw_only=True)
class SearchOptions:
    checkpoint: str = checkpoint_arg()
    queries: list[str] = setting(help="query images or folders of them", positional=True, metavar="QUERY")
    gallery: str = setting(help="a folder of images, or an `isif embed` output folder")
    k: int = setting(5, "neighbours per query", check=at_least(1))
    out: str = setting("search.png", "the grid PNG")
    max_rows: int = setting(8, "queries drawn in the grid", check=at_least(1))
    tile: int = setting(112, "side of each image in the grid, in pixels", check=at_least(32))
    batch_size: int = setting(256, "images per forward pass", check=at_least(1))
    device: str | None = setting(None, "auto, cpu, cuda or cuda:N (default auto)")
    strict: bool = setting(False, "stop at the first broken image instead of skipping it")
    json: bool = setting(False, "print one JSON object")
    exact: bool = setting(False, "exact search even when the gallery has a faiss index")


@dataclass
class SearchResult:
    results: list[dict]  # [{"query", "neighbours": [{"path", "cosine", "same_label"?}]}], the --json output
    rows: list[tuple]  # the grid's rows: (query, neighbours, same label or None, cosines)
    k: int


def search_images(o: SearchOptions) -> SearchResult:
    """``isif search``: the queries embedded by ``o.checkpoint``, their ``o.k`` nearest in the gallery, and the grid
    PNG at ``o.out`` (its first ``o.max_rows`` queries)."""
    from ..base.device import resolve_device

    embedder = Embedder(o.checkpoint, str(resolve_device(o.device or "auto")), o.batch_size)
    res = run_search(embedder, o.queries, o.gallery, o.k, o.strict, o.exact)
    grid(res.rows[: o.max_rows], Path(o.out), size=o.tile)
    return res


def run_search(embedder: Embedder, queries: list[str], gallery: str, k: int, strict: bool = False,
               exact: bool = False) -> SearchResult:
    """Embed the queries, search the gallery, and describe every hit. A query that is itself in the gallery never
    finds itself. ``same_label`` (class-folder galleries only) tells whether a neighbour shares the query's folder
    name."""
    if not Path(gallery).is_dir():
        raise UserError(f"--gallery {gallery}: no such folder; pass a folder of images or an isif embed output")
    files = query_files(queries)
    gal = load_gallery(embedder, gallery, strict, exact)
    from ..data.decode import report_skipped
    from .embedding import embed_files

    z, kept, broken = embed_files(embedder, files, 0, strict)
    if not kept:
        first = min(broken)
        raise UserError(f"{files[first]}: not a decodable image ({broken[first].split(': ', 1)[-1][:100]})"
                        + (f", nor the other {len(files) - 1} queries" if len(files) > 1 else "")
                        + "; pass JPEG, PNG, WEBP, BMP, TIFF or GIF files")
    report_skipped([str(files[i]) for i in sorted(broken)], "the queries")
    qz, qfiles = torch.from_numpy(z), [files[i] for i in kept]
    where = {p: i for i, p in enumerate(gal.paths)}
    exclude = [where.get(p.resolve()) for p in qfiles]
    limit = len(gal.paths) - (1 if any(e is not None for e in exclude) else 0)
    if limit < 1:
        raise UserError("the gallery has no image besides the query")
    if k > limit:
        raise UserError(f"--k {k} is larger than the gallery ({limit} images besides the query); lower it")
    scores, idx = search_gallery(qz, gal, k, exclude)
    results, rows = [], []
    for i, q in enumerate(qfiles):
        neigh = [gal.paths[int(j)] for j in idx[i]]
        qlabel = gal.label_of(q)
        same = [None if gal.labels is None else gal.labels[int(j)] == qlabel for j in idx[i]]
        results.append({"query": str(q), "neighbours": [
            {"path": str(p), "cosine": float(sc), **({"same_label": s} if s is not None else {})}
            for p, sc, s in zip(neigh, scores[i].tolist(), same, strict=True)]})
        rows.append((q, neigh, same, scores[i].tolist()))
    return SearchResult(results, rows, k)
