"""The embed folder's one owner (``isif.collection.embed_dir``): it reads what ``isif embed`` wrote, refuses every
mismatch in one line, labels images by one rule (the first folder under the root) for search, map and serve, and
still reads the folders written by the code before it took over (commit 8a678c3)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from isif.base.errors import UserError
from isif.base.files import sha256_file
from isif.cli import main
from isif.collection.embed_dir import class_labels, label_of, load_embed_dir, unit_rows
from isif.data.input_spec import InputSpec
from isif.training.checkpoint import load_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "embed-8a678c3.json"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """(run, tree, embed folder of tree/test): a one-epoch cifar10-tiny run and its embedding of 12 images."""
    from tests.conftest import train_tiny_run

    base = tmp_path_factory.mktemp("embed-dir")
    run, tree = train_tiny_run(base)
    out = base / "emb"
    assert main(["embed", str(run), str(tree / "test"), "--out", str(out), "--quiet", "--workers", "0"]) == 0
    return run, tree, out


def old_folder(tmp_path: Path, name: str) -> Path:
    """An embed folder written by the code at 8a678c3, byte for byte (tests/fixtures/embed-8a678c3.json)."""
    files = json.loads(FIXTURE.read_text())[name]
    d = tmp_path / f"old-{name}"
    d.mkdir()
    (d / "index.json").write_text(files["index.json"])
    (d / "paths.txt").write_text(files["paths.txt"])
    (d / "features.npy").write_bytes(base64.b64decode(files["features.npy"]))
    return d


def test_reads_what_embed_wrote_in_the_layout_of_before(embedded, tmp_path):
    run, tree, out = embedded
    ckpt = run / "checkpoints" / "last.pt"
    state = load_checkpoint(ckpt)
    dim = state["config"]["model"]["dim"]
    ed = load_embed_dir(out, sha256_file(ckpt), dim)
    z = np.load(out / "features.npy")
    assert z.dtype == np.float32 and np.array_equal(ed.features, unit_rows(z))
    assert np.asarray(load_embed_dir(out, unit=False).features).tobytes() == z.tobytes()
    assert ed.features[3:7].tobytes() == unit_rows(z[3:7]).tobytes() and np.array_equal(ed.features[[5, 0]],
                                                                                      unit_rows(z[[5, 0]]))
    assert ed.paths == (out / "paths.txt").read_text().splitlines() and ed.root == (tree / "test").resolve()
    assert ed.checkpoint == str(ckpt.resolve()) and ed.checkpoint_sha256 == sha256_file(ckpt)
    from isif.training.config import Config

    assert ed.input_spec == InputSpec.from_checkpoint(state, Config.from_dict(state["config"]))
    assert ed.labels == [p.split("/")[0] for p in ed.paths] and set(ed.labels) == {"class0", "class1", "class2"}
    # the files keep the layout of the code before: the same keys in the same order, the spec written back as read
    meta = json.loads((out / "index.json").read_text())
    before = old_folder(tmp_path, "builtin")
    old = json.loads(before.joinpath("index.json").read_text())
    # (plus the segments of the shards and their id, and the near-duplicate calibration that embed measures since)
    assert list(meta) == [*old, "segments", "features_id", "calibration"] and list(meta["input"]) == list(old["input"])
    assert load_embed_dir(before).segments == []  # a folder of before: features.npy
    assert json.dumps(ed.input_spec.to_dict(), indent=2) == json.dumps(meta["input"], indent=2)


def _one_line(call) -> str:
    with pytest.raises(UserError) as e:
        call()
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_refuses_each_mismatch_in_one_line(embedded, tmp_path):
    _, _, out = embedded
    dim = np.load(out / "features.npy").shape[1]
    assert "is not the checkpoint that embedded" in _one_line(lambda: load_embed_dir(out, "f" * 64))
    assert f"holds {dim}-d features but the checkpoint gives {dim + 1}-d" in _one_line(
        lambda: load_embed_dir(out, dim=dim + 1))

    def variant(name: str, change) -> Path:
        d = tmp_path / name
        shutil.copytree(out, d)
        change(d)
        return d

    cases = {
        "no paths.txt": lambda d: (d / "paths.txt").unlink(),
        "holds 12 rows for 11 paths": lambda d: (d / "paths.txt").write_text(
            "".join(line + "\n" for line in (d / "paths.txt").read_text().splitlines()[1:])),
        "non-empty (N, D) array of finite floats": lambda d: [np.save(f, np.full((12, dim), np.nan, np.float32))
                                                              for f in (d / "shards").glob("*.npy")],
        "holding rows of the collection is missing": lambda d: [f.unlink() for f in (d / "shards").glob("*.npy")],
        "outside the shard's": lambda d: [np.save(f, np.zeros((3, dim), np.float32))
                                           for f in (d / "shards").glob("*.npy")],
        "no image root": lambda d: (d / "index.json").write_text(json.dumps({"images": 12})),
        "unreadable embed output": lambda d: (d / "index.json").write_text("{not json"),
    }
    for i, (phrase, change) in enumerate(cases.items()):
        d = variant(f"v{i}", change)
        assert phrase in _one_line(lambda d=d: load_embed_dir(d)), phrase
    assert "no such folder" in _one_line(lambda: load_embed_dir(tmp_path / "nowhere"))


def test_search_refuses_another_checkpoints_embed_folder_with_the_same_line(embedded, tmp_path, capsys):
    run, tree, out = embedded
    other = tmp_path / "other"
    shutil.copytree(out, other)
    meta = json.loads((other / "index.json").read_text())
    (other / "index.json").write_text(json.dumps({**meta, "checkpoint_sha256": "f" * 64}, indent=2))
    capsys.readouterr()
    query = str(sorted((tree / "test").rglob("*.png"))[0])
    assert main(["search", str(run), query, "--gallery", str(other), "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not the checkpoint that embedded" in err, err


def test_one_label_rule_the_first_folder_under_the_root(tmp_path):
    assert class_labels(["a/1.png", "a/2.png", "b/1.png"]) == ["a", "a", "b"]
    assert class_labels(["cat/2019/1.png", "cat/2020/2.png", "dog/2019/3.png"]) == ["cat", "cat", "dog"]
    assert class_labels(["a/x/1.png", "a/2.png", "3.png"]) == ["a", "a", "(top level)"]
    assert class_labels(["1.png", "2.png"]) is None  # no folders
    assert class_labels(["a/1.png", "b/1.png"]) is None  # no folder holds several images
    assert class_labels(["a/1.png", "a/2.png"]) is None  # one folder: nothing to tell apart
    root = tmp_path / "gallery"
    assert label_of(root / "cat" / "2019" / "1.png", root) == "cat"  # inside the root: its first folder
    assert label_of(root / "1.png", root) == "(top level)"
    assert label_of(tmp_path / "queries" / "dog" / "q.png", root) == "dog"  # elsewhere: its own folder


def test_search_marks_the_class_by_the_top_folder_on_a_two_level_tree(embedded, tmp_path, capsys):
    """Albums a/ and b/ inside every class folder: the album names cross the classes, so a rule by the parent
    folder (the search before) calls a neighbour in another class's album a/ "same class"."""
    run, tree, _ = embedded
    gallery = tmp_path / "gallery"
    for i, f in enumerate(sorted((tree / "test").rglob("*.png"))):
        dest = gallery / f.parent.name / ("a" if i % 2 else "b") / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    emb = tmp_path / "emb2"
    assert main(["embed", str(run), str(gallery), "--out", str(emb), "--quiet", "--workers", "0"]) == 0
    queries = [gallery / "class0" / "a" / sorted(p.name for p in (gallery / "class0" / "a").iterdir())[0],
               sorted((tree / "train" / "class1").iterdir())[0]]  # one inside the gallery, one from elsewhere
    for g in (str(gallery), str(emb)):  # an image folder and an embed folder: the same rule
        capsys.readouterr()
        assert main(["search", str(run), *map(str, queries), "--gallery", g, "--k", "11", "--json",
                     "--out", str(tmp_path / "s.png")]) == 0
        results = json.loads(capsys.readouterr().out)["results"]
        for r, want in zip(results, ("class0", "class1"), strict=True):
            got = [(Path(n["path"]).relative_to(gallery.resolve()).parts[0] == want, n["same_label"])
                   for n in r["neighbours"]]
            assert all(a == b for a, b in got), got
            assert {a for a, _ in got} == {True, False}


@pytest.mark.parametrize("name", ["builtin", "fixed"])
def test_an_embed_folder_of_the_previous_code_still_loads(tmp_path, name):
    d = old_folder(tmp_path, name)
    meta = json.loads((d / "index.json").read_text())
    ed = load_embed_dir(d, meta["checkpoint_sha256"], meta["dim"])
    assert ed.features.shape == (12, meta["dim"]) and len(ed.paths) == 12 and str(ed.root) == meta["root"]
    assert ed.labels == [p.split("/")[0] for p in ed.paths]
    spec = ed.input_spec
    assert spec.size == meta["input"]["size"] and spec.resize == meta["input"]["resize"] and spec.fit == "square"
    assert spec.transform().center_crop == (name == "fixed")
    assert json.dumps(spec.to_dict(), indent=2) == json.dumps(meta["input"], indent=2)  # written back unchanged


def test_rows_on_disk_read_as_one_array_whatever_the_index(tmp_path):
    """Rows over memory-mapped parts against the concatenated array: one row, negative rows, slices within, across
    and past the parts, steps, lists out of order, masks, blocks, re-normalised reading; out of range refused."""
    from isif.collection.rows import Rows

    rng = np.random.default_rng(0)
    z = rng.normal(size=(23, 5)).astype(np.float32) * 3
    parts = []
    for i, (lo, hi) in enumerate([(0, 7), (7, 8), (8, 23)]):
        np.save(tmp_path / f"{i}.npy", z[lo:hi])
        parts.append(np.load(tmp_path / f"{i}.npy", mmap_mode="r"))
    r = Rows(parts)
    assert r.shape == (23, 5) and len(r) == 23 and np.array_equal(np.asarray(r), z)
    for key in (0, 7, 22, -1, -23, slice(5, 9), slice(0, 23), slice(20, 99), slice(3, 3), slice(1, 20, 4),
                [22, 0, 7, 7, 8], np.array([3]), z[:, 0] > 0):
        assert np.array_equal(r[key], z[key]), key
    assert np.array_equal(np.concatenate([b for _, b in r.blocks(6)]), z)
    assert [s for s, _ in r.blocks(6)] == [0, 6, 12, 18]
    u = Rows(parts, unit=True)
    assert np.allclose(u[[4, 9]], unit_rows(z[[4, 9]])) and np.allclose(np.linalg.norm(u[2:12], axis=1), 1, atol=1e-6)
    for bad in (23, -24, [0, 23]):
        with pytest.raises(IndexError):
            r[bad]
