"""``isif serve EMBED_DIR``: a local search page and JSON API over an embedded collection.

The collection is an ``isif embed`` output folder (features.npy, paths.txt, index.json), searched through its
faiss index when ``isif index`` made one (the same ``search_gallery`` as ``isif search``), exactly otherwise or
with ``--exact``; uploads are embedded with the checkpoint that made the features (its sha256 must match).

API (every error is JSON ``{"error": "..."}`` with a 4xx status, 503 when busy; never a traceback page):

- ``GET  /api/info``: the collection: images, dim, index kind and its measured Recall@10, clusters.
- ``GET  /api/search?id=N&k=K``: the K nearest images of gallery image N (itself left out).
- ``POST /api/search?k=K``: the K nearest images of an uploaded image: the raw bytes as the body
  (``curl --data-binary @q.jpg``) or a multipart form field ``image`` (``curl -F image=@q.jpg``).
- ``GET  /api/image/N``: gallery image N's file, as stored; ``GET /api/thumb/N?size=S``: a JPEG thumbnail.
- ``GET  /api/clusters`` and ``/api/clusters/C?offset=&limit=``: ``isif cluster`` output, when present.

What it defends against:

- Reading files outside the collection: images are served by id only, and only when the resolved file lies
  inside the collection's image folder (a path in a request is never opened; a symlink or a ``paths.txt``
  entry leading outside is refused).
- DNS rebinding (a website whose name is made to resolve to 127.0.0.1 reading the API as its own origin): a
  request whose ``Host`` header is not a name the server was started for (127.0.0.1, localhost, [::1] and
  ``--host``, with the port) is refused with 421.
- Cross-site requests (another website's page making the user's browser send a form, a ``no-cors`` fetch or an
  ``<img>`` here): refused with 403 on every /api route and for every method but GET/HEAD, from the browser's
  ``Origin`` and ``Sec-Fetch-Site`` headers; only a top-level page load of / or /static comes from anywhere.
  Every response carries ``nosniff``, ``no-referrer`` and ``X-Frame-Options: DENY``, the page a strict
  Content-Security-Policy (no inline script or style, nothing from other origins, no framing), and
  ``Cache-Control`` keeps images (``private``) and API answers (``no-store``) out of shared caches.
- Hostile uploads: a request body is limited (``--max-upload-mib``, checked on Content-Length and while
  reading), and uploads go through the training decoder (``decode_rgb``: decompression bombs refused from the
  header, truncated and non-image data rejected).
- Memory exhaustion by many requests: at most N decodes (uploads being read, decoded and embedded, and
  thumbnails being made) run at once, N = max(1, min(cores, MemAvailable / 2 / (max upload + 2 GiB))) (the
  1 GiB ``decode_rgb`` lets one decode allocate, and as much for the embedder's copy; ``decode_slots``), and an
  upload's body is read only once it holds one, so at most N bodies are held at once; up to max(32, 4 N) more
  requests wait up to ``WAIT_S`` seconds (their bodies unread meanwhile), the rest get 503 with ``Retry-After``.
  Searches by id, images and cached thumbnails never wait for a decode.

What it does not defend against:

- Anyone who can reach the port: there is no authentication, so every image of the collection is readable by
  whoever connects (every local user of the machine by default; the whole network with ``--host 0.0.0.0``,
  and it is plain HTTP). Keep the default 127.0.0.1 on a shared machine or network you do not trust.
- Old browsers, which send no ``Sec-Fetch-Site`` (it came with Chrome 76, Firefox 90, Safari 16.4) and no
  ``Origin`` on a cross-site ``<img>``: there another site's page can show (not read) the collection's images.
  Non-browser clients are not restricted by these checks at all.
- Denial of service by volume: many connections or searches by id are only bounded by uvicorn and the machine;
  a file of the collection itself is trusted (a thumbnail reads it whole before decoding it).
"""


import asyncio
import contextlib
import csv
import io
import ipaddress
import json
import mimetypes
import os
import socket
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..base.errors import UserError
from ..collection.embed_dir import EmbedDir, load_embed_dir
from ..data.decode import BadImage, TooLarge, decode_rgb, is_image_name, max_decode_bytes

INSTALL = ("isif serve needs FastAPI and uvicorn: pip install 'isif[serve]' (or pip install fastapi uvicorn "
           "python-multipart)")
MAX_K = 500
THUMB_SIDES = (64, 128, 256, 512)
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# the page loads its script and style from the server only, shows thumbnails and the uploaded file (blob:), and
# can be neither framed nor made to post a form anywhere
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"))
PRIVATE_CACHE = "private, max-age=3600"  # images and thumbnails: the browser may keep them, a shared cache not
# one decode's memory beyond its body: decode_rgb's default bound on what one decode may allocate (1 GiB: an
# 89-megapixel RGB JPEG, PIL's pixel limit, needs 0.98 GiB), and as much again for the embedder's float copy of
# the decoded image (measured: an upload of a 16-bit PNG of 9000 x 9000 zeros peaks at 1.4 GiB)
DECODE_PEAK = 2 << 30
WAIT_S = 2.0  # how long a decode waits for a free slot before its 503
QUEUE_MIN = 32  # requests that may wait for a slot at once, at least (a page loads its thumbnails 6 at a time)
DRAIN_S = 2.0  # how long a refused upload's body is read (and dropped) so the client sees the answer
RETRY_AFTER_S = 2


class RequestError(Exception):
    """A bad request: answered as JSON {"error": message} with ``status`` (and ``headers``)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


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
    """``isif cluster`` output in the embed folder, or None (with a warning line when it is stale)."""
    csv_path = ed.folder / "clusters.csv"
    if not csv_path.is_file():
        return None
    where = {p: i for i, p in enumerate(ed.paths)}
    try:
        with csv_path.open(newline="") as fh:
            rows = [(r["path"], int(r["cluster"]), float(r["distance_to_centre"])) for r in csv.DictReader(fh)]
    except (OSError, ValueError, KeyError, csv.Error):
        print(f"warning: {csv_path} is unreadable; clusters not shown (re-run `isif cluster {ed.folder} --k K`)",
              file=sys.stderr)
        return None
    if len(rows) != len(ed.paths) or any(p not in where for p, _, _ in rows) or any(c < 0 for _, c, _ in rows):
        print(f"warning: {csv_path} was made before the last `isif embed`; clusters not shown (re-run "
              f"`isif cluster {ed.folder} --k K`)", file=sys.stderr)
        return None
    k = max(c for _, c, _ in rows) + 1
    members: list[list[int]] = [[] for _ in range(k)]
    dists: list[list[float]] = [[] for _ in range(k)]
    of = np.full(len(ed.paths), -1, dtype=np.int64)
    for p, c, dist in rows:  # the CSV is ordered by cluster, then distance to the centre
        members[c].append(where[p])
        dists[c].append(dist)
        of[where[p]] = c
    return Clusters(k, members, dists, of)


class Collection:
    """An embed folder ready to be searched: features, index, the checkpoint for uploads, clusters."""

    def __init__(self, embed_dir: str | Path, checkpoint: str | None = None, exact: bool = False,
                 device: str = "cpu") -> None:
        from ..collection.embedding import Embedder
        from ..collection.search import Gallery, _labels

        self.ed = load_embed_dir(embed_dir)
        if not self.ed.root.is_dir():
            raise UserError(f"image folder {self.ed.root} (the root in {self.ed.folder}/index.json) is missing; "
                            "put the images back there or re-run `isif embed`")
        self.root = self.ed.root.resolve()
        meta = json.loads((self.ed.folder / "index.json").read_text())
        ckpt = checkpoint or meta.get("checkpoint")
        if not ckpt or not Path(ckpt).exists():
            raise UserError(f"{self.ed.folder}: the checkpoint that made it ({ckpt}) is missing; pass it with "
                            "--checkpoint")
        self.embedder = Embedder(ckpt, device, batch_size=1)
        if meta.get("checkpoint_sha256") and meta["checkpoint_sha256"] != self.embedder.fingerprint:
            raise UserError(f"{ckpt} is not the checkpoint that embedded {self.ed.folder}; pass that one with "
                            f"--checkpoint, or re-run `isif embed` with this one")
        if self.embedder.cfg.model.dim != self.ed.features.shape[1]:
            raise UserError(f"{ckpt} gives {self.embedder.cfg.model.dim}-d features but {self.ed.folder} holds "
                            f"{self.ed.features.shape[1]}-d; re-run `isif embed`")
        loaded = None
        if not exact:
            from ..collection.index import load_index

            try:
                loaded = load_index(self.ed.folder)
            except UserError as e:
                if "not installed" not in str(e):
                    raise
                loaded = None  # no faiss: the exact search is the same answer, only slower
        self.index_meta = loaded[1] if loaded else None
        paths = [self.ed.root / p for p in self.ed.paths]
        self.gallery = Gallery(torch.from_numpy(self.ed.features), paths, _labels(paths, self.ed.root),
                               loaded[0] if loaded else None)
        self.clusters = load_clusters(self.ed)
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
                "labels": self.gallery.labels is not None, "max_k": self._max_k(None)}

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
        return {"query": self.describe(i), "results": self.search(self.gallery.features[i], k, exclude=i)}

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
        return d

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


# ----------------------------------------------------------------------------- the web app


def allowed_hosts(host: str = "127.0.0.1", port: int = 8000) -> tuple[str, ...]:
    """The ``Host`` headers the server answers to, the address to open first: ``host`` and the loopback names (for
    a wildcard such as 0.0.0.0, the loopback names, this machine's name and ``host``), each with ``port`` (and also
    bare for port 80, as browsers send it there)."""
    if host in WILDCARD_HOSTS:
        names = [*LOOPBACK_NAMES, socket.gethostname(), socket.getfqdn(), host]
    else:
        names = [host, *LOOPBACK_NAMES]
    out: list[str] = []
    for name in names:
        name = (f"[{name}]" if ":" in name and not name.startswith("[") else name).lower()
        for h in (f"{name}:{port}", *([name] if port == 80 else [])):
            if name and h not in out:
                out.append(h)
    return tuple(out)


def _header(scope, name: bytes) -> str:
    for key, value in scope.get("headers") or []:
        if key == name:
            return value.decode("latin-1")
    return ""


class _Guard:
    """ASGI middleware in front of everything: the ``Host`` header must be one of ``hosts`` (421 otherwise: DNS
    rebinding), a request from another site's page is refused (403) on /api and for any method but GET/HEAD, and
    every response gets the security headers and, unless its route chose one, ``Cache-Control: no-store``."""

    def __init__(self, app, hosts: tuple[str, ...]) -> None:
        self.app, self.hosts = app, tuple(h.lower() for h in hosts)
        self.origins = frozenset(f"http://{h}" for h in self.hosts)
        self.slots: DecodeSlots | None = None  # create_app's, for whoever holds the app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _with_security_headers(send)
        host = _header(scope, b"host")
        if host.lower() not in self.hosts:
            return await _json_asgi(send, 421, f"Host {host[:80]!r} is not this server's address; open "
                                               f"http://{self.hosts[0]}/ (against DNS rebinding it answers only to "
                                               "the names it was started for: --host NAME adds NAME)")
        if self._cross_site(scope):
            return await _json_asgi(send, 403, f"cross-site request refused: only the page served by this server "
                                               f"(http://{self.hosts[0]}/) may call its API")
        return await self.app(scope, receive, send)

    def _cross_site(self, scope) -> bool:
        """From another site's page (its Origin, or the browser's Sec-Fetch-Site), to /api or not a GET/HEAD."""
        if scope["method"] in ("GET", "HEAD") and not scope["path"].startswith("/api"):
            return False  # the page and its static files: a link from anywhere may open them
        origin = _header(scope, b"origin").lower()
        return (origin != "" and origin not in self.origins) or \
            _header(scope, b"sec-fetch-site") in ("cross-site", "same-site")


def _with_security_headers(send):
    async def sender(msg):
        if msg["type"] == "http.response.start":
            headers = list(msg.get("headers") or [])
            names = {k.lower() for k, _ in headers}
            headers += [h for h in SECURITY_HEADERS if h[0] not in names]
            if b"cache-control" not in names:
                headers.append((b"cache-control", b"no-store"))
            msg = {**msg, "headers": headers}
        await send(msg)

    return sender


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused with 413 (from Content-Length before
    reading, else as soon as the bytes read pass it)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _json_asgi(send, 413, self._message())
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise RequestError(413, self._message())
            return msg

        return await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"upload larger than {self.limit / 2**20:g} MiB; send a smaller image (the server's --max-upload-mib)"


async def _json_asgi(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or 2 GiB when the system does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2 * 2**30


def decode_slots(max_upload_bytes: int) -> int:
    """How many decodes may run at once: one per core, and no more than half the available memory holds at
    ``max_upload_bytes + DECODE_PEAK`` each (the body and its decoded image); at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, _available_memory() // 2 // (max_upload_bytes + DECODE_PEAK)))


class DecodeSlots:
    """At most ``n`` decodes in flight (uploads being read, decoded and embedded; thumbnails being made). When all
    are taken a request waits up to ``wait_s`` seconds, at most ``queue`` of them at once; the others, and those
    that waited in vain, get 503 with Retry-After. On the server's event loop (asyncio)."""

    def __init__(self, n: int, wait_s: float = WAIT_S, queue: int | None = None) -> None:
        if n < 1:
            raise ValueError(f"decode slots must be >= 1, got {n}")
        self.n, self.wait_s = n, wait_s
        self.queue = max(QUEUE_MIN, 4 * n) if queue is None else queue
        self.waiting = 0
        self._sem = asyncio.Semaphore(n)

    async def acquire(self) -> None:
        if not self._sem.locked():
            await self._sem.acquire()  # free: returns at once
            return
        if self.waiting >= self.queue:
            raise self._busy()
        self.waiting += 1
        try:
            await asyncio.wait_for(self._sem.acquire(), self.wait_s)
        except asyncio.TimeoutError:
            raise self._busy() from None
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self._sem.release()

    @contextlib.asynccontextmanager
    async def hold(self):
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    def _busy(self) -> RequestError:
        return RequestError(503, f"busy: {self.n} image(s) are being decoded and {self.waiting} more wait; retry in "
                                 f"{RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)})


def create_app(col: Collection, max_upload_mib: float = 20.0, default_k: int = 24,
               hosts: tuple[str, ...] | None = None, decodes: int | None = None, wait_s: float = WAIT_S):
    """The ASGI app over ``col``: the page at /, the JSON API under /api; every error answered as JSON.

    ``hosts``: the Host headers it answers to (default: the loopback names on port 8000, ``allowed_hosts()``;
    ``serve`` passes those of the address it bound). ``decodes``: decodes at once (default ``decode_slots``)."""
    try:
        from fastapi import FastAPI
    except ImportError:
        raise UserError(INSTALL) from None
    limit = int(max_upload_mib * 2**20)
    slots = DecodeSlots(decodes or decode_slots(limit), wait_s)
    app = FastAPI(title="isif search", docs_url=None, redoc_url=None, openapi_url=None)
    _json_errors(app)
    _page(app)
    _api(app, col, default_k, slots)
    guard = _Guard(_BodyLimit(app, limit), hosts or allowed_hosts())
    guard.slots = slots
    return guard


def _json_errors(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        return error(e.status, e.message, e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        msg = "no such page: the API is under /api (see the README)" if e.status_code == 404 else str(e.detail)
        return error(e.status_code, msg)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "request"
        return error(422, f"{where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):  # logged by uvicorn; the client gets no traceback
        return error(500, f"internal error ({type(e).__name__}); see the server's log")


def _page(app) -> None:
    from fastapi.responses import Response

    web = resources.files("isif.serve") / "web"

    @app.get("/", include_in_schema=False)
    def page():
        return Response((web / "index.html").read_bytes(), media_type=STATIC["index.html"],
                        headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        if name not in STATIC:
            raise RequestError(404, f"no static file {name!r}")
        return Response((web / name).read_bytes(), media_type=STATIC[name])


async def _upload(request) -> tuple[bytes, str]:
    """(the uploaded bytes, a name): a multipart field ``image``, or the raw body."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await request.body(), "upload"
    try:
        form = await request.form(max_files=1, max_fields=4)
    except RequestError:
        raise
    except Exception as e:  # a malformed multipart body
        raise RequestError(400, f"malformed multipart upload ({str(e)[:80]})") from None
    f = form.get("image")
    if f is None or isinstance(f, str):
        raise RequestError(400, "multipart upload without a file field named 'image'")
    return await f.read(), Path(f.filename or "upload").name


async def _discard_body(request, seconds: float = DRAIN_S) -> None:
    """Read and drop the rest of a refused upload's body (at most the body limit, for at most ``seconds``), so
    that the client reads the answer instead of a connection reset while it is still sending."""
    from starlette.requests import ClientDisconnect

    async def drain():
        async for _ in request.stream():
            pass

    with contextlib.suppress(asyncio.TimeoutError, RequestError, ClientDisconnect, RuntimeError):
        await asyncio.wait_for(drain(), seconds)


def _api(app, col: Collection, default_k: int, slots: DecodeSlots) -> None:
    from fastapi import Request
    from fastapi.responses import FileResponse, Response
    from starlette.concurrency import run_in_threadpool

    def timed(fn, *args) -> dict:
        t0 = time.perf_counter()
        out = fn(*args)
        return {**out, "ms": round(1000 * (time.perf_counter() - t0), 2)}

    @app.get("/api/info")
    def info():
        return {**col.info(), "default_k": default_k}

    @app.get("/api/search")
    def search_id(id: int, k: int | None = None):  # noqa: A002  (the API's parameter name)
        return timed(col.search_id, id, default_k if k is None else k)

    @app.post("/api/search")
    async def search_upload(request: Request, k: int | None = None):
        try:
            await slots.acquire()  # before the body is read: at most slots.n bodies are held at once
        except RequestError:
            await _discard_body(request)
            raise
        try:
            data, name = await _upload(request)
            return await run_in_threadpool(timed, col.search_upload, data, default_k if k is None else k, name)
        finally:
            slots.release()

    @app.get("/api/image/{i}")
    def image(i: int):
        p = col.image_path(i)
        return FileResponse(p, media_type=mimetypes.guess_type(p.name)[0] or "application/octet-stream",
                            headers={"Cache-Control": PRIVATE_CACHE})

    @app.get("/api/thumb/{i}")
    async def thumb(i: int, size: int = 256):
        side = min((s for s in THUMB_SIDES if s >= size), default=THUMB_SIDES[-1])
        data = col.cached_thumb(col.check_id(i), side)
        if data is None:
            async with slots.hold():
                data = await run_in_threadpool(col.thumb, i, side)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": PRIVATE_CACHE})

    @app.get("/api/clusters")
    def clusters():
        return col.cluster_list()

    @app.get("/api/clusters/{c}")
    def cluster(c: int, offset: int = 0, limit: int = 100):
        return col.cluster(c, offset, limit)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or a one-line error naming --port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise UserError(f"--host {host}: not an address of this machine") from None
    family, kind, proto, _, addr = infos[0]
    # the protocol must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on such sockets' connections, and
    # without it every keep-alive response waits ~40 ms for a delayed ACK
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another with --port") from None
    sock.listen(128)
    return sock


def serve(embed_dir: str, checkpoint: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          exact: bool = False, max_upload_mib: float = 20.0, k: int = 24, device: str = "cpu",
          ready=None) -> None:
    """Load the collection, bind, print the address and serve until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise UserError(INSTALL) from None
    if max_upload_mib <= 0 or not 1 <= k <= MAX_K:
        raise UserError(f"--max-upload-mib must be > 0 and --k 1 to {MAX_K}")
    max_decode_bytes()  # a malformed ISIF_MAX_DECODE_MIB is one line now, not a 500 at the first upload
    col = Collection(embed_dir, checkpoint, exact, device)
    if not is_loopback(host):
        print(f"warning: --host {host} lets anyone who can reach this machine read every image of the collection "
              "(there is no authentication); the default 127.0.0.1 keeps it to this machine", file=sys.stderr)
    sock = bind(host, port)
    try:
        shown = sock.getsockname()[1]
        app = create_app(col, max_upload_mib, min(k, max(1, len(col) - 1)), hosts=allowed_hosts(host, shown))
        url_host = f"[{host}]" if ":" in host else host
        kind = col.index_meta["kind"] if col.index_meta else "exact"
        clusters = f", {col.clusters.k} clusters" if col.clusters else ""
        print(f"serving {len(col)} images ({kind} search{clusters}) at http://{url_host}:{shown}/  (Ctrl-C stops)",
              flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        if ready is not None:
            ready(server, shown)
        server.run(sockets=[sock])
    finally:
        sock.close()
