"""The training loop: exact resume, run folder contents, divergence, schedules."""

from __future__ import annotations

import json

import pytest
import torch

from isif.base.errors import UserError
from isif.data.augment import PlainTransform
from isif.objectives import methods
from isif.training.checkpoint import load_checkpoint
from isif.training.config import Config
from isif.training.loop import Interrupted, TrainingDiverged, train
from isif.training.optim import lr_at as _lr_at
from isif.training.presets import resolve

from .conftest import use_method


def lr_at(cfg, t):
    return _lr_at(cfg.optim, cfg.train.epochs, t)


def tiny_config(data, **train_kw) -> Config:
    cfg = resolve("cifar10-tiny")
    cfg.data.dataset = "folder"
    cfg.data.path = str(data)
    cfg.data.train_subset = None
    cfg.data.test_subset = None
    cfg.model.width = 0.03125
    cfg.train.batch_size = 8
    cfg.eval.knn_k = 5
    cfg.train.epochs = 3
    for k, v in train_kw.items():
        setattr(cfg.eval if k == "knn_k" else cfg.train, k, v)
    return cfg


def weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


TIMES = ("images_per_s", "train_s", "eval_s", "elapsed_s", "peak_memory_mib")


def strip_times(history):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in history]


def test_run_folder_has_config_metrics_checkpoint_tensorboard_and_curve(tmp_path, image_tree):
    cfg = tiny_config(image_tree, epochs=2)
    hist = train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert (run / "config.json").is_file() and (run / "curve.png").stat().st_size > 1000
    assert any((run / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows == hist
    for key in ("epoch", "knn_top1", "loss", "images_per_s", "elapsed_s"):
        assert key in rows[-1]
    assert 0 <= rows[-1]["knn_top1"] <= 100
    assert Config.from_dict(json.loads((run / "config.json").read_text())) == cfg
    # an existing folder is never overwritten by accident
    with pytest.raises(UserError, match="--resume"):
        train(cfg, run, progress=False)


@pytest.mark.parametrize("stop_after", [4, 6, 9])  # mid-epoch, exactly at an epoch boundary, later
def test_interrupted_then_resumed_run_is_bit_identical(tmp_path, image_tree, stop_after):
    # 64 training images, batch 8: 8 steps per epoch
    cfg = tiny_config(image_tree, epochs=2)
    full = train(cfg, tmp_path / "full", progress=False)
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "cut", progress=False, stop_after_steps=stop_after)
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert strip_times(full) == strip_times(resumed)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert strip_times([json.loads(x) for x in lines]) == strip_times(full)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_paper_variant_trains_with_plain_anchor_view(tmp_path, image_tree, monkeypatch, variant):
    """The paper's anchor (rows 0..B-1 of every step's network input) is the un-augmented test view of the batch,
    exactly; its positive (rows B..2B-1) is augmented. The official variant augments both."""
    import isif.training.step as step
    from isif.data.registry import load_sets

    fed, real = [], step.forward_backward

    def forward_backward(parts, inp, idx, grad=None):
        fed.append((inp.detach().clone(), idx.detach().cpu().clone()))
        return real(parts, inp, idx, grad)

    monkeypatch.setattr(step, "forward_backward", forward_backward)
    cfg = tiny_config(image_tree, epochs=1)
    cfg.set("method.variant", variant)
    hist = train(cfg, tmp_path / "run", progress=False)
    assert [r["epoch"] for r in hist] == [1]
    sets = load_sets(cfg.data)
    plain = PlainTransform(32, sets.splits.mean, sets.splits.std)  # the test transform, built independently
    assert len(fed) == 8  # 64 images, batch 8
    for inp, idx in fed:
        b = len(idx)
        want = plain(sets.train.images[idx])
        assert inp.shape == (2 * b, 3, 32, 32)
        assert torch.equal(inp[:b], want) == (variant == "paper")  # the anchor: plain in the paper variant only
        assert (inp[b:] - want).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every positive is augmented


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, image_tree, monkeypatch):
    cfg = tiny_config(image_tree, epochs=3)
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "run", progress=False, stop_after_steps=8)  # one full epoch, then stops
    good = weights(tmp_path / "run")
    import isif.objectives.isif as mod

    real = mod.InvariantSpreading.forward
    calls = {"n": 0}

    def poisoned(self, z, idx=None):
        calls["n"] += 1
        loss = real(self, z, idx)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(mod.InvariantSpreading, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 2 \(global step 10\).*lower --lr"):
        train(cfg, tmp_path / "run", resume=True, progress=False)
    after = weights(tmp_path / "run")
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_schedules():
    cfg = Config()
    assert lr_at(cfg, 0) == pytest.approx(0.03)
    assert lr_at(cfg, 119.9) == pytest.approx(0.03)
    assert lr_at(cfg, 120) == pytest.approx(0.003)
    assert lr_at(cfg, 170) == pytest.approx(0.0003)
    cfg.optim.schedule = "cosine"
    cfg.optim.warmup_epochs = 2
    assert lr_at(cfg, 0) == 0
    assert lr_at(cfg, 1) == pytest.approx(0.5 * 0.03 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 200)).item()))
    assert lr_at(cfg, 100) == pytest.approx(0.015)
    assert lr_at(cfg, 200) == pytest.approx(0.0)


def test_batch_larger_than_data_and_k_larger_than_data(tmp_path, image_tree):
    cfg = tiny_config(image_tree, batch_size=1000)
    with pytest.raises(UserError, match="batch-size"):
        train(cfg, tmp_path / "a", progress=False)
    cfg = tiny_config(image_tree, knn_k=1000)
    with pytest.raises(UserError, match="knn-k"):
        train(cfg, tmp_path / "b", progress=False)


@pytest.mark.parametrize("method", [m for m, e in methods().items() if e.trains])
def test_every_method_resumes_bit_identically(tmp_path, image_tree, method):
    cfg = use_method(tiny_config(image_tree, epochs=2), method)
    full = train(cfg, tmp_path / "full", progress=False)
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "cut", progress=False, stop_after_steps=11)  # mid-epoch 2
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert_same_run(tmp_path / "full", tmp_path / "cut", full, resumed, ("model", "objective"))


def assert_same_run(a_dir, b_dir, a_hist, b_hist, parts=("model",)) -> dict:
    """Two runs ended with bit-identical ``parts`` of their last checkpoints and the same metrics; returns the
    first run's checkpoint."""
    a = load_checkpoint(a_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(b_dir / "checkpoints" / "last.pt")
    for part in parts:
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert strip_times(a_hist) == strip_times(b_hist)
    return a


def test_random_method_evaluates_once_without_training(tmp_path, image_tree):
    cfg = tiny_config(image_tree, epochs=3)
    cfg.set("method.name", "random")
    hist = train(cfg, tmp_path / "r", progress=False)
    assert len(hist) == 1 and hist[0]["epoch"] == 0 and hist[0]["knn_top1"] is not None


def test_bank_size_mismatch_on_resume_is_a_user_error(tmp_path, image_tree):
    cfg = tiny_config(image_tree, epochs=2)
    cfg.set("method.name", "npsoftmax")
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "r", progress=False, stop_after_steps=3)
    cfg.data.train_subset = 32
    with pytest.raises(UserError, match="bank.memory has shape"):
        train(cfg, tmp_path / "r", resume=True, progress=False)
