"""isif audit and duplicates --keep: pixel statistics against a naive float64 reference, the outlier score against
a brute-force one, planted problems found by a real embed-then-audit run, leaks between two collections, the
keep-list, bad input in one line, and the image folder untouched."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from isif.cli import main
from isif.collection import audit as au
from isif.collection.embed_dir import load_embed_dir
from isif.collection.pixel_stats import COLUMNS, pixel_stats
from isif.data.decode import decode_rgb

from .conftest import train_tiny_run
from .test_explore import one_line_error, snapshot, unit, write_embed_dir


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- pixel statistics


def naive_stats(arr: np.ndarray) -> dict[str, float]:
    """The statistics from their definitions, pixel by pixel in float64 (no reduction: arr is small)."""
    h, w, _ = arr.shape
    x = arr.astype(np.float64) / 255
    b = np.empty((h, w))
    for i in range(h):
        for j in range(w):
            r, g, bl = x[i, j]
            b[i, j] = (0.241 * r * r + 0.691 * g * g + 0.068 * bl * bl) ** 0.5
    levels = sorted(int(np.floor(v * 255 + 0.5)) for v in b.ravel())

    def pct(q):  # nearest rank: the ceil(q n)-th smallest level
        return levels[int(np.ceil(q / 100 * len(levels))) - 1] / 255

    lap = [4 * b[i, j] - b[i - 1, j] - b[i + 1, j] - b[i, j - 1] - b[i, j + 1]
           for i in range(1, h - 1) for j in range(1, w - 1)]
    counts = np.zeros(256)
    for v in levels:
        counts[v] += 1
    p = counts[counts > 0] / b.size
    spread = [(arr[i, j].max() - arr[i, j].min()) / 255 for i in range(h) for j in range(w)]
    return {"width": w, "height": h, "bright_p01": pct(1), "bright_p99": pct(99),
            "sharpness": np.log((np.var(lap) + 1e-8) / (np.var(b) + 1e-8)), "entropy": -(p * np.log2(p)).sum(),
            "colour": float(np.mean(spread))}


def test_pixel_stats_equal_their_definitions():
    rng = np.random.default_rng(0)
    arr = (rng.random((23, 31, 3)) ** 2 * 255).astype(np.uint8)
    got = dict(zip(COLUMNS, pixel_stats(arr).tolist(), strict=True))
    ref = naive_stats(arr)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=2e-5, abs=2e-6), k


def naive_mirror_hash(arr: np.ndarray) -> int:
    """The mirror hash from its definition: brightness, averaged with its mirror, box-reduced to 32 x 32 (PIL),
    scipy's orthonormal 2-D DCT-II, the 8 lowest vertical x the 8 lowest even horizontal frequencies, DC out,
    bits above their median, most significant first."""
    from scipy.fft import dctn

    x = arr.astype(np.float64) / 255
    b = np.sqrt(0.241 * x[..., 0] ** 2 + 0.691 * x[..., 1] ** 2 + 0.068 * x[..., 2] ** 2)
    sym = np.floor((b + b[:, ::-1]) * 127.5 + 0.5).astype(np.uint8)
    g = np.asarray(Image.fromarray(sym).resize((32, 32), Image.BOX), np.float64)
    c = dctn(g, type=2, norm="ortho")[:8, 0:16:2].ravel()
    bits = [0] + [int(v > np.median(c[1:])) for v in c[1:]]
    return int("".join(map(str, bits)), 2)


def test_mirror_hash_equals_its_definition_ignores_a_mirror_and_tells_pictures_apart(tmp_path):
    import io

    from PIL import ImageDraw

    from isif.collection.duplicates import HASH_BITS
    from isif.collection.pixel_stats import hash_words

    rng = np.random.default_rng(4)
    pics = []
    for _ in range(8):  # a background and six coloured discs each
        im = Image.new("RGB", (64, 48), tuple(int(v) for v in rng.integers(0, 256, 3)))
        for _ in range(6):
            x0, y0 = (int(v) for v in rng.integers(0, 48, 2))
            ImageDraw.Draw(im).ellipse([x0, y0, x0 + int(rng.integers(8, 40)), y0 + int(rng.integers(8, 40))],
                                       fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        pics.append(np.asarray(im))
    words = lambda arrs: hash_words(np.stack([pixel_stats(a) for a in arrs]))  # noqa: E731
    h = words(pics)
    assert [int(v) for v in h] == [naive_mirror_hash(a) for a in pics]
    assert (words([a[:, ::-1].copy() for a in pics]) == h).all()  # a mirror has the very same hash
    copies = []
    for a in pics:  # mirrored and re-encoded as JPEG (q60 on real photos: docs/own-images.md)
        buf = io.BytesIO()
        Image.fromarray(a[:, ::-1]).save(buf, "JPEG", quality=90)
        copies.append(np.asarray(Image.open(buf).convert("RGB")))
    own = np.bitwise_count(words(copies) ^ h)
    apart = np.bitwise_count(h[:, None] ^ h[None, :])[np.triu_indices(len(h), 1)]
    # flat discs put many coefficients near the median, the hardest case for a median hash: most copies within
    # HASH_BITS, every one far nearer its own picture than any two pictures are to each other
    assert (own <= HASH_BITS).mean() >= 0.75 and own.max() < apart.min() and apart.min() > 2 * HASH_BITS


def test_pixel_stats_of_a_large_image_are_measured_box_reduced_and_report_the_full_size():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (600, 900, 3), dtype=np.uint8)
    got = dict(zip(COLUMNS, pixel_stats(arr, (1800, 1200)).tolist(), strict=True))
    small = arr.reshape(150, 4, 225, 4, 3).astype(np.float64).mean((1, 3))  # 900 > 3 x 256: reduced by 4
    small = np.floor(small + 0.5).astype(np.uint8)
    ref = naive_stats(small)
    assert (got["width"], got["height"]) == (1800, 1200)
    for k in ("bright_p01", "bright_p99", "entropy", "colour", "sharpness"):
        assert got[k] == pytest.approx(ref[k], rel=0.02, abs=0.01), k


def test_decode_reports_the_full_upright_size_of_a_drafted_rotated_jpeg():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (400, 640, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the upright image is 400 wide and 640 tall
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    info: dict = {}
    arr = decode_rgb(buf.getvalue(), "r.jpg", draft=32, info=info)
    assert info["size"] == (400, 640) and arr.shape[0] > arr.shape[1] and arr.shape[0] < 640


def test_each_check_flags_its_planted_statistics_and_nothing_else():
    typical = [64, 48, 0.05, 0.9, -1.0, 6.5, 0.2]
    rows = np.array([typical] * 40, np.float32)
    rows[:, COLUMNS.index("sharpness")] += np.linspace(-0.3, 0.3, 40)
    planted = {"dark": ("bright_p99", 0.2), "bright": ("bright_p01", 0.8), "low_information": ("entropy", 3.0),
               "blurry": ("sharpness", -4.0), "grayscale": ("colour", 0.0), "odd_aspect": ("width", 200),
               "odd_size": ("height", 1000)}
    for i, (col, v) in enumerate(planted.values()):
        rows[i, COLUMNS.index(col)] = v
    rows[6, COLUMNS.index("width")] = 1000 * 64 / 48  # a large image of the typical aspect
    for i, name in enumerate(planted):
        flags = {n: bool(c.flag(c.score(rows))[i]) for n, c in au.CHECKS.items()}
        assert flags[name], name
        assert [n for n, f in flags.items() if f] == [name], (name, flags)
    clean = [n for n, c in au.CHECKS.items() if c.flag(c.score(rows))[7:].any()]
    assert clean == []


# ----------------------------------------------------------------------------- outliers and neighbours


def test_outlier_score_is_the_robust_z_of_the_mean_distance_to_the_k_nearest(tmp_path):
    rng = np.random.default_rng(3)
    centres = np.linalg.qr(rng.normal(size=(16, 3)))[0].T
    z = unit(np.repeat(centres, 20, axis=0) + rng.normal(0, 0.15, (60, 16)))
    z[5] = unit(rng.normal(size=16))  # far from every cluster
    z[7] = z[8]  # an exact copy: self must still be left out, not the copy
    z = z.astype(np.float32)
    paths = [f"c/{i:03d}.png" for i in range(60)]
    ed = load_embed_dir(write_embed_dir(tmp_path / "e", z, paths, tmp_path))
    score, dist, norm, how = au.outlier_scores(ed, 4)
    s = z.astype(np.float64) @ z.astype(np.float64).T
    np.fill_diagonal(s, -np.inf)
    d = 1 - np.sort(s, 1)[:, ::-1][:, :4].mean(1)
    med = np.median(d)
    mad = 1.4826 * np.median(np.abs(d - med))
    np.testing.assert_allclose(dist, d, atol=1e-5)
    np.testing.assert_allclose(score, (d - med) / mad, rtol=1e-4, atol=1e-4)
    assert how == "exact" and int(np.argmax(score)) == 5 and score[5] > au.OUTLIER_Z
    assert norm["median"] == pytest.approx(med, abs=1e-5)


def test_nearest_through_a_faiss_index_equals_exact_search(tmp_path):
    pytest.importorskip("faiss", reason="faiss is not installed (pip install -e '.[collection]')")
    from isif.collection.index import build_index
    from isif.collection.rows import Rows

    rng = np.random.default_rng(4)
    z = unit(rng.normal(size=(300, 24))).astype(np.float32)
    index, _ = build_index(z, "exact")
    a = au.nearest(Rows([z]), Rows([z]), 5, index, skip_self=True)
    b = au.nearest(Rows([z]), Rows([z]), 5, None, skip_self=True)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert not (b[1] == np.arange(300)[:, None]).any()


# ----------------------------------------------------------------------------- the command, end to end


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny trained run, and a folder of its training images with one planted problem each, embedded."""
    base = tmp_path_factory.mktemp("audit")
    run, tree = train_tiny_run(base)
    root = base / "photos"
    rng = np.random.default_rng(5)
    srcs = sorted((tree / "train").rglob("*.png"))
    for i, f in enumerate(srcs):
        (root / f.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("RGB").save(root / f.parent.name / f"{i:03d}.png")
    base_img = np.asarray(Image.open(srcs[0]).convert("RGB"))
    Image.fromarray((base_img * 0.15).astype(np.uint8)).save(root / "dark.png")
    Image.fromarray((255 - (255 - base_img.astype(float)) * 0.15).astype(np.uint8)).save(root / "bright.png")
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8) + rng.integers(0, 2, (32, 32, 3), dtype=np.uint8)).save(
        root / "flat.png")
    Image.fromarray(base_img).resize((128, 32)).save(root / "wide.png")
    Image.fromarray(np.stack([base_img.mean(2).astype(np.uint8)] * 3, -1)).save(root / "grey.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    emb = base / "emb"
    assert main(["embed", str(run), str(root), "--out", str(emb), "--quiet"]) == 0
    return run, root, emb


def test_audit_flags_each_planted_problem_and_writes_its_files(planted, capsys):
    run, root, emb = planted
    before = snapshot(root)
    capsys.readouterr()
    assert main(["audit", str(emb), "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert snapshot(root) == before
    rows = {r["path"]: r for r in rows_of(emb / "audit.csv")}
    assert list(next(iter(rows.values())))[:3] == ["path", "outlier", "outlier_flag"]
    for path, check in (("dark.png", "dark"), ("bright.png", "bright"), ("flat.png", "low_information"),
                        ("wide.png", "odd_aspect"), ("grey.png", "grayscale")):
        assert rows[path][f"{check}_flag"] == "1", (path, check)
    assert rows["broken.jpg"]["unreadable"] == "1" and rows["broken.jpg"]["outlier"] == ""
    assert sum(r["unreadable"] == "1" for r in rows.values()) == 1
    meta = json.loads((emb / "audit.json").read_text())
    assert meta["pixels"] and meta["counts"]["unreadable"] == 1 and meta["unreadable"][0]["path"] == "broken.jpg"
    assert meta["features_id"] == load_embed_dir(emb).features_id
    assert (emb / "audit-dark.png").is_file() and "dark" in out and "unreadable" in out


def test_pixel_statistics_survive_an_incremental_embed_and_an_old_folder_gets_a_hint(planted, tmp_path, capsys):
    run, root, emb = planted
    ed = load_embed_dir(emb)
    assert ed.pixels is not None and ed.pixels.shape == (len(ed.paths), len(COLUMNS))
    i = ed.paths.index("wide.png")
    assert tuple(ed.pixels[i, :2]) == (128, 32)
    # an older folder: its shards without the statistics
    old = tmp_path / "old"
    shutil.copytree(emb, old)
    for m in (old / "shards").glob("*.json"):
        d = json.loads(m.read_text())
        d.pop("pixels")
        m.write_text(json.dumps(d))
    capsys.readouterr()
    assert main(["audit", str(old), "--sheet", "0"]) == 0
    err = capsys.readouterr().err
    assert "pixel checks skipped" in err and "isif embed" in err and err.count("\n") == 1
    assert "dark" not in rows_of(old / "audit.csv")[0]
    assert main(["audit", str(old), "--checks", "dark", "--sheet", "0"]) == 2  # asked for by name: refused
    one_line_error(capsys, "--checks dark", f"isif embed {load_embed_dir(old).checkpoint}", f"--out {old}")
    assert main(["audit", str(emb), "--checks", "dark,blury", "--sheet", "0"]) == 2
    one_line_error(capsys, "'blury'", "blurry")
    assert main(["audit", str(emb), "--checks", "dark,grayscale", "--sheet", "0", "--out", str(tmp_path / "a")]) == 0
    cols = set(rows_of(tmp_path / "a" / "audit.csv")[0])
    assert cols == {"path", "outlier", "outlier_flag", "dark", "dark_flag", "grayscale", "grayscale_flag",
                    "unreadable"}
    # the command the hint names: an incremental embed into the old folder embeds its files again, once
    assert main(["embed", str(run), str(root), "--out", str(old), "--quiet"]) == 0
    again = load_embed_dir(old)
    assert again.pixels is not None and sorted(again.paths) == sorted(ed.paths)
    np.testing.assert_allclose(again.pixels[[again.paths.index(p) for p in ed.paths]], ed.pixels)


def test_leaks_between_two_collections(tmp_path, capsys):
    rng = np.random.default_rng(6)
    a = unit(rng.normal(size=(50, 16))).astype(np.float32)
    b = unit(rng.normal(size=(30, 16))).astype(np.float32)
    b[[3, 17]] = unit(a[[10, 40]] + 0.01 * rng.normal(size=(2, 16)))  # copies of two of a's images
    ea = write_embed_dir(tmp_path / "a", a, [f"a/{i}.png" for i in range(50)], tmp_path / "img")
    eb = write_embed_dir(tmp_path / "b", b, [f"b/{i}.png" for i in range(30)], tmp_path / "img")
    assert main(["audit", str(ea), "--against", str(eb), "--sheet", "0"]) == 2  # no calibration: --threshold
    one_line_error(capsys, "--threshold")
    assert main(["audit", str(ea), "--against", str(eb), "--threshold", "2", "--sheet", "0"]) == 2
    one_line_error(capsys, "--threshold 2", "(-1, 1]")
    assert main(["audit", str(ea), "--against", str(eb), "--threshold", "0.95", "--sheet", "0"]) == 0
    leaks = rows_of(ea / "leaks.csv")
    assert [(r["path"], r["other_path"]) for r in leaks] in ([("a/10.png", "b/3.png"), ("a/40.png", "b/17.png")],
                                                            [("a/40.png", "b/17.png"), ("a/10.png", "b/3.png")])
    assert "2 images have a near-duplicate" in capsys.readouterr().out
    meta = json.loads((eb / "index.json").read_text())
    meta["checkpoint_sha256"] = "1" * 64
    (eb / "index.json").write_text(json.dumps(meta))
    assert main(["audit", str(ea), "--against", str(eb), "--threshold", "0.95"]) == 2
    one_line_error(capsys, "another checkpoint", "embed both with one checkpoint")


def test_bad_input_is_refused_in_one_line(tmp_path, capsys):
    z = unit(np.random.default_rng(7).normal(size=(5, 8))).astype(np.float32)
    e = write_embed_dir(tmp_path / "e", z, [f"{i}.png" for i in range(5)], tmp_path / "img")
    (tmp_path / "img").mkdir()
    for argv, phrase in ((["audit", str(e), "--k", "5"], "--k 5"), (["audit", str(e), "--k", "0"], "--k"),
                         (["audit", str(tmp_path / "none")], "no such folder"),
                         (["audit", str(e), "--out", str(tmp_path / "img" / "x")], "inside the image folder"),
                         (["audit", str(e), "--against", str(e), "--threshold", "0.9"], "audited itself")):
        assert main(argv) == 2, argv
        one_line_error(capsys, phrase)


def test_read_audit_refuses_a_stale_file(planted, capsys):
    run, root, emb = planted
    assert main(["audit", str(emb), "--sheet", "0"]) == 0
    ed = load_embed_dir(emb)
    got = au.read_audit(ed, "no audit columns")
    assert got is not None and got["dark_flag"][ed.paths.index("dark.png")]
    meta = json.loads((emb / "audit.json").read_text())
    meta["features_id"] = "other"
    (emb / "audit.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert au.read_audit(ed, "no audit columns") is None
    assert "isif audit" in capsys.readouterr().err


# ----------------------------------------------------------------------------- duplicates --keep


def test_keep_list_holds_every_image_in_no_group_and_each_groups_representative(tmp_path, capsys):
    from .test_explore import CHAIN, EXACT, NEAR, planted_features  # noqa: F401

    root = tmp_path / "photos"
    paths = [f"cls{c}/{i:04d}.png" for c in range(3) for i in range(8)]
    for p in paths:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / p)
    emb = write_embed_dir(tmp_path / "e", planted_features(paths), paths, root)
    keep = tmp_path / "keep.txt"
    assert main(["duplicates", str(emb), "--threshold", "0.95", "--keep", str(keep)]) == 0
    groups: dict[str, list[str]] = {}
    for r in rows_of(emb / "duplicates.csv"):
        groups.setdefault(r["group"], []).append(r["path"])
    dropped = {p for g in groups.values() for p in g[1:]}
    assert {EXACT[1], NEAR[1]} <= dropped and len(dropped) == sum(len(g) - 1 for g in groups.values())
    assert CHAIN[0] not in dropped  # the chain's ends are no copies of each other: at most one of them goes
    kept = keep.read_text().splitlines()
    assert kept == [str(root.resolve() / p) for p in paths if p not in dropped]
    assert f"{len(kept)} of the 24 images to keep" in capsys.readouterr().out
    assert main(["duplicates", str(emb), "--threshold", "0.95", "--keep", str(root / "keep.txt")]) == 2
    one_line_error(capsys, "inside the image folder")


def test_the_decoded_image_is_resized_in_uint8_within_one_level_of_the_float_resize():
    import torch
    import torch.nn.functional as F

    from isif.data.input_spec import prepare

    rng = np.random.default_rng(8)
    yy, xx = np.mgrid[0:300, 0:451]
    arr = np.clip(np.stack([127 + 100 * np.sin(xx / 9), 127 + 100 * np.cos(yy / 13), xx * 255 / 451], -1)
                  + rng.normal(0, 20, (300, 451, 3)), 0, 255).astype(np.uint8)
    got = prepare(arr, 32)
    x = torch.from_numpy(arr.astype(np.float64) / 255).permute(2, 0, 1)[None]
    ref = F.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False, antialias=True)[0, :, :, 8:40]
    assert got.shape == (3, 32, 32) and float((got.double() - ref).abs().max()) <= 1 / 255 + 1e-6


def test_the_page_lists_an_issue_worst_first_and_refuses_bad_requests(planted):
    pytest.importorskip("fastapi", reason="FastAPI is not installed (pip install 'isif[serve]')")
    from isif.serve.collection import Collection
    from isif.serve.errors import RequestError

    run, root, emb = planted
    assert main(["audit", str(emb), "--k", "3", "--sheet", "0"]) == 0
    col = Collection(emb)
    counts = {c["issue"]: c["count"] for c in col.info()["audit"]}
    assert counts["dark"] >= 1 and set(counts) == {"outlier", *au.CHECKS}
    out = col.audited("dark")
    assert out["images"][0]["path"] == "dark.png" and "dark" in out["images"][0]["issues"]
    every = col.audited("outlier", limit=1000, min_score=-1e9)
    scores = [r["score"] for r in every["images"]]
    assert every["total"] == len(col) and scores == sorted(scores, reverse=True)
    for args in (("nope",), ("dark", 0, 0), ("dark", -1), ("dark", 0, 10, float("nan"))):
        with pytest.raises(RequestError):
            col.audited(*args)


def test_export_embeddings_carries_the_audit_columns_and_leaves_a_stale_audit_out(planted, capsys):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (pip install 'isif[parquet]')")
    run, root, emb = planted
    assert main(["audit", str(emb), "--k", "3", "--sheet", "0"]) == 0
    assert main(["export-embeddings", str(emb), "--out", str(emb.parent / "t.parquet")]) == 0
    t = pq.read_table(emb.parent / "t.parquet").to_pydict()
    rows = {r["path"]: r for r in rows_of(emb / "audit.csv")}
    i = t["path"].index("dark.png")
    assert t["dark_flag"][i] is True and t["outlier"][i] == pytest.approx(float(rows["dark.png"]["outlier"]))
    assert "broken.jpg" not in t["path"] and len(t["path"]) == len(rows) - 1
    meta = json.loads((emb / "audit.json").read_text())
    (emb / "audit.json").write_text(json.dumps({**meta, "features_id": "stale"}))
    capsys.readouterr()
    assert main(["export-embeddings", str(emb), "--out", str(emb.parent / "u.parquet")]) == 0
    assert "audit" in capsys.readouterr().err
    assert "outlier" not in pq.read_table(emb.parent / "u.parquet").column_names
    (emb / "audit.json").write_text(json.dumps(meta))


def test_a_mirrored_copy_is_found_by_its_hash_where_the_embedding_alone_misses_it(planted, tmp_path, capsys):
    run, root, emb = planted
    srcs = sorted(p for p in root.rglob("*.png") if p.parent != root)
    other = tmp_path / "other"
    other.mkdir()
    ImageOps.mirror(Image.open(srcs[3]).convert("RGB")).save(other / "copy.jpg", quality=90)
    Image.open(srcs[-1]).convert("RGB").rotate(90).save(other / "turned.png")  # not a copy the hash knows
    e2 = tmp_path / "e2"
    assert main(["embed", str(run), str(other), "--out", str(e2), "--quiet"]) == 0
    hi = "0.999999"  # above any cosine of two different files: only the hash can pair them
    assert main(["audit", str(emb), "--against", str(e2), "--threshold", hi, "--sheet", "0"]) == 0
    leaks = rows_of(emb / "leaks.csv")
    rel = str(srcs[3].relative_to(root))
    assert [(r["path"], r["other_path"]) for r in leaks] == [(rel, "copy.jpg")] and int(leaks[0]["hash_bits"]) <= 6
    assert main(["audit", str(emb), "--against", str(e2), "--threshold", hi, "--hash-bits", "-1",
                 "--sheet", "0"]) == 0
    assert rows_of(emb / "leaks.csv") == []
    both = tmp_path / "both"  # one folder: the original and its copy form a group of duplicates
    shutil.copytree(root, both)
    shutil.copy(other / "copy.jpg", both / "copy.jpg")
    e3 = tmp_path / "e3"
    assert main(["embed", str(run), str(both), "--out", str(e3), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["duplicates", str(e3), "--threshold", hi]) == 0
    assert "or perceptual hashes <= 6 bits apart" in capsys.readouterr().out
    groups = {r["path"]: r["group"] for r in rows_of(e3 / "duplicates.csv")}
    assert groups.get(rel) is not None and groups.get(rel) == groups.get("copy.jpg")
    assert main(["duplicates", str(e3), "--threshold", hi, "--hash-bits", "-1"]) == 0
    assert "copy.jpg" not in {r["path"] for r in rows_of(e3 / "duplicates.csv")}
