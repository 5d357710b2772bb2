"""STL-10 reader, linear probe, presets for the ablations, the race and the similarity figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from isif.cli import main
from isif.data.registry import DataConfig
from isif.data.registry import load_dataset as _load_dataset
from isif.errors import UserError
from isif.evaluate.linear import LinearRecipe, linear_probe
from isif.presets import preset


def load_dataset(name, path, split="train"):
    return _load_dataset(DataConfig(dataset=name, path=path, split=split))


def write_stl10(root: Path, n_train=6, n_test=4, n_unl=5, seed=0) -> Path:
    """The stl10_binary layout: uint8 images stored channel by channel, each channel column-major."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    images = {}
    for name, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unl)):
        x = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)  # row-major (N, C, H, W)
        images[name] = x
        x.transpose(0, 1, 3, 2).tofile(folder / f"{name}_X.bin")  # the file stores (N, C, W, H)
        if name != "unlabeled":
            (rng.integers(1, 11, size=n).astype(np.uint8)).tofile(folder / f"{name}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse",
                                                       "monkey", "ship", "truck"]) + "\n")
    return folder, images


def test_stl10_binary_reader_orientation_labels_and_splits(tmp_path):
    folder, images = write_stl10(tmp_path)
    s = load_dataset("stl10", str(tmp_path))
    assert torch.equal(s.train.images, torch.from_numpy(images["train"]))
    assert torch.equal(s.test.images, torch.from_numpy(images["test"]))
    y = np.fromfile(folder / "train_y.bin", dtype=np.uint8)
    assert s.train.labels.tolist() == (y.astype(int) - 1).tolist()
    assert s.train.classes[7] == "monkey" and s.bank is None
    both = load_dataset("stl10", str(folder), split="train+unlabeled")
    assert len(both.train) == 11 and len(both.bank) == 6 and (both.train.labels[6:] == -1).all()
    unl = load_dataset("stl10", str(folder), split="unlabeled")
    assert len(unl.train) == 5 and torch.equal(unl.train.images, torch.from_numpy(images["unlabeled"]))


def test_stl10_errors(tmp_path):
    with pytest.raises(UserError, match="stl10_binary"):
        load_dataset("stl10", str(tmp_path))
    folder, _ = write_stl10(tmp_path)
    with open(folder / "test_X.bin", "ab") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(UserError, match="truncated"):
        load_dataset("stl10", str(folder))
    with pytest.raises(UserError, match="no training split"):
        load_dataset("cifar10", None, split="unlabeled")


def test_stl10_training_pools_the_whole_map(tmp_path):
    from isif.models import ModelConfig, build_model

    model = build_model(ModelConfig("resnet18_cifar", width=0.0625))
    x = torch.zeros(2, 3, 96, 96)
    x[:, :, 80:, 80:] = 5.0  # a signal only in the bottom-right corner of the 12x12 map
    feats = model.backbone.layer4(model.backbone.layer3(model.backbone.layer2(model.backbone.layer1(
        model.backbone.relu(model.backbone.bn1(model.backbone.conv1(x)))))))
    assert feats.shape[-1] == 12
    assert torch.allclose(model.backbone(x), feats.mean(dim=(2, 3)))


def test_linear_probe_separable_and_chance():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.randint(0, 4, (400,), generator=g)
    x = centers[y] + torch.randn(400, 16, generator=g)
    yt = torch.randint(0, 4, (200,), generator=g)
    xt = centers[yt] + torch.randn(200, 16, generator=g)
    res = linear_probe(x, y, xt, yt, 4, LinearRecipe(epochs=20))
    assert res["test_top1"] > 95
    noise = linear_probe(torch.randn(400, 16, generator=g), y, torch.randn(200, 16, generator=g), yt, 4,
                         LinearRecipe(epochs=20))
    assert noise["test_top1"] < 45  # chance is 25%
    # unlabelled rows (label -1) are ignored
    res2 = linear_probe(torch.cat([x, 100 * torch.randn(50, 16)]), torch.cat([y, torch.full((50,), -1)]), xt, yt, 4,
                        LinearRecipe(epochs=20))
    assert res2["test_top1"] == res["test_top1"]


def test_ablation_presets_change_exactly_one_thing():
    base = preset("cifar10").to_dict()
    expected = {
        "cifar10-no-crop": {("augment", "crop_scale"): None},
        "cifar10-no-gray": {("augment", "grayscale_p"): 0.0},
        "cifar10-no-jitter": {("augment", "jitter"): None},
        "cifar10-no-flip": {("augment", "flip"): False},
        "cifar10-hard50": {("method", "negatives"): "hard"},
        "cifar10-easy50": {("method", "negatives"): "easy"},
        "cifar10-no-aug": {("augment", "crop_scale"): None, ("augment", "jitter"): None,
                           ("augment", "grayscale_p"): 0.0, ("augment", "flip"): False},
    }
    for name, changes in expected.items():
        d = preset(name).validate().to_dict()
        diff = {(sec, k): v for sec in d if isinstance(d[sec], dict) for k, v in d[sec].items() if base[sec][k] != v}
        assert diff == changes, name
    assert preset("stl10-105k").data.split == "train+unlabeled" and preset("stl10").data.dataset == "stl10"


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_race_trains_every_method_and_writes_figure_and_table(capsys, tmp_path, image_tree):
    out = tmp_path / "race"
    args = ["race", "--preset", "cifar10-tiny", "--methods", "random,isif,npsoftmax", "--dataset", "folder",
            "--data", str(image_tree), "--width", "0.03125", "--batch-size", "8", "--knn-k", "5", "--epochs", "2",
            "--out", str(out), "--quiet", "--precision", "fp32"]
    code, stdout, err = _cli(capsys, *args)
    assert code == 0, err
    table = (out / "race.md").read_text()
    assert "| isif |" not in table and "| **isif** |" in table and "random (untrained)" in table
    assert "ep 1 | ep 2" in table and (out / "race.png").stat().st_size > 1000
    for m in ("isif", "npsoftmax"):
        rows = [json.loads(x) for x in (out / m / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2]
    # a rerun reuses finished runs: same table, no retraining
    mtime = (out / "isif" / "checkpoints" / "last.pt").stat().st_mtime_ns
    code, stdout2, err = _cli(capsys, *args)
    assert code == 0 and (out / "isif" / "checkpoints" / "last.pt").stat().st_mtime_ns == mtime
    code, _, err = _cli(capsys, "race", "--methods", "isif,nope", "--out", str(tmp_path / "x"))
    assert code == 2 and "unknown method(s) nope" in err


def test_linear_eval_and_similarity_plot_from_a_run(capsys, tmp_path, image_tree):
    run = tmp_path / "run"
    code, _, err = _cli(capsys, "train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data", str(image_tree),
                        "--width", "0.03125", "--batch-size", "8", "--knn-k", "5", "--epochs", "1", "--out", str(run),
                        "--quiet")
    assert code == 0, err
    code, out, err = _cli(capsys, "eval", "linear", "--checkpoint", str(run), "--epochs", "5", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["backbone_unchanged"] is True and 0 <= res["linear_top1"] <= 100 and res["feature_dim"] == 16
    code, out, err = _cli(capsys, "plot", "similarity", str(run), "--compare", str(run), "--images", "20",
                          "--out", str(tmp_path / "sim.png"))
    assert code == 0, err
    assert (tmp_path / "sim.png").stat().st_size > 1000 and "positives mean" in out
    code, _, err = _cli(capsys, "plot", "similarity", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err


def test_stl10_105k_style_training_uses_labelled_bank(tmp_path):
    from isif.train import train

    folder, _ = write_stl10(tmp_path, n_train=6, n_test=4, n_unl=10)
    cfg = preset("stl10-105k")
    cfg.data.path = str(folder)
    cfg.model.width = 0.03125
    cfg.train.batch_size = 4
    cfg.train.epochs = 1
    cfg.eval.knn_k = 3
    hist = train(cfg, tmp_path / "run", progress=False)
    assert hist[-1]["knn_top1"] is not None
    cfg.eval.knn_k = 7  # larger than the 6 labelled images, though there are 16 training images
    with pytest.raises(UserError, match="larger than the kNN bank"):
        train(cfg, tmp_path / "run2", progress=False)
