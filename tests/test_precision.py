"""Training paths beyond eager fp32: fp16 with its gradient scaler, ``--deterministic``, ``--compile``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from isif.cli import main
from isif.data.types import ArrayDataset, Splits
from isif.training.checkpoint import load_checkpoint, save_checkpoint
from isif.training.loop import Interrupted, train
from isif.training.presets import resolve
from isif.training.step import build_parts, train_step

from .conftest import train_tiny_run, write_image_tree
from .test_train import assert_same_run, strip_times, tiny_config

STEPS_PER_EPOCH, CUT = 8, 11  # 64 training images, batch 8; the cut falls in the middle of epoch 2


def last(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a, b, where: str = "") -> None:
    """Nested state dicts equal: tensors bit for bit, everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ----------------------------------------------------------------------------- fp16 and its gradient scaler


@pytest.fixture(scope="module")
def fp16_runs(tmp_path_factory):
    """(the config, an uninterrupted 2-epoch fp16 run, its history, a run stopped after 11 steps, a copy of that
    stopped run): the resumes are the tests'."""
    base = tmp_path_factory.mktemp("fp16")
    cfg = tiny_config(write_image_tree(base / "tree"), epochs=2, precision="fp16")
    full = train(cfg, base / "full", progress=False)
    with pytest.raises(Interrupted):
        train(cfg, base / "cut", progress=False, stop_after_steps=CUT)
    shutil.copytree(base / "cut", base / "cut-copy")
    return cfg, base / "full", full, base / "cut", base / "cut-copy"


def test_fp16_run_resumes_bit_exact_with_its_gradient_scaler(fp16_runs):
    _, full_dir, full, cut, _ = fp16_runs
    assert last(cut)["scaler"]["_growth_tracker"] > 0  # the interrupted checkpoint carries the scaler
    assert main(["train", "--resume", str(cut), "--quiet"]) == 0
    a = assert_same_run(full_dir, cut, full, metrics(cut), ("model", "objective"))
    b = last(cut)
    assert_same_state(a["optimizer"], b["optimizer"], "optimizer")
    assert a["scaler"] == b["scaler"]  # scale and growth tracker at the same step
    # the scale did change during the run (fp16 gradients overflowed at 2**16, the step was skipped and the
    # scale halved), and the growth tracker counts steps since the last overflow across the resume: more than
    # the steps the resumed call ran. A scaler started afresh on resume shows in both.
    assert a["scaler"]["scale"] < 2.0**16
    assert a["scaler"]["_growth_tracker"] > 2 * STEPS_PER_EPOCH - CUT
    assert strip_times(full) == strip_times(metrics(cut))


def test_resume_restores_the_scale_and_growth_tracker_from_the_checkpoint(fp16_runs):
    cfg, _, _, _, copy = fp16_runs
    path = copy / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    assert state["scaler"]["growth_interval"] == 2000
    # the resumed call runs 5 steps; from a tracker 5 short of the growth interval the 5th (if none overflows,
    # as none did at the run's own, larger scale) doubles the scale and resets the tracker
    state["scaler"].update(scale=1024.0, _growth_tracker=2000 - (2 * STEPS_PER_EPOCH - CUT))
    save_checkpoint(state, path)
    train(cfg, copy, resume=True, progress=False)
    got = last(copy)["scaler"]
    assert (got["scale"], got["_growth_tracker"]) == (2048.0, 0)


@pytest.mark.parametrize("precision", ["bf16", "fp64"])
def test_bf16_and_fp64_runs_resume_bit_exact(tmp_path, image_tree, precision):
    cfg = tiny_config(image_tree, epochs=2, precision=precision)
    full = train(cfg, tmp_path / "full", progress=False)
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "cut", progress=False, stop_after_steps=CUT)
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    a = assert_same_run(tmp_path / "full", tmp_path / "cut", full, resumed, ("model", "objective"))
    assert_same_state(a["optimizer"], last(tmp_path / "cut")["optimizer"], "optimizer")
    want = torch.float64 if precision == "fp64" else torch.float32  # bf16 is autocast: the weights stay fp32
    assert {v.dtype for v in a["model"].values() if v.is_floating_point()} == {want}
    assert "scaler" not in a  # the gradient scaler is fp16's alone


# ----------------------------------------------------------------------------- --deterministic


def _record_kernel_settings(monkeypatch) -> list[tuple]:
    """Patch the loop's step to record the process-wide kernel settings it runs under."""
    import isif.training.loop as loop

    seen: list[tuple] = []
    real = loop.train_step

    def recording(*args, **kw):
        cudnn = torch.backends.cudnn
        seen.append((torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark))
        return real(*args, **kw)

    monkeypatch.setattr(loop, "train_step", recording)
    return seen


def test_deterministic_is_set_during_the_run_recorded_and_may_change_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # so that the test's end puts back what was there before
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    seen = _record_kernel_settings(monkeypatch)
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark)
    run, _ = train_tiny_run(tmp_path)  # 1 epoch, the default: cuDNN autotuning, any algorithm
    assert seen and set(seen) == {(False, False, True)}
    assert json.loads((run / "config.json").read_text())["train"]["deterministic"] is False
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    seen.clear()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--deterministic", "--quiet"]) == 0
    assert seen and set(seen) == {(True, True, False)}
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert json.loads((run / "config.json").read_text())["train"]["deterministic"] is True
    assert last(run)["config"]["train"]["deterministic"] is True and len(metrics(run)) == 2
    assert (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark) == before


def test_an_operation_without_a_deterministic_kernel_is_one_line_naming_the_fix(tmp_path, monkeypatch, capsys):
    import isif.objectives.isif as mod

    real = mod.InvariantSpreading.forward

    def with_put(self, z, idx=None):  # put_ without accumulate has no deterministic kernel on any device
        torch.zeros(2).put_(torch.tensor([0]), torch.tensor([1.0]))
        return real(self, z, idx)

    monkeypatch.setattr(mod.InvariantSpreading, "forward", with_put)
    run, _ = train_tiny_run(tmp_path)  # without the flag it trains
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--deterministic", "--quiet"]) == 2
    assert capsys.readouterr().err == ("isif: error: --deterministic: put_ has no deterministic kernel on this "
                                       "device; drop --deterministic to run it\n")
    assert not torch.are_deterministic_algorithms_enabled()


# ----------------------------------------------------------------------------- --compile

N_IMAGES, BATCH = 16, 8


def _one_step(compiled: bool) -> tuple[float, dict, dict]:
    """(loss, weights before, weights after) of one ``train_step`` of the smallest network the tests use."""
    cfg = resolve("cifar10-tiny", {"model.width": 0.03125, "model.dim": 16, "train.batch_size": BATCH,
                                   "train.compile": compiled})
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (N_IMAGES, 3, 16, 16), generator=g, dtype=torch.uint8)
    data = ArrayDataset(images, torch.zeros(N_IMAGES, dtype=torch.long), ["x"])
    torch.manual_seed(0)
    parts = build_parts(cfg, Splits(data, data, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), N_IMAGES,
                        torch.device("cpu"))
    assert isinstance(parts.net, torch._dynamo.eval_frame.OptimizedModule) == compiled
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    idx = torch.arange(BATCH) * 2
    loss = train_step(parts, images[idx], idx, torch.Generator().manual_seed(7))
    return loss.item(), before, {k: v.clone() for k, v in parts.model.state_dict().items()}


@pytest.mark.slow  # the first compile of the network's forward and backward: minutes on a 2-core CPU
def test_compiled_step_equals_the_eager_step():
    loss_e, before, eager = _one_step(False)
    loss_c, before_c, compiled = _one_step(True)
    assert_same_state(before, before_c, "initial weights")
    # measured on the 2-core CPU: loss 4.8e-7 apart (relative 1.1e-7), weights at most 3.7e-7 apart
    assert loss_c == pytest.approx(loss_e, rel=1e-6)
    moved = max((eager[k] - before[k]).abs().max().item() for k in eager if eager[k].is_floating_point())
    assert moved > 1e-3  # the step did move the weights, by far more than the tolerance
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=0, atol=2e-6, msg=k)
