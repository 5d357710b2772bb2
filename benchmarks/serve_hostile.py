"""Hostile uploads against a real `isif serve`: the server's memory, and searches by id while it is attacked.

    python benchmarks/serve_hostile.py EMBED_DIR [--clients 8] [--requests 15] [--time-limit 60]
    python benchmarks/serve_hostile.py --make-demo DIR [...]   # anyone can run it: makes DIR/emb first

Starts `isif serve EMBED_DIR --port 0` (a real server process, bound to 127.0.0.1), measures --baseline
searches by id (GET /api/search?id=&k=) and the server's RSS, then --clients threads (each its own keep-alive
connection) send --requests hostile uploads each (POST /api/search, raw bytes), in turn: the largest body allowed
(--max-upload-mib of random bytes), a 16-bit PNG of 9,000 x 9,000 zeros (~154 KiB, 81 megapixels: under PIL's
decompression-bomb limit, so it is decoded), a decompression bomb (a PNG header claiming 20,000 x 20,000 pixels)
and truncated JPEG and PNG files; meanwhile one more thread searches by id. Bounded: at most clients x requests
uploads and --time-limit seconds; the server is stopped at the end.

Prints the server's RSS before the attack and its peak (VmHWM of /proc/PID/status), the p50/p99 of searches by
id before and during the attack, the count of each status per upload kind, failed connections, and the answers
that were not JSON (must be 0: the exit status is 1 otherwise).

``--make-demo DIR`` first makes DIR/emb (kept, and reused by the next run): a one-epoch tiny run trained on
generated images (DIR/run) and 200 generated photos embedded with it. About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("largest body", "16-bit 9000x9000", "bomb header", "truncated jpeg", "truncated png")


def isif(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "isif", *args], check=True, timeout=900)


def generated_tree(root: Path, classes: int = 4, per_class: int = 16, seed: int = 0) -> Path:
    """train/ and test/ folders of class-coloured noise images (a network can learn something from them)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 225, (classes, 3))
    for split, per in (("train", per_class), ("test", per_class // 2)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per):
                img = np.clip(colours[c] + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


def make_demo(out: Path, images: int = 200) -> Path:
    """out/emb: a tiny run's embedding of ``images`` generated photos (made once, then reused)."""
    emb = out / "emb"
    if (emb / "index.json").is_file():
        return emb
    t0 = time.perf_counter()
    isif("train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data", str(generated_tree(out / "tree")),
         "--width", "0.03125", "--batch-size", "8", "--epochs", "1", "--out", str(out / "run"), "--quiet")
    rng = np.random.default_rng(1)
    for i in range(images):
        d = out / "photos" / f"album{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48 + i % 7, 64, 3), dtype=np.uint8)).save(d / f"{i:03d}.jpg")
    isif("embed", str(out / "run"), str(out / "photos"), "--out", str(emb), "--quiet", "--workers", "0")
    print(f"made the demo collection {emb} in {time.perf_counter() - t0:.0f} s")
    return emb


def png_claiming(w: int, h: int) -> bytes:
    """A valid PNG header claiming w x h pixels (the pixels themselves are never there)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def encoded(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def payloads(max_upload_mib: float) -> dict[str, bytes]:
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 256, (600, 800, 3), dtype=np.uint8))
    jpeg, png = encoded(photo, "JPEG"), encoded(photo, "PNG")
    out = {"largest body": os.urandom(int(max_upload_mib * 2**20)),
           "16-bit 9000x9000": encoded(Image.fromarray(np.zeros((9000, 9000), np.uint16)), "PNG"),
           "bomb header": png_claiming(20_000, 20_000),
           "truncated jpeg": jpeg[:len(jpeg) // 2], "truncated png": png[:len(png) // 2]}
    assert list(out) == list(KINDS)
    return out


def start_server(embed_dir: Path, max_upload_mib: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "isif", "serve", str(embed_dir), "--port", "0", "--max-upload-mib",
                             str(max_upload_mib)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        sys.exit(f"the server did not start: {line}{proc.stderr.read()}")
    print(line.strip())
    return proc, int(line.split("http://127.0.0.1:")[1].split("/")[0])


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of process ``pid``, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) // 1024
    return fields


class Client:
    """One keep-alive connection to the server, reopened after a failure; every answer's status and JSON-ness."""

    def __init__(self, port: int) -> None:
        self.port, self.conn = port, None

    def request(self, method: str, url: str, body: bytes | None = None) -> tuple[int | str, bool, float]:
        """(status, or the exception's name for a failed connection; whether the answer is JSON; seconds)."""
        t0 = time.perf_counter()
        try:
            self.conn = self.conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
            self.conn.request(method, url, body=body, headers=headers)
            r = self.conn.getresponse()
            data = r.read()
            return r.status, is_json(r.getheader("content-type"), data), time.perf_counter() - t0
        except (OSError, http.client.HTTPException) as e:
            self.close()
            return type(e).__name__, True, time.perf_counter() - t0

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None


def is_json(content_type: str | None, data: bytes) -> bool:
    if content_type != "application/json":
        return False
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def searches(port: int, n: int, images: int, stop: threading.Event | None = None,
             deadline: float = float("inf")) -> list[tuple[int | str, bool, float]]:
    """Searches by id, one after another: ``n`` of them, or until ``stop`` is set or the deadline passes."""
    c, out, rng = Client(port), [], np.random.default_rng(3)
    while len(out) < n and not (stop is not None and stop.is_set()) and time.perf_counter() < deadline:
        out.append(c.request("GET", f"/api/search?id={rng.integers(images)}&k=24"))
    c.close()
    return out


def attacker(port: int, bodies: dict[str, bytes], start: int, count: int, deadline: float, out: list) -> None:
    c = Client(port)
    for j in range(count):
        if time.perf_counter() > deadline:
            break
        kind = KINDS[(start + j) % len(KINDS)]
        out.append((kind, *c.request("POST", "/api/search?k=5", bodies[kind])))
    c.close()


def attack(port: int, bodies: dict[str, bytes], args, images: int) -> tuple[list, list, float]:
    """(the uploads' answers, the searches' answers during the attack, its seconds)."""
    hostile: list = []
    stop = threading.Event()
    deadline = time.perf_counter() + args.time_limit
    during: list = []
    watcher = threading.Thread(target=lambda: during.extend(searches(port, 10**6, images, stop, deadline + 5)))
    threads = [threading.Thread(target=attacker, args=(port, bodies, i, args.requests, deadline, hostile))
               for i in range(args.clients)]
    t0 = time.perf_counter()
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    return hostile, during, time.perf_counter() - t0


def latency(rows: list) -> str:
    ms = np.array([r[2] for r in rows if r[0] == 200]) * 1000
    bad = sum(r[0] != 200 for r in rows)
    if not len(ms):
        return f"no answers ({bad} failed)"
    p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
    return f"p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  ({len(ms)} searches, {bad} failed)"


def report(before: dict, after: dict, base: list, hostile: list, during: list, wall: float, args) -> int:
    from isif.serve.guard import decode_slots

    slots = decode_slots(int(args.max_upload_mib * 2**20))
    print(f"{args.clients} attackers x {args.requests} uploads, {len(hostile)} sent in {wall:.1f} s on 127.0.0.1, "
          f"{os.cpu_count()} cores; --max-upload-mib {args.max_upload_mib:g} (decode slots here: {slots})")
    print(f"server RSS before the attack {before['VmRSS']} MiB (peak so far {before['VmHWM']} MiB); "
          f"peak RSS (VmHWM) after it {after['VmHWM']} MiB; RSS now {after['VmRSS']} MiB")
    print(f"search by id before: {latency(base)}")
    print(f"search by id during: {latency(during)}")
    statuses = sorted({str(r[1]) for r in hostile})
    print(f"{'upload':18s} " + " ".join(f"{s:>8s}" for s in statuses))
    for kind in KINDS:
        counts = Counter(str(r[1]) for r in hostile if r[0] == kind)
        print(f"{kind:18s} " + " ".join(f"{counts[s]:8d}" for s in statuses))
    not_json = sum(not r[2] for r in hostile) + sum(not r[1] for r in base + during)
    print(f"answers that were not JSON: {not_json}")
    return 1 if not_json else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("embed_dir", nargs="?", help="an `isif embed` output folder (or give --make-demo)")
    ap.add_argument("--make-demo", metavar="DIR", help="make (or reuse) a demo collection in DIR/emb and use it")
    ap.add_argument("--clients", type=int, default=8, help="attacking threads (default 8)")
    ap.add_argument("--requests", type=int, default=15, help="uploads per attacking thread (default 15)")
    ap.add_argument("--baseline", type=int, default=200, help="searches by id before the attack (default 200)")
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds of attack at most (default 60)")
    ap.add_argument("--max-upload-mib", type=float, default=20.0, help="the server's --max-upload-mib (default 20)")
    args = ap.parse_args(argv)
    if bool(args.embed_dir) == bool(args.make_demo):
        ap.error("give EMBED_DIR or --make-demo DIR")
    emb = make_demo(Path(args.make_demo)) if args.make_demo else Path(args.embed_dir)
    images = len((emb / "paths.txt").read_text().split())
    bodies = payloads(args.max_upload_mib)
    proc, port = start_server(emb, args.max_upload_mib)
    try:
        searches(port, 5, images)  # warm up
        base = searches(port, args.baseline, images, deadline=time.perf_counter() + 60)
        before = memory(proc.pid)
        hostile, during, wall = attack(port, bodies, args, images)
        after = memory(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return report(before, after, base, hostile, during, wall, args)


if __name__ == "__main__":
    sys.exit(main())
