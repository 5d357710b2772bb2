"""What `isif select` and `isif label` buy on real images with known labels.

    python benchmarks/select_labels.py --checkpoint RUN --data ../shared/datasets/cifar10-jpeg.zip --out /tmp/sl
    python benchmarks/select_labels.py --checkpoint RUN --data ../shared/datasets/tiny-imagenet-unseen.zip \\
        --out /tmp/sl-tiny --budgets 100,200,500,1000
    python benchmarks/select_labels.py --scale 1000000 --out /tmp/sl-scale   # selection time on 1M memory-mapped rows

1. Extracts the zip's images (CIFAR-10: train/ is the pool, test/ the evaluation set; tiny-imagenet-unseen: its
   test/ classes, never seen in training, split per class: the first 40 images the pool, the last 10 evaluated)
   into --out/images and embeds both folders with `isif embed` (the labels are the class folders, never shown to
   the strategies).
2. Selection: for each budget, strategy and --seeds seeds, a 1-NN and the linear probe of isif's evaluation trained
   on the picks' labels only; top-1 on the evaluation set, mean and s.d. over the seeds.
3. Spreading: the largest budget's picks by `--strategy auto`, labelled, spread by `isif label`'s code to the rest of
   the pool; accuracy on the rest of the pool and on the evaluation set, against the weighted kNN (k 200, sigma
   0.1) with every pool label.
4. Wrong labels: --noise fractions of the pool's labels flipped to another class (seeded); AUROC of the suspect
   score, precision and recall of the flagged set; beside cleanlab on the same features: Datalab's label issues
   (`find_issues(features=...)`) and `find_label_issues` on the out-of-fold kNN probabilities.

Writes --out/select_labels.json and .md; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

STRATEGIES = ("typiclust", "probcover", "kcenter", "random")


def extract(zip_path: Path, dest: Path) -> tuple[Path, Path]:
    """(pool folder, evaluation folder) of images extracted from the zip (kept when already there)."""
    pool, ev = dest / "pool", dest / "eval"
    if pool.is_dir() and ev.is_dir():
        return pool, ev
    z = zipfile.ZipFile(zip_path)
    names = sorted(n for n in z.namelist() if not n.endswith("/") and n.lower().endswith((".jpg", ".jpeg", ".png")))
    tiny = any(n.startswith("test/n") for n in names)
    by_class: dict[str, list[str]] = {}
    for n in names:
        parts = PurePosixPath(n).parts
        if tiny and parts[0] == "test":
            by_class.setdefault(parts[1], []).append(n)
    for n in names:
        parts = PurePosixPath(n).parts
        if tiny:
            if parts[0] != "test":
                continue
            members = by_class[parts[1]]
            target = pool if members.index(n) < 40 else ev
        else:
            target = pool if parts[0] == "train" else ev
        out = target / parts[1] / parts[-1]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(z.read(n))
    return pool, ev


def embedded(checkpoint: str, folder: Path, out: Path):
    from isif.collection.embed_dir import load_embed_dir
    from isif.collection.embedding import EmbedOptions, embed_folder

    if not (out / "index.json").is_file():
        embed_folder(EmbedOptions(checkpoint=checkpoint, folder=str(folder), out=str(out), workers=1, quiet=True))
    ed = load_embed_dir(out)
    names = sorted(set(ed.labels))
    y = np.array([names.index(c) for c in ed.labels])
    return ed, np.asarray(ed.features), y, names


def one_nn(xp, yp, xe, ye) -> float:
    return float((yp[np.argmax(xe @ xp.T, axis=1)] == ye).mean() * 100)


def probe(xp, yp, xe, ye, classes: int) -> float:
    import torch

    from isif.evaluate.linear import LinearRecipe, fit_probe

    p = fit_probe(torch.from_numpy(xp), torch.from_numpy(yp), classes, LinearRecipe())
    return float((p.logits(torch.from_numpy(xe)).numpy().argmax(1) == ye).mean() * 100)


def knn_top1(bank, yb, q, yq, classes: int) -> float:
    from isif.collection.label import knn_probs

    return float((knn_probs(q, bank, yb, classes, 200).argmax(1) == yq).mean() * 100)


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half), by ranks."""
    from scipy.stats import rankdata

    r = rankdata(score)
    n1, n0 = positive.sum(), (~positive).sum()
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def selection(xp, yp, xe, ye, classes, budgets, seeds, probcover_seeds=None) -> list[dict]:
    from isif.collection.select import select_rows

    rows = []
    for b in budgets:
        for s in STRATEGIES:
            nn, lin, secs = [], [], []
            for seed in range((probcover_seeds or seeds) if s == "probcover" else seeds):
                t = time.perf_counter()
                picks = select_rows(xp, b, s, seed)[0].rows
                secs.append(time.perf_counter() - t)
                nn.append(one_nn(xp[picks], yp[picks], xe, ye))
                lin.append(probe(xp[picks], yp[picks], xe, ye, classes))
            rows.append({"budget": b, "strategy": s, "seeds": len(nn), "nn_mean": np.mean(nn),
                         "nn_sd": np.std(nn, ddof=1),
                         "probe_mean": np.mean(lin), "probe_sd": np.std(lin, ddof=1), "seconds": np.mean(secs)})
            print(f"budget {b:5d} {s:10s} 1-NN {np.mean(nn):6.2f} ± {np.std(nn, ddof=1):5.2f}  probe "
                  f"{np.mean(lin):6.2f} ± {np.std(lin, ddof=1):5.2f}  ({np.mean(secs):.1f} s a selection)",
                  flush=True)
    return rows


def spreading(xp, yp, xe, ye, classes, names, budget) -> dict:
    from isif.collection.label import Given, spread
    from isif.collection.select import select_rows

    picks, strategy, why, _ = select_rows(xp, budget, "auto", 0)
    rows = np.sort(picks.rows)
    res = spread(xp, Given(rows, yp[rows], names), seed=0)
    rest = np.setdiff1d(np.arange(len(yp)), rows)
    pred_e = spread_eval(xp[rows], yp[rows], xe, res, classes)
    full_e = knn_top1(xp, yp, xe, ye, classes)
    out = {"budget": budget, "strategy": strategy, "predictor": res["predictor"], "why": res["why"],
           "rest_top1": float((res["label"][rest] == yp[rest]).mean() * 100),
           "eval_top1": float((pred_e == ye).mean() * 100), "full_knn_eval_top1": full_e,
           "expected_accuracy": res.get("expected_accuracy", float("nan")) * 100}
    out["ratio_eval"] = out["eval_top1"] / full_e
    conf = res["confidence"][rest]
    right = res["label"][rest] == yp[rest]
    out["mean_confidence_rest"] = float(conf.mean() * 100)
    print(f"spreading {budget} labels picked by {strategy}: {res['predictor']} -> {out['rest_top1']:.2f} on the rest "
          f"of the pool, {out['eval_top1']:.2f} on the evaluation set against {full_e:.2f} with every label "
          f"({out['ratio_eval']:.1%}); expected {out['expected_accuracy']:.2f}; mean confidence "
          f"{out['mean_confidence_rest']:.2f} where {right.mean() * 100:.2f} are right", flush=True)
    return out


def spread_eval(xl, yl, xe, res, classes) -> np.ndarray:
    """The spreading predictor applied to the evaluation images."""
    import torch

    from isif.collection.label import knn_probs
    from isif.evaluate.linear import LinearRecipe, fit_probe

    if res["predictor"] == "probe":
        p = fit_probe(torch.from_numpy(xl), torch.from_numpy(yl), classes, LinearRecipe(seed=0))
        return p.logits(torch.from_numpy(xe)).numpy().argmax(1)
    return knn_probs(xe, xl, yl, classes, int(res["predictor"].split("-")[1])).argmax(1)


def noisy_labels(y, classes, fraction, seed) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    flip = rng.random(len(y)) < fraction
    noisy = y.copy()
    noisy[flip] = (y[flip] + rng.integers(1, classes, flip.sum())) % classes  # another class, uniformly
    return noisy, flip


def wrong_labels(xp, yp, classes, names, fraction) -> dict:
    from isif.collection.label import Given, cross_validate, spread

    noisy, flip = noisy_labels(yp, classes, fraction, 0)
    t = time.perf_counter()
    res = spread(xp, Given(np.arange(len(yp)), noisy, names), seed=0)
    ours_s = time.perf_counter() - t
    fl = res["flagged"]
    out = {"noise": fraction, "flipped": int(flip.sum()), "isif_auroc": auroc(res["score"], flip),
           "isif_precision": float(flip[fl].mean()) if fl.any() else float("nan"),
           "isif_recall": float(fl[flip].mean()), "isif_flagged": int(fl.sum()), "isif_seconds": ours_s}
    try:
        import cleanlab
        from cleanlab import Datalab
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores

        t = time.perf_counter()
        lab = Datalab(data={"label": noisy}, label_name="label", verbosity=0)
        lab.find_issues(features=xp, issue_types={"label": {}})
        issues = lab.get_issues("label")
        out["datalab_seconds"] = time.perf_counter() - t
        dl_flag = issues["is_label_issue"].to_numpy()
        out.update(datalab_auroc=auroc(-issues["label_score"].to_numpy(), flip),
                   datalab_precision=float(flip[dl_flag].mean()) if dl_flag.any() else float("nan"),
                   datalab_recall=float(dl_flag[flip].mean()), datalab_flagged=int(dl_flag.sum()))
        cands, _ = cross_validate(xp, noisy, classes, 0)
        knn = next(c for c in cands if c.name == "knn-200")
        oof = knn.oof / knn.oof.sum(1, keepdims=True)
        cl_flag = find_label_issues(noisy, oof)
        out.update(cleanlab_knn_auroc=auroc(-get_label_quality_scores(noisy, oof), flip),
                   cleanlab_knn_precision=float(flip[cl_flag].mean()) if cl_flag.any() else float("nan"),
                   cleanlab_knn_recall=float(cl_flag[flip].mean()), cleanlab_knn_flagged=int(cl_flag.sum()),
                   cleanlab_version=cleanlab.__version__)
    except ImportError as e:
        out["cleanlab"] = f"not run: {str(e)[:160]}"
    print(json.dumps(out), flush=True)
    return out


def scale(n: int, out: Path, budget: int = 1000) -> dict:
    """Seconds for `isif select --budget 1000` (auto) over n memory-mapped 128-d rows (random clustered data)."""
    from isif.cli import main

    d = out / f"scale-{n}"
    if not (d / "index.json").is_file():
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(1000, 128)).astype(np.float32)
        z = np.lib.format.open_memmap(d / "features.npy", mode="w+", dtype=np.float32, shape=(n, 128))
        for s in range(0, n, 100_000):
            m = min(100_000, n - s)
            block = centres[rng.integers(0, 1000, m)] + rng.normal(0, 0.6, (m, 128)).astype(np.float32)
            z[s:s + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
        z.flush()
        del z
        (d / "paths.txt").write_text("".join(f"img/{i:07d}.jpg\n" for i in range(n)))
        (d / "index.json").write_text(json.dumps({"root": str(out / "no-images"), "images": n, "dim": 128}))
    t = time.perf_counter()
    rc = main(["select", str(d), "--budget", str(budget), "--sheet", "0"])
    secs = time.perf_counter() - t
    print(f"select {budget} of {n:,} memory-mapped rows: {secs:.1f} s (exit {rc})", flush=True)
    return {"rows": n, "budget": budget, "seconds": secs}


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next(x.split(":", 1)[1].strip() for x in out.splitlines() if x.startswith("Model name:"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        name = platform.processor() or "unknown CPU"
    import os

    return f"{name} ({os.cpu_count()} cores)"


def table(res: dict) -> str:
    lines = [f"machine: {res['machine']}", ""]
    if res.get("selection"):
        lines += ["| budget | strategy | seeds | 1-NN top-1 | probe top-1 | s a selection |",
                  "|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {r['budget']} | {r['strategy']} | {r['seeds']} | {r['nn_mean']:.2f} ± {r['nn_sd']:.2f} | "
                  f"{r['probe_mean']:.2f} ± {r['probe_sd']:.2f} | {r['seconds']:.1f} |" for r in res["selection"]]
    if res.get("wrong"):
        lines += ["", "| noise | tool | AUROC | precision | recall | flagged |", "|---:|---|---:|---:|---:|---:|"]
        for w in res["wrong"]:
            for tool, key in (("isif label", "isif"), ("cleanlab Datalab (features)", "datalab"),
                              ("cleanlab find_label_issues (OOF kNN)", "cleanlab_knn")):
                if f"{key}_auroc" in w:
                    lines.append(f"| {w['noise']:.0%} | {tool} | {w[key + '_auroc']:.4f} | "
                                 f"{w[key + '_precision']:.3f} | {w[key + '_recall']:.3f} | {w[key + '_flagged']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--data", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budgets", default="10,20,50,100,1000")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--probcover-seeds", type=int, default=None,
                   help="fewer seeds for probcover (two passes over all pairs a selection); default --seeds")
    p.add_argument("--noise", default="0.1,0.3")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: selection, spreading, wrong")
    p.add_argument("--scale", type=int, default=0, help="only time the selection over this many synthetic rows")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": machine()}
    if a.scale:
        res["scale"] = scale(a.scale, a.out)
        (a.out / "select_scale.json").write_text(json.dumps(res, indent=2) + "\n")
        return 0
    if not a.checkpoint or not a.data or not a.data.exists():
        print("pass --checkpoint RUN and --data ZIP (the shared CIFAR-10 or tiny-imagenet-unseen zip)", file=sys.stderr)
        return 2
    pool, ev = extract(a.data, a.out / "images")
    _, xp, yp, names = embedded(a.checkpoint, pool, a.out / "pool-emb")
    _, xe, ye, names_e = embedded(a.checkpoint, ev, a.out / "eval-emb")
    assert names == names_e
    classes = len(names)
    budgets = [int(b) for b in a.budgets.split(",")]
    skip = set(a.skip.split(",")) - {""}
    res.update(data=str(a.data), checkpoint=a.checkpoint, pool=len(yp), eval=len(ye), classes=classes)
    if "selection" not in skip:
        res["selection"] = selection(xp, yp, xe, ye, classes, budgets, a.seeds, a.probcover_seeds)
    if "spreading" not in skip:
        res["spreading"] = spreading(xp, yp, xe, ye, classes, names, max(budgets))
    if "wrong" not in skip:
        res["wrong"] = [wrong_labels(xp, yp, classes, names, float(f)) for f in a.noise.split(",")]
    (a.out / "select_labels.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    (a.out / "select_labels.md").write_text(table(res))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
