"""isif duplicates: groups that mean copies (every pair of a group at the threshold, never a chain), against a
naive float64 reference of complete linkage; the threshold calibrated by `isif embed` on the collection; one-line
refusals and warnings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isif.cli import main
from isif.collection.calibration import EDITS, calibrate, copy_of, nearest_other, summary, threshold_of
from isif.collection.duplicates import duplicate_groups, large_group, similar_pairs
from tests.conftest import train_tiny_run
from tests.test_explore import (  # noqa: F401  (fixtures)
    CHAIN,
    EXACT,
    NEAR,
    emb,
    images,
    naive_edges,
    one_line_error,
    read_csv,
    unit,
    write_embed_dir,
)


def naive_complete_linkage(z: np.ndarray, t: float) -> list[list[int]]:
    """From the definition, in float64 and plain Python: the pairs >= t from the most similar down (ties by
    (i, j)); two groups merge when every pair across them is >= t. Groups of two or more, each with its medoid
    (largest summed cosine to the group, ties to the lower index) first, then by cosine to it (ties by index);
    the largest group first, ties by the first member."""
    s = z.astype(np.float64) @ z.astype(np.float64).T
    n = len(z)
    pairs = sorted(((s[i, j], i, j) for i in range(n) for j in range(i + 1, n) if s[i, j] >= t),
                   key=lambda p: (-p[0], p[1], p[2]))
    group = {i: {i} for i in range(n)}
    for _, i, j in pairs:
        a, b = group[i], group[j]
        if a is b or any(s[x, y] < t for x in a for y in b):
            continue
        merged = a | b
        for m in merged:
            group[m] = merged
    out, seen = [], set()
    for g in group.values():
        if len(g) < 2 or id(g) in seen:
            continue
        seen.add(id(g))
        g = sorted(g)
        rep = max(g, key=lambda x: (sum(s[x, y] for y in g), -x))
        out.append([rep] + sorted((y for y in g if y != rep), key=lambda y: (-s[rep, y], y)))
    return sorted(out, key=lambda g: (-len(g), g[0]))


@pytest.mark.parametrize("block", [7, 1000])
def test_groups_equal_a_float64_complete_linkage_reference_and_are_cliques(block):
    rng = np.random.default_rng(5)
    z = unit(rng.normal(size=(157, 6))).astype(np.float32)
    t = 0.8
    s64 = z.astype(np.float64) @ z.astype(np.float64).T
    assert np.abs(s64 - t).min() > 1e-5  # no pair so close to the threshold that float32 could decide otherwise
    ref = naive_edges(z, t)
    got = {(a, b) for i, j, _ in similar_pairs(z, t, block) for a, b in zip(i.tolist(), j.tolist(), strict=True)}
    assert got == set(ref) and 20 < len(ref) < 2000
    groups = [g.tolist() for g in duplicate_groups(z, t, block)]
    assert groups == naive_complete_linkage(z, t)
    assert len(groups) > 5 and len(groups[0]) >= 3  # the case has groups larger than a pair
    members = [m for g in groups for m in g]
    assert len(members) == len(set(members))  # an image in at most one group
    for g in groups:  # every pair of a group is above the threshold
        assert all(s64[a, b] >= t for a in g for b in g)
    # nothing left to merge: two groups, or a group and a lone image, always have a pair below the threshold
    alone = [i for i in range(len(z)) if i not in set(members)]
    units = groups + [[i] for i in alone]
    for x in range(len(units)):
        for y in range(x + 1, len(units)):
            assert min(s64[a, b] for a in units[x] for b in units[y]) < t


def test_a_chain_of_look_alikes_is_not_one_group():
    """25 images on an arc, each 0.97 from the next (the failure of single linkage: one group of 25)."""
    rng = np.random.default_rng(0)
    u, v = unit(rng.normal(size=(2, 16)))
    v = unit(v - (v @ u) * u)
    step = np.arccos(0.97)
    z = np.stack([np.cos(k * step) * u + np.sin(k * step) * v for k in range(25)]).astype(np.float32)
    groups = duplicate_groups(z, 0.95)
    assert max(map(len, groups)) == 2  # two steps apart is cos(2 step) = 0.882 < 0.95: pairs only
    assert all(abs(int(g[0]) - int(g[1])) == 1 for g in groups) and len(groups) >= 11  # neighbours, paired


def test_a_star_keeps_one_copy_with_its_centre_not_the_look_alikes():
    """A centre c and five images each 0.96 from c but 0.92 from each other: every member close to a
    representative, but no two of the five copies of each other."""
    rng = np.random.default_rng(1)
    c = unit(rng.normal(size=32))
    basis = np.linalg.qr(np.column_stack([c, rng.normal(size=(32, 5))]))[0][:, 1:].T  # 5 directions orthogonal to c
    a = 0.96
    z = np.vstack([c, a * c + np.sqrt(1 - a * a) * basis]).astype(np.float32)
    s = z.astype(np.float64) @ z.astype(np.float64).T
    assert np.allclose(s[0, 1:], 0.96, atol=1e-6) and np.allclose(s[1, 2:], 0.9216, atol=1e-6)
    groups = [g.tolist() for g in duplicate_groups(z, 0.95)]
    assert len(groups) == 1 and len(groups[0]) == 2 and 0 in groups[0]
    g = duplicate_groups(z, 0.9)[0].tolist()
    assert g[0] == 0 and sorted(g) == [0, 1, 2, 3, 4, 5]  # at 0.9 all are copies; c, the medoid, first


def test_the_planted_copies_of_the_fixture_at_0_95(emb):  # noqa: F811
    paths = (emb / "paths.txt").read_text().split()
    z = np.load(emb / "features.npy")
    named = [[paths[i] for i in g] for g in duplicate_groups(z, 0.95, block=5)]
    # a~b 0.970, b~c 0.976, a~c 0.894: b and c are copies, a is not a copy of c, so a stays alone
    assert sorted(map(sorted, named)) == sorted([sorted(EXACT), sorted(NEAR), sorted(CHAIN[1:])])
    assert [[paths[i] for i in g] for g in duplicate_groups(z, 0.98, block=5)] == [list(EXACT), list(NEAR)]


def test_too_many_pairs_are_refused_with_the_fix():
    z = np.ones((50, 4), np.float32) / 2
    with pytest.raises(Exception, match="raise --threshold"):
        duplicate_groups(z, 0.5, max_pairs=100)
    assert [len(g) for g in duplicate_groups(z, 0.5)] == [50]


# ----------------------------------------------------------------------------- calibration


def test_copy_edits_are_the_edits_they_say():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert np.array_equal(copy_of(arr, "mirror", rng), arr[:, ::-1])
    for _ in range(20):
        c = copy_of(arr, "crop", rng)
        assert 32 <= c.shape[0] <= 38 and 48 <= c.shape[1] <= 57
        hits = [(y, x) for y in range(41 - c.shape[0]) for x in range(61 - c.shape[1])
                if np.array_equal(arr[y:y + c.shape[0], x:x + c.shape[1]], c)]
        assert hits  # a window of the original
        r = copy_of(arr, "resize", rng)
        f = r.shape[1] / 60
        assert 0.49 <= f <= 1.51 and abs(r.shape[0] / 40 - f) < 0.05 and r.dtype == np.uint8
    smooth = np.repeat(np.repeat(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8), 8, 0), 10, 1)
    j = copy_of(smooth, "jpeg", rng)
    assert j.shape == smooth.shape and not np.array_equal(j, smooth)
    assert np.abs(j.astype(int) - smooth).mean() < 20  # a re-encode, not another picture (~85 apart)


def test_the_threshold_rule_on_known_distributions():
    copies = np.linspace(0.90, 0.99, 101)  # the 5th percentile: 0.9045
    second = np.linspace(-0.2, 0.6, 1001)  # look-alikes far below
    t, separable = threshold_of(copies, second)
    assert separable and t == pytest.approx(0.9045, abs=1e-4)
    # 2% of the images have a second-nearest image at 0.95: the threshold rises to their 99th percentile
    second = np.concatenate([second, np.full(21, 0.95)])
    t, separable = threshold_of(copies, second)
    assert not separable and t == pytest.approx(0.95)
    nearest = np.concatenate([np.full(100, 0.97), np.full(922, 0.5)])  # 100 images with a copy at 0.97
    rec = summary(copies, nearest, second, 0, ["jpeg"] * 50 + ["crop"] * 51, 1022)
    assert rec["threshold"] == t and not rec["separable"] and rec["copies_found"] == pytest.approx(45 / 101, abs=1e-3)
    assert rec["copies_by_edit"]["jpeg"]["found"] == 0.0 and rec["copies_by_edit"]["crop"]["found"] == round(45 / 51, 4)
    assert set(rec["copies_by_edit"]) == {"jpeg", "crop"} and rec["with_copy"] == pytest.approx(100 / 1022, abs=1e-4)
    assert rec["lookalikes_above"] == pytest.approx(21 / 1022, abs=1e-4) and rec["lookalike_p99"] == 0.95


def test_nearest_and_second_nearest_equal_a_float64_reference_blockwise():
    rng = np.random.default_rng(2)
    z = unit(rng.normal(size=(300, 8))).astype(np.float32)
    rows = [3, 17, 150, 299]
    s = z.astype(np.float64) @ z.astype(np.float64).T
    np.fill_diagonal(s, -np.inf)
    ref = -np.sort(-s[rows], axis=1)[:, :2]
    for block, pool in ((7, 10_000), (1000, 10_000)):
        first, second, searched = nearest_other(z, rows, np.random.default_rng(0), pool, block)
        assert searched == 300
        assert np.allclose(first, ref[:, 0], atol=1e-6) and np.allclose(second, ref[:, 1], atol=1e-6)
    first, second, searched = nearest_other(z, rows, np.random.default_rng(0), pool=50, block=16)
    assert 50 < searched <= 54 and np.all(first <= ref[:, 0] + 1e-6) and np.all(second <= first)  # a subset: no higher


class _MeanColour:
    """A stand-in network: the image's mean colour per third of its width, so a mirror changes the feature and a
    re-encode barely does."""

    batch_size = 3

    class spec:  # noqa: N801
        @staticmethod
        def decode(data, name):
            from isif.data.decode import decode_rgb

            return decode_rgb(data, name)

        @staticmethod
        def prepare(arr):
            import torch

            t = torch.from_numpy(np.array(arr)).float().permute(2, 0, 1) / 255
            return torch.nn.functional.interpolate(t[None], size=(12, 12), mode="area")[0]

    def forward(self, xs):
        import torch

        x = torch.stack(xs)
        return torch.cat([x[..., 4 * k:4 * (k + 1)].mean((-1, -2)) for k in range(3)], 1) - 0.5


def test_calibrate_measures_copies_against_the_collections_own_features(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i in range(40):
        a = np.zeros((24, 36, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
        a[:, :12] = rng.integers(0, 256, 3, dtype=np.uint8)  # left third another colour
        Image.fromarray(a).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"nope")
    net = _MeanColour()
    feats = np.concatenate([net.forward([net.spec.prepare(np.asarray(Image.open(f).convert("RGB")))]).numpy()
                            for f in files])
    cal = calibrate(net, files + [tmp_path / "broken.png"], np.vstack([feats, feats[:1]]), seed=3, sample=41)
    assert cal["sample"] == 40  # the broken file left out
    assert {e: v["n"] for e, v in cal["copies_by_edit"].items()} == dict.fromkeys(EDITS, 10)
    # crops, resizes and re-encodes keep the colours: cosine ~1; a mirror moves the left colour to the right
    assert cal["copies"]["p50"] > 0.99 and cal["copies"]["p01"] < cal["copies"]["p50"]
    assert cal == calibrate(net, files + [tmp_path / "broken.png"], np.vstack([feats, feats[:1]]), seed=3, sample=41)
    assert calibrate(net, files[:5], feats[:5]) is None  # too few images to measure


# ----------------------------------------------------------------------------- the command


def with_calibration(folder: Path, **fields) -> Path:
    meta = json.loads((folder / "index.json").read_text())
    cal = {"version": 1, "sample": 24, "threshold": 0.95, "separable": True, "copies_found": 0.95,
           "lookalikes_above": 0.0, "copies": {"p05": 0.95}, "lookalike_p99": 0.8,
           "copies_by_edit": {"jpeg": {"found": 1.0}, "crop": {"found": 0.5}}} | fields
    meta["calibration"] = cal
    (folder / "index.json").write_text(json.dumps(meta))
    return folder


def test_the_command_uses_the_calibrated_threshold_and_writes_its_record(emb, tmp_path, capsys):  # noqa: F811
    assert main(["duplicates", str(emb)]) == 2  # no calibration in this folder: --threshold is named
    one_line_error(capsys, "no near-duplicate calibration", "--threshold", "isif embed")
    with_calibration(emb)
    assert main(["duplicates", str(emb), "--block", "4"]) == 0
    out = capsys.readouterr()
    assert ("3 near-duplicate groups, 6 images (the largest 2) at cosine >= 0.95 (calibrated: 95% (jpeg 100%, "
            "crop 50%) of 24 sampled copies") in out.out
    assert out.err.count("\n") == 1 and "copies by the embedding alone" in out.err  # no hashes in this folder
    rows = read_csv(emb / "duplicates.csv")
    assert len(rows) == 6 and {r["path"] for r in rows} == set(EXACT) | set(NEAR) | set(CHAIN[1:])
    firsts = [r for k, r in enumerate(rows) if k == 0 or rows[k - 1]["group"] != r["group"]]
    assert all(float(r["similarity"]) == 1.0 for r in firsts)  # the representative first
    rec = json.loads((emb / "duplicates.json").read_text())
    assert rec["threshold"] == 0.95 and rec["source"] == "calibrated" and rec["groups"] == 3 and rec["largest"] == 2
    assert main(["duplicates", str(emb), "--threshold", "0.5", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr()
    assert "(--threshold)" in out.out
    assert "below the look-alike level of this collection (0.800" in out.err
    with_calibration(emb, separable=False)
    assert main(["duplicates", str(emb)]) == 0
    err = capsys.readouterr().err
    assert "puts look-alikes as close as copies" in err and "(crop 50%)" in err and err.count("\n") == 2


def test_a_collection_above_the_in_memory_limit_gives_the_groups_of_one_in_memory(emb, tmp_path, capsys,  # noqa: F811
                                                                                  monkeypatch):
    """Above rows.IN_MEMORY_MAX the pairs are found on tiles read from the memory-mapped features: the same
    duplicates.csv, byte for byte, as with every row in memory."""
    import isif.collection.duplicates as dup_mod
    import isif.collection.rows as rows_mod

    assert main(["duplicates", str(emb), "--threshold", "0.9", "--block", "5"]) == 0
    in_memory = (emb / "duplicates.csv").read_bytes()
    seen = []
    real = dup_mod.duplicate_groups
    monkeypatch.setattr(dup_mod, "duplicate_groups", lambda z, *a, **k: seen.append(type(z)) or real(z, *a, **k))
    monkeypatch.setattr(rows_mod, "IN_MEMORY_MAX", 5)
    assert main(["duplicates", str(emb), "--threshold", "0.9", "--block", "5"]) == 0
    assert seen == [rows_mod.Rows] and (emb / "duplicates.csv").read_bytes() == in_memory
    assert in_memory.count(b"\n") > 3  # groups were found, so the comparison means something


def test_an_implausibly_large_group_is_reported_with_what_to_do(tmp_path, capsys):
    root = tmp_path / "same"
    root.mkdir()
    paths = []
    for i in range(30):
        Image.fromarray(np.full((8, 8, 3), 7 * i, np.uint8)).save(root / f"{i}.png")
        paths.append(f"{i}.png")
    e = with_calibration(write_embed_dir(tmp_path / "e", np.ones((30, 4)), paths, root))
    assert large_group(30) == 25 and large_group(10_000) == 100
    assert main(["duplicates", str(e), "--hash-bits", "-1"]) == 0
    out = capsys.readouterr()
    assert "the largest 30" in out.out
    assert "warning: the largest group holds 30 of the 30 images, implausible as copies" in out.err
    assert out.err.count("\n") == 1


@pytest.mark.parametrize("value", ["1.5", "-1", "-2", "nan"])
def test_a_threshold_outside_minus_one_to_one_is_refused(emb, capsys, value):  # noqa: F811
    assert main(["duplicates", str(emb), "--threshold", value]) == 2
    one_line_error(capsys, f"--threshold {value}", "(-1, 1]")


def test_isif_embed_records_a_calibration_that_duplicates_then_uses(tmp_path, capsys):
    run, tree = train_tiny_run(tmp_path)
    out = tmp_path / "emb"
    capsys.readouterr()
    assert main(["embed", str(run), str(tree / "train"), "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "near-duplicate threshold: cosine" in text
    cal = json.loads((out / "index.json").read_text())["calibration"]
    assert cal["sample"] == 24
    assert -1 < cal["threshold"] <= 1 and cal["copies"]["p05"] <= cal["copies"]["p50"] <= 1.0 + 1e-6
    assert cal["second"]["p50"] <= cal["second"]["p99"] <= cal["nearest"]["p99"] + 1e-6
    assert cal["pool"] == 24 and sum(v["n"] for v in cal["copies_by_edit"].values()) == 24
    # a rerun (nothing new) keeps it, and the duplicates command reads it
    assert main(["embed", str(run), str(tree / "train"), "--out", str(out), "--quiet"]) == 0
    assert "near-duplicate threshold" not in capsys.readouterr().out
    assert json.loads((out / "index.json").read_text())["calibration"] == cal
    assert main(["duplicates", str(out)]) == 0
    assert f"at cosine >= {cal['threshold']:g} (calibrated" in capsys.readouterr().out


def test_hash_pairs_join_the_groups_and_a_group_is_still_a_clique():
    rng = np.random.default_rng(9)
    z = rng.normal(size=(8, 16))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    z[1] = z[0]  # 0~1 by the embedding
    hashes = rng.integers(0, 2**63, 8, dtype=np.int64).astype(np.uint64)
    hashes[2] = hashes[0] ^ np.uint64(0b101)  # 0~2 by the hash (2 bits), but 1 and 2 only through 0
    hashes[5] = hashes[4] ^ np.uint64(0b111)  # 4~5 by the hash alone (3 bits)
    assert [g.tolist() for g in duplicate_groups(z, 0.99, block=3)] == [[0, 1]]
    joined = [sorted(g.tolist()) for g in duplicate_groups(z, 0.99, block=3, hashes=hashes, hash_bits=3)]
    assert [4, 5] in joined and ([0, 1] in joined or [0, 2] in joined) and [0, 1, 2] not in joined
    assert [4, 5] not in [sorted(g.tolist()) for g in duplicate_groups(z, 0.99, hashes=hashes, hash_bits=2)]
    hashes[1] = hashes[0]  # now every pair of 0, 1, 2 is a copy
    assert [0, 1, 2] in [sorted(g.tolist()) for g in duplicate_groups(z, 0.99, block=3, hashes=hashes, hash_bits=3)]
