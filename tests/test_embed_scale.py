"""isif embed at scale: shards, resuming after kill -9, incremental reruns, workers, torchrun, refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isif.cli import main

from .conftest import write_image_tree


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("embed-run")
    tree = write_image_tree(tmp / "tree")
    out = tmp / "run"
    assert main(["train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data", str(tree), "--width",
                 "0.03125", "--batch-size", "8", "--knn-k", "5", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    return out


def photos(root: Path, n: int, start: int = 0) -> Path:
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        d = root / f"album{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32 + i % 5, 32, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return root


def load(out: Path) -> tuple[np.ndarray, list[str], dict]:
    return (np.load(out / "features.npy"), (out / "paths.txt").read_text().split(),
            json.loads((out / "index.json").read_text()))


def isif(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "isif", *args], capture_output=True, text=True, env=e, timeout=300)


def features_of(out):
    """The feature shards of an embed folder (each has a .pixels.npy beside it)."""
    return [p for p in (out / "shards").glob("*.npy") if not p.name.endswith(".pixels.npy")]


def pixels_of(out):
    return list((out / "shards").glob("*.pixels.npy"))


def test_shards_equal_one_pass_and_workers_change_nothing(run, tmp_path):
    folder = photos(tmp_path / "p", 23)
    assert main(["embed", str(run), str(folder), "--out", str(tmp_path / "one"), "--quiet", "--workers", "0"]) == 0
    assert main(["embed", str(run), str(folder), "--out", str(tmp_path / "sh"), "--quiet", "--shard-size", "5",
                 "--batch-size", "5", "--workers", "2"]) == 0
    z1, p1, m1 = load(tmp_path / "one")
    z2, p2, m2 = load(tmp_path / "sh")
    assert p1 == p2 and len(p1) == 23 and m2["shards"] == 5
    assert len(features_of(tmp_path / "sh")) == 5 and len(pixels_of(tmp_path / "sh")) == 5
    assert np.allclose(z1, z2, atol=1e-6)
    assert m1["checkpoint_sha256"] == m2["checkpoint_sha256"] and m2["input"]["size"] == 32


@pytest.mark.parametrize("site", ["embed-shard:2", "embed-batch:3"])
def test_kill_9_then_rerun_equals_an_uninterrupted_run(run, tmp_path, site):
    folder = photos(tmp_path / "p", 21)
    flags = ["--shard-size", "4", "--batch-size", "2", "--workers", "0", "--quiet"]
    ref = isif("embed", str(run), str(folder), "--out", str(tmp_path / "ref"), *flags)
    assert ref.returncode == 0, ref.stderr
    killed = isif("embed", str(run), str(folder), "--out", str(tmp_path / "k"), *flags, env={"ISIF_FAULT": site})
    assert killed.returncode == -9
    assert not (tmp_path / "k" / "features.npy").exists()
    done = len(list((tmp_path / "k" / "shards").glob("*.json")))
    assert done == (2 if site.startswith("embed-shard") else 1)
    again = isif("embed", str(run), str(folder), "--out", str(tmp_path / "k"), *flags)
    assert again.returncode == 0, again.stderr
    assert f"{21 - 4 * done} new or changed" in again.stdout
    za, pa, _ = load(tmp_path / "ref")
    zb, pb, _ = load(tmp_path / "k")
    assert pa == pb and np.array_equal(za, zb)  # the same shards, the same batches: bit-identical


def test_incremental_rerun_embeds_only_new_and_changed_files(run, tmp_path, capsys):
    folder = photos(tmp_path / "p", 12)
    out = tmp_path / "e"
    flags = ["--out", str(out), "--shard-size", "4", "--workers", "0", "--quiet"]
    assert main(["embed", str(run), str(folder), *flags]) == 0
    z0, p0, _ = load(out)
    for name in ("000", "003", "006", "009"):  # all of the first shard removed
        (folder / "album0" / f"{name}.png").unlink()
    (folder / "album1" / "001.png").unlink()  # 1 removed
    photos(folder, 3, start=100)  # 3 new
    time.sleep(0.01)
    Image.new("RGB", (32, 32), (250, 0, 0)).save(folder / "album2" / "002.png")  # 1 changed
    capsys.readouterr()
    assert main(["embed", str(run), str(folder), *flags]) == 0
    assert "4 new or changed" in capsys.readouterr().out
    z1, p1, m1 = load(out)
    assert len(p1) == 10 and "album0/000.png" not in p1 and "album0/102.png" in p1
    fresh = tmp_path / "fresh"
    assert main(["embed", str(run), str(folder), "--out", str(fresh), "--workers", "0", "--quiet"]) == 0
    zf, pf, _ = load(fresh)
    # equal to embedding the folder as it is now, in the order of stable row ids: the rows kept in their order,
    # then the new and changed files in theirs
    assert sorted(pf) == sorted(p1) and np.allclose(zf[[pf.index(p) for p in p1]], z1, atol=1e-6)
    kept = [p for p in p0 if p in p1 and p != "album2/002.png"]
    assert p1[:len(kept)] == kept and p1[len(kept):] == sorted(p1[len(kept):])
    assert np.allclose(z1[:len(kept)], z0[[p0.index(p) for p in kept]], atol=1e-6)
    # the emptied shard is deleted, its pixel statistics with it
    assert m1["shards"] == 3 and len(features_of(out)) == 3 and len(pixels_of(out)) == 3


def test_refusals_are_one_line(run, tmp_path, capsys, image_tree):
    folder = photos(tmp_path / "p", 6)
    out = tmp_path / "e"
    assert main(["embed", str(run), str(folder), "--out", str(out), "--quiet"]) == 0
    other = tmp_path / "run2"
    shutil.copytree(run, other)
    assert main(["train", "--resume", str(other), "--epochs", "2", "--quiet"]) == 0  # other weights
    capsys.readouterr()
    cases = [
        (["embed", str(other), str(folder), "--out", str(out)], "embeddings of another checkpoint"),
        (["embed", str(run), str(folder), "--out", str(folder / "emb")], "inside the image folder"),
        (["embed", str(run), str(folder), "--shard-size", "0"], "--shard-size must be >= 1"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main(["embed", str(other), str(folder), "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert not (folder / "emb").exists()


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(run, tmp_path):
    folder = photos(tmp_path / "p", 19)
    flags = ["--shard-size", "3", "--batch-size", "3", "--workers", "0", "--quiet", "--device", "cpu"]
    one = isif("embed", str(run), str(folder), "--out", str(tmp_path / "one"), *flags)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "isif",
                          "embed", str(run), str(folder), "--out", str(tmp_path / "two"), *flags],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-2000:]
    za, pa, _ = load(tmp_path / "one")
    zb, pb, mb = load(tmp_path / "two")
    assert pa == pb and np.array_equal(za, zb) and mb["shards"] == 7
