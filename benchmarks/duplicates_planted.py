"""Near-duplicate detection of `isif duplicates` against planted copies: precision and recall at the calibrated
threshold and at each --threshold.

    python benchmarks/duplicates_planted.py --checkpoint RUN_OR_PT --data ../shared/datasets/cifar10-jpeg.zip \\
        --out /tmp/dup-bench [--images 10000] [--planted 400] [--threshold 0.8 0.9 0.95 ...] [--seed 0]
    # a set with no copies planted (class-disjoint images nobody copied): what is reported is false
    python benchmarks/duplicates_planted.py --checkpoint RUN_OR_PT --data ../shared/datasets/tiny-imagenet-unseen.zip \\
        --out /tmp/dup-none --images 0 --planted 0

1. Extracts the first --images test/ images of the zip (taken round-robin over the class folders, so a small
   number still spans every class) as PNG files into --out/images, a flat folder (never inside this repository).
2. Plants --planted copies of distinct originals drawn with --seed, a quarter of each kind: ``jpeg50`` (re-encoded
   as JPEG quality 50), ``resize40`` (resized to 40x40, saved as PNG), ``hflip`` (mirrored, saved as PNG),
   ``crop90`` (90% of each side kept, at a seeded offset, saved as PNG). The (original, copy, kind) triples go to
   --out/planted.csv.
3. Runs `isif embed CHECKPOINT --out/images --out --out/embed` (which calibrates the threshold on the collection),
   then the duplicate groups at the calibrated threshold and at each --threshold, and prints: groups, images in
   them, the largest group, the largest connected component ("chained": the largest group of the single-linkage
   grouping used before), pairs the groups assert (a group of n asserts n(n-1)/2), precision and recall of the
   planted pairs, and recall per kind of copy. Precision counts every non-planted pair as false, so near-identical
   images already in the data set lower it a little.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import shutil
import sys
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps

from isif.cli import main as isif_main
from isif.collection.duplicates import duplicate_groups, similar_pairs
from isif.collection.embed_dir import load_embed_dir
from isif.data.decode import decode_rgb, is_image_name

KINDS = ("jpeg50", "resize40", "hflip", "crop90")
REPO = Path(__file__).resolve().parents[1]


def planted_pair_scores(found_pairs: Iterable, planted_pairs: Iterable) -> tuple[float, float]:
    """(precision, recall) of found pairs against planted pairs, both unordered ((a, b) == (b, a)).

    A found pair is true when it is a planted pair. Found pairs usually come from ``group_pairs`` of the groups
    (``isif.collection.duplicates``), so a group of n counts as all its n(n-1)/2 pairs: a planted pair whose
    members share a group is recalled, and every other pair in that group counts against precision. Precision is
    nan when nothing was found, recall nan when nothing was planted.
    """
    found = {frozenset(p) for p in found_pairs}
    planted = {frozenset(p) for p in planted_pairs}
    hits = len(found & planted)
    return (hits / len(found) if found else math.nan), (hits / len(planted) if planted else math.nan)


def grouped_pair_scores(groups: Iterable[Iterable], planted_pairs: Iterable) -> tuple[float, float]:
    """``planted_pair_scores(group_pairs(groups), planted_pairs)`` without listing the pairs (a group of n holds
    n(n-1)/2 of them, too many to list when a poor embedding makes one giant group). Groups must be disjoint."""
    groups = [list(g) for g in groups]
    where = {m: gi for gi, g in enumerate(groups) for m in g}
    found = sum(len(g) * (len(g) - 1) // 2 for g in groups)
    planted = {frozenset(p) for p in planted_pairs}
    hits = sum(1 for p in planted if len(p) == 2 and len({where.get(m, ("alone", m)) for m in p}) == 1)
    return (hits / found if found else math.nan), (hits / len(planted) if planted else math.nan)


def round_robin_test_images(zf: zipfile.ZipFile, limit: int | None) -> list[str]:
    """The zip's test/ images, round-robin over the class folders (the i-th image of every class, then the next)."""
    by_class: dict[str, list[str]] = {}
    for n in sorted(zf.namelist()):
        p = PurePosixPath(n)
        if len(p.parts) >= 2 and p.parts[0] == "test" and is_image_name(n) and not n.endswith("/"):
            by_class.setdefault(str(p.parent), []).append(n)
    lists = [by_class[c] for c in sorted(by_class)]
    order = [lst[i] for i in range(max(map(len, lists), default=0)) for lst in lists if i < len(lst)]
    return order[:limit] if limit else order


def extract(zip_path: Path, folder: Path, limit: int | None) -> list[str]:
    folder.mkdir(parents=True)
    names = []
    with zipfile.ZipFile(zip_path) as zf:
        for i, member in enumerate(round_robin_test_images(zf, limit)):
            name = f"{i:05d}.png"
            Image.fromarray(decode_rgb(zf.read(member), member)).save(folder / name)
            names.append(name)
    if not names:
        sys.exit(f"{zip_path}: no test/ images")
    return names


def make_copy(src: Path, kind: str, dest_stem: Path, rng: np.random.Generator) -> Path:
    with Image.open(src) as im:
        im = im.convert("RGB")
        if kind == "jpeg50":
            out = dest_stem.with_suffix(".jpg")
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=50)
            out.write_bytes(buf.getvalue())
            return out
        out = dest_stem.with_suffix(".png")
        if kind == "crop90":
            w, h = im.size
            cw, ch = max(1, round(0.9 * w)), max(1, round(0.9 * h))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            im.crop((x, y, x + cw, y + ch)).save(out)
        else:
            (im.resize((40, 40), Image.BICUBIC) if kind == "resize40" else ImageOps.mirror(im)).save(out)
        return out


def plant(folder: Path, names: list[str], count: int, seed: int) -> list[tuple[str, str, str]]:
    """(original, copy, kind) for ``count`` distinct originals; kinds in turn, so a quarter of each."""
    if count > len(names):
        sys.exit(f"--planted {count}: more than the {len(names)} images")
    rng = np.random.default_rng(seed)
    originals = rng.choice(len(names), size=count, replace=False)
    planted = []
    for j, i in enumerate(originals.tolist()):
        kind = KINDS[j % len(KINDS)]
        copy = make_copy(folder / names[i], kind, folder / f"copy-{j:04d}-{kind}", rng)
        planted.append((names[i], copy.name, kind))
    return planted


def prepare_out(out: Path) -> None:
    o = out.resolve()
    if o == REPO or REPO in o.parents:
        sys.exit(f"--out {out}: inside the repository; pass a folder elsewhere, e.g. /tmp/dup-bench")
    if (out / "images").exists():
        if not (out / "planted.csv").is_file():
            sys.exit(f"--out {out}: holds an images/ folder this script did not make; choose another --out")
        shutil.rmtree(out / "images")
        shutil.rmtree(out / "embed", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def largest_component(z: np.ndarray, t: float) -> int:
    """The largest connected component of the pairs >= t: the largest group of the single-linkage grouping that
    `isif duplicates` used before its groups had to be cliques (the "chained" column)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = list(similar_pairs(z, t))
    if not pairs:
        return 0
    i, j = (np.concatenate([p[k] for p in pairs]) for k in (0, 1))
    _, comp = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(len(z),) * 2), directed=False)
    return int(np.bincount(comp).max())


def report(z: np.ndarray, paths: list[str], planted: list[tuple[str, str, str]], thresholds: list[float],
           calibrated: float | None) -> None:
    pairs = [(a, b) for a, b, _ in planted]
    per_kind = {k: [(a, b) for a, b, kind in planted if kind == k] for k in KINDS}
    head = (f"{'threshold':>16} {'groups':>7} {'images':>7} {'largest':>7} {'chained':>7} {'pairs':>9} "
            f"{'precision':>9} {'recall':>7}")
    print(head + "".join(f" {'R ' + k:>10}" for k in KINDS) + f" {'seconds':>8}")
    rows = [(calibrated, True)] if calibrated is not None else []
    for t, is_cal in rows + [(t, False) for t in thresholds]:
        t0 = time.perf_counter()
        groups = [[paths[i] for i in g] for g in duplicate_groups(z, t)]
        precision, recall = grouped_pair_scores(groups, pairs)
        kinds = "".join(f" {grouped_pair_scores(groups, per_kind[k])[1]:10.3f}" for k in KINDS)
        n_pairs = sum(len(g) * (len(g) - 1) // 2 for g in groups)
        name = f"{t:.4f} (calib.)" if is_cal else f"{t:.4f}"
        print(f"{name:>16} {len(groups):7d} {sum(map(len, groups)):7d} {max(map(len, groups), default=0):7d} "
              f"{largest_component(z, t):7d} {n_pairs:9d} {precision:9.3f} {recall:7.3f}{kinds} "
              f"{time.perf_counter() - t0:8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a .pt file or a run folder")
    ap.add_argument("--data", required=True, help="a .zip with test/<class>/ images (cifar10-jpeg.zip)")
    ap.add_argument("--out", required=True, help="work folder outside the repository (images, embed, planted.csv)")
    ap.add_argument("--images", type=int, default=10000, help="test images extracted (default 10000; 0: all)")
    ap.add_argument("--planted", type=int, default=400, help="planted copies, a quarter of each kind (default 400)")
    ap.add_argument("--threshold", type=float, nargs="*", default=[0.8, 0.85, 0.9, 0.95, 0.98])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    out = Path(a.out)
    prepare_out(out)
    t0 = time.perf_counter()
    names = extract(Path(a.data), out / "images", a.images or None)
    planted = plant(out / "images", names, a.planted, a.seed)
    with open(out / "planted.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("original", "copy", "kind"), *planted])
    print(f"{len(names)} images + {len(planted)} planted copies in {out / 'images'} "
          f"({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    argv = ["embed", a.checkpoint, str(out / "images"), "--out", str(out / "embed")]
    if isif_main(argv + (["--device", a.device] if a.device else [])) != 0:
        sys.exit("isif embed failed")
    print(f"embedded in {time.perf_counter() - t0:.1f} s")
    ed = load_embed_dir(out / "embed")
    cal = ed.meta.get("calibration")
    if cal:
        print(f"calibration on {cal['sample']} images and a copy of each: copies p05 {cal['copies']['p05']:.4f}, "
              f"p50 {cal['copies']['p50']:.4f}; second-nearest other image p50 {cal['second']['p50']:.4f}, p99 "
              f"{cal['second']['p99']:.4f}; threshold {cal['threshold']:.4f} (separable: {cal['separable']}; "
              f"{cal['with_copy']:.1%} of the sample with a copy at it)")
    report(ed.features, ed.paths, planted, sorted(a.threshold), cal["threshold"] if cal else None)


if __name__ == "__main__":
    main()
