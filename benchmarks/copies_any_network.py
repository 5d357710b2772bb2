"""Copies found whatever the network: `isif duplicates` with the embedding alone and joined with the mirror hash,
for several networks, beside imagededup on the same files.

    python benchmarks/copies_any_network.py --data ../shared/datasets/tiny-imagenet-unseen.zip --out /tmp/cp \\
        --checkpoint tiny-1ep=RUN_A --checkpoint cpu-1ep=RUN_B --checkpoint cpu-fast-12ep=RUN_C \\
        [--images 2000] [--planted 20] [--peers-python /tmp/peers/bin/python]

1. Extracts the first --images test/ images of the zip (round-robin over the classes) as PNG files into a flat
   folder, and plants --planted copies of distinct originals drawn with --seed, each mirrored and re-encoded as
   JPEG q60 (a copy found by neither edit alone).
2. For each network: `isif embed`, then `isif duplicates` at the calibrated threshold twice: `--hash-bits -1`
   (the embedding alone) and the default (joined with the perceptual hash). Found: planted pairs whose two images
   share a group; others: images in some group that are neither an original nor a copy.
3. imagededup (run by --peers-python, an interpreter with imagededup installed) on the same folder: PHash with its
   default `max_distance_threshold` (10) and CNN with its default `min_similarity_threshold` (0.9); the same two
   counts from its duplicate lists. A tool that cannot run here is reported with the reason.

Writes --out/copies.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from duplicates_planted import extract, prepare_out  # noqa: E402
from select_labels import machine  # noqa: E402

from isif.cli import main as isif_main  # noqa: E402

PEER = r"""
import json, sys, time
from imagededup.methods import {method}
t = time.perf_counter()
try:
    found = {method}().find_duplicates(image_dir=sys.argv[1], {arg})
    print(json.dumps({{"pairs": [[k, v] for k, vs in found.items() for v in vs], "seconds": time.perf_counter() - t}}))
except Exception as e:
    print(json.dumps({{"error": f"{{type(e).__name__}}: {{str(e)[:200]}}"}}))
"""


def plant(folder: Path, names: list[str], count: int, seed: int) -> list[tuple[str, str]]:
    """(original, copy) for ``count`` distinct originals: each mirrored and saved as JPEG q60."""
    rng = np.random.default_rng(seed)
    out = []
    for j, i in enumerate(rng.choice(len(names), size=count, replace=False).tolist()):
        copy = f"copy-{j:03d}.jpg"
        with Image.open(folder / names[i]) as im:
            buf = io.BytesIO()
            ImageOps.mirror(im.convert("RGB")).save(buf, "JPEG", quality=60)
        (folder / copy).write_bytes(buf.getvalue())
        out.append((names[i], copy))
    return out


def score(pairs: list[tuple[str, str]], planted: list[tuple[str, str]]) -> dict:
    """Found planted pairs (either order), and the other images in some found pair."""
    found = {frozenset(p) for p in pairs}
    hits = sum(1 for p in planted if frozenset(p) in found)
    mine = {x for p in planted for x in p}
    others = {x for p in pairs for x in p} - mine
    return {"found": hits, "planted": len(planted), "others": len(others)}


def group_pairs(csv_path: Path) -> list[tuple[str, str]]:
    groups: dict[str, list[str]] = {}
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            groups.setdefault(r["group"], []).append(r["path"])
    return [(a, b) for g in groups.values() for i, a in enumerate(g) for b in g[i + 1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a .zip with test/<class>/ images")
    ap.add_argument("--out", required=True, help="work folder outside the repository")
    ap.add_argument("--checkpoint", action="append", required=True, help="NAME=RUN_OR_PT, once per network")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--planted", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers-python", default=None, help="an interpreter with imagededup installed")
    a = ap.parse_args()
    out = Path(a.out)
    prepare_out(out)
    folder = out / "images"
    names = extract(Path(a.data), folder, a.images)
    planted = plant(folder, names, a.planted, a.seed)
    res: dict = {"images": len(names), "planted": len(planted), "machine": machine(), "networks": {}, "peers": {}}
    for spec in a.checkpoint:
        name, ckpt = spec.split("=", 1)
        emb = out / f"emb-{name}"
        if isif_main(["embed", ckpt, str(folder), "--out", str(emb), "--quiet"]) != 0:
            sys.exit(f"isif embed {ckpt} failed")
        cal = json.loads((emb / "index.json").read_text()).get("calibration", {})
        row = {"threshold": cal.get("threshold"), "separable": cal.get("separable")}
        for label, flags in (("embedding", ["--hash-bits", "-1"]), ("joined", [])):
            d = out / f"dup-{name}-{label}"
            t = time.perf_counter()
            if isif_main(["duplicates", str(emb), "--out", str(d), *flags]) != 0:
                sys.exit("isif duplicates failed")
            row[label] = score(group_pairs(d / "duplicates.csv"), planted) | {"seconds": time.perf_counter() - t}
        res["networks"][name] = row
        print(name, json.dumps(row), flush=True)
    if a.peers_python:
        for method, arg in (("PHash", "max_distance_threshold=10"), ("CNN", "min_similarity_threshold=0.9")):
            p = subprocess.run([a.peers_python, "-c", PEER.format(method=method, arg=arg), str(folder)],
                               capture_output=True, text=True)
            try:
                got = json.loads(p.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                got = {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:200]}
            if "pairs" in got:
                got = score([tuple(x) for x in got.pop("pairs")], planted) | got
            res["peers"][f"imagededup {method}"] = got
            print(method, json.dumps(got), flush=True)
    (out / "copies.json").write_text(json.dumps(res, indent=2))
    print(f"\nmachine: {res['machine']}; {len(names)} images + {len(planted)} mirrored JPEG q60 copies\n")
    print("| network / tool | threshold | embedding alone: found | others | joined with the hash: found | others |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in res["networks"].items():
        e, j = r["embedding"], r["joined"]
        print(f"| isif, {name} | {r['threshold']} | {e['found']}/{e['planted']} | {e['others']} | "
              f"{j['found']}/{j['planted']} | {j['others']} |")
    for name, r in res["peers"].items():
        print(f"| {name} | default | " + (f"{r['found']}/{r['planted']} | {r['others']} | | |" if "found" in r
                                          else f"did not run: {r['error']} | | | |"))


if __name__ == "__main__":
    main()
