"""The searchable collection behind ``isif serve``: an embed folder with its features, its faiss index (or exact
search), the checkpoint that embeds uploads, ``isif cluster``, ``isif map``, ``isif select`` and ``isif label``
output and a cache of thumbnails."""

import io
import math
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..base.errors import UserError
from ..collection.embed_dir import EmbedDir, load_embed_dir
from ..collection.embedding import Embedder
from ..collection.map_layout import MAP_FULL, MapLayout, load_map_layout
from ..data.decode import BadImage, TooLarge, decode_rgb, is_image_name
from .errors import RequestError

MAX_K = 500


class _Lru:
    """A thread-safe least-recently-used cache of at most ``size`` values."""

    def __init__(self, size: int) -> None:
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


@dataclass
class Clusters:
    k: int
    members: list[list[int]]  # per cluster, gallery ids, most central first
    distances: list[list[float]]
    of: np.ndarray  # (N,) cluster of each gallery id


def load_clusters(ed: EmbedDir) -> Clusters | None:
    """``isif cluster`` output in the embed folder (read by its owner, ``read_clusters``), or None (with a warning
    line when it is stale or unreadable)."""
    from ..collection.cluster import read_clusters

    table = read_clusters(ed, "clusters not shown")
    if table is None:
        return None
    members: list[list[int]] = [[] for _ in range(table.k)]
    dists: list[list[float]] = [[] for _ in range(table.k)]
    for i, c, dist in table.rows:  # the CSV is ordered by cluster, then distance to the centre
        members[c].append(i)
        dists[c].append(dist)
    return Clusters(table.k, members, dists, table.of)


@dataclass
class Labelling:
    """``isif select`` and ``isif label`` output, as the page lists it (each part None when its file is absent)."""

    next_ids: list[int] | None  # selection.csv: gallery ids in rank order
    rank: dict[int, int]
    table: object | None  # collection.label.LabelTable
    classes: list[str]
    by_class: list[list[int]]  # gallery ids of each class, most confident first
    suspects: list[int] | None  # given ids, the likeliest wrong first


def load_labelling(ed: EmbedDir) -> Labelling | None:
    """selection.csv and labels.csv (+ suspects.csv), read by their owners (stale files: one warning, left out)."""
    from ..collection.label import read_labels_table
    from ..collection.select import read_selection

    rank = read_selection(ed, "the Label next list is not shown") or {}
    table = read_labels_table(ed, "labels are not shown")
    if not rank and table is None:
        return None
    classes, by_class, suspects = [], [], None
    if table is not None:
        classes = sorted(set(table.label))
        of = {c: j for j, c in enumerate(classes)}
        by_class = [[] for _ in classes]
        for i in np.argsort(-table.confidence, kind="stable").tolist():
            by_class[of[table.label[i]]].append(i)
        scored = np.nonzero(np.isfinite(table.suspect))[0]
        if len(scored):
            suspects = scored[np.argsort(-table.suspect[scored], kind="stable")].tolist()
    return Labelling(sorted(rank, key=rank.get) if rank else None, rank, table, classes, by_class, suspects)


@dataclass
class Audit:
    """``isif audit`` output as the page filters it: each issue's scores and flags, in gallery order."""

    scores: dict[str, np.ndarray]
    flags: dict[str, np.ndarray]


def load_audit(ed: EmbedDir) -> Audit | None:
    """audit.csv, read by its owner (a stale file: one warning, left out)."""
    from ..collection.audit import read_audit

    cols = read_audit(ed, "the Audit tab is not shown")
    if not cols:
        return None
    issues = [c for c in cols if not c.endswith("_flag") and f"{c}_flag" in cols]
    return Audit({c: cols[c] for c in issues}, {c: cols[f"{c}_flag"] for c in issues})


@dataclass
class Map:
    layout: MapLayout
    ids: list[int]  # the gallery id of each of layout.cells
    png: Path  # the embed folder's map-full.png
    version: str  # changes whenever map-full.png does (its mtime and size): the page's cache key


def load_map(ed: EmbedDir) -> Map | None:
    """``isif map`` output in the embed folder (map.json and map-full.png), or None (``load_map_layout`` warns in
    one line when it is unreadable or stale)."""
    layout = load_map_layout(ed.folder, ed.paths)
    if layout is None:
        return None
    png = ed.folder / MAP_FULL
    if layout.full_png != png.resolve():
        print(f"isif: warning: {ed.folder / 'map.json'} names {layout.full_png.name!r}, not {MAP_FULL}; the map is "
              f"not shown (re-run `isif map {ed.folder}`)", file=sys.stderr)
        return None
    where = {p: i for i, p in enumerate(ed.paths)}
    st = png.stat()
    return Map(layout, [where[p] for _, _, p in layout.cells], png, f"{st.st_mtime_ns:x}-{st.st_size:x}")


def _open(embed_dir: str | Path, checkpoint: str | None, device: str) -> tuple[EmbedDir, Embedder]:
    """(the embed folder, the embedder of uploads): ``checkpoint``, else the one the folder records, which must be
    the checkpoint that embedded it and give features of its size (``load_embed_dir`` checks both)."""
    ckpt = checkpoint or load_embed_dir(embed_dir).checkpoint
    if not ckpt or not Path(ckpt).exists():
        raise UserError(f"{embed_dir}: the checkpoint that made it ({ckpt}) is missing; pass it with --checkpoint")
    embedder = Embedder(ckpt, device, batch_size=1)
    return load_embed_dir(embed_dir, embedder.fingerprint, int(embedder.dim)), embedder


class Collection:
    """An embed folder ready to be searched: features, index, the checkpoint for uploads, clusters."""

    def __init__(self, embed_dir: str | Path, checkpoint: str | None = None, exact: bool = False,
                 device: str = "cpu") -> None:
        from ..collection.search import Gallery, gallery_features

        self.ed, self.embedder = _open(embed_dir, checkpoint, device)
        if not self.ed.root.is_dir():
            raise UserError(f"image folder {self.ed.root} (the root in {self.ed.folder}/index.json) is missing; "
                            "put the images back there or re-run `isif embed`")
        self.root = self.ed.root.resolve()
        loaded = None
        if not exact:
            from ..collection.index import load_index

            try:
                loaded = load_index(self.ed.folder, self.ed.features_id)
            except UserError as e:
                if "not installed" not in str(e):
                    raise
                loaded = None  # no faiss: the exact search is the same answer, only slower
        self.index_meta = loaded[1] if loaded else None
        self.gallery = Gallery(gallery_features(self.ed.features), [self.ed.image(i) for i in range(len(self))],
                               self.ed.labels, loaded[0] if loaded else None, self.ed.root,
                               loaded[1].get("rerank", 0) if loaded else 0)
        self.clusters = load_clusters(self.ed)
        self.map = load_map(self.ed)
        self.labelling = load_labelling(self.ed)
        self.audit = load_audit(self.ed)
        self._model_lock = threading.Lock()
        self._thumbs = _Lru(4096)

    def __len__(self) -> int:
        return len(self.ed.paths)

    def info(self) -> dict:
        m = self.index_meta
        return {"images": len(self), "dim": int(self.ed.features.shape[1]), "root": self.ed.root.name,
                "index": {"kind": m["kind"], "params": m["params"], "recall@10": m["recall@10"]} if m else
                {"kind": "exact (brute force)", "params": {}, "recall@10": 1.0},
                "clusters": self.clusters.k if self.clusters else None,
                "map": {"method": self.map.layout.method, "colour": self.map.layout.colour,
                        "thumbnails": len(self.map.ids)} if self.map else None,
                "labels": self.gallery.labels is not None, "max_k": self._max_k(None),
                "labelling": self.labelling_info(),
                "audit": [{"issue": c, "count": int(f.sum())} for c, f in self.audit.flags.items()]
                if self.audit else None}

    def _max_k(self, exclude: int | None) -> int:
        return min(MAX_K, len(self) - (exclude is not None))

    def check_id(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise RequestError(404, f"no image {i}: ids run from 0 to {len(self) - 1}")
        return i

    def search(self, query: torch.Tensor, k: int, exclude: int | None = None) -> list[dict]:
        from ..collection.search import search_gallery

        limit = self._max_k(exclude)
        if limit < 1:
            raise RequestError(400, "the collection has no image besides the query")
        if not 1 <= k <= limit:
            raise RequestError(400, f"k={k}: choose 1 to {limit}")
        scores, ids = search_gallery(query[None].float(), self.gallery, k, [exclude])
        return [self.describe(int(j), float(s)) for s, j in zip(scores[0].tolist(), ids[0].tolist(), strict=True)]

    def search_id(self, i: int, k: int) -> dict:
        self.check_id(i)
        return {"query": self.describe(i), "results": self.search(self.gallery.row(i), k, exclude=i)}

    def search_upload(self, data: bytes, k: int, name: str = "upload") -> dict:
        if not data:
            raise RequestError(400, "empty upload: send an image file")
        try:
            with self._model_lock:
                z = self.embedder.image_bytes(data, name)
        except TooLarge as e:
            raise RequestError(413, f"{e}; send a smaller image") from None
        except BadImage as e:
            raise RequestError(400, f"not a decodable image ({str(e).split(': ', 1)[-1][:120]}); send a JPEG, PNG, "
                                    "WEBP, BMP, TIFF or GIF file") from None
        return {"query": {"id": None, "path": name}, "results": self.search(z, k)}

    def describe(self, i: int, similarity: float | None = None) -> dict:
        d: dict = {"id": i, "path": self.ed.paths[i]}
        if similarity is not None:
            d["similarity"] = round(similarity, 6)
        if self.gallery.labels is not None:
            d["label"] = self.gallery.labels[i]
        if self.clusters is not None:
            d["cluster"] = int(self.clusters.of[i])
        lab = self.labelling
        if lab is not None:
            if i in lab.rank:
                d["rank"] = lab.rank[i]
            if lab.table is not None:
                t = lab.table
                d.update(assigned=t.label[i], confidence=round(float(t.confidence[i]), 4), given=bool(t.given[i]))
                if np.isfinite(t.suspect[i]):
                    d["suspect"] = round(float(t.suspect[i]), 4)
        if self.audit is not None:
            d["outlier"] = round(float(self.audit.scores["outlier"][i]), 3)
            d["issues"] = [c for c, f in self.audit.flags.items() if f[i]]
        return d

    def audited(self, issue: str, offset: int = 0, limit: int = 100, min_score: float | None = None) -> dict:
        """A page of the images flagged for ``issue`` (or, with ``min_score``, of every image whose score for it is
        at least that), the worst first."""
        if self.audit is None:
            raise RequestError(404, f"no audit: run `isif audit {self.ed.folder}` first")
        if issue not in self.audit.scores:
            raise RequestError(404, f"no issue {issue[:40]!r}: one of {', '.join(self.audit.scores)}")
        if offset < 0 or not 1 <= limit <= 1000:
            raise RequestError(400, "offset must be >= 0 and limit 1 to 1000")
        if min_score is not None and not math.isfinite(min_score):
            raise RequestError(400, "min_score must be a finite number")
        s = self.audit.scores[issue]
        keep = self.audit.flags[issue] if min_score is None else np.nan_to_num(s, nan=-np.inf) >= min_score
        ids = np.nonzero(keep)[0]
        ids = ids[np.argsort(-s[ids], kind="stable")]
        return {"issue": issue, "total": len(ids), "offset": offset, "min_score": min_score,
                "images": [{**self.describe(int(i)), "score": round(float(s[i]), 4)}
                           for i in ids[offset:offset + limit]]}

    def image_path(self, i: int) -> Path:
        """Gallery image i's file, only when it resolves to a file inside the image folder."""
        self.check_id(i)
        p = (self.ed.root / self.ed.paths[i]).resolve()
        if not p.is_relative_to(self.root) or not is_image_name(p):
            raise RequestError(403, f"image {i} lies outside the collection's folder; it is not served")
        if not p.is_file():
            raise RequestError(404, f"image {i} ({self.ed.paths[i]}) is no longer on disk; re-run `isif embed`")
        return p

    def thumb(self, i: int, side: int) -> bytes:
        """Gallery image i as a JPEG at most ``side`` pixels on its longer side (cached)."""
        data = self.cached_thumb(i, side)
        if data is None:
            data = self._thumb(i, side)
            self._thumbs.put((i, side), data)
        return data

    def cached_thumb(self, i: int, side: int) -> bytes | None:
        return self._thumbs.get((i, side))

    def _thumb(self, i: int, side: int) -> bytes:
        p = self.image_path(i)
        try:
            arr = decode_rgb(p.read_bytes(), str(p), draft=side)
        except (BadImage, OSError) as e:
            raise RequestError(404, f"image {i} cannot be decoded ({str(e)[-80:]})") from None
        im = Image.fromarray(arr)
        im.thumbnail((side, side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    def cluster(self, c: int, offset: int = 0, limit: int = 100) -> dict:
        if self.clusters is None:
            raise RequestError(404, f"no clusters: run `isif cluster {self.ed.folder} --k K` first")
        if not 0 <= c < self.clusters.k:
            raise RequestError(404, f"no cluster {c}: clusters run from 0 to {self.clusters.k - 1}")
        if offset < 0 or not 1 <= limit <= 1000:
            raise RequestError(400, "offset must be >= 0 and limit 1 to 1000")
        ids = self.clusters.members[c][offset:offset + limit]
        dists = self.clusters.distances[c][offset:offset + limit]
        return {"cluster": c, "size": len(self.clusters.members[c]), "offset": offset,
                "images": [{**self.describe(i), "distance_to_centre": d} for i, d in zip(ids, dists, strict=True)]}

    def cluster_list(self, preview: int = 12) -> dict:
        if self.clusters is None:
            raise RequestError(404, f"no clusters: run `isif cluster {self.ed.folder} --k K` first")
        return {"k": self.clusters.k, "clusters": [{"cluster": c, "size": len(m), "preview": m[:preview]}
                                                   for c, m in enumerate(self.clusters.members)]}

    def labelling_info(self) -> dict | None:
        lab = self.labelling
        if lab is None:
            return None
        return {"next": len(lab.next_ids) if lab.next_ids else 0,
                "classes": [{"label": c, "count": len(m)} for c, m in zip(lab.classes, lab.by_class, strict=True)],
                "suspects": len(lab.suspects) if lab.suspects else 0}

    def labelled(self, which: str, offset: int = 0, limit: int = 100) -> dict:
        """A page of the Label next list (``next``), the suspects (``suspects``) or the images of class j
        (``class-J``, most confident first)."""
        lab = self.labelling
        if lab is None:
            raise RequestError(404, f"no labels: run `isif select {self.ed.folder} --budget N` or `isif label "
                                    f"{self.ed.folder} LABELS.csv` first")
        if offset < 0 or not 1 <= limit <= 1000:
            raise RequestError(400, "offset must be >= 0 and limit 1 to 1000")
        if which == "next":
            ids = lab.next_ids
        elif which == "suspects":
            ids = lab.suspects
        elif which.startswith("class-") and which[6:].isdigit() and int(which[6:]) < len(lab.classes):
            ids = lab.by_class[int(which[6:])]
        else:
            raise RequestError(404, f"no list {which[:40]!r}: next, suspects or class-J (J from 0 to "
                                    f"{len(lab.classes) - 1})")
        if ids is None:
            raise RequestError(404, f"no {which} list: run `isif {'select' if which == 'next' else 'label'} "
                                    f"{self.ed.folder} ...` first")
        return {"list": which, "total": len(ids), "offset": offset,
                "images": [self.describe(i) for i in ids[offset:offset + limit]]}

    def _require_map(self) -> Map:
        if self.map is None:
            raise RequestError(404, f"no map: run `isif map {self.ed.folder}` first")
        return self.map

    def map_layout(self) -> dict:
        """The grid of map-full.png: its size, the cell size and origin, and each thumbnail's cell as
        [col, row, gallery id], with the paths in the same order."""
        m = self._require_map()
        g = m.layout
        return {"cols": g.cols, "rows": g.rows, "tile": g.tile, "left": g.left, "top": g.top, "width": g.width,
                "height": g.height, "method": g.method, "colour": g.colour, "version": m.version,
                "cells": [[c, r, i] for (c, r, _), i in zip(g.cells, m.ids, strict=True)],
                "paths": [p for _, _, p in g.cells]}

    def map_png(self) -> Path:
        m = self._require_map()
        if not m.png.is_file():
            raise RequestError(404, f"{MAP_FULL} is no longer in {self.ed.folder}; re-run `isif map {self.ed.folder}`")
        return m.png
