"""isif select and isif label: each strategy against a naive float64 reference written from its paper, answers known
in advance on constructed clusters, confident learning equal to cleanlab's on the same probabilities, the files
written and read back (stale ones refused), bad input in one line, and the image folder untouched."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from isif.cli import main
from isif.collection import label as lab
from isif.collection import select as sel

from .test_explore import write_embed_dir


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clusters(sizes=(40, 30, 20, 10), dim=16, spread=0.15, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Unit features in well-separated clusters of the given sizes, and each row's cluster."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, len(sizes))))[0].T
    y = np.repeat(np.arange(len(sizes)), sizes)
    return unit(centres[y] + rng.normal(0, spread, size=(len(y), dim))).astype(np.float32), y


def dist64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


# ----------------------------------------------------------------------------- the strategies, from their papers


def test_typicality_is_the_inverse_mean_distance_to_the_20_nearest_others():
    x, _ = clusters((45,), seed=1)
    d = dist64(x, x)
    np.fill_diagonal(d, np.inf)
    ref = 1 / (np.sort(d, 1)[:, :20].mean(1) + 1e-5)
    np.testing.assert_allclose(sel.typicality(x), ref, rtol=1e-5)


def test_typiclust_takes_the_most_typical_image_of_each_cluster_largest_first():
    x, y = clusters()
    picks = sel.typiclust(x, np.zeros(len(x), bool), 4, seed=0)
    assert [int(y[i]) for i in picks.rows] == [0, 1, 2, 3]  # one a cluster, the largest first
    for i in picks.rows:
        members = np.nonzero(y == y[i])[0]
        assert i == members[np.argmax(sel.typicality(x[members]))]


def test_typiclust_goes_to_the_clusters_without_a_label_first():
    x, y = clusters()
    labelled = np.isin(np.arange(len(x)), [0, 45])  # one image of clusters 0 and 1
    picks = sel.typiclust(x, labelled, 2, seed=0)
    assert sorted(int(y[i]) for i in picks.rows) == [2, 3]


def test_probcover_radius_is_the_largest_with_95_percent_pure_balls_by_a_naive_search():
    x, _ = clusters((30, 25, 20), spread=0.5, seed=3)
    pseudo = sel._kmeans(x, 3, 0)
    delta, pure = sel.radius_of(x, 3, 0)
    d = dist64(x, x)

    def purity(r):  # a ball is pure when every image in it shares the centre's pseudo-label
        return np.mean([np.all(pseudo[d[i] < r] == pseudo[i]) for i in range(len(x))])

    assert purity(delta - 1e-6) >= 0.95 and pure == pytest.approx(purity(delta - 1e-6))  # float32 distances
    above = np.sort(np.unique(d))
    above = above[above > delta + 1e-6]
    assert purity(above[0] + 1e-6) < 0.95  # the next radius at which a ball grows is no longer pure enough


def test_probcover_is_greedy_maximum_coverage_by_a_naive_loop():
    x, _ = clusters((30, 25, 20), spread=0.5, seed=3)
    picks = sel.probcover(x, np.zeros(len(x), bool), 3, seed=0)
    delta = picks.detail["radius"]
    ball = dist64(x, x) < delta - 1e-6  # the radius is one of the distances: float32 rounding decides that pair
    covered, ref = np.zeros(len(x), bool), []
    for _ in range(3):
        gain = (ball & ~covered[None, :]).sum(1)
        gain[ref] = -1
        i = int(np.argmax(gain))
        ref.append(i)
        covered |= ball[i]
    assert picks.rows.tolist() == ref and picks.scores.min() > 1
    assert picks.detail["covered"] == pytest.approx(covered.mean(), abs=2 / len(x))


def test_kcenter_is_farthest_first_from_the_labelled_by_a_naive_loop():
    x, _ = clusters(seed=5)
    labelled = np.isin(np.arange(len(x)), [3, 50])
    picks = sel.kcenter(x, labelled, 5, seed=0)
    chosen, ref = [3, 50], []
    for _ in range(5):
        d = dist64(x, x[chosen]).min(1)
        d[chosen] = -1
        ref.append(int(np.argmax(d)))
        chosen.append(ref[-1])
    assert picks.rows.tolist() == ref
    np.testing.assert_allclose(picks.scores[0], dist64(x, x[[3, 50]]).min(1)[ref[0]], rtol=1e-5)


@pytest.mark.parametrize("strategy", ["typiclust", "probcover", "kcenter", "random", "auto"])
def test_every_strategy_is_seeded_skips_the_labelled_and_samples_a_pool_that_keeps_them(strategy):
    x, _ = clusters((60, 50, 40), seed=2)
    labelled = np.array([1, 70, 120])
    a = sel.select_rows(x, 7, strategy, 4, labelled, pool=80)
    b = sel.select_rows(x, 7, strategy, 4, labelled, pool=80)
    assert a[0].rows.tolist() == b[0].rows.tolist() and len(set(a[0].rows.tolist())) == 7
    assert not set(a[0].rows.tolist()) & set(labelled.tolist()) and a[3] == 80
    pool = sel.pool_of(len(x), labelled, 80, 4)
    assert set(labelled) <= set(pool.tolist()) and set(a[0].rows.tolist()) <= set(pool.tolist())


def test_typiclust_reaches_more_clusters_and_probcover_covers_more_than_random():
    x, y = clusters((100, 60, 30, 15, 8), seed=7)
    picks = sel.select_rows(x, 5, "typiclust", 0)[0]
    rand = [sel.select_rows(x, 5, "random", s)[0] for s in range(10)]
    assert len(set(y[picks.rows].tolist())) >= 4 > np.mean([len(set(y[r.rows].tolist())) for r in rand])
    pc = sel.select_rows(x, 5, "probcover", 0)[0]
    ball = dist64(x, x) < pc.detail["radius"]
    assert ball[pc.rows].any(0).mean() > max(ball[r.rows].any(0).mean() for r in rand)


# ----------------------------------------------------------------------------- labels and suspects


def test_confident_learning_flags_what_cleanlab_flags_on_the_same_probabilities():
    cleanlab = pytest.importorskip("cleanlab.filter", reason="cleanlab (the test extra) is not installed")
    rng = np.random.default_rng(0)
    for trial in range(5):
        y = rng.integers(0, 4, 300)
        logits = rng.normal(0, 1, (300, 4)) + 2.5 * np.eye(4)[y]
        y_noisy = np.where(rng.random(300) < 0.2, rng.integers(0, 4, 300), y)
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        theirs = cleanlab.find_label_issues(y_noisy, p, filter_by="confident_learning")
        ours = lab.suspects_of(p, y_noisy)[2]
        assert ours.tolist() == theirs.tolist(), trial


def test_temperature_minimises_the_negative_log_likelihood_and_lowers_calibration_error():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 2000)
    logits = 4.0 * (rng.normal(0, 1, (2000, 3)) + 1.2 * np.eye(3)[y])  # over-confident by about 4x
    t = lab.fit_temperature("probe", logits, y)
    assert 2.0 < t < 8.0
    assert lab.ece(lab.calibrated("probe", logits, t), y) < lab.ece(lab.calibrated("probe", logits, 1.0), y) / 2


def test_ece_matches_its_definition_on_a_hand_example():
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    y = np.array([0, 1, 1, 0])
    # bins (15 equal): 0.9 alone (right), 0.8 alone (wrong), 0.7 alone (right), 0.6 alone (right)
    assert lab.ece(p, y) == pytest.approx((0.1 + 0.8 + 0.3 + 0.4) / 4)


def test_spread_labels_a_clustered_collection_and_flags_the_flipped_labels():
    x, y = clusters((80, 70, 60), spread=0.25, seed=4)
    rng = np.random.default_rng(0)
    given_rows = np.sort(rng.choice(len(x), 90, replace=False))
    given_y = y[given_rows].copy()
    flipped = given_rows[:6]
    given_y[:6] = (given_y[:6] + 1) % 3
    res = lab.spread(x, lab.Given(given_rows, given_y, ["a", "b", "c"]), seed=0)
    free = np.setdiff1d(np.arange(len(x)), given_rows)
    assert (res["label"][free] == y[free]).mean() > 0.97
    flagged = set(np.asarray(given_rows)[res["flagged"]].tolist())
    assert flagged <= set(flipped.tolist()) and len(flagged) >= 4  # confident learning: sure, not exhaustive
    top = given_rows[np.argsort(-res["score"])[:6]]
    assert set(top.tolist()) == set(flipped.tolist())
    assert res["expected_accuracy"] == pytest.approx((90 - 6) / 90, abs=0.02)


# ----------------------------------------------------------------------------- the commands


@pytest.fixture()
def collection(tmp_path):
    from PIL import Image

    x, y = clusters((30, 20, 10), seed=9)
    root = tmp_path / "images"
    paths = []
    for i, c in enumerate(y):
        p = root / f"c{c}" / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * int(c), 10, 10)).save(p)
        paths.append(f"c{c}/{i:03d}.png")
    d = write_embed_dir(tmp_path / "emb", x, paths, root)
    return d, root, paths, y


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_isif_select_writes_its_picks_and_is_repeatable(collection, tmp_path, capsys):
    d, root, paths, _ = collection
    before = snapshot(root)
    assert main(["select", str(d), "--budget", "4", "--strategy", "typiclust"]) == 0
    first = (d / "selection.csv").read_text()
    rows = list(csv.DictReader(first.splitlines()))
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"] and set(rows[0]) == {"rank", "path", "typicality"}
    assert (d / "selection.png").is_file() and json.loads((d / "selection.json").read_text())["strategy"] == \
        "typiclust"
    assert main(["select", str(d), "--budget", "4", "--strategy", "typiclust"]) == 0
    assert (d / "selection.csv").read_text() == first
    excl = tmp_path / "done.csv"
    excl.write_text("path\n" + "\n".join(r["path"] for r in rows) + "\n")
    assert main(["select", str(d), "--budget", "3", "--exclude", str(excl)]) == 0
    out = capsys.readouterr().out
    assert "around the 4 already labelled" in out and "auto" not in out.split(" by ")[1].split(" ")[0]
    again = [r["path"] for r in csv.DictReader((d / "selection.csv").read_text().splitlines())]
    assert not set(again) & {r["path"] for r in rows}
    assert snapshot(root) == before


def test_a_selection_of_other_features_is_stale(collection):
    d, *_ = collection
    from isif.collection.embed_dir import load_embed_dir

    assert main(["select", str(d), "--budget", "3"]) == 0
    assert sel.read_selection(load_embed_dir(d), "the ranks") is not None
    np.save(d / "features.npy", clusters((30, 20, 10), seed=10)[0])
    assert sel.read_selection(load_embed_dir(d), "the ranks") is None


def test_isif_label_writes_labels_and_suspects(collection, tmp_path, capsys):
    d, root, paths, y = collection
    before = snapshot(root)
    f = tmp_path / "labels.csv"
    given = list(range(0, 60, 3))
    names = ["cat", "dog", "owl"]
    wrong = given[0]
    f.write_text("path,label\n" + "".join(
        f"{paths[i]},{names[(y[i] + (1 if i == wrong else 0)) % 3]}\n" for i in given))
    assert main(["label", str(d), str(f)]) == 0
    out = capsys.readouterr().out
    assert "3 classes, 20 images labelled by hand; 40 labelled by" in out and "expected accuracy" in out
    table = list(csv.DictReader((d / "labels.csv").read_text().splitlines()))
    assert len(table) == 60 and all(r["label"] == names[y[i]] for i, r in enumerate(table) if i not in given)
    assert sum(bool(r["given"]) for r in table) == 20
    sus = list(csv.DictReader((d / "suspects.csv").read_text().splitlines()))
    assert len(sus) == 20 and sus[0]["path"] == paths[wrong] and sus[0]["suggested"] == names[y[wrong]]
    from isif.collection.embed_dir import load_embed_dir

    t = lab.read_labels_table(load_embed_dir(d), "labels")
    assert t is not None and t.given.sum() == 20 and np.isfinite(t.suspect).sum() == 20
    assert snapshot(root) == before


@pytest.mark.parametrize("argv,message", [
    (["select", "{d}", "--budget", "0"], "--budget must be >= 1"),
    (["select", "{d}", "--budget", "61"], "between 1 and the 60 images"),
    (["select", "{d}", "--budget", "3", "--exclude", "{nopath}"], "no `path` column"),
    (["select", "{d}", "--budget", "3", "--strategy", "best"], "--strategy"),
    (["label", "{d}", "{unknown}"], "2 of its paths are not in"),
    (["label", "{d}", "{twice}"], "is labelled both"),
    (["label", "{d}", "{one}"], "at least 2 classes"),
])
def test_bad_input_is_one_line_and_exit_2(collection, tmp_path, capsys, argv, message):
    d, root, paths, _ = collection
    files = {"nopath": "file\nx\n", "unknown": f"path,label\nnope.png,a\n{paths[0]},b\nzz.png,a\n",
             "twice": f"path,label\n{paths[0]},a\n{paths[0]},b\n{paths[1]},b\n",
             "one": f"path,label\n{paths[0]},a\n{paths[1]},a\n"}
    fmt = {"d": str(d)}
    for name, text in files.items():
        (tmp_path / f"{name}.csv").write_text(text)
        fmt[name] = str(tmp_path / f"{name}.csv")
    assert main([a.format(**fmt) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_the_table_carries_rank_label_confidence_and_suspect_and_leaves_out_stale_files(collection, tmp_path,
                                                                                       capsys):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the parquet extra) is not installed")
    d, root, paths, y = collection
    f = tmp_path / "labels.csv"
    f.write_text("path,label\n" + "".join(f"{paths[i]},{'xyz'[y[i]]}\n" for i in range(0, 60, 2)))
    assert main(["select", str(d), "--budget", "5"]) == 0
    assert main(["label", str(d), str(f)]) == 0
    assert main(["export-embeddings", str(d)]) == 0
    t = pq.read_table(d / "embeddings.parquet").to_pydict()
    ranks = {r["path"]: int(r["rank"]) for r in csv.DictReader((d / "selection.csv").read_text().splitlines())}
    assert {p: r for p, r in zip(t["path"], t["selection_rank"], strict=True) if r is not None} == ranks
    assert t["label"] == ["xyz"[c] for c in y] and sum(t["label_given"]) == 30
    assert [s is None for s in t["suspect_score"]] == [i % 2 == 1 for i in range(60)]
    assert all(0 < c <= 1 for c in t["confidence"])
    np.save(d / "features.npy", clusters((30, 20, 10), seed=11)[0])  # embedded again: other features
    capsys.readouterr()
    assert main(["export-embeddings", str(d)]) == 0
    err = capsys.readouterr().err
    assert "isif select" in err and "isif label" in err
    names = pq.read_schema(d / "embeddings.parquet").names
    assert not {"selection_rank", "label", "suspect_score"} & set(names)


def test_auto_is_typiclust_for_a_small_labelled_set_and_random_past_it():
    assert sel.auto_strategy(0, 20)[0] == "typiclust" and sel.auto_strategy(400, 100)[0] == "typiclust"
    assert sel.auto_strategy(0, 1000)[0] == "random" and sel.auto_strategy(450, 51)[0] == "random"
