"""--logger tensorboard|wandb|none and --log-every: step-level scalars that change nothing, resumes that continue
the same logger's step numbering, and loggers that can fail without stopping a run."""

from __future__ import annotations

import json
import shutil
import sys
import time
import types

import pytest
import torch

from isif.cli import main
from isif.config import Config
from isif.train import Interrupted, train

from .test_train import strip_times, tiny_config, weights


def scalars(run, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard tag as TensorBoard shows it (events a killed process wrote after its
    checkpoint purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def next_second() -> None:
    """TensorBoard reads a folder's event files in name order, and a name holds the second it was opened and a
    per-process counter (9 sorts after 10): sessions of one process within one second would read out of order."""
    time.sleep(1.02 - time.time() % 1)


def test_logger_and_log_every_are_settings_that_may_change_on_resume():
    from isif.cli import _ALL, _setting_fields

    flags = _setting_fields(_ALL)
    for flag in ("--logger", "--log-every"):
        (sec, f, _), = flags[flag]
        assert sec == "log" and f.metadata["resume"], flag
    cfg = Config()
    assert (cfg.log.logger, cfg.log.every) == ("tensorboard", None)  # what runs did before the settings
    d = cfg.to_dict()
    del d["log"]  # a config saved before the section existed
    assert Config.from_dict(d).log == cfg.log


def test_step_level_scalars_change_nothing_and_share_the_epochs_step_axis(tmp_path, image_tree):
    plain = train(tiny_config(image_tree, epochs=2), tmp_path / "plain", progress=False)
    cfg = tiny_config(image_tree, epochs=2)  # 64 images, batch 8: 8 steps an epoch
    cfg.log.every = 3
    logged = train(cfg, tmp_path / "logged", progress=False)
    assert strip_times(logged) == strip_times(plain)
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "logged")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [s for s, _ in scalars(tmp_path / "logged", "step/loss")] == [3, 6, 9, 12, 15]
    assert [s for s, _ in scalars(tmp_path / "logged", "train/loss")] == [8, 16]
    for tag in ("step/lr", "step/images_per_s"):
        assert all(v > 0 for _, v in scalars(tmp_path / "logged", tag))
    rows = [json.loads(x) for x in (tmp_path / "logged" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and not any(k.startswith("step") for k in rows[0])


@pytest.mark.parametrize("stop_after", [5, 8])  # mid-epoch; at the end of epoch 1
def test_tensorboard_resume_continues_the_step_numbering(tmp_path, image_tree, stop_after):
    cfg = tiny_config(image_tree, epochs=2)
    cfg.log.every = 1
    train(cfg, tmp_path / "full", progress=False)
    run = tmp_path / "cut"
    with pytest.raises(Interrupted):
        train(cfg, run, progress=False, stop_after_steps=stop_after)
    shutil.copy(run / "checkpoints" / "last.pt", tmp_path / "at-stop.pt")
    next_second()
    train(cfg, run, resume=True, progress=False)
    # a process that logged steps past its checkpoint and was killed: resuming again hides what it logged after
    shutil.copy(tmp_path / "at-stop.pt", run / "checkpoints" / "last.pt")
    next_second()
    train(cfg, run, resume=True, progress=False)
    got, want = scalars(run, "step/loss"), scalars(tmp_path / "full", "step/loss")
    assert [s for s, _ in got] == list(range(1, 17))
    assert got == want  # every step's loss, equal to the uninterrupted run's
    assert [s for s, _ in scalars(run, "train/loss")] == [8, 16]


def test_logger_none_writes_only_metrics(tmp_path, image_tree, capsys):
    cfg = tiny_config(image_tree, epochs=1)
    cfg.log.logger, cfg.log.every = "none", 2
    train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "tensorboard").exists() and (tmp_path / "run" / "metrics.jsonl").is_file()


class FakeWandb(types.ModuleType):
    """The part of wandb isif calls: init(...) -> run with id, log(values, step=), finish()."""

    def __init__(self, fail: str | None = None) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.logged: list[tuple[str, int, dict]] = []
        self.finished = 0
        self.fail = fail

    def init(self, **kw):
        if self.fail == "init":
            raise RuntimeError("no network\nsecond line")
        self.inits.append(kw)
        fake, run_id = self, kw.get("id") or "fake0001"

        class Run:
            id = run_id

            def log(self, values, step=None):
                if fake.fail == "log":
                    raise ConnectionError("server went away")
                fake.logged.append((run_id, step, dict(values)))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_gets_the_config_the_steps_and_the_same_run_on_resume(tmp_path, image_tree, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    cfg = tiny_config(image_tree, epochs=2)
    cfg.log.logger, cfg.log.every = "wandb", 4
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(cfg, run, progress=False, stop_after_steps=5)
    assert (run / "wandb-id").read_text() == "fake0001" and not (run / "tensorboard").exists()
    first = fake.inits[0]
    assert first["config"] == json.loads((run / "config.json").read_text()) and first["id"] is None
    assert first["dir"] == str(run) and fake.finished == 1
    train(cfg, run, resume=True, progress=False)
    again = fake.inits[1]
    assert again["id"] == "fake0001" and again["resume"] == "allow" and fake.finished == 2
    steps = [(step, sorted(v)) for _, step, v in fake.logged]
    assert steps == [(4, ["step/images_per_s", "step/loss", "step/lr"]),
                     (8, ["step/images_per_s", "step/loss", "step/lr"]),
                     (8, ["eval/knn_top1", "train/images_per_s", "train/loss", "train/lr"]),
                     (12, ["step/images_per_s", "step/loss", "step/lr"]),
                     (16, ["step/images_per_s", "step/loss", "step/lr"]),
                     (16, ["eval/knn_top1", "train/images_per_s", "train/loss", "train/lr"])]
    assert {run_id for run_id, _, _ in fake.logged} == {"fake0001"}


@pytest.mark.parametrize("fail", ["init", "log"])
def test_a_failing_logger_is_one_warning_and_the_run_goes_on(tmp_path, image_tree, monkeypatch, capsys, fail):
    plain = train(tiny_config(image_tree, epochs=2), tmp_path / "plain", progress=False)
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb(fail=fail))
    cfg = tiny_config(image_tree, epochs=2)
    cfg.log.logger, cfg.log.every = "wandb", 2
    hist = train(cfg, tmp_path / "run", progress=False)
    assert strip_times(hist) == strip_times(plain)
    warnings = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(warnings) == 1 and warnings[0].startswith("isif: warning: wandb logging failed"), warnings
    assert "training continues" in warnings[0]


def test_a_failing_tensorboard_is_one_warning(tmp_path, image_tree, monkeypatch, capsys):
    from isif import runlog

    def broken(self, values, step, flush):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runlog._TensorBoard, "scalars", broken)
    hist = train(tiny_config(image_tree, epochs=2), tmp_path / "run", progress=False)
    assert [r["epoch"] for r in hist] == [1, 2]
    err = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert err == ["isif: warning: tensorboard logging failed (OSError: [Errno 28] No space left on device); "
                   "training continues without it"]


def test_missing_wandb_is_a_one_line_install_error(tmp_path, image_tree, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    code = main(["train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data", str(image_tree),
                 "--logger", "wandb", "--dry-run", "--out", str(tmp_path / "run")])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0] == ("isif: error: --logger wandb needs the wandb package: pip install 'isif[wandb]' (or use "
                      "--logger tensorboard)")
    assert not (tmp_path / "run").exists()


def test_bad_logger_values_are_one_line(capsys):
    for argv, needle in ((["--logger", "mlflow"], "--logger must be one of tensorboard, wandb, none"),
                         (["--log-every", "-1"], "--log-every must be >= 0")):
        assert main(["train", "--preset", "cifar10-tiny", *argv, "--dry-run"]) == 2
        assert needle in capsys.readouterr().err


def test_real_wandb_offline_resumes_the_same_run(tmp_path, image_tree, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install 'isif[wandb]')")
    for var, sub in (("WANDB_DIR", "dir"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls = []
    real_log = wandb.sdk.wandb_run.Run.log

    def log(self, data, step=None, **kw):
        calls.append((self.id, step))
        return real_log(self, data, step=step, **kw)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
    cfg = tiny_config(image_tree, epochs=2)
    cfg.log.logger, cfg.log.every = "wandb", 3
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(cfg, run, progress=False, stop_after_steps=5)
    run_id = (run / "wandb-id").read_text()
    hist = train(cfg, run, resume=True, progress=False)
    assert (run / "wandb-id").read_text() == run_id and [r["epoch"] for r in hist] == [1, 2]
    assert {i for i, _ in calls} == {run_id}
    assert [s for _, s in calls] == [3, 6, 8, 9, 12, 15, 16]
    assert len(list((tmp_path / "wandb" / "dir").glob(f"wandb/offline-run-*-{run_id}"))) == 2  # one per process
