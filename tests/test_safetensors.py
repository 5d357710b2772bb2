"""Weights without pickles: isif export --format safetensors, read back by load_model and --weights."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from isif import UserError, embed, load_model
from isif.base.files import sha256_file
from isif.cli import main
from isif.models import ModelConfig, build_model
from isif.models.weights import read_state_dict, write_safetensors
from isif.training.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run in bf16 with channels_last: the export must carry both."""
    from tests.conftest import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("safetensors"), "--precision", "bf16", "--channels-last")


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.safetensors"
    assert main(["export", str(run[0]), "--format", "safetensors", "--out", str(out)]) == 0
    return out


def test_the_export_holds_the_weights_and_the_recipe(run, exported):
    ckpt = run[0] / "checkpoints" / "last.pt"
    state, meta = read_state_dict(exported, need_metadata=True)
    stored = load_checkpoint(ckpt)
    assert sorted(state) == sorted(stored["model"])  # the network only: no optimiser, no objective
    assert all(torch.equal(state[k], stored["model"][k].contiguous()) for k in state)
    assert all(state[k].dtype == stored["model"][k].dtype for k in state)
    assert meta == json.loads(exported.with_name(exported.name + ".json").read_text())  # the same JSON beside it
    assert meta["format_version"] == 1 and meta["checkpoint_sha256"] == sha256_file(ckpt)
    assert meta["model"]["arch"] == "resnet18_cifar" and meta["model"]["width"] == 0.03125
    assert meta["precision"] == "bf16" and meta["channels_last"] is True and meta["isif_version"]
    assert meta["input"]["size"] == 32 and len(meta["input"]["mean"]) == 3 and meta["input"]["fit"] == "square"


def test_export_then_load_gives_identical_outputs(run, exported):
    a, b = load_model(run[0]), load_model(exported)
    assert (b.precision, b.channels_last, b.config) == ("bf16", True, None)
    assert a.input_spec == b.input_spec and a.model_config == b.model_config
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(a.network(x), b.network(x))
    files = sorted((run[1] / "test").rglob("*.png"))[:6]
    assert torch.equal(embed(a, files), embed(b, files))  # bf16 autocast and channels_last, as the run


def test_the_default_output_lies_beside_the_checkpoint(run, exported, capsys):
    capsys.readouterr()
    assert main(["export", str(run[0]), "--format", "safetensors"]) == 0
    path = run[0] / "checkpoints" / "last.safetensors"
    spec = run[0] / "checkpoints" / "last.safetensors.json"
    # the same checkpoint exported to --out: the same tensors and metadata (the safetensors header's key order
    # is not fixed, so not byte for byte), and the same JSON beside it
    (got, got_meta), (want, want_meta) = read_state_dict(path, need_metadata=True), read_state_dict(exported)
    assert got_meta == want_meta and sorted(got) == sorted(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    assert spec.read_bytes() == exported.with_name(exported.name + ".json").read_bytes()
    out = capsys.readouterr().out
    assert out.startswith(f"exported safetensors to {path} ") and f"input recipe in {spec}\n" in out


def _tv_meta(arch: str) -> dict:
    return {"format_version": 1, "model": {"arch": arch, "dim": 16},
            "input": {"size": 64, "mean": [0.5] * 3, "std": [0.25] * 3}}


def test_weights_accepts_safetensors_state_dicts_and_isif_exports(tmp_path):
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    save_file(ref.state_dict(), str(tmp_path / "r18.safetensors"))
    m = build_model(ModelConfig("resnet18", weights=str(tmp_path / "r18.safetensors")))
    assert torch.equal(m.backbone.conv1.weight, ref.conv1.weight)
    assert torch.equal(m.backbone.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)

    net = build_model(ModelConfig("resnet18", dim=16))  # an isif export: backbone.* used, head.* not
    write_safetensors(tmp_path / "export.safetensors", net.state_dict(), _tv_meta("resnet18"))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    for name in ("export.safetensors", "plain.safetensors"):
        m2 = build_model(ModelConfig("resnet18", dim=32, weights=str(tmp_path / name)))
        assert all(torch.equal(v, m2.backbone.state_dict()[k]) for k, v in net.backbone.state_dict().items())
        assert m2.head.fc.out_features == 32

    write_safetensors(tmp_path / "other.safetensors", net.state_dict(), _tv_meta("googlenet"))
    with pytest.raises(UserError, match="isif export of googlenet, not resnet18; pass --arch googlenet"):
        build_model(ModelConfig("resnet18", weights=str(tmp_path / "other.safetensors")))
    with pytest.raises(UserError, match="does not fit torchvision's resnet50"):
        build_model(ModelConfig("resnet50", weights=str(tmp_path / "r18.safetensors")))


def test_bad_files_are_one_line_errors_naming_the_fix(tmp_path, exported):
    with pytest.raises(UserError, match="no such file"):
        read_state_dict(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(UserError, match="not a readable safetensors file.*isif export CHECKPOINT --format"):
        read_state_dict(tmp_path / "junk.safetensors")
    torch.save({"w": torch.zeros(2), "cfg": argparse.Namespace(a=1)}, tmp_path / "pickle.pt")
    with pytest.raises(UserError, match="refused, it holds more than weights"):
        read_state_dict(tmp_path / "pickle.pt")

    state, _ = read_state_dict(exported)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bare.safetensors"))
    assert read_state_dict(tmp_path / "bare.safetensors")[1] is None  # fine for --weights
    with pytest.raises(UserError, match="has no isif metadata.*isif export CHECKPOINT --format safetensors"):
        load_model(tmp_path / "bare.safetensors")
    for raw, what in (("{oops", "not valid JSON"), ('{"format_version": 1, "model": {"arch": "x"}}', "no valid model"),
                      ('{"format_version": 9}', "newer isif")):
        save_file({"w": torch.zeros(1)}, str(tmp_path / "bad.safetensors"), metadata={"isif": raw})
        with pytest.raises(UserError, match=what):
            load_model(tmp_path / "bad.safetensors")
    meta = read_state_dict(exported)[1]
    write_safetensors(tmp_path / "wrong.safetensors", state, {**meta, "model": {**meta["model"], "dim": 64}})
    with pytest.raises(UserError, match="the weights do not fit resnet18_cifar"):
        load_model(tmp_path / "wrong.safetensors")


def test_the_cli_refuses_in_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "--format", "safetensors"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("isif: error:") and "does not exist" in err[-1]


def test_a_cifar_run_starts_from_an_export_of_another(run, exported):
    """--weights PATH for resnet18_cifar: an isif export's backbone.* weights, refused at another width."""
    state, _ = read_state_dict(exported)
    net = build_model(ModelConfig(arch="resnet18_cifar", width=0.03125, weights=str(exported)))
    mine = net.backbone.state_dict()
    assert all(torch.equal(mine[k], state[f"backbone.{k}"].to(mine[k].dtype)) for k in mine)
    with pytest.raises(UserError, match=r"does not fit resnet18_cifar width 0.0625: .* has shape"):
        build_model(ModelConfig(arch="resnet18_cifar", width=0.0625, weights=str(exported)))
    with pytest.raises(ValueError, match="no pretrained weights to download"):
        build_model(ModelConfig(arch="resnet18_cifar", weights="imagenet"))
