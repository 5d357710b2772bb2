"""The HTTP limits of ``isif serve``, in front of every route: the Host names it answers to (against DNS
rebinding), the refusal of cross-site requests, the security headers, the request body limit, and the decode slots
that bound how many uploads and thumbnails are decoded at once (see ``isif.serve.app`` for what each defends)."""

import asyncio
import contextlib
import ipaddress
import os
import socket
from pathlib import Path

from .errors import RequestError, json_asgi

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"))
# one decode's memory beyond its body: decode_rgb's default bound on what one decode may allocate (1 GiB: an
# 89-megapixel RGB JPEG, PIL's pixel limit, needs 0.98 GiB), and as much again for the embedder's float copy of
# the decoded image (measured: an upload of a 16-bit PNG of 9000 x 9000 zeros peaks at 1.4 GiB)
DECODE_PEAK = 2 << 30
WAIT_S = 2.0  # how long a decode waits for a free slot before its 503
QUEUE_MIN = 32  # requests that may wait for a slot at once, at least (a page loads its thumbnails 6 at a time)
RETRY_AFTER_S = 2


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


class Guard:
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
            return await json_asgi(send, 421, f"Host {host[:80]!r} is not this server's address; open "
                                               f"http://{self.hosts[0]}/ (against DNS rebinding it answers only to "
                                               "the names it was started for: --host NAME adds NAME)")
        if self._cross_site(scope):
            return await json_asgi(send, 403, f"cross-site request refused: only the page served by this server "
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


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused with 413 (from Content-Length before
    reading, else as soon as the bytes read pass it)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await json_asgi(send, 413, self._message())
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
