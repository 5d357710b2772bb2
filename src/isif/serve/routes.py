"""The routes of ``isif serve``: the page and its static files at / and /static, the JSON API under /api."""

import asyncio
import contextlib
import mimetypes
import time
from importlib import resources
from pathlib import Path

from .collection import Collection
from .errors import RequestError
from .guard import DecodeSlots

THUMB_SIDES = (64, 128, 256, 512)
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
# the page loads its script and style from the server only, shows thumbnails and the uploaded file (blob:), and
# can be neither framed nor made to post a form anywhere
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PRIVATE_CACHE = "private, max-age=3600"  # images and thumbnails: the browser may keep them, a shared cache not
DRAIN_S = 2.0  # how long a refused upload's body is read (and dropped) so the client sees the answer


def add_page(app) -> None:
    """The page at / (with its Content-Security-Policy) and its script and style at /static/NAME."""
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


def add_api(app, col: Collection, default_k: int, slots: DecodeSlots) -> None:
    """The JSON API over ``col``; uploads and uncached thumbnails hold one of ``slots`` while they decode."""
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

    add_list_api(app, col)
    add_map_api(app, col)


def add_list_api(app, col: Collection) -> None:
    """The lists the other commands' files make: clusters, labels (select, label) and audit issues, a page at a
    time."""

    @app.get("/api/clusters")
    def clusters():
        return col.cluster_list()

    @app.get("/api/clusters/{c}")
    def cluster(c: int, offset: int = 0, limit: int = 100):
        return col.cluster(c, offset, limit)

    @app.get("/api/labels/{which}")
    def labelled(which: str, offset: int = 0, limit: int = 100):
        return col.labelled(which, offset, limit)

    @app.get("/api/audit/{issue}")
    def audited(issue: str, offset: int = 0, limit: int = 100, min_score: float | None = None):
        return col.audited(issue, offset, limit, min_score)


def add_map_api(app, col: Collection) -> None:
    """``isif map``'s grid at /api/map and its picture at /api/map.png (the embed folder's map-full.png, by that
    fixed name: no path is taken from the request; the page adds ?v=VERSION as its cache key)."""
    from fastapi.responses import FileResponse

    @app.get("/api/map")
    def map_layout():
        return col.map_layout()

    @app.get("/api/map.png")
    def map_png():
        return FileResponse(col.map_png(), media_type="image/png", headers={"Cache-Control": PRIVATE_CACHE})
