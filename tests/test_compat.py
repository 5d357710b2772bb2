"""Runs made before the architecture change still load, resume bit-exactly and evaluate; configs migrate.

Fixtures, written by the code of main at c7df253:
- ``main-c7df253-tiny-mid-epoch.pt``: a run of ``cifar10-tiny`` on ``write_image_tree()`` (width 1/32, dim 16,
  batch 16, kNN k 20, 2 epochs) stopped at epoch 2, step 2 of 4;
- ``main-c7df253-tiny-expected.json``: that run's loss and kNN per epoch when resumed by that same code (equal
  to an uninterrupted run);
- ``presets-main-c7df253.json``: every preset's resolved config as that code wrote it.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from isif.cli import main
from isif.training.checkpoint import load_checkpoint, load_trained
from isif.training.config import Config
from isif.training.presets import PRESETS, resolve

from .conftest import write_image_tree

FIX = Path(__file__).parent / "fixtures"
OLD = FIX / "main-c7df253-tiny-mid-epoch.pt"


def test_every_preset_of_the_previous_release_resolves_to_the_same_config():
    old = json.loads((FIX / "presets-main-c7df253.json").read_text())
    assert set(old) <= set(PRESETS)  # presets added since are new; none of the old ones may go or change
    for name, d in old.items():
        assert Config.from_dict(d).to_dict() == resolve(name).to_dict(), name


def test_old_checkpoint_resumes_to_the_numbers_the_old_code_gave(tmp_path, capsys):
    tree = write_image_tree(tmp_path / "tree")  # the same seeded images the fixture was trained on
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(OLD, run / "checkpoints" / "last.pt")
    assert main(["train", "--resume", str(run), "--data", str(tree), "--quiet"]) == 0
    got = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    want = json.loads((FIX / "main-c7df253-tiny-expected.json").read_text())["history"]
    assert [(r["epoch"], r["loss"], r["knn_top1"]) for r in got] == [
        (r["epoch"], r["loss"], r["knn_top1"]) for r in want]
    new = load_checkpoint(run / "checkpoints" / "last.pt")
    assert new["config"]["version"] == 3 and new["epoch"] == 2


def _tree_images(folder: Path) -> tuple[torch.Tensor, list[str]]:
    """(N, 3, 32, 32) floats in [0, 1] and the class folder of each PNG under ``folder``, in sorted order."""
    files = sorted(folder.rglob("*.png"))
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    return x.double() / 255, [f.parent.name for f in files]


def _knn_top1_reference(q: torch.Tensor, q_cls: list[str], bank: torch.Tensor, bank_cls: list[str], k: int,
                        sigma: float) -> float:
    """The paper's weighted kNN from its formula, in float64: the k most similar bank rows vote exp(s / sigma)."""
    s = q @ bank.T
    right = 0
    for i in range(len(q)):
        votes: dict[str, float] = {}
        for j in sorted(range(len(bank)), key=lambda j: (-float(s[i, j]), j))[:k]:
            votes[bank_cls[j]] = votes.get(bank_cls[j], 0.0) + math.exp(float(s[i, j]) / sigma)
        right += max(votes, key=votes.get) == q_cls[i]
    return 100.0 * right / len(q)


def test_old_checkpoint_evaluates_and_exports(tmp_path, capsys):
    tree = write_image_tree(tmp_path / "tree")
    assert main(["eval", "knn", "--checkpoint", str(OLD), "--data", str(tree), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["epoch"], res["k"], res["sigma"], res["train_images"], res["test_images"]) == (1, 20, 0.1, 64, 24)
    # the checkpoint's network in float64 on the PNGs, normalised by its recorded input recipe
    model, _, state = load_trained(OLD, "cpu")
    net = model.double().eval()
    mean = torch.tensor(state["input"]["mean"], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(state["input"]["std"], dtype=torch.float64).view(1, 3, 1, 1)
    (bank, bank_cls), (test, test_cls) = _tree_images(tree / "train"), _tree_images(tree / "test")
    with torch.no_grad():
        zb, zt = net((bank - mean) / std), net((test - mean) / std)
    want = _knn_top1_reference(zt, test_cls, zb, bank_cls, 20, 0.1)
    assert res["knn_top1"] == pytest.approx(want, abs=1e-9)
    # the export computes that network, normalisation included, on images in [0, 1]
    out = tmp_path / "net.torchscript.pt"
    assert main(["export", str(OLD), "--out", str(out)]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        exported = torch.jit.load(str(out))
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        got, ref = exported(x.float()).double(), net((x - mean) / std)
    assert got.shape == (5, 16) and float((got - ref).abs().max()) <= 1e-5
    assert torch.allclose(got.norm(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-5)  # L2-normalised


def test_old_checkpoint_has_no_checksum_and_still_loads():
    state = load_checkpoint(OLD)
    assert "checksum" not in state and isinstance(state["model"], dict)
    assert all(isinstance(v, torch.Tensor) for v in state["model"].values())


@pytest.mark.parametrize("flag, value", [("--temperature", "0.2"), ("--precision", "fp16")])
def test_settings_that_change_the_run_cannot_change_on_resume(tmp_path, flag, value, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(OLD, run / "checkpoints" / "last.pt")
    assert main(["train", "--resume", str(run), flag, value]) == 2
    assert f"{flag} cannot change on --resume" in capsys.readouterr().err
