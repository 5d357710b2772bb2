"""What `isif audit` finds, against planted problems whose truth is known, beside CleanVision and cleanlab.

    python benchmarks/audit_planted.py --checkpoint RUN --out /tmp/au --peers-python /tmp/peers/bin/python
    python benchmarks/audit_planted.py --scale 1000000 --out /tmp/au-scale       # memory and time on 1M rows

The shared CIFAR-10 (JPEG q75) is extracted into --out/images (train/ and test/ as class folders; kept when there).

1. Pixel checks: for each of blurry (Gaussian blur, radius 1 to 2 px), dark (x 0.1 to 0.3), bright (255 - (255 - x)
   x 0.1 to 0.3) and low_information (the image's mean colour plus noise of s.d. 2), a copy of the 10,000 test
   images with 5% (seeded) replaced by that version, saved as JPEG q75 like the rest; `isif embed` then `isif audit`
   on it, and CleanVision's `Imagelab.find_issues()` with its defaults on the same folder (run by --peers-python, an
   interpreter with cleanvision installed); precision and recall of each tool's flag for the planted issue.
2. Outliers: 1% of the test images replaced by tiny-imagenet-unseen images resized to 32 px; AUROC of isif's outlier
   score and of cleanlab's `Datalab(...).find_issues(features=...)` outlier score on the same embeddings; precision
   and recall of isif's flag.
3. Leaks: 300 test images, re-encoded at JPEG q60 and mirrored, hidden in the 50,000 training images; `isif audit
   TRAIN --against TEST`: recall (the leak found, with its own source), and precision over the flags the planted
   run adds to the plain run's (the plain shared CIFAR-10's own train-test copies are reported apart: `isif audit
   TEST --against TRAIN` on the plain sets).
4. Throughput: the 10,000 test images upscaled to 224 px (JPEG q90): `isif embed` + `isif audit` end to end, beside
   CleanVision and fastdup (`fastdup.create(...).run()`) on the same folder, wall seconds, one run each.
5. --scale N: N synthetic 128-d rows with pixel statistics in memory-mapped shards; `isif index`, then `isif audit`
   through it: wall seconds and the peak resident memory of each command.

Writes --out/audit_planted.json and .md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from select_labels import auroc, extract, machine  # noqa: E402

ISSUES = ("blurry", "dark", "bright", "low_information")
CLEANVISION = {"blurry": "is_blurry_issue", "dark": "is_dark_issue", "bright": "is_light_issue",
               "low_information": "is_low_information_issue"}
PEER_SCRIPT = r"""
import sys, time, json
from cleanvision import Imagelab
t = time.perf_counter()
lab = Imagelab(data_path=sys.argv[1])
lab.find_issues()
secs = time.perf_counter() - t
lab.issues.to_csv(sys.argv[2])
print(json.dumps({"seconds": secs}))
"""
FASTDUP_SCRIPT = r"""
import sys, time, json
import fastdup
t = time.perf_counter()
fd = fastdup.create(work_dir=sys.argv[2], input_dir=sys.argv[1])
fd.run(overwrite=True, num_threads=2)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def plant(arr: np.ndarray, issue: str, rng: np.random.Generator) -> np.ndarray:
    if issue == "blurry":
        return np.asarray(Image.fromarray(arr).filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.0))))
    x = arr.astype(np.float64)
    if issue == "dark":
        return (x * rng.uniform(0.1, 0.3)).astype(np.uint8)
    if issue == "bright":
        return (255 - (255 - x) * rng.uniform(0.1, 0.3)).astype(np.uint8)
    mean = x.reshape(-1, 3).mean(0)
    return np.clip(mean + rng.normal(0, 2, arr.shape), 0, 255).astype(np.uint8)


def linked_copy(src: Path, dest: Path) -> list[str]:
    """dest mirrors src with hard links (no bytes copied); the relative paths, sorted."""
    rel = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    for r in rel:
        (dest / r).parent.mkdir(parents=True, exist_ok=True)
        if not (dest / r).exists():
            os.link(src / r, dest / r)
    return rel


def replace(path: Path, arr: np.ndarray, quality: int = 75) -> None:
    """A new file at ``path`` (the hard link removed first: the original stays as it was)."""
    path.unlink()
    Image.fromarray(arr).save(path, "JPEG", quality=quality)


def isif(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "isif", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def audit_rows(emb: Path) -> dict[str, dict]:
    with open(emb / "audit.csv", newline="") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def pr(flagged: set, truth: set) -> dict:
    hit = len(flagged & truth)
    return {"flagged": len(flagged), "precision": hit / len(flagged) if flagged else 0.0,
            "recall": hit / len(truth) if truth else 0.0}


def cleanvision(peers: str | None, folder: Path, out: Path) -> tuple[dict[str, set], float] | None:
    """{issue: flagged relative paths}, seconds; None without --peers-python."""
    if not peers:
        return None
    res = subprocess.run([peers, "-c", PEER_SCRIPT, str(folder), str(out)], capture_output=True, text=True,
                         check=True)
    secs = json.loads(res.stdout.strip().splitlines()[-1])["seconds"]
    flags: dict[str, set] = {k: set() for k in CLEANVISION}
    with open(out, newline="") as f:
        for r in csv.DictReader(f):
            rel = str(Path(r[""]).relative_to(folder))
            for k, col in CLEANVISION.items():
                if r[col] == "True":
                    flags[k].add(rel)
    return flags, secs


def pixel_checks(a, test: Path, work: Path) -> dict:
    out = {}
    for n, issue in enumerate(("clean", *ISSUES)):
        folder = work / f"planted-{issue}"
        rel = linked_copy(test, folder)
        truth: set[str] = set()
        if issue != "clean":
            rng = np.random.default_rng(100 + n)
            for j in rng.permutation(len(rel))[: len(rel) // 20]:
                p = folder / rel[j]
                if p.stat().st_nlink > 1:  # not yet planted
                    replace(p, plant(np.asarray(Image.open(p).convert("RGB")), issue, rng))
                truth.add(rel[j])
        emb = work / f"emb-{issue}"
        t_embed = isif("embed", a.checkpoint, str(folder), "--out", str(emb), "--quiet")
        t_audit = isif("audit", str(emb), "--sheet", "0")
        rows = audit_rows(emb)
        ours = {k: {p for p, r in rows.items() if r.get(f"{k}_flag") == "1"} for k in ISSUES}
        cv = cleanvision(a.peers_python, folder, work / f"cleanvision-{issue}.csv")
        entry = {"embed_s": t_embed, "audit_s": t_audit, "images": len(rel),
                 "isif_flagged": {k: len(v) for k, v in ours.items()},
                 "cleanvision_flagged": {k: len(v) for k, v in cv[0].items()} if cv else None,
                 "cleanvision_s": cv[1] if cv else None}
        if issue != "clean":
            entry["isif"] = pr(ours[issue], truth)
            entry["cleanvision"] = pr(cv[0][issue], truth) if cv else None
        out[issue] = entry
        print(issue, json.dumps(entry), flush=True)
    return out


def outliers(a, test: Path, work: Path) -> dict:
    from cleanlab import Datalab

    from isif.collection.embed_dir import load_embed_dir

    folder = work / "planted-outlier"
    rel = linked_copy(test, folder)
    z = zipfile.ZipFile(a.tiny)
    others = sorted(n for n in z.namelist() if n.lower().endswith((".jpeg", ".jpg", ".png")))
    rng = np.random.default_rng(7)
    pick = rng.permutation(len(rel))[: len(rel) // 100]
    src = rng.choice(len(others), len(pick), replace=False)
    truth = set()
    for j, s in zip(pick, src, strict=True):
        p = folder / rel[j]
        if p.stat().st_nlink > 1:
            import io

            im = Image.open(io.BytesIO(z.read(others[s]))).convert("RGB").resize((32, 32), Image.BILINEAR)
            replace(p, np.asarray(im))
        truth.add(rel[j])
    emb = work / "emb-outlier"
    isif("embed", a.checkpoint, str(folder), "--out", str(emb), "--quiet")
    isif("audit", str(emb), "--sheet", "0")
    rows = audit_rows(emb)
    ed = load_embed_dir(emb)
    positive = np.array([p in truth for p in ed.paths])
    ours = np.array([float(rows[p]["outlier"]) for p in ed.paths])
    flagged = {p for p, r in rows.items() if r.get("outlier_flag") == "1"}
    t = time.perf_counter()
    lab = Datalab(data={"y": list(ed.labels)}, label_name="y", verbosity=0)
    lab.find_issues(features=np.asarray(ed.features), issue_types={"outlier": {}})
    theirs = lab.get_issues("outlier")["outlier_score"].to_numpy()
    res = {"planted": len(truth), "isif_auroc": auroc(ours, positive), "datalab_auroc": auroc(-theirs, positive),
           "datalab_s": time.perf_counter() - t, "isif": pr(flagged, truth),
           "datalab_flagged": pr({ed.paths[i] for i in np.nonzero(lab.get_issues("outlier")["is_outlier_issue"]
                                                                 .to_numpy())[0]}, truth)}
    print("outlier", json.dumps(res), flush=True)
    return res


def leaks(a, train: Path, test: Path, work: Path) -> dict:
    emb_test, emb_train = work / "emb-test", work / "emb-train"
    isif("embed", a.checkpoint, str(test), "--out", str(emb_test), "--quiet")
    isif("embed", a.checkpoint, str(train), "--out", str(emb_train), "--quiet")
    # the plain shared CIFAR-10: its own test images with a copy in train, and train images with one in test
    t = time.perf_counter()
    isif("audit", str(emb_test), "--against", str(emb_train), "--sheet", "0", "--out", str(work / "plain-test"))
    plain_secs = time.perf_counter() - t
    test_copies = sum(1 for _ in open(work / "plain-test" / "leaks.csv")) - 1
    isif("audit", str(emb_train), "--against", str(emb_test), "--sheet", "0", "--out", str(work / "plain-train"))
    with open(work / "plain-train" / "leaks.csv", newline="") as f:
        plain = {r["path"] for r in csv.DictReader(f)}
    folder = work / "planted-train"
    linked_copy(train, folder)
    rel = sorted(str(p.relative_to(test)) for p in test.rglob("*") if p.is_file())
    rng = np.random.default_rng(11)
    truth = {}
    for j in rng.permutation(len(rel))[:300]:
        name = f"leak/{Path(rel[j]).parent.name}-{Path(rel[j]).stem}.jpg"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if not (folder / name).exists():
            im = ImageOps.mirror(Image.open(test / rel[j]).convert("RGB"))
            im.save(folder / name, "JPEG", quality=60)
        truth[name] = rel[j]
    emb = work / "emb-train-planted"
    if not emb.exists():
        subprocess.run(["cp", "-r", str(emb_train), str(emb)], check=True)
    isif("embed", a.checkpoint, str(folder), "--out", str(emb), "--quiet")  # only the 300 new files
    t = time.perf_counter()
    isif("audit", str(emb), "--against", str(emb_test), "--sheet", "0")
    secs = time.perf_counter() - t
    with open(emb / "leaks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    found = {r["path"]: r["other_path"] for r in rows}
    right = sum(1 for p, src in truth.items() if found.get(p) == src)
    threshold_ = json.loads((emb / "audit.json").read_text())["against"]["threshold"]
    by_hash = sum(1 for r in rows if r["path"] in truth and found[r["path"]] == truth[r["path"]]
                  and float(r["cosine"]) < threshold_)
    new = set(found) - plain
    threshold = json.loads((emb / "audit.json").read_text())["against"]["threshold"]
    res = {"planted": len(truth), "found": right, "found_by_hash_alone": by_hash, "recall": right / len(truth),
           "flagged": len(found),
           "flagged_beyond_plain": len(new), "precision_beyond_plain": right / len(new) if new else 0.0,
           "precision_raw": right / len(found) if found else 0.0, "threshold": threshold, "audit_s": secs,
           "plain_test_with_copy_in_train": test_copies, "plain_train_with_copy_in_test": len(plain),
           "plain_audit_s": plain_secs}
    print("leaks", json.dumps(res), flush=True)
    return res


def throughput(a, test: Path, work: Path) -> dict:
    folder = work / "tp224"
    if not folder.exists():
        for p in sorted(test.rglob("*.jpg")):
            d = folder / p.relative_to(test)
            d.parent.mkdir(parents=True, exist_ok=True)
            Image.open(p).convert("RGB").resize((224, 224), Image.BICUBIC).save(d, "JPEG", quality=90)
    n = sum(1 for _ in folder.rglob("*.jpg"))
    emb = work / "emb-tp224"
    subprocess.run(["rm", "-rf", str(emb)], check=True)
    t_embed = isif("embed", a.checkpoint, str(folder), "--out", str(emb), "--quiet")
    t_audit = isif("audit", str(emb), "--sheet", "0")
    res = {"images": n, "isif_embed_s": t_embed, "isif_audit_s": t_audit,
           "isif_images_per_s": n / (t_embed + t_audit)}
    cv = cleanvision(a.peers_python, folder, work / "cleanvision-tp224.csv")
    if cv:
        res["cleanvision_s"] = cv[1]
        res["cleanvision_images_per_s"] = n / cv[1]
    if a.peers_python:
        r = subprocess.run([a.peers_python, "-c", FASTDUP_SCRIPT, str(folder), str(work / "fastdup-tp224")],
                           capture_output=True, text=True)
        if r.returncode == 0:
            s = json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
            res.update(fastdup_s=s, fastdup_images_per_s=n / s)
        else:
            res["fastdup_error"] = (r.stderr or r.stdout).strip().splitlines()[-1][:300]
    print("throughput", json.dumps(res), flush=True)
    return res


def scale(n: int, out: Path) -> dict:
    """An embed folder of n synthetic rows in 50,000-row shards with pixel statistics; index, then audit."""
    from isif.collection.pixel_stats import HASH_COLUMNS, VERSION

    d = out / f"scale-{n}"
    if not (d / "index.json").is_file():
        (d / "shards").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(1000, 128)).astype(np.float32)
        segments = []
        for k, s in enumerate(range(0, n, 50_000)):
            m = min(50_000, n - s)
            block = centres[rng.integers(0, 1000, m)] + rng.normal(0, 0.6, (m, 128)).astype(np.float32)
            np.save(d / "shards" / f"s{k:05d}.npy", block / np.linalg.norm(block, axis=1, keepdims=True))
            pix = np.tile(np.array([640, 480, 0.05, 0.9, -1.0, 6.5, 0.2], np.float32), (m, 1))
            pix[:, 2:] += rng.normal(0, 0.02, (m, 5)).astype(np.float32)
            words = rng.integers(0, 1 << 16, (m, len(HASH_COLUMNS))).astype(np.float32)  # random mirror hashes
            np.save(d / "shards" / f"s{k:05d}.pixels.npy", np.concatenate([pix, words], 1))
            (d / "shards" / f"s{k:05d}.json").write_text(json.dumps(
                {"checkpoint_sha256": "0" * 64, "seq": k, "files": [], "broken": [], "pixels": VERSION}))
            segments.append([f"s{k:05d}", 0, m])
        (d / "paths.txt").write_text("".join(f"img/{i:07d}.jpg\n" for i in range(n)))
        (d / "index.json").write_text(json.dumps({"root": str(out / "no-images"), "images": n, "dim": 128,
                                                  "checkpoint_sha256": "0" * 64, "segments": segments,
                                                  "features_id": f"synthetic-{n}"}))
    res = {"rows": n}
    for name, args in (("index", ["index", str(d)]), ("audit", ["audit", str(d), "--sheet", "0"])):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", "import resource, sys; from isif.cli import main; rc = main("
                            "sys.argv[1:]); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); "
                            "sys.exit(rc)", *args], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"isif {name} failed: {r.stderr.strip()[-300:]}")
        res[f"{name}_s"] = time.perf_counter() - t
        res[f"{name}_peak_mib"] = int(r.stdout.strip().splitlines()[-1]) / 1024
        print(f"{name}: {res[f'{name}_s']:.1f} s, peak {res[f'{name}_peak_mib']:.0f} MiB", flush=True)
    res["neighbours"] = json.loads((d / "audit.json").read_text())["neighbours"]
    return res


def table(res: dict) -> str:
    lines = [f"machine: {res['machine']}; checkpoint: {res.get('checkpoint')}", "",
             "| issue | isif precision | isif recall | CleanVision precision | CleanVision recall |",
             "|---|---:|---:|---:|---:|"]
    for issue in ISSUES:
        e = res.get("pixels", {}).get(issue)
        if e:
            cv = e.get("cleanvision") or {}
            lines.append(f"| {issue} | {e['isif']['precision']:.3f} | {e['isif']['recall']:.3f} | "
                         f"{cv.get('precision', float('nan')):.3f} | {cv.get('recall', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--data", default="../shared/datasets/cifar10-jpeg.zip")
    p.add_argument("--tiny", default="../shared/datasets/tiny-imagenet-unseen.zip")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--peers-python", help="an interpreter with cleanvision and fastdup installed")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: pixels, outliers, leaks, throughput")
    p.add_argument("--scale", type=int, default=0, help="only the memory and time of index + audit on N rows")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": machine()}
    if a.scale:
        res["scale"] = scale(a.scale, a.out)
        (a.out / "audit_scale.json").write_text(json.dumps(res, indent=2) + "\n")
        return 0
    if not a.checkpoint:
        p.error("--checkpoint is required (or --scale N)")
    res["checkpoint"] = a.checkpoint
    train, test = extract(Path(a.data), a.out / "images")
    skip = set(a.skip.split(","))
    work = a.out / "work"
    work.mkdir(exist_ok=True)
    if "pixels" not in skip:
        res["pixels"] = pixel_checks(a, test, work)
    if "outliers" not in skip:
        res["outliers"] = outliers(a, test, work)
    if "leaks" not in skip:
        res["leaks"] = leaks(a, train, test, work)
    if "throughput" not in skip:
        res["throughput"] = throughput(a, test, work)
    if (a.out / "audit_planted.json").is_file():  # a run of some parts keeps the others' last results
        res = json.loads((a.out / "audit_planted.json").read_text()) | res
    (a.out / "audit_planted.json").write_text(json.dumps(res, indent=2) + "\n")
    (a.out / "audit_planted.md").write_text(table(res))
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
