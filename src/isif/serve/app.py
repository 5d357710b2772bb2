"""``isif serve EMBED_DIR``: a local search page and JSON API over an embedded collection.

The collection is an ``isif embed`` output folder (features.npy, paths.txt, index.json), searched through its
faiss index when ``isif index`` made one (the same ``search_gallery`` as ``isif search``), exactly otherwise or
with ``--exact``; uploads are embedded with the checkpoint that made the features (its sha256 must match).

The parts: ``collection`` (the searchable collection: features, index, checkpoint, clusters, map, thumbnails),
``guard`` (the HTTP limits in front of every route), ``routes`` (the page and the /api routes), ``errors`` (every
error as JSON); this module puts them together (``create_app``), binds the socket and serves.

API (every error is JSON ``{"error": "..."}`` with a 4xx status, 503 when busy; never a traceback page):

- ``GET  /api/info``: the collection: images, dim, index kind and its measured Recall@10, clusters, map.
- ``GET  /api/search?id=N&k=K``: the K nearest images of gallery image N (itself left out).
- ``POST /api/search?k=K``: the K nearest images of an uploaded image: the raw bytes as the body
  (``curl --data-binary @q.jpg``) or a multipart form field ``image`` (``curl -F image=@q.jpg``).
- ``GET  /api/image/N``: gallery image N's file, as stored; ``GET /api/thumb/N?size=S``: a JPEG thumbnail.
- ``GET  /api/clusters`` and ``/api/clusters/C?offset=&limit=``: ``isif cluster`` output, when present.
- ``GET  /api/labels/next``, ``/api/labels/suspects``, ``/api/labels/class-J`` (``?offset=&limit=``): ``isif
  select``'s Label next list, ``isif label``'s suspects (likeliest wrong first) and the images it labels J (most
  confident first), when present; /api/info's ``labelling`` lists the classes.
- ``GET  /api/map``: ``isif map``'s grid of thumbnails (each cell's gallery id), when present; ``GET /api/map.png``:
  its full-resolution picture (the embed folder's map-full.png, by that fixed name).

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

import socket
import sys

from ..base.errors import UserError
from ..data.decode import max_decode_bytes
from .collection import MAX_K, Collection
from .errors import json_errors
from .guard import WAIT_S, BodyLimit, DecodeSlots, Guard, allowed_hosts, decode_slots, is_loopback
from .options import ServeOptions
from .routes import add_api, add_page

INSTALL = ("isif serve needs FastAPI and uvicorn: pip install 'isif[serve]' (or pip install fastapi uvicorn "
           "python-multipart)")


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
    json_errors(app)
    add_page(app)
    add_api(app, col, default_k, slots)
    guard = Guard(BodyLimit(app, limit), hosts or allowed_hosts())
    guard.slots = slots
    return guard


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


def serve(o: ServeOptions, ready=None) -> None:
    """Load the collection, bind, print the address and serve until interrupted; ``ready(server, port)`` is called
    once bound (tests stop the server there)."""
    from ..base.device import resolve_device

    host, port, max_upload_mib, k = o.host, o.port, o.max_upload_mib, o.k
    try:
        import uvicorn
    except ImportError:
        raise UserError(INSTALL) from None
    if max_upload_mib <= 0 or not 1 <= k <= MAX_K:
        raise UserError(f"--max-upload-mib must be > 0 and --k 1 to {MAX_K}")
    max_decode_bytes()  # a malformed ISIF_MAX_DECODE_MIB is one line now, not a 500 at the first upload
    col = Collection(o.embed_dir, o.checkpoint, o.exact, str(resolve_device(o.device)))
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
        clusters += f", a map of {len(col.map.ids)} thumbnails" if col.map else ""
        print(f"serving {len(col)} images ({kind} search{clusters}) at http://{url_host}:{shown}/  (Ctrl-C stops)",
              flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        if ready is not None:
            ready(server, shown)
        server.run(sockets=[sock])
    finally:
        sock.close()
