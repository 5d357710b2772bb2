"""isif cluster | duplicates | map: answers known in advance on constructed features, files written, bad input
refused in one line, and the image folder left exactly as it was."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isif.cli import main
from isif.collection.cluster import cluster_features, cluster_order
from isif.collection.duplicates import group_pairs
from isif.collection.embed_dir import class_labels
from isif.collection.maps import pca_2d
from isif.collection.rows import Rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # its scoring helpers are its own
try:
    from duplicates_planted import grouped_pair_scores, planted_pair_scores
finally:
    sys.path.pop(0)

CLASSES, PER_CLASS, DIM = 3, 8, 32
EXACT = ("cls0/0000.png", "cls0/0001.png")  # identical features
NEAR = ("cls1/0002.png", "cls1/0003.png")  # cosine ~0.9995
CHAIN = ("cls2/0000.png", "cls2/0001.png", "cls2/0002.png")  # a~b 0.970, b~c 0.976, a~c 0.894
BROKEN = "cls2/0007.png"  # listed in paths.txt, but not an image


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_embed_dir(folder: Path, z: np.ndarray, paths: list[str], root: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "features.npy", z.astype(np.float32))
    (folder / "paths.txt").write_text("\n".join(paths) + "\n")
    meta = {"root": str(root.resolve()), "checkpoint_sha256": "0" * 64, "images": len(paths), "dim": z.shape[1]}
    (folder / "index.json").write_text(json.dumps(meta))
    return folder


def planted_features(paths: list[str]) -> np.ndarray:
    """Three tight clusters on orthonormal directions (members ~0.76 apart), with the planted copies."""
    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.normal(size=(DIM, CLASSES)))[0].T  # (3, D) orthonormal
    z = unit(np.repeat(centres, PER_CLASS, axis=0) + rng.normal(0, 0.1, size=(CLASSES * PER_CLASS, DIM)))
    row = {p: i for i, p in enumerate(paths)}
    z[row[EXACT[1]]] = z[row[EXACT[0]]]
    z[row[NEAR[1]]] = unit(z[row[NEAR[0]]] + 0.03 * unit(rng.normal(size=DIM)))
    a = z[row[CHAIN[0]]]
    u = rng.normal(size=DIM)
    u = unit(u - (u @ a) * a)  # orthogonal to a
    z[row[CHAIN[1]]], z[row[CHAIN[2]]] = unit(a + 0.25 * u), unit(a + 0.5 * u)
    return z.astype(np.float32)


@pytest.fixture
def images(tmp_path) -> Path:
    """3 class folders x 8 small PNGs, each with its own colour and stripe pattern; one file is broken."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(1)
    for c in range(CLASSES):
        (root / f"cls{c}").mkdir(parents=True)
        for i in range(PER_CLASS):
            img = np.zeros((20, 24, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
            img[:: i + 2] = 255 - img[:: i + 2]
            Image.fromarray(img).save(root / f"cls{c}" / f"{i:04d}.png")
    (root / BROKEN).write_bytes(b"not a png at all")
    return root


@pytest.fixture
def emb(tmp_path, images) -> Path:
    paths = sorted(str(p.relative_to(images)) for p in images.rglob("*.png"))
    return write_embed_dir(tmp_path / "photos-embeddings", planted_features(paths), paths, images)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def one_line_error(capsys, *phrases: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("isif: error: ") and err.count("\n") == 1, err
    for p in phrases:
        assert p in err, (p, err)
    return err


# ----------------------------------------------------------------------------- pure functions


def test_kmeans_recovers_the_groups_numbers_them_by_size_and_depends_only_on_the_seed():
    rng = np.random.default_rng(3)
    sizes = (5, 12, 7)
    truth = np.repeat(np.arange(3), sizes)
    perm = rng.permutation(len(truth))
    truth = truth[perm]
    centres = np.linalg.qr(rng.normal(size=(16, 3)))[0].T
    z = unit(centres[truth] + rng.normal(0, 0.05, size=(len(truth), 16))).astype(np.float32)
    c = cluster_features(z, 3, seed=4)
    # the partition is the truth, renumbered by size: the group of 12 is cluster 0, of 7 cluster 1, of 5 cluster 2
    assert np.array_equal(c.labels, np.array([2, 0, 1])[truth])
    means = np.stack([z[c.labels == j].astype(np.float64).mean(0) for j in range(3)])
    assert np.allclose(c.centres, means, atol=1e-5)
    expect = np.linalg.norm(z - means[c.labels], axis=1)
    assert np.allclose(c.distances, expect, atol=1e-5) and math.isclose(c.inertia, (expect**2).sum(), rel_tol=1e-5)
    again = cluster_features(z, 3, seed=4)
    assert np.array_equal(again.labels, c.labels) and np.array_equal(again.distances, c.distances)
    order = cluster_order(c)
    key = list(zip(c.labels[order], c.distances[order], strict=True))
    assert key == sorted(key) and sorted(order.tolist()) == list(range(len(z)))


class CountingRows(Rows):
    """Rows that record the most rows one read copied into memory."""

    most = 0

    def __getitem__(self, key):
        out = super().__getitem__(key)
        if np.ndim(out) == 2:
            CountingRows.most = max(CountingRows.most, len(out))
        return out


def test_kmeans_above_train_rows_trains_on_a_sample_and_reads_the_rest_a_block_at_a_time(tmp_path, monkeypatch):
    import isif.collection.cluster as cluster_mod

    monkeypatch.setattr(cluster_mod, "ASSIGN_BLOCK", 150)
    rng = np.random.default_rng(5)
    sizes = (900, 500, 300, 100)
    truth = rng.permutation(np.repeat(np.arange(4), sizes))
    centres = np.linalg.qr(rng.normal(size=(16, 4)))[0].T
    z = unit(centres[truth] + rng.normal(0, 0.08, size=(len(truth), 16))).astype(np.float32)
    halves = [tmp_path / "a.npy", tmp_path / "b.npy"]
    np.save(halves[0], z[:1000])
    np.save(halves[1], z[1000:])
    rows = CountingRows([np.load(h, mmap_mode="r") for h in halves])
    CountingRows.most = 0
    c = cluster_features(rows, 4, seed=2, train_rows=200)
    assert CountingRows.most <= 200  # the sample, then blocks: never all 1,800 rows at once
    assert np.array_equal(c.labels, np.argsort(np.argsort(-np.array(sizes)))[truth])  # the truth, by size
    # every row is given its nearest centre, the distance to it in float64 (a naive reference)
    d = np.linalg.norm(z.astype(np.float64)[:, None, :] - c.centres[None, :, :], axis=2)
    assert np.array_equal(c.labels, d.argmin(1)) and np.allclose(c.distances, d.min(1), atol=1e-6)
    assert math.isclose(c.inertia, (d.min(1) ** 2).sum(), rel_tol=1e-9)
    # the centres are the means of the sample's members (not of all), and the sample depends on the seed alone
    sample = np.sort(np.random.default_rng(2).choice(len(z), 200, replace=False))
    means = np.stack([z[sample][c.labels[sample] == j].astype(np.float64).mean(0) for j in range(4)])
    assert np.allclose(c.centres, means, atol=1e-5)
    again = cluster_features(z, 4, seed=2, train_rows=200)  # in memory: the same answer
    assert np.array_equal(again.labels, c.labels) and np.array_equal(again.distances, c.distances)
    full = cluster_features(z, 4, seed=2, train_rows=len(z))  # every row trains: the means of all members
    assert np.array_equal(full.labels, c.labels)
    assert np.allclose(full.centres, [z[full.labels == j].astype(np.float64).mean(0) for j in range(4)], atol=1e-5)


def naive_edges(z: np.ndarray, t: float) -> dict[tuple[int, int], float]:
    s = z.astype(np.float64) @ z.astype(np.float64).T
    return {(i, j): s[i, j] for i in range(len(z)) for j in range(i + 1, len(z)) if s[i, j] >= t}


def test_planted_pair_scores_count_every_pair_of_a_group():
    found = group_pairs([["a", "b", "c"], ["d", "e"]])  # ab ac bc de
    assert found == {frozenset(p) for p in ("ab", "ac", "bc", "de")}
    precision, recall = planted_pair_scores(found, [("b", "a"), ("d", "f"), ("e", "d")])
    assert (precision, recall) == (2 / 4, 2 / 3)
    assert grouped_pair_scores([["a", "b", "c"], ["d", "e"]], [("b", "a"), ("d", "f"), ("e", "d")]) == (2 / 4, 2 / 3)
    assert grouped_pair_scores([["a", "b"], ["c", "d"]], [("a", "c"), ("b", "a")]) == (1 / 2, 1 / 2)
    assert planted_pair_scores([("x", "y")], [("y", "x")]) == (1.0, 1.0)
    precision, recall = planted_pair_scores([], [("a", "b")])
    assert math.isnan(precision) and recall == 0.0
    assert math.isnan(planted_pair_scores([("a", "b")], [])[1])


def test_pca_matches_a_float64_svd_up_to_sign_and_its_sign_is_fixed():
    rng = np.random.default_rng(7)
    z = (rng.normal(size=(300, 12)) * np.linspace(3, 0.2, 12) + 0.5).astype(np.float32)
    x = z.astype(np.float64) - z.astype(np.float64).mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    ref = u[:, :2] * s[:2]
    xy = pca_2d(z)
    assert xy.shape == (300, 2) and xy.dtype == np.float64
    for k in range(2):
        assert min(np.abs(xy[:, k] - ref[:, k]).max(), np.abs(xy[:, k] + ref[:, k]).max()) < 1e-8 * s[0]
    assert np.allclose(pca_2d(z[::-1])[::-1], xy, atol=1e-8)  # the sign does not depend on the row order
    for seed in range(6):  # the sign rule: each axis's largest-magnitude loading is positive
        z = np.random.default_rng(seed).normal(size=(50, 5)) * np.array([5, 4, 3, 2, 1])
        x = z - z.mean(0)
        loadings = np.linalg.lstsq(x, pca_2d(z), rcond=None)[0]  # (5, 2): xy = x @ loadings
        assert all(loadings[np.abs(loadings[:, k]).argmax(), k] > 0 for k in range(2)), seed


def test_class_labels_only_when_a_folder_is_shared():
    assert class_labels(["a/1.png", "a/2.png", "b/1.png"]) == ["a", "a", "b"]
    assert class_labels(["a/x/1.png", "a/2.png", "3.png"]) == ["a", "a", "(top level)"]
    assert class_labels(["1.png", "2.png"]) is None  # no folders
    assert class_labels(["a/1.png", "b/1.png"]) is None  # no folder holds several images
    assert class_labels(["a/1.png", "a/2.png"]) is None  # one folder: nothing to tell apart


# ----------------------------------------------------------------------------- the commands


def test_cluster_command_writes_the_table_the_summary_and_one_sheet_per_cluster(emb, tmp_path, capsys):
    assert main(["cluster", str(emb), "--k", "3"]) == 0
    out = capsys.readouterr()
    assert "3 clusters (sizes 8, 8, 8" in out.out and "skipped 1 unreadable" in out.err and BROKEN in out.err
    rows = read_csv(emb / "clusters.csv")
    assert len(rows) == 24 and list(rows[0]) == ["path", "cluster", "distance_to_centre"]
    key = [(int(r["cluster"]), float(r["distance_to_centre"])) for r in rows]
    assert key == sorted(key)
    folders = {c: {r["path"].split("/")[0] for r in rows if int(r["cluster"]) == c} for c in range(3)}
    assert sorted(map(len, folders.values())) == [1, 1, 1] and len(set().union(*folders.values())) == 3
    meta = json.loads((emb / "clusters.json").read_text())
    assert (meta["k"], meta["seed"], meta["sizes"]) == (3, 0, [8, 8, 8])
    assert math.isclose(meta["inertia"], sum(d**2 for _, d in key), rel_tol=1e-4)
    sheets = sorted(p.name for p in (emb / "clusters").iterdir())
    assert sheets == ["cluster-000.png", "cluster-001.png", "cluster-002.png"]
    with Image.open(emb / "clusters" / "cluster-000.png") as im:
        full_height = im.size[1]  # 8 images: 3 rows
    assert main(["cluster", str(emb), "--k", "3", "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "clusters.csv").read_bytes() == (emb / "clusters.csv").read_bytes()
    assert main(["cluster", str(emb), "--k", "2", "--per-sheet", "4", "--tile", "16"]) == 0
    assert sorted(p.name for p in (emb / "clusters").iterdir()) == ["cluster-000.png", "cluster-001.png"]
    with Image.open(emb / "clusters" / "cluster-000.png") as im:
        im.load()
        assert im.size[1] == 4 + 4 + 12 + 2 * (16 + 4) and im.size[1] < full_height  # 4 shown: 2 rows of 2
    assert json.loads((emb / "clusters.json").read_text())["sizes"] in ([16, 8], [12, 12])


def test_bad_input_is_refused_in_one_line(emb, images, tmp_path, capsys):
    first = "run `isif embed CHECKPOINT FOLDER --out DIR` first"
    assert main(["cluster", str(tmp_path / "nowhere"), "--k", "2"]) == 2
    one_line_error(capsys, "nowhere: no such folder", first)
    (tmp_path / "empty").mkdir()
    assert main(["duplicates", str(tmp_path / "empty")]) == 2
    one_line_error(capsys, "paths.txt", first)
    for argv, phrases in ((["cluster", str(emb), "--k", "25"], ("--k 25", "(24)")),
                          (["cluster", str(emb), "--k", "0"], ("--k 0",)),
                          (["cluster", str(emb), "--k", "3", "--train-rows", "2"], ("--train-rows 2", "--k (3)")),
                          (["map", str(emb), "--out", str(images / "cls0" / "map.png")], ("inside the image folder",)),
                          (["cluster", str(emb), "--k", "2", "--out", str(images)], ("inside the image folder",)),
                          (["cluster", str(emb)], ("--k",))):
        assert main(argv) == 2, argv
        one_line_error(capsys, *phrases)
    paths = (emb / "paths.txt").read_text().split()
    short = write_embed_dir(tmp_path / "short", np.load(emb / "features.npy"), paths[:-1], images)
    assert main(["map", str(short)]) == 2
    one_line_error(capsys, "features.npy holds 24 rows for 23 paths")
    moved = write_embed_dir(tmp_path / "moved", np.load(emb / "features.npy"), paths, tmp_path / "gone")
    for argv in (["cluster", str(moved), "--k", "2"], ["duplicates", str(moved), "--threshold", "0.9"],
                 ["map", str(moved)]):
        assert main(argv) == 2
        one_line_error(capsys, f"image folder {(tmp_path / 'gone').resolve()}", "missing")
    assert not list(tmp_path.glob("*/clusters.csv")) and not list(tmp_path.glob("*/map.png"))


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_the_image_folder_is_left_exactly_as_it_was(emb, images, capsys):
    before = snapshot(images)
    assert len(before) == 3 + 24 and before[BROKEN] == b"not a png at all"
    assert main(["cluster", str(emb), "--k", "3"]) == 0
    assert main(["duplicates", str(emb), "--threshold", "0.95"]) == 0
    assert main(["map", str(emb), "--method", "pca"]) == 0
    assert snapshot(images) == before
    assert {"clusters.csv", "clusters.json", "duplicates.csv", "duplicates.png", "map.csv", "map.png"} <= {
        p.name for p in emb.iterdir()}


def neighbour_purity(xy: np.ndarray, groups: np.ndarray, k: int) -> float:
    """The share of each point's k nearest 2-D neighbours (Euclidean, itself left out) in its own group."""
    d = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1, kind="stable")[:, :k]
    return float((groups[nn] == groups[:, None]).mean())


@pytest.mark.slow  # numba compiles UMAP on its first call in a process: about 30 s here, then 0.3 s a map
@pytest.mark.filterwarnings("ignore:n_jobs value 1 overridden:UserWarning")  # a seeded UMAP runs on one thread
def test_real_umap_separates_planted_groups_with_the_seed_and_cosine(emb, capsys):
    umap = pytest.importorskip("umap", reason="umap-learn is not installed (pip install -e '.[umap]')")
    from isif.collection.embed_dir import load_embed_dir
    from isif.collection.maps import embed_2d

    rng = np.random.default_rng(11)
    centres = np.linalg.qr(rng.normal(size=(128, 3)))[0].T  # 3 orthonormal directions in 128-d
    groups = np.repeat(np.arange(3), 40)
    z = unit(centres[groups] + rng.normal(0, 0.05, size=(120, 128))).astype(np.float32)
    xy, used = embed_2d(z, "umap", seed=0)
    assert used == "umap" and xy.shape == (120, 2) and xy.dtype == np.float64 and np.isfinite(xy).all()
    # a map that kept the groups apart: each point's 5 nearest map neighbours are of its group (chance: 39/119)
    assert neighbour_purity(xy, groups, 5) >= 0.95
    assert neighbour_purity(xy, rng.permutation(groups), 5) < 0.5  # the measure on the same map, groups shuffled
    assert np.array_equal(embed_2d(z, "auto", seed=0)[0], xy)  # auto: UMAP when installed, with the seed
    assert np.array_equal(embed_2d(z, "umap", seed=0)[0], xy) and not np.allclose(embed_2d(z, "umap", seed=1)[0], xy)
    # the cosine metric: rows scaled by powers of two (exact in float32) give the very same map; Euclidean does not
    scaled = z * (2.0 ** rng.integers(-3, 4, size=(120, 1))).astype(np.float32)
    assert np.array_equal(embed_2d(scaled, "umap", seed=0)[0], xy)
    euclid = umap.UMAP(n_components=2, metric="euclidean", random_state=0, n_neighbors=15).fit_transform(scaled)
    assert not np.allclose(euclid, xy)
    assert embed_2d(z[:3], "umap")[1] == "pca"  # too few points for a neighbour graph
    # the command: the same map of the fixture's features in map.csv, its 3 folders apart
    assert main(["map", str(emb), "--method", "umap", "--thumbs", "0"]) == 0
    assert capsys.readouterr().out.startswith("UMAP map of 24 images (0 thumbnails, coloured by 3 folders) -> ")
    rows = read_csv(emb / "map.csv")
    got = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    assert np.allclose(got, embed_2d(load_embed_dir(emb).features, "umap", seed=0)[0], rtol=1e-5, atol=1e-5)
    folders = np.array([r["path"].split("/")[0] for r in rows])
    assert neighbour_purity(got, folders, 3) >= 0.9  # chance: 7/23
