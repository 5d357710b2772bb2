"""Unlabelled images as a training set: messy folders and zips, the scan, the holdout, labelled evaluation data,
the default preset, and the promise that the user's folder is never written to."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from isif.cli import main
from isif.data import stream
from isif.data.decode import BadImage, TooLarge, decode_rgb
from isif.data.evaldata import load_eval_data
from isif.data.registry import holdout_count, labelled_layout, split_holdout
from isif.data.stream import FileReader, scan_files
from isif.data.types import ArrayDataset
from isif.data.unlabelled import find_images
from isif.training.presets import default_preset

from .conftest import CIFAR_ZIP, requires_cifar, write_image_tree

TINY = ["--width", "0.0625", "--size", "16", "--batch-size", "8", "--epochs", "1", "--quiet", "--workers", "0",
        "--precision", "fp32", "--eval-batch-size", "64"]


def _two_tone(w: int = 40, h: int = 30) -> Image.Image:
    """Top half red, bottom half blue: which way is up is visible."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, :, 0] = 255
    a[h // 2:, :, 2] = 255
    return Image.fromarray(a)


def _png_with_size(w: int, h: int) -> bytes:
    """A valid PNG header claiming w x h pixels (the pixels themselves are never decoded)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def write_messy_folder(root: Path) -> dict[str, int]:
    """Every kind of file a real photo folder holds; returns the expected counts."""
    rng = np.random.default_rng(0)
    (root / "trip" / "day 1").mkdir(parents=True)
    (root / ".thumbnails").mkdir()
    good = 0
    for i in range(12):  # mixed sizes and aspect ratios
        w, h = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "trip" / f"p{i:02d}.jpg")
        good += 1
    rot = _two_tone().transpose(Image.Transpose.ROTATE_90)  # stored rotated, tagged to be shown upright
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    rot.save(root / "trip" / "phone.JPG", "JPEG", exif=exif.tobytes())
    Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8), "L").save(root / "grey.png")
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).convert("P").save(root / "palette.gif")
    p = Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).convert("P")
    p.info["transparency"] = 0
    p.save(root / "palette_t.png", transparency=0)
    Image.fromarray(rng.integers(0, 255, (24, 24, 4), dtype=np.uint8), "RGBA").save(root / "alpha.png")
    Image.new("CMYK", (24, 24), (10, 200, 30, 0)).save(root / "print.jpg")
    Image.fromarray((rng.integers(0, 65535, (24, 24))).astype(np.uint16)).save(root / "deep16.png")
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "web.webp")
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "old.BMP")
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "scan.tiff")
    frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "trip" / "day 1" / "café_東京.png")
    good += 12
    (root / ".hidden.jpg").write_bytes(b"x")
    Image.new("RGB", (8, 8)).save(root / ".thumbnails" / "t.jpg")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    full = _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "bomb.png").write_bytes(_png_with_size(20000, 20000))  # 400 megapixels: past PIL's hard limit
    (root / "warnbomb.png").write_bytes(_png_with_size(10000, 10000))  # 100 megapixels: PIL would warn and decode
    os.symlink("..", root / "trip" / "loop")  # a folder link back up: must not be followed forever
    return {"good": good, "broken": 2, "large": 2, "hidden": 2, "other": 1}


@pytest.fixture
def messy(tmp_path) -> tuple[Path, dict[str, int]]:
    root = tmp_path / "photos"
    root.mkdir()
    return root, write_messy_folder(root)


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed) and each file's sha256."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = ("link:" + os.readlink(p)) if p.is_symlink() else (
                hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
    return out


# ----------------------------------------------------------------------------- decoding and listing


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(_two_tone().transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif.tobytes(), quality=95)
    arr = decode_rgb(data)
    assert arr.shape == (30, 40, 3)  # upright: landscape again
    assert arr[2, 20, 0] > 200 and arr[2, 20, 2] < 60  # red on top
    assert arr[-3, 20, 2] > 200 and arr[-3, 20, 0] < 60  # blue at the bottom


def test_every_mode_decodes_to_rgb(messy):
    root, _ = messy
    for name in ("grey.png", "palette.gif", "palette_t.png", "alpha.png", "print.jpg", "deep16.png", "web.webp",
                 "old.BMP", "scan.tiff"):
        arr = decode_rgb((root / name).read_bytes(), name)
        assert arr.shape == (24, 24, 3) and arr.dtype == np.uint8, name
    assert decode_rgb((root / "anim.gif").read_bytes())[0, 0].tolist() == [255, 0, 0]  # the first frame
    assert decode_rgb((root / "deep16.png").read_bytes()).std() > 20  # 16-bit scaled down, not clipped to white


def test_decompression_bombs_are_refused_without_decoding():
    for w in (20000, 10000):
        with pytest.raises(TooLarge, match="too large to decode safely"):
            decode_rgb(_png_with_size(w, w), "x.png")
    with pytest.raises(BadImage):
        decode_rgb(b"\xff\xd8\xff garbage", "x.jpg")


def test_find_images_lists_counts_and_survives_link_loops(messy):
    root, want = messy
    found = find_images(root)
    names = [Path(n).name for n in found.names]
    assert len(names) == want["good"] + want["broken"] + want["large"]
    assert "café_東京.png" in names and "phone.JPG" in names and "old.BMP" in names
    assert not any(n.startswith(".") for n in names) and "notes.txt" not in names
    assert found.hidden == want["hidden"] and found.other == want["other"]
    assert found.loops >= 1  # trip/loop -> the root again: entered once
    assert found.names == sorted(found.names)


def test_zip_of_the_folder_lists_and_decodes_the_same(messy, tmp_path):
    root, _ = messy
    z = tmp_path / "photos.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for n in find_images(root).names:
            zf.write(n, str(Path(n).relative_to(root)))
        zf.writestr("__MACOSX/._p00.jpg", b"junk")
        zf.writestr("readme.md", b"x")
    found = find_images(z)
    assert found.archive == str(z) and found.hidden == 1 and found.other == 1
    reader = FileReader(found.archive)
    a = stream.load_file("trip/p03.jpg", 32, "crop", reader)
    b = stream.load_file(str(root / "trip" / "p03.jpg"), 32, "crop")
    assert torch.equal(a, b) and a.shape == (3, 32, 32)


def test_scan_skips_and_counts_then_is_cached(messy, tmp_path, capsys, monkeypatch):
    root, want = messy
    names = find_images(root).names
    res = scan_files(names, workers=0, cache_dir=tmp_path / "c")
    err = capsys.readouterr().err
    assert len(res.bad) == want["broken"] + want["large"]
    assert f"skipped {want['broken']} unreadable image(s)" in err
    assert f"skipped {want['large']} too large to decode safely" in err
    mean, std = res.mean_std()
    assert all(0 < m < 1 for m in mean) and all(0 < s < 0.6 for s in std)

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(stream, "_run_scan", no_decoding)
    again = scan_files(names, workers=0, cache_dir=tmp_path / "c")
    assert again.bad == res.bad and again.short == res.short
    Image.new("RGB", (30, 30)).save(root / "new.png")
    with pytest.raises(AssertionError, match="decoded again"):  # a changed folder is scanned again
        scan_files(find_images(root).names, workers=0, cache_dir=tmp_path / "c")


def test_strict_refuses_the_first_broken_file(messy, tmp_path):
    root, _ = messy
    assert main(["train", "--data", str(root), "--strict", "--out", str(tmp_path / "r"), *TINY]) == 2


def test_fit_keeps_aspect_ratio():
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, 20:40] = 255  # the centre third is white: the centre crop of a wide image
    b = io.BytesIO()
    Image.fromarray(a).save(b, "PNG")
    p = Path(os.environ["ISIF_CACHE"]).parent / "wide.png"
    p.write_bytes(b.getvalue())
    x = stream.load_file(str(p), 20, "crop")
    assert x.shape == (3, 20, 20) and x.float().mean() > 250  # not squashed: only the white centre is kept


# ----------------------------------------------------------------------------- holdout


def test_holdout_counts():
    assert holdout_count(None, 100_000, labelled=False) == 2000
    assert holdout_count(None, 1_000_000, labelled=False) == 5000
    assert holdout_count(None, 300, labelled=False) == 30  # 2% is too few: 10%, at most 64
    assert holdout_count(None, 50_000, labelled=True) == 0
    assert holdout_count(0.1, 500, labelled=True) == 50
    assert holdout_count(123, 500, labelled=False) == 123
    assert holdout_count(0, 500, labelled=False) == 0
    assert holdout_count(None, 12, labelled=False) == 2 and holdout_count(None, 7, labelled=False) == 0
    with pytest.raises(Exception, match="leaves none to train on"):
        holdout_count(500, 500, labelled=False)
    with pytest.raises(Exception, match="whole number"):
        holdout_count(2.5, 500, labelled=False)


def test_holdout_is_seeded_disjoint_and_independent_of_the_run():
    ds = ArrayDataset(torch.arange(200).view(200, 1, 1, 1).expand(200, 3, 1, 1).to(torch.uint8),
                      torch.full((200,), -1), [])
    tr, ho = split_holdout(ds, 20)
    tr2, ho2 = split_holdout(ds, 20)
    a, b = set(tr.images[:, 0, 0, 0].tolist()), set(ho.images[:, 0, 0, 0].tolist())
    assert len(b) == 20 and not a & b and len(a | b) == 200
    assert torch.equal(ho.images, ho2.images)
    assert b != set(range(20))  # drawn, not the first 20


# ----------------------------------------------------------------------------- evaluation data and presets


def test_eval_data_layouts(tmp_path):
    tree = write_image_tree(tmp_path / "tt", n_classes=3, train_per_class=5, test_per_class=4)
    bank, test = load_eval_data(str(tree), side=32, workers=0)
    assert len(bank) == 15 and len(test) == 12 and bank.classes == test.classes == ["class0", "class1", "class2"]
    bank, test = load_eval_data(str(tree / "train"), side=16, workers=0)  # one tree of class folders
    assert bank is None and len(test) == 15 and test.images.shape[1:] == (3, 16, 16)
    with pytest.raises(Exception, match="no labels found"):
        load_eval_data(str(tree / "train" / "class0"), side=16, workers=0)


def test_default_preset_detects_unlabelled_folders(tmp_path, messy):
    root, _ = messy
    tree = write_image_tree(tmp_path / "tt", n_classes=2, train_per_class=2, test_per_class=2)
    assert default_preset(str(root), None, "cpu") == "images-cpu"
    assert default_preset(str(root), None, "cuda") == "images-gpu"
    assert default_preset(str(tree), None, "cpu") == "cifar10-cpu"
    assert default_preset(None, None, "cpu") == "cifar10-cpu"
    assert default_preset(str(tree), "unlabelled", "cpu") == "images-cpu"
    assert labelled_layout(str(tree)) and not labelled_layout(str(root))


def test_eval_protocol_none_evaluates_nothing(tmp_path):
    import json

    root = _photo_folder(tmp_path / "photos", 30)
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "r"), "--eval-protocol", "none", *TINY]) == 0
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "view_top1" not in row and row["knn_top1"] is None and row["loss"] > 0


def test_budget_sets_the_epochs():
    from isif.training.presets import resolve

    t = resolve("images-cpu").train
    assert t.epochs is None and t.resolve_epochs(10_000) == 40 and t.resolve_epochs(1_000_000) == 2
    assert t.resolve_epochs(100) == 200
    t.epochs = 3
    assert t.resolve_epochs(10_000) == 3


@requires_cifar
def test_cifar_zip_is_a_labelled_layout():
    assert labelled_layout(str(CIFAR_ZIP))


# ----------------------------------------------------------------------------- end to end


def test_train_on_a_messy_folder_then_embed_leaves_the_folder_untouched(messy, tmp_path, capsys):
    root, want = messy
    before = snapshot(root)
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(out), "--holdout", "8", *TINY]) == 0
    err = capsys.readouterr().err
    assert "preset images-cpu" not in err  # --quiet: no banner
    import json

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preset"] == "images-cpu" and cfg["data"]["dataset"] == "unlabelled" and cfg["train"]["epochs"] == 1
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("view_top1", "view_top5", "alignment", "uniformity", "rankme", "pos_cos", "neg_cos"):
        assert row[key] is not None, key
    assert 0 <= row["view_top1"] <= row["view_top5"] <= 100 and 1 <= row["rankme"] <= 8
    assert row["knn_top1"] is None
    emb = tmp_path / "emb"
    assert main(["embed", str(out), str(root), "--out", str(emb)]) == 0
    assert main(["cluster", str(emb), "--k", "3"]) == 0
    assert main(["duplicates", str(emb), "--threshold", "0.5"]) == 0
    assert main(["map", str(emb), "--method", "pca"]) == 0
    assert (emb / "clusters.csv").is_file() and (emb / "duplicates.csv").is_file() and (emb / "map.png").is_file()
    assert snapshot(root) == before
    assert main(["cluster", str(emb), "--k", "1000"]) == 2  # more clusters than images


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(20):
        Image.new("RGB", (20 + i, 20), (i * 10, 0, 0)).save(root / f"{i}.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("x")
    notzip = tmp_path / "photos.zip"
    notzip.write_bytes(b"not a zip at all")
    labelled = write_image_tree(tmp_path / "tt", n_classes=2, train_per_class=2, test_per_class=2)
    cases = [
        (["--data", str(empty)], "holds no images"),
        (["--data", str(texts)], "ignored 0 hidden and 1 other"),
        (["--data", str(notzip), "--dataset", "unlabelled"], "not a folder or a .zip"),
        (["--data", str(root), "--holdout", "20"], "leaves none to train on"),
        (["--data", str(root), "--eval-data", str(root)], "no labels found"),
        (["--data", str(root), "--eval-data", str(labelled / "train" / "class0")], "no labels found"),
        (["--data", str(root), "--eval-protocol", "knn"], "needs labelled images: pass --eval-data"),
        (["--data", str(root), "--eval-data", str(labelled / "train"), "--eval-protocol", "knn"],
         "needs a labelled kNN bank"),
    ]
    for extra, message in cases:
        code = main(["train", *extra, "--out", str(tmp_path / "r"), "--overwrite", *TINY])
        err = capsys.readouterr().err.strip()
        assert code == 2, extra
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, (extra, err)


def _photo_folder(root: Path, n: int = 60) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for i in range(n):
        w, h = int(rng.integers(24, 70)), int(rng.integers(24, 70))
        base = rng.integers(0, 255, 3)
        img = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"{i:03d}.{'jpg' if i % 2 else 'png'}")
    return root


def test_unlabelled_run_resumes_exactly_with_its_label_free_metrics(tmp_path):
    from isif.training import loop as train_mod
    from isif.training.checkpoint import load_checkpoint
    from isif.training.config import Config

    root = _photo_folder(tmp_path / "photos")
    flags = [*TINY, "--epochs", "2", "--holdout", "12", "--workers", "1"]
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "a"), *flags]) == 0
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    cfg = Config.from_dict(a["config"])
    cfg.data.workers, cfg.data.memory_gib = 0, 0  # files decoded each epoch without workers: the same run
    with pytest.raises(train_mod.Interrupted):  # 48 images / 8 = 6 steps an epoch: stop inside epoch 2
        train_mod.train(cfg, tmp_path / "b", progress=False, stop_after_steps=8)
    assert main(["train", "--resume", str(tmp_path / "b"), "--quiet"]) == 0
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for key in ("view_top1", "alignment", "uniformity", "rankme", "neg_cos"):
        assert a["history"][-1][key] == b["history"][-1][key], key
    assert a["input"]["fit"] == "crop" and a["input"]["size"] == 16


def test_embed_gives_the_features_training_evaluated(tmp_path):
    """``isif embed`` on an unlabelled run's images computes what its evaluation computed: the same decoding
    (JPEG draft), the same shorter-side fit and centre square, the same normalisation."""
    from isif.collection.embedding import Embedder
    from isif.data.augment import PlainTransform
    from isif.data.registry import DataConfig, load_sets
    from isif.evaluate import extract_features
    from isif.training.checkpoint import load_trained

    root = _photo_folder(tmp_path / "photos", 30)
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "run"), *TINY]) == 0
    model, cfg, state = load_trained(tmp_path / "run")
    cfg.data.memory_gib = 0  # files, to know the held-out images' paths
    sets = load_sets(cfg.data)
    assert isinstance(cfg.data, DataConfig) and sets.holdout is not None
    spec = state["input"]
    ref = extract_features(model, sets.holdout.images, PlainTransform(16, tuple(spec["mean"]), tuple(spec["std"])))
    z, kept, _ = Embedder(str(tmp_path / "run")).files([Path(p) for p in sets.holdout.images.paths])
    assert len(kept) == len(sets.holdout)
    assert torch.allclose(z, ref, atol=1e-5)


def test_decoded_once_equals_the_workers_decoding_and_is_cached(tmp_path, monkeypatch):
    from isif.data import unlabelled

    root = _photo_folder(tmp_path / "photos", 20)
    files = stream.FileImages(find_images(root).names, 24, workers=2, fit="crop")
    once = unlabelled.decoded_once(files, tmp_path / "c")
    assert torch.equal(once, files.take(range(20))) and once.shape == (20, 3, 24, 24)
    monkeypatch.setattr(stream.FileImages, "sequential", lambda *a: (_ for _ in ()).throw(AssertionError("again")))
    assert torch.equal(unlabelled.decoded_once(files, tmp_path / "c"), once)  # from the cache


def test_memory_limit_chooses_between_memory_and_files(tmp_path):
    from isif.data.registry import DataConfig, load_sets
    from isif.data.types import LazyImages

    root = _photo_folder(tmp_path / "photos", 20)
    small = load_sets(DataConfig(dataset="unlabelled", path=str(root), size=16, workers=0, holdout=4))
    files = load_sets(DataConfig(dataset="unlabelled", path=str(root), size=16, workers=0, holdout=4, memory_gib=0))
    assert isinstance(small.train.images, torch.Tensor) and isinstance(files.train.images, LazyImages)
    assert torch.equal(small.holdout.images, files.holdout.images.take(range(4)))


def test_eval_command_on_an_unlabelled_run(tmp_path, capsys):
    root = _photo_folder(tmp_path / "photos", 30)
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "run"), *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "run"), "--k", "5"]) == 2
    assert "trained on unlabelled images: pass --data" in capsys.readouterr().err
    tree = write_image_tree(tmp_path / "tt", n_classes=3, train_per_class=6, test_per_class=3)
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "run"), "--data", str(tree), "--k", "5"]) == 0
    assert main(["eval", "retrieval", "--checkpoint", str(tmp_path / "run"), "--data", str(tree / "train")]) == 0
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "run"), "--data", str(tree / "train"), "--k", "5"]) == 2
    assert "need a labelled bank" in capsys.readouterr().err


def test_a_budgeted_preset_fits_its_batch_to_a_small_folder(tmp_path):
    import json

    root = _photo_folder(tmp_path / "photos", 12)
    out = tmp_path / "r"
    assert main(["train", "--data", str(root), "--out", str(out), "--budget", "30", "--width", "0.0625", "--size",
                 "16", "--workers", "0", "--quiet", "--precision", "fp32"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preset"] == "images-cpu" and cfg["train"]["batch_size"] == 10  # 12 images, 2 held out
    assert cfg["train"]["epochs"] == 3  # round(30 / 10)
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "s"), "--epochs", "1", "--batch-size", "64",
                 "--quiet", "--workers", "0"]) == 2  # a batch the user chose is not changed: refused instead


def test_training_from_a_zip(tmp_path):
    root = _photo_folder(tmp_path / "photos", 24)
    z = tmp_path / "photos.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(root.iterdir()):
            zf.write(p, f"album/{p.name}")
    assert main(["train", "--data", str(z), "--out", str(tmp_path / "r"), *TINY]) == 0
    assert main(["train", "--data", str(z), "--out", str(tmp_path / "s"), "--memory-gib", "0", *TINY]) == 0
    from isif.training.checkpoint import load_checkpoint

    a = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "s" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # members decoded once or every epoch: the same run
