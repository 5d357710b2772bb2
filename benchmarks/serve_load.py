"""Load test of `isif serve`: N concurrent clients, M requests each, on the loopback interface only.

    python benchmarks/serve_load.py EMBED_DIR [--clients 8] [--requests 200] [--upload-share 0.25]
    python benchmarks/serve_load.py EMBED_DIR --synthetic 1000000 [--kind hnsw] [--out DIR] ...


Starts `isif serve EMBED_DIR --port 0` (a real server process, bound to 127.0.0.1), waits for it, then each client
(a thread with its own keep-alive connection) sends M requests drawn with a seeded generator: a search by a
random gallery id (GET /api/search?id=&k=), an upload of a random gallery file (POST /api/search, the raw bytes),
or a thumbnail (GET /api/thumb/ID). Prints p50/p99/max latency per kind, the throughput, and the errors (any
status but 200, or a failed connection), which should be zero. Bounded: at most --clients x --requests requests
and --time-limit seconds; the server is stopped at the end.

``--synthetic N`` first makes ``--out DIR`` (default: EMBED_DIR-synthetic-N beside EMBED_DIR), an embed folder
of N features from index_scale.py's seeded mixture of 10,000 clusters, with the checkpoint and image root of the
real embed folder EMBED_DIR (the files named in its paths.txt do not exist, so only searches by id are sent),
builds its index with ``isif index --kind KIND`` and serves that folder.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def start_server(embed_dir: str, extra: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "isif", "serve", embed_dir, "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        sys.exit(f"the server did not start: {line}{proc.stderr.read()}")
    print(line.strip())
    port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
    return proc, port


def make_synthetic(out: Path, n: int, like: Path, kind: str, seed: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from index_scale import mixture

    meta = json.loads((like / "index.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    np.save(out / "features.npy", mixture(n, meta["dim"], 10_000, seed))
    (out / "paths.txt").write_text("".join(f"synthetic/{i:07d}.jpg\n" for i in range(n)))
    meta.update(images=n, shards=0)
    for key in ("segments", "features_id"):  # the features are features.npy alone, as a folder of before reads
        meta.pop(key, None)
    (out / "index.json").write_text(json.dumps(meta, indent=2))
    print(f"made {n} synthetic features in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "isif", "index", str(out), "--kind", kind], check=True)
    print(f"isif index: {time.perf_counter() - t0:.1f} s")


def synthetic_folder(args: argparse.Namespace) -> Path:
    """Make the --synthetic folder from the real embed folder EMBED_DIR; the folder to serve."""
    like = Path(args.embed_dir)
    if not (like / "index.json").is_file():
        sys.exit(f"{like}: not an `isif embed` output folder (no index.json); --synthetic takes its checkpoint")
    out = Path(args.out) if args.out else like.parent / f"{like.name}-synthetic-{args.synthetic}"
    make_synthetic(out, args.synthetic, like, args.kind, args.seed)
    return out


def client(port: int, jobs: list[tuple[str, str, bytes | None]], out: list, deadline: float) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for kind, url, body in jobs:
        if time.perf_counter() > deadline:
            break
        t0 = time.perf_counter()
        try:
            if body is None:
                conn.request("GET", url)
            else:
                conn.request("POST", url, body=body, headers={"Content-Type": "application/octet-stream"})
            r = conn.getresponse()
            r.read()
            ok = r.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        out.append((kind, time.perf_counter() - t0, ok))
    conn.close()


def make_plans(args: argparse.Namespace, paths: list[str], root: Path) -> list[list[tuple[str, str, bytes | None]]]:
    """Each client's requests, drawn seeded: (kind, url, the upload's bytes or None)."""
    rng = random.Random(args.seed)
    plans = []
    for _ in range(args.clients):
        jobs = []
        for _ in range(args.requests):
            u, i = rng.random(), rng.randrange(len(paths))
            if u < args.upload_share:
                jobs.append(("upload", f"/api/search?k={args.k}", (root / paths[i]).read_bytes()))
            elif u < args.upload_share + args.thumb_share:
                jobs.append(("thumb", f"/api/thumb/{i}?size=256", None))
            else:
                jobs.append(("search id", f"/api/search?id={i}&k={args.k}", None))
        plans.append(jobs)
    return plans


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("embed_dir")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200, help="per client")
    ap.add_argument("--upload-share", type=float, default=0.25)
    ap.add_argument("--thumb-share", type=float, default=0.25)
    ap.add_argument("--k", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=600.0)
    ap.add_argument("--exact", action="store_true", help="pass --exact to the server")
    ap.add_argument("--synthetic", type=int, help="make and serve an embed folder of this many synthetic features, "
                                                  "with EMBED_DIR's checkpoint")
    ap.add_argument("--out", help="with --synthetic: where it goes (default EMBED_DIR-synthetic-N beside EMBED_DIR)")
    ap.add_argument("--kind", default="auto", help="with --synthetic: the index kind built")
    args = ap.parse_args(argv)
    d = Path(args.embed_dir)
    if args.synthetic:
        d = synthetic_folder(args)
        args.upload_share = args.thumb_share = 0.0
    paths = [p for p in (d / "paths.txt").read_text().split("\n") if p]
    plans = make_plans(args, paths, Path(json.loads((d / "index.json").read_text())["root"]))
    proc, port = start_server(str(d), ["--exact"] if args.exact else [])
    try:
        warm: list = []
        client(port, [("warm", f"/api/search?id=0&k={args.k}", None)] * 5, warm, time.perf_counter() + 60)
        results: list = []
        deadline = time.perf_counter() + args.time_limit
        threads = [threading.Thread(target=client, args=(port, jobs, results, deadline)) for jobs in plans]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"{args.clients} clients x {args.requests} requests on 127.0.0.1, {len(paths)} images, k={args.k}, "
          f"{os.cpu_count()} cores; {len(results)} requests in {wall:.1f} s ({len(results) / wall:.1f} requests/s)")
    print(f"{'kind':10s} {'count':>6s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} {'errors':>7s}")
    for kind in ("search id", "upload", "thumb", "all"):
        rows = [r for r in results if kind == "all" or r[0] == kind]
        if not rows:
            continue
        ms = np.array([r[1] for r in rows]) * 1000
        errors = sum(not r[2] for r in rows)
        print(f"{kind:10s} {len(rows):6d} {np.percentile(ms, 50):8.1f} {np.percentile(ms, 99):8.1f} "
              f"{ms.max():8.1f} {errors:7d}")


if __name__ == "__main__":
    main()
