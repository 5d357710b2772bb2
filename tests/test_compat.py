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
import shutil
from pathlib import Path

import pytest
import torch

from isif.checkpoint import load_checkpoint
from isif.cli import main
from isif.config import Config
from isif.presets import PRESETS, preset

from .conftest import write_image_tree

FIX = Path(__file__).parent / "fixtures"
OLD = FIX / "main-c7df253-tiny-mid-epoch.pt"


def test_every_preset_of_the_previous_release_resolves_to_the_same_config():
    old = json.loads((FIX / "presets-main-c7df253.json").read_text())
    assert set(old) <= set(PRESETS)  # presets added since are new; none of the old ones may go or change
    for name, d in old.items():
        assert Config.from_dict(d).to_dict() == preset(name).to_dict(), name


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
    assert new["config"]["version"] == 2 and new["epoch"] == 2


def test_old_checkpoint_evaluates_and_exports(tmp_path, capsys):
    tree = write_image_tree(tmp_path / "tree")
    assert main(["eval", "knn", "--checkpoint", str(OLD), "--data", str(tree), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["epoch"] == 1 and 0 <= res["knn_top1"] <= 100
    out = tmp_path / "net.torchscript.pt"
    assert main(["export", str(OLD), "--out", str(out)]) == 0 and out.is_file()


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
