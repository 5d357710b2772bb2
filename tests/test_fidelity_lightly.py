"""Smoke test of benchmarks/fidelity_lightly.py: lightly's SimCLR and isif's, 1 epoch on 256 CIFAR-10 images."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from .conftest import CIFAR_ZIP, requires_cifar

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity_lightly.py"


@pytest.mark.slow
@requires_cifar
def test_simclr_both_sides_evaluated(tmp_path):
    pytest.importorskip("lightly", reason="the lightly side needs `pip install lightly` (in isif[test])")
    spec = importlib.util.spec_from_file_location("fidelity_lightly", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--method", "simclr", "--epochs", "1", "--train-subset", "256", "--test-subset", "100",
            "--data", str(CIFAR_ZIP), "--out", str(tmp_path)]
    assert mod.main(argv) == 0
    result = json.loads((tmp_path / "fidelity-simclr-e1-s0.json").read_text())
    sides = {s["side"]: s for s in result["sides"]}
    assert list(sides) == ["lightly", "isif"]
    for s in sides.values():
        assert math.isfinite(s["knn_top1"]) and 0 <= s["knn_top1"] <= 100
        assert s["train_s"] > 0 and s["images_per_s"] > 0
    # isif's side: the loop's kNN and the script's (the code lightly's side gets) are the same evaluation
    assert sides["isif"]["knn_top1"] == pytest.approx(sides["isif"]["knn_top1_loop"])
    assert (tmp_path / "fidelity-simclr-e1-s0.md").read_text().count("| simclr |") == 2
