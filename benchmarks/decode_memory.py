"""Peak memory and time of decoding one image with ``decode_rgb``, each case in a fresh process.

    python benchmarks/decode_memory.py --dir /tmp/isif-decode-bench
    python benchmarks/decode_memory.py --dir /tmp/isif-decode-bench --impl /tmp/old/decode.py  # another decoder

Makes the images under --dir (never in the repository; reused when already there):

- ``deep16.png``: 9000x9000 16-bit grey zeros (about 150 KiB), the issue's file;
- ``grey8.png``: 9000x9000 8-bit grey zeros;
- ``photo12.jpg``: a 4000x3000 RGB JPEG (12 megapixels), decoded whole and with ``draft=224``.

Each case runs in its own ``python`` process: it reads the file, resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``; without it the peak is ``ru_maxrss`` minus the resident size before decoding),
calls ``decode_rgb(data, name, draft=...)`` once and prints the resident peak above what the process held
before the call (``peak MiB``; ``VmHWM`` is the whole process's peak, interpreter and file included), the
wall time and, for the current decoder, its estimate from the header (``decode_estimate``), which is what
the limit ``max_bytes`` is compared with: it should never be below the peak. ``--impl`` loads
``decode_rgb`` from another file instead, e.g. the previous version:
``git show HEAD~1:src/isif/data/decode.py | sed 's/from \\.\\.errors/from isif.base.errors/' > /tmp/old/decode.py``.
A refused image prints its one-line refusal instead of figures. ``--prepare SIZE`` also runs the network's test
transform at SIZE px on the decoded array (``isif.data.input_spec.prepare``, what `isif embed` and `isif serve` do
next), inside the measured peak: the whole cost of one file on its way to the network.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

CASES = [("16-bit grey PNG 9000x9000", "deep16.png", None), ("8-bit grey PNG 9000x9000", "grey8.png", None),
         ("12 MP RGB JPEG, whole", "photo12.jpg", None), ("12 MP RGB JPEG, draft=224", "photo12.jpg", 224)]


def make_files(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "deep16.png").is_file():
        Image.fromarray(np.zeros((9000, 9000), np.uint16)).save(d / "deep16.png")
    if not (d / "grey8.png").is_file():
        Image.fromarray(np.zeros((9000, 9000), np.uint8)).save(d / "grey8.png")
    if not (d / "photo12.jpg").is_file():
        y, x = np.mgrid[0:3000, 0:4000]
        noise = np.random.default_rng(0).integers(0, 40, (3000, 4000, 3), dtype=np.uint8)
        rgb = np.stack([x * 255 // 4000, y * 255 // 3000, (x + y) * 255 // 7000], -1).astype(np.uint8) + noise
        Image.fromarray(rgb).save(d / "photo12.jpg", quality=90)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _load_decoder(impl: str | None):
    from isif.data import decode  # for either decoder, so that both processes start from the same baseline

    if impl is None:
        return decode
    spec = importlib.util.spec_from_file_location("decode_under_test", impl)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def child(path: str, draft: int | None, impl: str | None, size: int = 0) -> dict:
    """One decode (and with ``size``, the test transform) in this process: the peak resident memory it added (MiB)
    and its wall time."""
    mod = _load_decoder(impl)
    if size:
        from isif.data.input_spec import prepare
    data = Path(path).read_bytes()
    estimate = None
    if hasattr(mod, "decode_estimate"):
        estimate = round(mod.decode_estimate(data, path, draft) / 2**20)
    before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        reset = True
    except OSError:
        reset = False
    t = time.perf_counter()
    try:
        arr = mod.decode_rgb(data, path, draft=draft)
        if size:
            arr = prepare(arr, size).numpy()
    except mod.BadImage as e:
        return {"refused": str(e)}
    seconds = time.perf_counter() - t
    peak = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": round((peak - before) / 1024), "total_mib": round(peak / 1024), "seconds": round(seconds, 2),
            "estimate_mib": estimate, "output_mib": round(arr.nbytes / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/isif-decode-bench", help="where the test images are made")
    ap.add_argument("--impl", default=None, help="a decode.py file to measure instead of isif.data.decode")
    ap.add_argument("--prepare", type=int, default=0, help="also the test transform at this size (e.g. 224)")
    ap.add_argument("--child", nargs=2, metavar=("PATH", "DRAFT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]) or None, a.impl, a.prepare)))
        return
    d = Path(a.dir)
    make_files(d)
    print(f"decoder: {a.impl or 'isif.data.decode'}; ISIF_MAX_DECODE_MIB={os.environ.get('ISIF_MAX_DECODE_MIB')}"
          + (f"; then the test transform at {a.prepare} px" if a.prepare else ""))
    print(f"{'case':28s} {'file KiB':>9s} {'peak MiB':>9s} {'estimate':>9s} {'output':>7s} {'VmHWM':>7s} "
          f"{'seconds':>8s}")
    for label, name, draft in CASES:
        cmd = [sys.executable, __file__, "--child", str(d / name), str(draft or 0), "--prepare", str(a.prepare)]
        out = subprocess.run(cmd + (["--impl", a.impl] if a.impl else []), capture_output=True, text=True)
        if out.returncode:
            print(f"{label:28s} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        kib = (d / name).stat().st_size // 1024
        if "refused" in r:
            print(f"{label:28s} {kib:9d} refused: {r['refused']}")
            continue
        est = "-" if r["estimate_mib"] is None else str(r["estimate_mib"])
        print(f"{label:28s} {kib:9d} {r['peak_mib']:9d} {est:>9s} {r['output_mib']:7d} {r['total_mib']:7d} "
              f"{r['seconds']:8.2f}")


if __name__ == "__main__":
    main()
