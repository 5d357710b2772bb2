"""STL-10 reader, linear probe, presets for the ablations, the race and the similarity figure."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from isif.base.errors import UserError
from isif.cli import main
from isif.data.registry import DataConfig
from isif.data.registry import load_dataset as _load_dataset
from isif.evaluate.linear import LinearRecipe, linear_probe
from isif.training.presets import resolve

from .conftest import write_image_tree


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
    labels = torch.from_numpy(y.astype(np.int64) - 1)
    # train+unlabeled (the 105K set): training on the labelled images then the unlabelled ones (label -1), the kNN
    # bank exactly the labelled images with their labels, the test set unchanged
    both = load_dataset("stl10", str(folder), split="train+unlabeled")
    assert torch.equal(both.train.images, torch.from_numpy(np.concatenate([images["train"], images["unlabeled"]])))
    assert torch.equal(both.train.labels, torch.cat([labels, torch.full((5,), -1)]))
    assert torch.equal(both.bank.images, torch.from_numpy(images["train"])) and torch.equal(both.bank.labels, labels)
    assert torch.equal(both.test.images, s.test.images) and torch.equal(both.test.labels, s.test.labels)
    unl = load_dataset("stl10", str(folder), split="unlabeled")
    assert torch.equal(unl.train.images, torch.from_numpy(images["unlabeled"])) and (unl.train.labels == -1).all()
    assert torch.equal(unl.bank.images, torch.from_numpy(images["train"])) and torch.equal(unl.bank.labels, labels)


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
    base = resolve("cifar10").to_dict()
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
        d = resolve(name).validate().to_dict()
        diff = {(sec, k): v for sec in d if isinstance(d[sec], dict) for k, v in d[sec].items() if base[sec][k] != v}
        assert diff == changes, name
    assert resolve("stl10-105k").data.split == "train+unlabeled" and resolve("stl10").data.dataset == "stl10"


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
        name = "**isif**" if m == "isif" else m  # each method's row: its own kNN after each epoch
        assert f"| {name} | {rows[0]['knn_top1']:.2f} | {rows[1]['knn_top1']:.2f} | " in table, (m, table)
    (untrained,) = [json.loads(x) for x in (out / "random" / "metrics.jsonl").read_text().splitlines()]
    k = untrained["knn_top1"]
    assert untrained["epoch"] == 0 and f"| random (untrained) | {k:.2f} | {k:.2f} | 0 |" in table
    # a rerun reuses finished runs: same table, no retraining
    mtime = (out / "isif" / "checkpoints" / "last.pt").stat().st_mtime_ns
    code, stdout2, err = _cli(capsys, *args)
    assert code == 0 and (out / "isif" / "checkpoints" / "last.pt").stat().st_mtime_ns == mtime
    code, _, err = _cli(capsys, "race", "--methods", "isif,nope", "--out", str(tmp_path / "x"))
    assert code == 2 and "unknown method(s) nope" in err


def _tree(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 32, 32) floats in [0, 1], class index) of the PNGs under ``folder``: classes in sorted name order."""
    from PIL import Image

    files = sorted(folder.rglob("*.png"))
    names = sorted({f.parent.name for f in files})
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    return x.float() / 255, torch.tensor([names.index(f.parent.name) for f in files])


def _checkpoint_net(run: Path):
    """(the run's network in eval mode, a function normalising [0, 1] images by its recorded input recipe)."""
    from isif.training.checkpoint import load_trained, resolve_checkpoint

    model, _, state = load_trained(resolve_checkpoint(run), "cpu")
    mean = torch.tensor(state["input"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(state["input"]["std"]).view(1, 3, 1, 1)
    return model.eval(), lambda x: (x - mean.to(x.dtype)) / std.to(x.dtype)


def test_linear_eval_and_similarity_plot_from_a_run(capsys, tmp_path, image_tree):
    run = tmp_path / "run"
    code, _, err = _cli(capsys, "train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data", str(image_tree),
                        "--width", "0.03125", "--batch-size", "8", "--knn-k", "5", "--epochs", "1", "--out", str(run),
                        "--quiet")
    assert code == 0, err
    code, out, err = _cli(capsys, "eval", "linear", "--checkpoint", str(run), "--epochs", "5", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["backbone_unchanged"] is True and res["feature_dim"] == 16 and res["features"] == "backbone"
    # the probe of the pooled backbone features of the train images (the bank), tested on the test images
    model, norm = _checkpoint_net(run)
    (xb, yb), (xt, yt) = _tree(image_tree / "train"), _tree(image_tree / "test")
    with torch.no_grad():
        fb, ft = model.backbone(norm(xb)), model.backbone(norm(xt))
    want = linear_probe(fb, yb, ft, yt, 4, LinearRecipe(epochs=5))
    assert (res["linear_top1"], res["linear_train_top1"]) == pytest.approx((want["test_top1"], want["train_top1"]))
    code, out, err = _cli(capsys, "plot", "similarity", str(run), "--compare", str(run), "--images", "20",
                          "--out", str(tmp_path / "sim.png"))
    assert code == 0, err
    assert (tmp_path / "sim.png").stat().st_size > 1000 and out.count(f"{run.name}: positives mean ") == 1
    code, _, err = _cli(capsys, "plot", "similarity", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err


def test_similarity_means_are_the_cosines_of_the_features(capsys, tmp_path):
    """Without augmentation both views of an image are its test view: every positive is cos(z, z) = 1; with two
    test images the negatives pair one with the other, so their mean is z0 . z1."""
    from isif.collection.similarity import similarity_figure

    tree = write_image_tree(tmp_path / "tree", n_classes=2, train_per_class=8, test_per_class=1)
    run = tmp_path / "run"
    code, _, err = _cli(capsys, "train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data", str(tree),
                        "--width", "0.03125", "--batch-size", "8", "--knn-k", "5", "--epochs", "1", "--crop-scale",
                        "none", "--jitter", "none", "--grayscale-p", "0", "--no-flip", "--out", str(run), "--quiet")
    assert code == 0, err
    model, norm = _checkpoint_net(run)
    x, _ = _tree(tree / "test")
    with torch.no_grad():
        z = model.double()(norm(x.double()))
    neg = float(z[0] @ z[1])
    assert abs(neg) < 0.999  # two distinct embeddings: a negative mean unlike the positives'
    stats = similarity_figure([str(run)], tmp_path / "a.png", images=2)
    assert stats == {"run": {"pos_mean": pytest.approx(1.0, abs=1e-5), "neg_mean": pytest.approx(neg, abs=1e-5)}}
    code, out, err = _cli(capsys, "plot", "similarity", str(run), "--images", "2", "--out", str(tmp_path / "b.png"))
    assert code == 0, err
    lines = out.splitlines()
    printed = re.fullmatch(r"run: positives mean (-?[0-9.]+), negatives mean (-?[0-9.]+)", lines[0])
    assert printed and lines[1:] == [f"wrote {tmp_path / 'b.png'}"], out
    assert float(printed[1]) == pytest.approx(1.0, abs=6e-4) and float(printed[2]) == pytest.approx(neg, abs=6e-4)


def test_stl10_105k_style_training_uses_labelled_bank(tmp_path, monkeypatch):
    """stl10-105k trains on train + unlabeled (5K + 100K images on the real data; 6 + 10 here) and evaluates kNN
    against the labelled train images only."""
    import isif.evaluate.protocol as protocol
    import isif.training.loop as train_mod

    folder, images = write_stl10(tmp_path, n_train=6, n_test=4, n_unl=10)
    cfg = resolve("stl10-105k")
    cfg.data.path = str(folder)
    cfg.model.width = 0.03125
    cfg.train.batch_size = 4
    cfg.train.epochs = 1
    cfg.eval.knn_k = 3
    trained, evaluated = [], []
    real_step, real_knn = train_mod.train_step, protocol.evaluate_knn

    def step(parts, x, idx, gen, second=None):
        trained.append((x.cpu().clone(), idx.cpu().clone()))
        return real_step(parts, x, idx, gen, second)

    def knn(model, bank, test, ex, k, sigma, engine="auto"):
        evaluated.append((bank, test, k))
        return real_knn(model, bank, test, ex, k, sigma, engine)

    monkeypatch.setattr(train_mod, "train_step", step)
    monkeypatch.setattr(protocol, "evaluate_knn", knn)
    hist = train_mod.train(cfg, tmp_path / "run", progress=False)
    # trained on all 16 images once (4 steps of 4), each batch the train + unlabeled images at its indices
    pool = torch.from_numpy(np.concatenate([images["train"], images["unlabeled"]]))
    assert len(trained) == 4 and sorted(torch.cat([i for _, i in trained]).tolist()) == list(range(16))
    assert all(torch.equal(x, pool[i]) for x, i in trained)
    # evaluated once, against exactly the 6 labelled images with their labels
    (bank, test, k), = evaluated
    labels = torch.from_numpy(np.fromfile(folder / "train_y.bin", dtype=np.uint8).astype(np.int64) - 1)
    assert torch.equal(bank.images, torch.from_numpy(images["train"])) and torch.equal(bank.labels, labels)
    assert torch.equal(test.images, torch.from_numpy(images["test"])) and k == 3
    assert hist[-1]["knn_top1"] in {100 * c / 4 for c in range(5)}  # 4 test images
    cfg.eval.knn_k = 7  # larger than the 6 labelled images, though there are 16 training images
    with pytest.raises(UserError, match=r"--knn-k 7 is larger than the kNN bank \(6 labelled images\)"):
        train_mod.train(cfg, tmp_path / "run2", progress=False)


def test_spearman_and_ranks_have_known_answers_and_equal_scipys():
    from scipy.stats import spearmanr

    from isif.training.race import ranks, spearman

    assert ranks([3.0, 1.0, 2.0]) == [1.0, 3.0, 2.0] and ranks([5.0, 5.0, 1.0]) == [1.5, 1.5, 3.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(0, 6, 9).astype(float).tolist(), rng.normal(size=9).tolist()
        if len(set(a)) > 1:
            assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


def test_a_race_on_a_folder_without_labels_ranks_by_view_retrieval_and_correlates_with_knn(capsys, tmp_path,
                                                                                           image_tree):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted((image_tree / "train").rglob("*.png"))):
        (flat / f"{i:04d}.png").write_bytes(f.read_bytes())
    out = tmp_path / "race"
    base = ["race", "--preset", "cifar10-tiny", "--dataset", "unlabelled", "--data", str(flat), "--width",
            "0.03125", "--batch-size", "8", "--epochs", "1", "--size", "32", "--holdout", "8", "--quiet",
            "--precision", "fp32"]
    code, stdout, err = _cli(capsys, *base, "--methods", "isif,simclr,barlow-twins", "--out", str(out))
    assert code == 0, err
    table = (out / "race.md").read_text()
    assert table.startswith("view top-1 after each evaluated epoch")  # no labels: view retrieval is raced
    assert "Ranked without labels" in table and "| 1 |" in table and "Spearman" not in table  # no labels: no rho
    # with labelled images to evaluate on, kNN joins and the two rankings are correlated
    code, stdout, err = _cli(capsys, *base, "--methods", "isif,simclr,barlow-twins", "--knn-k", "5", "--eval-data",
                             str(image_tree), "--out", str(tmp_path / "race2"))
    assert code == 0, err
    assert "Spearman's rho between the label-free ranking and the kNN ranking over 3 methods" in stdout
    code, _, err = _cli(capsys, "race", "--methods", "isif", "--out", str(tmp_path / "x"))
    assert code == 2 and "at least two methods" in err and err.count("\n") == 1
