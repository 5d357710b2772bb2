"""timm backbones (--arch timm:NAME): a ResNet, a ConvNeXt, an EfficientNet and a ViT of timm's own tiny test
models, trained a few steps on tiny inputs, resumed bit-exact, embedded, exported; the input recipe from timm's
data config; the one-line refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'isif[timm]')")

from isif.base.errors import UserError  # noqa: E402
from isif.cli import main  # noqa: E402
from isif.models import ModelConfig, build_model, input_recipe, timm_nets  # noqa: E402
from isif.training.loop import Interrupted, train  # noqa: E402
from isif.training.step import input_size  # noqa: E402

from .test_train import assert_same_run, tiny_config  # noqa: E402

MODELS = ["test_resnet", "test_convnext", "test_efficientnet", "test_vit"]


def timm_config(data, name: str, size: int = 32, epochs: int = 2):
    cfg = tiny_config(data, epochs=epochs)
    cfg.model.arch = f"timm:{name}"
    cfg.model.width = 1.0
    cfg.data.size = size
    cfg.data.train_subset = 32  # 4 steps of 8 per epoch
    return cfg


@pytest.mark.parametrize("name", MODELS)
def test_train_resume_embed_and_export(name, tmp_path, image_tree, capsys):
    cfg = timm_config(image_tree, name)
    full = train(cfg, tmp_path / "full", progress=False)
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "cut", progress=False, stop_after_steps=5)  # mid-epoch 2
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    a = assert_same_run(tmp_path / "full", tmp_path / "cut", full, resumed)
    assert any(not torch.equal(v, w) for v, w in zip(a["model"].values(), build_model(cfg.model, 32).state_dict()
                                                      .values(), strict=True))  # it did train
    recipe = timm_nets.data_config(cfg.model.arch)
    assert a["input"]["size"] == 32 and tuple(a["input"]["mean"]) == recipe["mean"]  # timm's, not the data's
    assert tuple(a["input"]["std"]) == recipe["std"]
    # embed a folder with the run's recipe
    run = tmp_path / "full"
    emb = tmp_path / "emb"
    assert main(["embed", str(run), str(image_tree / "test"), "--out", str(emb), "--quiet", "--workers", "0"]) == 0
    z = np.load(emb / "features.npy")
    assert z.shape[1] == 128 and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    assert json.loads((emb / "index.json").read_text())["input"]["mean"] == list(recipe["mean"])
    # export: both formats within 1e-5 of the checkpoint (the command checks it, and refuses otherwise)
    for fmt in ("torchscript", "onnx"):
        capsys.readouterr()
        out = tmp_path / f"model.{fmt}"
        assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0, capsys.readouterr().err
        meta = json.loads(out.with_name(out.name + ".json").read_text())
        assert meta["max_abs_diff"] <= 1e-5 and meta["arch"] == f"timm:{name}"


def test_the_banner_names_the_backbone_and_an_ignored_width(tmp_path, image_tree, capsys):
    cfg = timm_config(image_tree, "test_resnet", epochs=1)
    cfg.model.width = 0.25  # e.g. from a preset made for the built-in network
    train(cfg, tmp_path / "run")
    err = capsys.readouterr().err
    assert "network timm:test_resnet (--width 0.25 does not apply to it);" in err and "at 32px" in err


def test_input_recipe_comes_from_timm_unless_size_is_given(image_tree):
    cfg = timm_config(image_tree, "test_vit", size=None)
    assert input_size(cfg) == 160  # test_vit's own input size
    assert input_recipe(cfg.model) == {"size": 160, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    cfg.data.size = 48
    assert input_size(cfg) == 48
    net = build_model(cfg.model, 48).eval()  # a ViT is built for the run's side
    assert net(torch.rand(2, 3, 48, 48)).shape == (2, 128)
    cfg.model.arch = "resnet18_cifar"
    assert input_recipe(cfg.model) is None  # built-in backbones: the data's size and moments


def test_local_weights_load_and_a_mismatch_names_the_first_key(tmp_path):
    from safetensors.torch import save_file

    src = timm.create_model("test_resnet", num_classes=10)
    state = src.state_dict()
    torch.save(state, tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    x = torch.rand(2, 3, 32, 32)
    src.reset_classifier(0)
    want = src.eval()(x)
    for f in ("w.pt", "w.safetensors"):
        net = build_model(ModelConfig(arch="timm:test_resnet", weights=str(tmp_path / f)))
        assert torch.equal(net.backbone.eval()(x), want)  # the classifier's keys are ignored
    key = next(k for k in state if state[k].dim() == 4)
    bad = dict(state)
    bad[key] = torch.zeros(1, 1, 1, 1)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=f"{key} has shape \\(1, 1, 1, 1\\) in the file"):
        build_model(ModelConfig(arch="timm:test_resnet", weights=str(tmp_path / "bad.pt")))
    del bad[key]
    torch.save(bad, tmp_path / "short.pt")
    with pytest.raises(UserError, match=f"the first: {key}"):
        build_model(ModelConfig(arch="timm:test_resnet", weights=str(tmp_path / "short.pt")))


def test_refusals_are_one_line(tmp_path, image_tree, capsys, monkeypatch):
    def refused(argv: list[str], message: str) -> None:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("isif: error:"), err

    base = ["train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data", str(image_tree), "--size", "32",
            "--out", str(tmp_path / "r"), "--quiet", "--epochs", "1", "--batch-size", "8"]
    refused([*base, "--arch", "timm:convnext_atoo"], "unknown timm model 'convnext_atoo'")
    refused([*base, "--arch", "timm:convnext_atoo"], "closest: convnext_atto")
    # offline (the hub reads HF_HUB_OFFLINE when it is imported: a fresh process)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "isif", *base, "--arch", "timm:test_resnet", "--weights", "imagenet"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "pass --weights PATH" in r.stderr, r.stderr
    refused([*base, "--arch", "timm:test_resnet", "--weights", str(tmp_path / "nothing.safetensors")], "nothing")
    monkeypatch.setitem(sys.modules, "timm", None)
    timm_nets._names.cache_clear()
    try:
        refused([*base, "--arch", "timm:test_resnet"], "pip install 'isif[timm]'")
    finally:
        timm_nets._names.cache_clear()


def test_a_network_the_exporter_cannot_take_names_the_format_that_works(tmp_path, image_tree, capsys,
                                                                         monkeypatch):
    """No small timm model fails to trace here, so the tracer is made to fail as it does on control flow it
    cannot follow; safetensors, which needs no tracing, still works."""
    cfg = timm_config(image_tree, "test_resnet", epochs=1)
    train(cfg, tmp_path / "run", progress=False)

    def untraceable(*args, **kwargs):
        raise torch.jit.TracingCheckError("graph diverged", "data-dependent control flow")

    monkeypatch.setattr(torch.jit, "trace", untraceable)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "timm:test_resnet cannot be exported to torchscript" in err
    assert "--format safetensors works" in err and not (tmp_path / "m.pt").exists()
    assert main(["export", str(tmp_path / "run"), "--format", "safetensors", "--out", str(tmp_path / "m.st")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    good = str(tmp_path / "m.safetensors")
    assert main(["export", str(tmp_path / "run"), "--format", "safetensors", "--out", good]) == 0
