"""The three extensions of the README's "Extending isif", done as written there: a method, a dataset, a backbone.

Each is registered at run time here (the README puts the same lines in the registry files) and trained through
the unchanged loop and command line.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from isif.base.settings import POSITIVE, check_fields, setting
from isif.cli.main import main
from isif.data import registry as data_registry
from isif.data import stream
from isif.data.class_split import Listing, listing
from isif.models import BACKBONES, Backbone, _torchvision
from isif.objectives import Method, build_objective, registry

# ----------------------------------------------------------------------------- a method (README example)


@dataclass
class NTXentSettings:
    temperature: float = setting(0.5, "softmax temperature tau", check=POSITIVE)


class NTXent(nn.Module):
    """NT-Xent (SimCLR): each view must pick its other view out of the 2B - 1 others. z (2B, D) -> scalar."""

    views = ("augment", "augment")

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        check_fields(NTXentSettings(temperature), flags=False)
        self.temperature = temperature

    def on_epoch_start(self, ctx) -> None:
        """Nothing to do per epoch."""

    def forward(self, z: torch.Tensor, instance_idx: torch.Tensor | None = None) -> torch.Tensor:
        n = z.shape[0]
        z = z.float()
        logits = z @ z.t() / self.temperature  # (2B, 2B)
        logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
        return F.cross_entropy(logits, (torch.arange(n, device=z.device) + n // 2) % n)


NTXENT = Method("ntxent", "NT-Xent (SimCLR): symmetric InfoNCE over the batch", NTXentSettings,
                lambda s, c: NTXent(s.temperature))


def test_a_new_method_is_one_module_and_one_registry_line(tmp_path, image_tree, monkeypatch, capsys):
    monkeypatch.setitem(registry._REGISTRY, "ntxent", NTXENT)
    crit = build_objective("ntxent", temperature=0.2)
    z = F.normalize(torch.randn(8, 16, dtype=torch.float64), dim=1)
    ref = 0.0
    for a in range(8):  # naive loop reference, float64
        others = [j for j in range(8) if j != a]
        e = {j: torch.exp(z[a] @ z[j] / 0.2) for j in others}
        ref -= torch.log(e[(a + 4) % 8] / sum(e.values())).item()
    assert abs(crit(z).item() - ref / 8) < 1e-5
    assert main(["train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data", str(image_tree), "--method",
                 "ntxent", "--temperature", "0.3", "--width", "0.03125", "--batch-size", "8", "--knn-k", "5",
                 "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["method"] == {"name": "ntxent", "temperature": 0.3}
    assert "kNN top-1" in capsys.readouterr().out


# ----------------------------------------------------------------------------- a dataset (README example)


def read_csv_listing(root: Path) -> dict[str, Listing]:
    """``images.csv`` with columns path,class,split (split: train or test); paths relative to the folder."""
    rows = list(csv.DictReader((root / "images.csv").open()))
    return {s: listing([(root / r["path"], r["class"]) for r in rows if r["split"] == s]) for s in ("train", "test")}


def test_a_new_dataset_is_one_module_and_one_registry_line(tmp_path, monkeypatch, capsys):
    src = data_registry.Source("csv", stream.streamed("csv", read_csv_listing, "CSV-listed images"),
                               "images listed in images.csv (path,class,split)", streamed=True)
    monkeypatch.setitem(data_registry.SOURCES, "csv", src)
    root = tmp_path / "set"
    rng = np.random.default_rng(0)
    lines = ["path,class,split"]
    for i in range(48):
        c = i % 6
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,c{c},{'train' if c < 3 else 'test'}")
    (root / "images.csv").write_text("\n".join(lines) + "\n")
    assert main(["train", "--preset", "cifar10-tiny", "--dataset", "csv", "--data", str(root), "--size", "32",
                 "--width", "0.03125", "--batch-size", "8", "--epochs", "1", "--workers", "0",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert "unseen classes: R@1" in capsys.readouterr().out


# ----------------------------------------------------------------------------- a backbone (README example)


def test_a_new_backbone_is_one_registry_entry(tmp_path, image_tree, monkeypatch, capsys):
    monkeypatch.setitem(BACKBONES, "resnet34", Backbone("resnet34", _torchvision("resnet34"), 512,
                                                        "torchvision ResNet-34", pretrained=True))
    assert main(["train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data", str(image_tree), "--arch",
                 "resnet34", "--batch-size", "4", "--train-subset", "8", "--test-subset", "8", "--knn-k", "4",
                 "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert "kNN top-1" in capsys.readouterr().out
    monkeypatch.setitem(BACKBONES, "resnet34", Backbone("resnet34", _torchvision("resnet34"), 2048,
                                                        "a wrong declared width", pretrained=True))
    assert main(["train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data", str(image_tree), "--arch",
                 "resnet34", "--out", str(tmp_path / "run2"), "--quiet"]) == 2
    assert "registry says 2048 features, the network has 512" in capsys.readouterr().err
