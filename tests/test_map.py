"""isif map: thumbnails on a grid, one a cell, placed by the 2-D map (known answers of the assignment, neighbours
kept neighbours), the colour rule (folders, else clusters, else none), the two pictures and map.csv, map.json's
round trip and its refusals, and bad input refused in one line."""

from __future__ import annotations

import csv
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isif.base.errors import UserError
from isif.cli import main
from isif.collection.map_layout import MAP_JSON, MapLayout, load_map_layout
from isif.collection.maps import (
    UMAP_MISSING,
    MapOptions,
    assignment_cost,
    grid_assign,
    grid_shape,
    map_folder,
    pca_2d,
)
from isif.collection.render import PALETTE
from tests import test_explore
from tests.test_explore import BROKEN, one_line_error, read_csv, unit, write_embed_dir

images, emb = test_explore.images, test_explore.emb  # its fixtures: 3 class folders of 8 images, one broken


def unique_cells(cells: np.ndarray, cols: int, rows: int) -> bool:
    inside = ((cells >= 0) & (cells < [cols, rows])).all()
    return bool(inside) and len({tuple(c) for c in cells.tolist()}) == len(cells)


# ----------------------------------------------------------------------------- the assignment


def test_grid_shape_leaves_about_15_percent_of_the_cells_empty():
    assert grid_shape(0) == (1, 1) and grid_shape(1) == (2, 1)  # ceil(1.15) = 2 cells
    assert grid_shape(23) == (6, 5)  # 27 cells wanted: 6 columns, 5 rows
    assert grid_shape(2000) == (48, 48) and grid_shape(2000, slack=1.0) == (45, 45)  # 2300 / 2000 cells wanted
    for n in (2, 7, 100, 999, 4001):
        cols, rows = grid_shape(n)
        assert n * 1.15 <= cols * rows < n * 1.15 + cols and abs(cols - rows) <= 1


@pytest.mark.parametrize("exact_limit", [10**6, 0], ids=["exact", "greedy"])
def test_points_already_on_a_grid_land_on_their_own_cells(exact_limit):
    cols, rows = 5, 4
    cells = np.array([(c, r) for r in range(rows) for c in range(cols)])
    xy = np.stack([3.0 * cells[:, 0] - 7.0, -0.5 * cells[:, 1]], axis=1)  # any scale per axis; y up: row 0 on top
    perm = np.random.default_rng(0).permutation(len(xy))
    assert np.array_equal(grid_assign(xy[perm], cols, rows, exact_limit), cells[perm])
    # four corners of a 3 x 3 grid: the corner cells, the rest empty
    corners = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert grid_assign(corners, 3, 3, exact_limit).tolist() == [[0, 2], [2, 2], [0, 0], [2, 0]]
    assert grid_assign(np.zeros((0, 2)), 1, 1, exact_limit).shape == (0, 2)


def test_two_points_wanting_one_cell_share_it_out_exactly_and_greedily():
    # a 3 x 1 grid: x 0 -> 0.5 (cell 0's centre), 0.1 -> 0.7 (also cell 0), 1 -> 2.5 (cell 2)
    xy = np.array([[0.0, 0.0], [0.1, 0.0], [1.0, 0.0]])
    # exact: cost 0 + 0.8^2 + 0 = 0.64 beats 0.2^2 + 1^2 + 0 = 1.04
    assert grid_assign(xy, 3, 1).tolist() == [[0, 0], [1, 0], [2, 0]]
    assert assignment_cost(xy, grid_assign(xy, 3, 1), 3, 1) == pytest.approx(0.64)
    for seed in range(6):  # greedy: whichever comes first takes cell 0, the other the nearest free cell, 1
        got = grid_assign(xy, 3, 1, exact_limit=0, seed=seed).tolist()
        assert sorted(got[:2]) == [[0, 0], [1, 0]] and got[2] == [2, 0]


def test_the_exact_assignment_is_the_optimum_of_all_assignments():
    rng = np.random.default_rng(4)
    for _ in range(3):
        xy = rng.normal(size=(5, 2))
        cols, rows = 3, 2
        best = min(assignment_cost(xy, np.array([(c % cols, c // cols) for c in perm]), cols, rows)
                   for perm in itertools.permutations(range(cols * rows), 5))  # all 720 ways
        got = grid_assign(xy, cols, rows)
        assert unique_cells(got, cols, rows) and assignment_cost(xy, got, cols, rows) == pytest.approx(best)


def clustered(n: int, seed: int, groups: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = rng.integers(0, groups, n)
    return rng.normal(0, 6, size=(groups, 2))[g] + rng.normal(0, 1, size=(n, 2)), g


def test_every_image_gets_its_own_cell_and_exact_costs_no_more_than_greedy():
    for n, seed in ((1, 0), (37, 1), (300, 2), (500, 3)):
        xy, _ = clustered(n, seed)
        cols, rows = grid_shape(n)
        exact, greedy = grid_assign(xy, cols, rows, seed=seed), grid_assign(xy, cols, rows, exact_limit=0, seed=seed)
        assert exact.dtype == greedy.dtype == np.int64 and exact.shape == greedy.shape == (n, 2)
        assert unique_cells(exact, cols, rows) and unique_cells(greedy, cols, rows)
        assert assignment_cost(xy, exact, cols, rows) <= assignment_cost(xy, greedy, cols, rows) + 1e-9
    # the hard cases: a full grid, and 200 copies of one point (all want one cell) among 100 others
    xy, _ = clustered(400, 5)
    assert unique_cells(grid_assign(xy, 20, 20, exact_limit=0), 20, 20)
    assert unique_cells(grid_assign(xy, 20, 20), 20, 20)
    same = np.concatenate([np.full((200, 2), 0.3), np.random.default_rng(6).uniform(size=(100, 2))])
    for limit in (10**6, 0):
        assert unique_cells(grid_assign(same, 18, 18, exact_limit=limit), 18, 18)
    big, _ = clustered(3000, 7)  # above the exact limit by default: greedy
    assert unique_cells(grid_assign(big, *grid_shape(3000)), *grid_shape(3000))
    with pytest.raises(ValueError, match="do not fit"):
        grid_assign(np.zeros((7, 2)), 2, 3)


@pytest.mark.parametrize("exact_limit", [10**6, 0], ids=["exact", "greedy"])
def test_grid_neighbours_are_embedding_neighbours_far_more_often_than_chance(exact_limit):
    rng = np.random.default_rng(8)
    k, n, dim = 6, 600, 32
    plane = np.linalg.qr(rng.normal(size=(dim, 2)))[0]  # (32, 2) orthonormal
    ring = 10 * np.stack([np.cos(2 * np.pi * np.arange(k) / k), np.sin(2 * np.pi * np.arange(k) / k)], axis=1)
    groups = rng.integers(0, k, n)
    z = ring[groups] @ plane.T + rng.normal(0, 1, size=(n, dim))  # well-separated clusters in 32-d
    cols, rows = grid_shape(n)
    cells = grid_assign(pca_2d(z), cols, rows, exact_limit)
    at = {tuple(c): i for i, c in enumerate(cells.tolist())}
    pairs = [(i, at[(c + dc, r + dr)]) for (c, r), i in at.items() for dc, dr in ((1, 0), (0, 1))
             if (c + dc, r + dr) in at]
    a, b = np.array(pairs).T
    assert len(pairs) > n  # the grid is mostly filled: most cells have right and lower neighbours
    same = float((groups[a] == groups[b]).mean())
    chance = np.mean([(s[a] == s[b]).mean() for s in (rng.permutation(groups) for _ in range(20))])
    assert chance < 0.25 and same > 0.85, (same, chance)  # chance about 1/6


# ----------------------------------------------------------------------------- the command


def full_png_cells(layout: MapLayout) -> dict[str, tuple[int, int, int, int]]:
    """Each thumbnailed path's cell rectangle (x0, y0, x1, y1), exclusive ends, in map-full.png."""
    t = layout.tile
    return {p: (layout.left + c * t, layout.top + r * t, layout.left + (c + 1) * t, layout.top + (r + 1) * t)
            for c, r, p in layout.cells}


def disjoint_inside(rects: list[tuple[int, int, int, int]], width: int, height: int) -> bool:
    inside = all(0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height for x0, y0, x1, y1 in rects)
    overlap = any(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
                  for a, b in itertools.combinations(rects, 2))
    return inside and not overlap


def pixels_of(arr: np.ndarray, colour) -> int:
    return int((arr == np.array(colour, np.uint8)).all(-1).sum())


def test_the_map_of_a_labelled_folder_is_coloured_by_folder_with_a_legend(emb, images, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
    assert main(["map", str(emb)]) == 0  # auto: falls back to PCA, and says how to get UMAP
    out = capsys.readouterr().out
    assert "PCA map of 24 images (23 thumbnails, coloured by 3 folders)" in out and "pip install umap-learn" in out
    paths = (emb / "paths.txt").read_text().split()
    for name in ("map.png", "map-full.png", "map.csv", MAP_JSON):
        assert (emb / name).is_file(), name
    rows = read_csv(emb / "map.csv")
    assert [r["path"] for r in rows] == paths and list(rows[0]) == ["path", "x", "y", "col", "row"]
    xy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    assert np.allclose(xy, pca_2d(np.load(emb / "features.npy")), rtol=1e-5, atol=1e-6)
    assert [r["path"] for r in rows if r["col"] == ""] == [BROKEN] == [r["path"] for r in rows if r["row"] == ""]

    layout = load_map_layout(emb, paths)
    assert capsys.readouterr().err == ""
    assert (layout.cols, layout.rows, layout.tile, layout.method, layout.colour) == (6, 5, 96, "pca", "folder")
    assert layout.full_png == (emb / "map-full.png").resolve() and len(layout.cells) == 23
    assert {p: (c, r) for c, r, p in layout.cells} == {r["path"]: (int(r["col"]), int(r["row"])) for r in rows
                                                       if r["col"]}
    # the cells follow the map: the grid is the PCA points' order along each axis, up to ties in one cell column
    kept = [i for i, r in enumerate(rows) if r["col"]]
    cols_of = np.array([int(rows[i]["col"]) for i in kept])
    assert np.corrcoef(cols_of, xy[kept, 0])[0, 1] > 0.8
    assert np.corrcoef([int(rows[i]["row"]) for i in kept], -xy[kept, 1])[0, 1] > 0.8  # y up: row 0 on top

    full = np.asarray(Image.open(emb / "map-full.png").convert("RGB"))
    assert full.shape == (layout.height, layout.width, 3)
    rects = full_png_cells(layout)
    assert disjoint_inside(list(rects.values()), layout.width, layout.height)
    colour_of = {"cls0": PALETTE[0], "cls1": PALETTE[1], "cls2": PALETTE[2]}  # 8 images each: by name
    for p, (x0, y0, x1, y1) in rects.items():
        cell = full[y0:y1, x0:x1]
        assert (cell[0] == 255).all() and (cell[:, 0] == 255).all()  # the 1-pixel white gap
        frame = colour_of[p.split("/")[0]]
        assert (cell[1, 1:-1] == frame).all() and (cell[1:-1, 1] == frame).all() and (cell[-2, 1:-1] == frame).all()
        src = np.asarray(Image.open(images / p).convert("RGB"), dtype=np.float64)[:, 2:22]  # its centre square
        inner = cell[4:-4, 4:-4].astype(np.float64)  # inside the 1 + 3 pixel gap and frame
        assert np.abs(inner.mean((0, 1)) - src.mean((0, 1))).max() < 6, p  # this image, in this cell
    taken = {(c, r) for c, r, _ in layout.cells}
    for c, r in itertools.product(range(layout.cols), range(layout.rows)):
        if (c, r) not in taken:
            t = layout.tile
            assert (full[layout.top + r * t:layout.top + (r + 1) * t,
                         layout.left + c * t:layout.left + (c + 1) * t] == 255).all()  # empty cells white
    right = full[:, layout.left + layout.cols * layout.tile:]
    assert all(pixels_of(right, c) == 0 for c in colour_of.values())  # no legend in map-full.png

    # map.png: the same grid at 28 px a cell, the legend right of it
    res = map_folder(MapOptions(embed_dir=str(emb), method="pca"))
    s = res.screen
    assert (res.cols, res.rows, s["tile"]) == (6, 5, 28)
    screen = np.asarray(Image.open(emb / "map.png").convert("RGB"))
    assert screen.shape == (s["height"], s["width"], 3)
    small = [(s["left"] + c * 28, s["top"] + r * 28, s["left"] + (c + 1) * 28, s["top"] + (r + 1) * 28)
             for c, r, _ in layout.cells]
    assert disjoint_inside(small, s["width"], s["height"])
    for (x0, y0, _, _), (_, _, p) in zip(small, layout.cells, strict=True):
        assert (screen[y0 + 1, x0 + 1:x0 + 27] == colour_of[p.split("/")[0]]).all()  # a 2-pixel frame at 28 px
    legend = screen[:, s["left"] + 6 * 28:]
    assert all(pixels_of(legend, c) >= 100 for c in colour_of.values())  # three 13 x 13 squares

    # --out: map.png there, the other three beside it
    assert main(["map", str(emb), "--method", "pca", "--thumbs", "5", "--out", str(tmp_path / "m" / "x.png")]) == 0
    assert "thumbnails, coloured by 3 folders)" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"x.png", "map-full.png", "map.csv", MAP_JSON}
    placed = [r for r in read_csv(tmp_path / "m" / "map.csv") if r["col"]]
    assert len(placed) in (4, 5)  # 5 drawn at random, one may be the broken file
    again = load_map_layout(tmp_path / "m", paths)
    assert again is not None and len(again.cells) == len(placed) and again.full_png.parent == (tmp_path / "m").resolve()


def many_folders(tmp_path: Path, folders: int, per: int = 2) -> tuple[Path, list[str]]:
    """An embed folder of ``folders`` class folders of ``per`` plain grey-blue images (no palette colour)."""
    root = tmp_path / "many"
    paths = []
    for f in range(folders):
        (root / f"f{f:02d}").mkdir(parents=True)
        for i in range(per):
            Image.new("RGB", (16, 16), (60 + 5 * f, 70, 80 + i)).save(root / f"f{f:02d}" / f"{i}.png")
            paths.append(f"f{f:02d}/{i}.png")
    z = unit(np.random.default_rng(9).normal(size=(len(paths), 8)))
    return write_embed_dir(tmp_path / "many-emb", z, paths, root), paths


def write_clusters(folder: Path, rows: list[tuple[str, int]]) -> None:
    with open(folder / "clusters.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("path", "cluster", "distance_to_centre"))
        w.writerows((p, c, "0.1") for p, c in rows)


def test_many_folders_are_coloured_by_cluster_when_clustered_else_not_at_all(tmp_path, capsys):
    e, paths = many_folders(tmp_path, 13)  # 13 > 12 folders: no legend
    assert main(["map", str(e), "--method", "pca"]) == 0
    cap = capsys.readouterr()
    assert "(26 thumbnails) ->" in cap.out and "coloured by" not in cap.out and cap.err == ""
    assert "13 folders are too many" in cap.out and "isif cluster" in cap.out
    layout = load_map_layout(e, paths)
    assert layout.colour == "none" and len(layout.cells) == 26
    full = np.asarray(Image.open(e / "map-full.png").convert("RGB"))
    assert all(pixels_of(full, c) == 0 for c in PALETTE[:4])  # no frames
    x0, y0 = layout.left + layout.cells[0][0] * 96, layout.top + layout.cells[0][1] * 96
    assert (full[y0 + 1, x0 + 1] != 255).any()  # uncoloured: the thumbnail fills the cell inside the 1-pixel gap

    # isif cluster's output, cluster = folder number mod 3
    write_clusters(e, [(p, int(p[1:3]) % 3) for p in paths])
    assert main(["map", str(e), "--method", "pca"]) == 0
    cap = capsys.readouterr()
    assert "(26 thumbnails, coloured by 3 clusters (isif cluster)) ->" in cap.out and cap.err == ""
    layout = load_map_layout(e, paths)
    assert layout.colour == "cluster"
    full = np.asarray(Image.open(e / "map-full.png").convert("RGB"))
    for c, r, p in layout.cells:
        assert (full[layout.top + r * 96 + 1, layout.left + c * 96 + 1] == PALETTE[int(p[1:3]) % 3]).all(), p
    screen = np.asarray(Image.open(e / "map.png").convert("RGB"))
    assert pixels_of(screen[:, 8 + layout.cols * 28:], PALETTE[0]) == 0  # no legend for clusters

    # stale: a row of another image (or one missing) -> one warning line, no colour
    for rows in ([(p, 0) for p in paths[:-1]], [(p, 0) for p in paths[:-1]] + [("elsewhere.png", 1)]):
        write_clusters(e, rows)
        assert main(["map", str(e), "--method", "pca"]) == 0
        cap = capsys.readouterr()
        assert "coloured by" not in cap.out
        assert cap.err.count("\n") == 1 and "clusters.csv" in cap.err and "isif cluster" in cap.err, cap.err
        assert load_map_layout(e, paths).colour == "none"
    (e / "clusters.csv").write_text("path,cluster\nf00/0.png,zero\n")  # unreadable
    assert main(["map", str(e), "--method", "pca"]) == 0
    cap = capsys.readouterr()
    assert "coloured by" not in cap.out and cap.err.count("\n") == 1 and "unreadable" in cap.err

    # twelve folders: coloured by folder, even with clusters.csv there
    e12, paths12 = many_folders(tmp_path / "twelve", 12)
    write_clusters(e12, [(p, 0) for p in paths12])
    assert main(["map", str(e12), "--method", "pca"]) == 0
    assert "coloured by 12 folders" in capsys.readouterr().out and load_map_layout(e12, paths12).colour == "folder"


def test_a_flat_folder_is_not_coloured(tmp_path, capsys):
    root = tmp_path / "flat"
    root.mkdir()
    rng = np.random.default_rng(2)
    paths = []
    for i in range(6):
        Image.new("RGB", (16, 16), tuple(int(v) for v in rng.integers(30, 90, 3))).save(root / f"{i}.png")
        paths.append(f"{i}.png")
    e = write_embed_dir(tmp_path / "e", unit(rng.normal(size=(6, 4))), paths, root)
    assert main(["map", str(e), "--method", "pca"]) == 0
    out = capsys.readouterr().out
    assert "6 thumbnails)" in out and "coloured" not in out
    for name in ("map.png", "map-full.png"):
        arr = np.asarray(Image.open(e / name).convert("RGB"))
        assert all(pixels_of(arr, c) == 0 for c in PALETTE[:3])
    assert load_map_layout(e, paths).colour == "none"


def test_load_map_layout_round_trips_and_refuses_what_it_cannot_trust(emb, capsys):
    paths = (emb / "paths.txt").read_text().split()
    assert load_map_layout(emb, paths) is None and capsys.readouterr().err == ""  # no map yet: quietly None
    assert main(["map", str(emb), "--method", "pca"]) == 0
    capsys.readouterr()
    layout = load_map_layout(emb, paths)
    good = json.loads((emb / MAP_JSON).read_text())
    assert good["version"] == 1 and good["full_png"] == "map-full.png"
    assert {k: good[k] for k in ("cols", "rows", "tile", "left", "top", "width", "height", "method", "colour")} == {
        "cols": layout.cols, "rows": layout.rows, "tile": 96, "left": layout.left, "top": layout.top,
        "width": layout.width, "height": layout.height, "method": "pca", "colour": "folder"}
    assert [tuple(c) for c in good["cells"]] == layout.cells
    assert Image.open(layout.full_png).size == (layout.width, layout.height)

    def refused(*phrases: str) -> None:
        assert load_map_layout(emb, paths) is None
        err = capsys.readouterr().err
        assert err.startswith("isif: warning: ") and err.count("\n") == 1, err
        assert "re-run `isif map EMBED_DIR`" in err and all(p in err for p in phrases), err

    assert load_map_layout(emb, paths[:-1]) is not None  # the broken file (no cell) may go
    assert load_map_layout(emb, [p for p in paths if p != layout.cells[0][2]]) is None  # made before the last embed
    assert "not in the embed folder" in capsys.readouterr().err
    hostile = [{"version": 2}, {"cols": 0}, {"tile": True}, {"left": -1}, {"width": 10}, {"full_png": "../map.png"},
               {"full_png": "/etc/passwd"}, {"method": "tsne"}, {"colour": "red"}, {"cells": {"a": 1}},
               {"cells": [[0, 0]]}, {"cells": [[layout.cols, 0, paths[0]]]}, {"cells": [[0, -1, paths[0]]]},
               {"cells": [[0, 0, paths[0]], [0, 0, paths[1]]]}, {"cells": [[0, 0, paths[0]], [1, 0, paths[0]]]},
               {"cells": [[0.0, 0, paths[0]]]}]
    for change in hostile:
        (emb / MAP_JSON).write_text(json.dumps({**good, **change}))
        refused("unreadable")
    for raw in (b"{not json", b"\xff\xfe", b"[]", b"1e999999", b"[" * 100_000):
        (emb / MAP_JSON).write_bytes(raw)
        refused("unreadable")
    (emb / MAP_JSON).write_text(json.dumps(good))
    assert load_map_layout(emb, paths) == layout
    (emb / "map-full.png").unlink()
    refused("map-full.png is missing")


def test_bad_input_is_refused_in_one_line(emb, capsys, monkeypatch):
    for argv, phrase in ((["--tile", "4"], "--tile must be >= 8"), (["--full-tile", "8"], "--full-tile must be >= 16"),
                         (["--thumbs", "-1"], "--thumbs"), (["--method", "tsne"], "--method")):
        assert main(["map", str(emb), *argv]) == 2, argv
        one_line_error(capsys, phrase)
    monkeypatch.setitem(sys.modules, "umap", None)
    assert main(["map", str(emb), "--method", "umap"]) == 2  # asked for explicitly: refused, naming the install
    assert one_line_error(capsys) == f"isif: error: {UMAP_MISSING}\n" and "pip install umap-learn" in UMAP_MISSING
    assert main(["map", str(emb), "--out", str(emb / "map-full.png")]) == 2
    one_line_error(capsys, "written beside map.png")
    with pytest.raises(UserError, match="million"):
        map_folder(MapOptions(embed_dir=str(emb), method="pca", thumbs=24, full_tile=10**5))  # too large to make
    assert not list(emb.glob("map*"))
