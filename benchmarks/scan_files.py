"""How long listing and scanning a folder of many small images takes, the first time and from the cache.

    python benchmarks/scan_files.py --files 100000 --dir /tmp/isif-scan-bench

Makes FILES small JPEG and PNG images (16-48 px, mixed sizes, a few broken ones) in nested folders under
--dir (never in the repository), then times, each in a fresh process state:

1. listing (``find_images``: the walk, hidden and non-image files counted);
2. the first scan (every file decoded once by the DataLoader workers; sizes and channel statistics kept);
3. the second scan (the cache hit: one stat per file to check that nothing changed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_files(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    tiles = [rng.integers(0, 255, (48, 48, 3), dtype=np.uint8) for _ in range(64)]
    for i in range(n):
        d = root / f"{i // 10000:02d}" / f"{(i // 500) % 20:02d}"
        if i % 500 == 0:
            d.mkdir(parents=True, exist_ok=True)
        w, h = 16 + (i * 7) % 33, 16 + (i * 13) % 33
        if i % 2000 == 1999:
            (d / f"{i:06d}.jpg").write_bytes(b"\xff\xd8\xff broken")
            continue
        Image.fromarray(tiles[i % 64][:h, :w]).save(d / f"{i:06d}.{'jpg' if i % 2 else 'png'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--dir", default=None, help="where to make the files (default a temporary folder, removed)")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    from isif.data.stream import FileReader, scan_files
    from isif.data.unlabelled import find_images

    root = Path(args.dir or tempfile.mkdtemp(prefix="isif-scan-"))
    cache = Path(tempfile.mkdtemp(prefix="isif-scan-cache-"))
    try:
        t0 = time.perf_counter()
        make_files(root, args.files)
        print(f"made {args.files:,} files in {time.perf_counter() - t0:.1f} s under {root}", file=sys.stderr)
        os.sync()
        t0 = time.perf_counter()
        found = find_images(root)
        t_list = time.perf_counter() - t0
        rows = [("list (walk)", t_list, len(found.names))]
        for label in ("first scan (decode every file)", "second scan (cached)"):
            t0 = time.perf_counter()
            res = scan_files(found.names, workers=args.workers, cache_dir=cache, what="bench", reader=FileReader(),
                             draft=224)
            rows.append((label, time.perf_counter() - t0, len(found.names) - len(res.bad)))
        print("| step | seconds | images/s | readable |\n|---|---:|---:|---:|")
        for label, sec, n in rows:
            print(f"| {label} | {sec:.2f} | {len(found.names) / sec:,.0f} | {n:,} |")
        print(f"cpu cores: {os.cpu_count()}, workers: {args.workers if args.workers is not None else 'default'}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
