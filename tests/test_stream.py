"""Streamed sources (CUB-200 layout fixture), the paper's 256 -> 227 crops, and the nearest-neighbour positive."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from isif.base.errors import UserError
from isif.cli import main
from isif.data.augment import BatchAugment, PlainTransform, sample_fixed_crop_params
from isif.data.registry import DataConfig, load_dataset
from isif.data.stream import FileImages, load_file, scan
from isif.evaluate.retrieval import nearest_neighbour
from isif.training.sampler import epoch_batches, positive_sources


def load_streaming(name, path, strict=False, workers=None):
    return load_dataset(DataConfig(dataset=name, path=None if path is None else str(path), strict=strict,
                                   workers=workers))


def write_cub(root, n_classes: int = 200, per_class: int = 2, seed: int = 0, broken: bool = False):
    """CUB-200-2011's layout (images.txt, image_class_labels.txt, images/NNN.Name/*.jpg), images of varied size
    whose class shows as a colour."""
    rng = np.random.default_rng(seed)
    colors = rng.integers(30, 225, size=(n_classes, 3))
    lines, labels = [], []
    image_id = 0
    for c in range(1, n_classes + 1):
        d = root / "images" / f"{c:03d}.Bird_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            image_id += 1
            h, w = int(rng.integers(24, 48)), int(rng.integers(24, 48))
            img = np.clip(colors[c - 1][None, None] + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            name = f"{c:03d}.Bird_{c}/Bird_{c}_{k}.jpg"
            Image.fromarray(img).save(root / "images" / name, quality=95)
            lines.append(f"{image_id} {name}")
            labels.append(f"{image_id} {c}")
    if broken:
        (root / "images" / "150.Bird_150" / "Bird_150_0.jpg").write_bytes(b"\xff\xd8 truncated")
        (root / "images" / "003.Bird_3" / "Bird_3_1.jpg").write_bytes(b"")
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return root


def test_file_images_resize_and_slice(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    p = tmp_path / "a.png"
    Image.fromarray(a).save(p)
    x = load_file(str(p), 64)
    ref = np.asarray(Image.fromarray(a).resize((64, 64), Image.BILINEAR))
    assert x.shape == (3, 64, 64) and x.dtype == torch.uint8
    assert torch.equal(x, torch.from_numpy(ref.copy()).permute(2, 0, 1))
    imgs = FileImages([str(p)] * 5, store=64, workers=0)
    assert imgs.shape == (5, 3, 64, 64) and len(imgs[1:3]) == 2
    batches = list(imgs.sequential(2))
    assert [b.shape[0] for b in batches] == [2, 2, 1] and torch.equal(batches[0][1], x)


def test_cub_stream_counts_skips_broken_files_and_strict_names_the_first(tmp_path, capsys):
    root = write_cub(tmp_path / "CUB_200_2011", broken=True)
    splits = load_streaming("cub200", root, workers=0)
    err = capsys.readouterr().err
    assert len(splits.train) == 199 and len(splits.test) == 199  # one broken file on each side
    assert "skipped 1 unreadable image(s) in cub200 train" in err and "Bird_3_1.jpg" in err
    assert "Bird_150_0.jpg" in err
    assert len(splits.train.classes) == 100 and splits.test.classes[0] == "101"
    assert splits.train.images.shape[1:] == (3, 256, 256)
    # the scan is cached: the second load does not decode again (same result, no error)
    assert len(load_streaming("cub200", root, workers=0).train) == 199
    with pytest.raises(UserError, match=r"Bird_3_1\.jpg: unreadable image .*drop --strict"):
        load_streaming("cub200", root, strict=True, workers=0)
    with pytest.raises(UserError, match="missing images.txt, .*; expected the CUB-200-2011 layout"):
        load_streaming("cub200", tmp_path, workers=0)
    with pytest.raises(UserError, match="needs --data PATH"):
        load_streaming("sop", None)


def test_scan_with_workers_matches_without(tmp_path):
    root = write_cub(tmp_path / "c", n_classes=4, per_class=3, broken=False)
    paths = sorted(str(p) for p in (root / "images").rglob("*.jpg"))
    (root / "images" / "001.Bird_1" / "Bird_1_0.jpg").write_bytes(b"GIF89a")
    broken = [str(root / "images" / "001.Bird_1" / "Bird_1_0.jpg")]
    assert scan(paths, workers=2, cache_dir=tmp_path / "a") == scan(paths, workers=0, cache_dir=tmp_path / "b")
    assert scan(paths, workers=2, cache_dir=tmp_path / "a") == broken


def test_fixed_crop_equals_torchvision_crop_and_center_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    aug = BatchAugment(28, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), crop_scale=None, jitter=None, grayscale_p=0.0,
                       flip=True, crop_mode="fixed")
    params = aug.sample(6, 40, 40, g)
    out = aug.apply(x, params)
    for i in range(6):
        t, left = int(params.crop.top[i]), int(params.crop.left[i])
        ref = TF.crop(x[i].float() / 255, t, left, 28, 28)
        if params.flip[i]:
            ref = TF.hflip(ref)
        assert torch.allclose(out[i], ref, atol=1e-5)
    c = sample_fixed_crop_params(20000, 40, 40, 28, torch.Generator().manual_seed(1))
    assert int(c.top.min()) == 0 and int(c.top.max()) == 12  # every position 0..H-size reachable
    assert abs(float(c.left.float().mean()) - 6.0) < 0.1
    plain = PlainTransform(28, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), center_crop=True)
    assert torch.allclose(plain(x), TF.center_crop(x.float() / 255, [28, 28]), atol=1e-6)
    with pytest.raises(ValueError, match="larger than"):
        sample_fixed_crop_params(2, 20, 20, 28)


def test_nearest_neighbour_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(300, 8, generator=g, dtype=torch.float64), dim=1)
    f[7] = f[3]  # a duplicate: 3 and 7 are each other's nearest
    f[11] = f[3]  # and a tie: 3's nearest among {7, 11} is the lower index
    nn_idx = nearest_neighbour(f, chunk_size=64)
    sim = f @ f.t()
    sim.fill_diagonal_(-float("inf"))
    for i in range(300):
        best = sim[i].max()
        assert int(nn_idx[i]) == int(torch.nonzero(sim[i] == best)[0])
    assert int(nn_idx[3]) == 7 and int(nn_idx[7]) == 3 and int(nn_idx[11]) == 3


def test_nearest_neighbour_positive_sources_and_batches():
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    neighbours = (torch.arange(50) + 1) % 50
    assert positive_sources(None, perm, 0.5, 0, 0) is None
    assert torch.equal(positive_sources(neighbours, perm, 1.0, 0, 0), neighbours[perm])
    half = positive_sources(neighbours, perm, 0.5, 0, 3)
    swapped = half != perm
    assert 10 < int(swapped.sum()) < 40 and torch.equal(half[swapped], neighbours[perm][swapped])
    assert torch.equal(half, positive_sources(neighbours, perm, 0.5, 0, 3))  # a function of (seed, epoch)
    assert not torch.equal(half, positive_sources(neighbours, perm, 0.5, 0, 4))
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 3, 2, 2).contiguous()
    got = list(epoch_batches(images, perm, half, 1, 5, 10, slice(0, 10), torch.device("cpu")))
    assert len(got) == 4
    for s, (x, x2) in enumerate(got, start=1):
        assert torch.equal(x[:, 0, 0, 0].long(), perm[s * 10:(s + 1) * 10])
        assert torch.equal(x2[:, 0, 0, 0].long(), half[s * 10:(s + 1) * 10])


def _train_cub(root, out, *extra):
    return main(["train", "--preset", "cub200", "--data", str(root), "--arch", "resnet18_cifar", "--weights", "none",
                 "--width", "0.0625", "--size", "32", "--batch-size", "16", "--epochs", "2", "--eval-every", "1",
                 "--lr", "0.03", "--out", str(out), "--quiet", *extra])


def test_streamed_training_resumes_exactly_and_workers_do_not_change_it(tmp_path, capsys):
    """cub200 preset end to end on the fixture (with the nearest-neighbour positive): workers 0 and 2 give the
    same run, and a run stopped mid-epoch and resumed ends bit-identical."""
    from isif.training import loop as train_mod
    from isif.training.checkpoint import load_checkpoint
    from isif.training.config import Config

    root = write_cub(tmp_path / "CUB_200_2011", n_classes=200, per_class=1)
    assert _train_cub(root, tmp_path / "w0", "--workers", "0") == 0
    out = capsys.readouterr().out
    assert "unseen classes: R@1" in out
    rows = [json.loads(line) for line in (tmp_path / "w0" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["knn_top1"] is None and {"recall@1", "recall@8", "map@r", "nmi"} <= set(rows[-1])
    assert _train_cub(root, tmp_path / "w2", "--workers", "2") == 0
    a, b = load_checkpoint(tmp_path / "w0" / "checkpoints" / "last.pt"), load_checkpoint(
        tmp_path / "w2" / "checkpoints" / "last.pt")
    assert a["neighbours"].shape == (100,) and torch.equal(a["neighbours"], b["neighbours"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["input"]["center_crop"] and a["input"]["resize"] == 256 and a["input"]["size"] == 32
    # interrupt after 8 steps (inside epoch 2: 100 images / 16 = 6 steps per epoch), then resume
    cfg = Config.from_dict(a["config"])
    cfg.data.workers = 2
    with pytest.raises(train_mod.Interrupted):
        train_mod.train(cfg, tmp_path / "r", progress=False, stop_after_steps=8)
    assert main(["train", "--resume", str(tmp_path / "r"), "--quiet"]) == 0
    c = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], c["model"][k]), k
    assert c["history"][-1]["recall@1"] == a["history"][-1]["recall@1"]


def test_embed_uses_the_streamed_test_transform(tmp_path):
    """A checkpoint trained on a streamed set embeds files as its evaluation did: 256x256 resize, centre crop."""
    from isif.collection.embedding import Embedder
    from isif.evaluate import extract_features
    from isif.training.checkpoint import load_trained

    root = write_cub(tmp_path / "CUB_200_2011", n_classes=200, per_class=1)
    assert _train_cub(root, tmp_path / "run", "--workers", "0", "--epochs", "1", "--nn-positive", "0") == 0
    model, cfg, state = load_trained(tmp_path / "run")
    splits = load_streaming("cub200", root, workers=0)
    plain = PlainTransform(32, splits.mean, splits.std, center_crop=True)
    ref = extract_features(model, splits.test.images[:20], plain)
    from pathlib import Path

    z, kept, skipped = Embedder(str(tmp_path / "run")).files([Path(p) for p in splits.test.images.paths[:20]])
    assert not skipped and len(kept) == 20
    assert torch.allclose(z, ref, atol=1e-5)


def test_images_folder_split_in_half_converts_odd_modes(tmp_path):
    """`--dataset images` on one folder of class folders: the sorted first half trains, the second tests;
    grey, RGBA, CMYK and 16-bit files are converted, not skipped."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    modes = {"a_grey": "L", "b_rgba": "RGBA", "c_cmyk": "CMYK", "d_16bit": "I;16"}
    for cls, mode in modes.items():
        d = root / cls
        d.mkdir(parents=True)
        for k in range(2):
            if mode == "I;16":
                im = Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16))
                im.save(d / f"{k}.png")
            else:
                im = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert(mode)
                im.save(d / f"{k}.{'jpg' if mode == 'CMYK' else 'png'}")
    splits = load_streaming("images", root, workers=0)
    assert splits.train.classes == ["a_grey", "b_rgba"] and splits.test.classes == ["c_cmyk", "d_16bit"]
    assert len(splits.train) == 4 and len(splits.test) == 4
    x = splits.test.images.take(range(4))
    assert x.shape == (4, 3, 256, 256) and x.dtype == torch.uint8 and int(x[2:].max()) > 0


def test_train_cli_strict_and_bad_layout_end_in_one_line(tmp_path, capsys):
    root = write_cub(tmp_path / "CUB_200_2011", n_classes=200, per_class=1, broken=True)
    out = tmp_path / "run"
    assert _train_cub(root, out, "--workers", "0", "--strict") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreadable image" in err and "drop --strict" in err
    assert not out.exists()  # nothing was created for a refused run
    assert _train_cub(tmp_path, out, "--workers", "0") == 2
    assert "expected the CUB-200-2011 layout" in capsys.readouterr().err
    assert _train_cub(root, out, "--workers", "-1") == 2
    assert "--workers must be >= 0" in capsys.readouterr().err
