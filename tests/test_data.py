"""CIFAR-10 readers in every accepted layout, the decode cache, and the no-data error."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from isif.base.errors import UserError
from isif.data import cifar
from isif.data.decode import BadImage, decode_rgb
from isif.data.registry import SOURCES, labelled_layout
from isif.data.types import Request
from isif.training.presets import default_preset

from .conftest import CIFAR_ZIP, requires_cifar, write_cifar_batches, write_image_tree


def _req(path, cache_dir=None) -> Request:
    return Request(None if path is None else str(path), None if cache_dir is None else str(cache_dir))


def load_cifar10(path, cache_dir=None):
    return cifar.load_cifar10(_req(path, cache_dir))


def load_image_folder(path, cache_dir=None):
    return cifar.load_image_folder(_req(path, cache_dir))


def test_reads_torchvision_batches_folder_and_its_parent(tmp_path):
    folder = write_cifar_batches(tmp_path)
    for path in (folder, tmp_path):
        s = load_cifar10(path, cache_dir=tmp_path / "cache")
        assert s.train.images.shape == (100, 3, 32, 32) and s.train.images.dtype == torch.uint8
        assert s.test.images.shape == (20, 3, 32, 32)
        assert s.train.classes[0] == "airplane" and len(s.train.classes) == 10
    # pixels keep the official row layout: 1024 red, 1024 green, 1024 blue
    import pickle

    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(s.train.images[0].numpy().reshape(-1), raw[b"data"][0])
    assert s.train.labels[:20].tolist() == raw[b"labels"]


def test_reads_image_folder_tree_and_zip_identically(tmp_path):
    tree = write_image_tree(tmp_path / "tree", n_classes=3, train_per_class=4, test_per_class=2)
    a = load_image_folder(tree, cache_dir=tmp_path / "c1")
    zpath = tmp_path / "copy.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(tree.rglob("*.png")):
            zf.write(f, "top/" + str(f.relative_to(tree)))  # a top-level folder above train/ is allowed
    b = load_image_folder(zpath, cache_dir=tmp_path / "c2")
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.train.classes == ["class0", "class1", "class2"]
    assert len(a.train) == 12 and len(a.test) == 6


def test_cache_is_reused_and_keyed_by_content(tmp_path):
    tree = write_image_tree(tmp_path / "tree", n_classes=2, train_per_class=3, test_per_class=1)
    cache = tmp_path / "cache"
    load_image_folder(tree, cache_dir=cache)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    first = files[0].stat().st_mtime_ns
    load_image_folder(tree, cache_dir=cache)
    assert files[0].stat().st_mtime_ns == first  # read, not rebuilt
    # a changed source gets a new entry
    img = next((tree / "train" / "class0").iterdir())
    write_image_tree(tmp_path / "other", n_classes=2, train_per_class=3, test_per_class=1, seed=9)
    shutil.copy(next((tmp_path / "other" / "train" / "class0").iterdir()), img)
    load_image_folder(tree, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 2
    # a corrupt cache file is rebuilt, not trusted
    for f in cache.glob("*.npz"):
        f.write_bytes(b"garbage")
    s = load_image_folder(tree, cache_dir=cache)
    assert len(s.train) == 6


def test_missing_path_and_wrong_layout_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_cifar10(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="not a .zip"):
        load_cifar10(tmp_path / "x.txt")


def test_no_copy_and_no_internet_names_the_flag(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match="--data PATH"):
        load_cifar10(None, cache_dir=tmp_path / "c")


def test_decode_converts_modes_and_rejects_broken_bytes(tmp_path):
    import io

    from PIL import Image

    def encode(im, fmt="PNG"):
        buf = io.BytesIO()
        im.save(buf, fmt)
        return buf.getvalue()

    grey = Image.fromarray(np.full((4, 5), 100, np.uint8), "L")
    rgba = Image.fromarray(np.full((4, 5, 4), 200, np.uint8), "RGBA")
    cmyk = Image.new("CMYK", (5, 4), (0, 0, 0, 0))
    deep = Image.fromarray(np.full((4, 5), 65535, np.uint16))
    for im, fmt in ((grey, "PNG"), (rgba, "PNG"), (cmyk, "JPEG"), (deep, "PNG")):
        arr = decode_rgb(encode(im, fmt))
        assert arr.shape == (4, 5, 3) and arr.dtype == np.uint8
    assert decode_rgb(encode(deep))[0, 0, 0] == 255
    assert decode_rgb(encode(grey))[0, 0].tolist() == [100, 100, 100]
    for bad in (b"", b"not an image", encode(grey)[:20]):
        with pytest.raises(BadImage):
            decode_rgb(bad, "x.png")


@requires_cifar
@pytest.mark.slow
def test_shared_cifar_copy_has_the_real_counts(tmp_path):
    s = load_cifar10(CIFAR_ZIP)
    assert s.train.images.shape == (50000, 3, 32, 32) and s.test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(s.train.labels).tolist() == [5000] * 10
    assert torch.bincount(s.test.labels).tolist() == [1000] * 10
    assert s.train.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                               "truck"]
    sub = s.train.subset(1000)
    assert len(sub) == 1000 and torch.bincount(sub.labels).tolist() == [100] * 10


def test_stratified_subset(tmp_path):
    s = load_image_folder(write_image_tree(tmp_path / "t", n_classes=4, train_per_class=10), cache_dir=tmp_path)
    sub = s.train.subset(8)
    assert torch.bincount(sub.labels).tolist() == [2, 2, 2, 2]
    assert s.train.subset(None) is s.train and s.train.subset(10_000) is s.train


# ----------------------------------------------------------------------------- layout detection, by the registry

MARKED = sorted(n for n, s in SOURCES.items() if s.markers)


@pytest.mark.parametrize("name", MARKED)
def test_a_folder_with_a_sources_markers_is_its_layout(tmp_path, name):
    src = SOURCES[name]
    for m in src.markers:
        (tmp_path / m).touch()
    assert src.detects(tmp_path) and labelled_layout(str(tmp_path)) == src.labelled
    (tmp_path / src.markers[-1]).unlink()  # every marker is needed
    assert not src.detects(tmp_path)


def test_detection_asks_each_of_the_sources(tmp_path):
    def which(p) -> list[str]:
        return sorted(n for n, s in SOURCES.items() if s.detects(p))

    batches = write_cifar_batches(tmp_path / "c", per_batch=10)
    tree = write_image_tree(tmp_path / "tree", n_classes=2, train_per_class=1, test_per_class=1)
    archive = shutil.make_archive(str(tmp_path / "tree"), "zip", tree)
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next((tree / "train" / "class0").iterdir()), flat / "a.png")
    (tmp_path / "x.txt").write_text("hi")
    assert which(batches) == which(batches.parent) == ["cifar10", "folder"]
    assert which(tree) == ["cifar10", "folder", "images"] and which(Path(archive)) == ["cifar10", "folder"]
    assert which(flat) == which(tmp_path / "x.txt") == which(tmp_path / "nope") == []
    assert [labelled_layout(str(p)) for p in (batches, tree, archive, flat)] == [True, True, True, False]


def test_the_sources_say_which_have_labels():
    assert [n for n, s in SOURCES.items() if not s.labelled] == ["unlabelled"]
    assert default_preset(None, "unlabelled", "cpu") == "images-cpu" and default_preset(None, "csv", "cpu") == (
        "cifar10-cpu")  # an unknown name is the config's error to report, not the preset's
