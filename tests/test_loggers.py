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
from isif.training.config import Config
from isif.training.loop import Interrupted, train

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
    from isif.training.config import SECTIONS
    from isif.training.options import setting_fields

    flags = setting_fields(SECTIONS)
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
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "config.json", "curve.png",
                                                                   "metrics.jsonl"]  # no tensorboard/, no wandb
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and not any(k.startswith("step") for k in rows[0])


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
    from isif.training import runlog

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


def wandb_records(path) -> list:
    """The records of a W&B transaction log (RUN-ID.wandb): a 7-byte header (":W&B", magic 0xBEE1, version 0), then
    LevelDB's log format: 32 KiB blocks of chunks, each checksum (crc32 of type byte + data, little endian),
    length (2 bytes), type (1 full, 2 first, 3 middle, 4 last) and data; a record is one protobuf ``Record``."""
    import zlib

    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]
    out, pos, part = [], 7, b""
    while pos < len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, length, kind = int.from_bytes(data[pos:pos + 4], "little"), int.from_bytes(data[pos + 4:pos + 6],
                                                                                         "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        assert len(chunk) == length and zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, (path, pos)
        pos, part = pos + 7 + length, part + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            out.append(rec)
            part = b""
    return out


def wandb_offline_run(folder) -> tuple[object, list[tuple[int, dict]]]:
    """(the run record, [(step, {key: value})] of every history row without W&B's own _keys) of an offline run."""
    (log,) = folder.glob("run-*.wandb")
    records = wandb_records(log)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    rows = [(r.history.step.num, {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
            for r in records if r.WhichOneof("record_type") == "history"]
    return run, [(step, {k: v for k, v in row.items() if not k.startswith("_")}) for step, row in rows]


def test_real_wandb_offline_run_holds_the_config_and_the_metrics(tmp_path, image_tree, monkeypatch):
    """A real offline W&B run, interrupted after 5 steps and resumed: its transaction logs hold the run's
    config.json as config, and per step the scalars of metrics.jsonl (the epochs) and the step-level ones. (An
    offline wandb.init takes about 0.7 s here, finish under 0.1 s: the training is most of the test's time.)"""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'isif[wandb]')")
    from isif.training.optim import lr_at

    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb" / sub))
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the first process: wandb's files in the run folder
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(image_tree, epochs=2)  # 64 images, batch 8: 8 steps an epoch
    cfg.log.logger, cfg.log.every = "wandb", 3
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(cfg, run, progress=False, stop_after_steps=5)
    run_id = (run / "wandb-id").read_text()
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb" / "dir"))  # the resumed one: in $WANDB_DIR
    hist = train(cfg, run, resume=True, progress=False)
    assert (run / "wandb-id").read_text() == run_id and [r["epoch"] for r in hist] == [1, 2]
    (first,) = (run / "wandb").glob(f"offline-run-*-{run_id}")
    (second,) = (tmp_path / "wandb" / "dir" / "wandb").glob(f"offline-run-*-{run_id}")
    config = json.loads((run / "config.json").read_text())
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics == hist
    step_keys, epoch_keys = ["step/images_per_s", "step/loss", "step/lr"], [
        "eval/knn_top1", "train/images_per_s", "train/loss", "train/lr"]
    logged = []
    for folder, steps in ((first, [3]), (second, [6, 8, 9, 12, 15, 16])):
        rec, rows = wandb_offline_run(folder)
        assert (rec.run_id, rec.project, rec.display_name) == (run_id, "isif", "run")
        got = {u.key: json.loads(u.value_json) for u in rec.config.update if u.key != "_wandb"}
        assert got == config  # every section and value of config.json
        assert [s for s, _ in rows] == steps
        logged += rows
    for step, row in logged:
        if step % 8:  # a step-level point: the lr of that step (the step-th, so at epoch time (step - 1) / 8)
            assert sorted(row) == step_keys and row["step/lr"] == pytest.approx(lr_at(cfg.optim, 2, (step - 1) / 8))
            assert row["step/loss"] > 0 and row["step/images_per_s"] > 0
        else:  # the end of an epoch: its metrics.jsonl row
            m = metrics[step // 8 - 1]
            assert sorted(row) == epoch_keys
            assert row == {"train/loss": m["loss"], "train/images_per_s": m["images_per_s"], "train/lr": m["lr"],
                           "eval/knn_top1": m["knn_top1"]}
