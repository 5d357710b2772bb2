"""isif train --config FILE: a run's config.json repeats the run, partial JSON/YAML files fill from the preset,
flags override the file, and every mistake in a file is one line naming the key or the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from isif.cli import main
from isif.training.config import Config
from isif.training.presets import resolve

from .test_cli import assert_one_line_error

FIX = Path(__file__).parent / "fixtures"


def tiny_flags(tree, out) -> list[str]:
    return ["--preset", "cifar10-tiny", "--dataset", "folder", "--data", str(tree), "--train-subset", "none",
            "--test-subset", "none", "--width", "0.03125", "--batch-size", "8", "--knn-k", "5", "--epochs", "1",
            "--out", str(out), "--quiet"]


def dry_run(capsys, *argv) -> dict:
    """The resolved config that ``isif train ... --dry-run`` prints."""
    assert main(["train", *argv, "--dry-run", "--quiet"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_runs_config_json_repeats_the_run(tmp_path, image_tree, capsys):
    first = tmp_path / "first"
    assert main(["train", *tiny_flags(image_tree, first), "--lr", "0.05", "--temperature", "0.2"]) == 0
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.json"), "--out", str(again), "--quiet"]) == 0
    assert (again / "config.json").read_text() == (first / "config.json").read_text()
    rows = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (first, again)]
    assert [(r["loss"], r["knn_top1"]) for r in rows[0]] == [(r["loss"], r["knn_top1"]) for r in rows[1]]


def test_flags_override_the_file_and_dry_run_prints_the_result(tmp_path, image_tree, capsys):
    base = dry_run(capsys, *tiny_flags(image_tree, tmp_path / "a"))
    file = write(tmp_path / "run.json", json.dumps(base))
    got = dry_run(capsys, "--config", str(file), "--epochs", "3", "--lr", "0.01", "--no-flip",
                  "--out", str(tmp_path / "b"))
    assert (got["train"]["epochs"], got["optim"]["lr"], got["augment"]["flip"]) == (3, 0.01, False)
    changed = {(s, k) for s in base if isinstance(base[s], dict) for k in base[s] if base[s][k] != got[s][k]}
    assert changed == {("train", "epochs"), ("optim", "lr"), ("augment", "flip")}


def test_a_partial_yaml_file_fills_from_its_preset(tmp_path, image_tree, capsys):
    file = write(tmp_path / "exp.yaml", f"""\
# only what differs from the preset
preset: cifar10-tiny
data: {{dataset: folder, path: {image_tree}, test_subset: none}}   # none clears, as on the command line
optim:
  lr: 1e-2          # YAML 1.2 numbers: 1e-2 is a float
  milestones: [3, 6]
method: {{temperature: 0.2}}
log: {{logger: none, every: 5}}
""")
    got = dry_run(capsys, "--config", str(file), "--out", str(tmp_path / "r"))
    want = resolve("cifar10-tiny")
    want.data.dataset, want.data.path, want.data.test_subset = "folder", str(image_tree), None
    want.optim.lr, want.optim.milestones, want.method.settings.temperature = 0.01, (3, 6), 0.2
    want.log.logger, want.log.every = "none", 5
    assert Config.from_dict(got) == want


def test_without_a_preset_key_the_default_preset_is_the_base(tmp_path, image_tree, capsys):
    file = write(tmp_path / "exp.json", json.dumps({"data": {"dataset": "folder", "path": str(image_tree)},
                                                      "train": {"batch_size": 8}, "eval": {"knn_k": 5}}))
    got = dry_run(capsys, "--config", str(file), "--out", str(tmp_path / "r"))
    assert got["preset"] == "cifar10-cpu" and got["model"]["width"] == 0.25 and got["train"]["batch_size"] == 8


def test_method_from_the_file_and_from_a_flag(tmp_path, image_tree, capsys):
    data = {"dataset": "folder", "path": str(image_tree)}
    triplet = write(tmp_path / "t.json", json.dumps({"preset": "cifar10-tiny", "data": data,
                                                      "method": {"name": "triplet", "margin": 0.3}}))
    got = dry_run(capsys, "--config", str(triplet), "--out", str(tmp_path / "a"))
    assert got["method"] == {"name": "triplet", "margin": 0.3}
    # --method switches; the file's settings of its own method apply where the new one has them
    got = dry_run(capsys, "--config", str(triplet), "--method", "isif", "--out", str(tmp_path / "b"))
    assert got["method"]["name"] == "isif" and "margin" not in got["method"]
    # a file without a method name may hold the settings of the method a flag chooses
    margin = write(tmp_path / "m.json", json.dumps({"preset": "cifar10-tiny", "data": data,
                                                     "method": {"margin": 0.4}}))
    got = dry_run(capsys, "--config", str(margin), "--method", "triplet-hard", "--out", str(tmp_path / "c"))
    assert got["method"] == {"name": "triplet-hard", "margin": 0.4}


def test_an_old_v1_config_and_a_custom_config_are_valid_files(tmp_path, image_tree, capsys):
    old = json.loads((FIX / "presets-main-c7df253.json").read_text())["cifar10-tiny"]  # no "version": v1
    old["data"].update(dataset="folder", path=str(image_tree))
    got = dry_run(capsys, "--config", str(write(tmp_path / "v1.json", json.dumps(old))), "--out", str(tmp_path / "a"))
    want = resolve("cifar10-tiny")
    want.data.dataset, want.data.path = "folder", str(image_tree)
    assert Config.from_dict(got) == want
    custom = Config()  # built in Python: preset "custom", the defaults
    custom.data.dataset, custom.data.path, custom.train.batch_size, custom.eval.knn_k = "folder", str(image_tree), 8, 5
    got = dry_run(capsys, "--config", str(write(tmp_path / "c.json", json.dumps(custom.to_dict()))),
                  "--out", str(tmp_path / "b"))
    assert Config.from_dict(got) == custom


@pytest.mark.parametrize("text, needle", [
    ('{"trian": {}}', "unknown key trian; did you mean train?"),
    ('{"train": {"epoch": 3}}', "unknown key train.epoch; did you mean train.epochs?"),
    ('{"train": {"flip": false}}', "unknown key train.flip; did you mean augment.flip?"),
    ('{"method": {"temprature": 0.1}}', "unknown key method.temprature; did you mean method.temperature?"),
    ('{"method": {"name": "tripplet"}}', "unknown method 'tripplet'; did you mean triplet?"),
    ('{"method": {"margin": 0.3}}', "method.margin is a setting of triplet, triplet-hard, not of method isif"),
    ('{"preset": "cifar10-tiyn"}', "unknown preset 'cifar10-tiyn'; did you mean cifar10-tiny?"),
    ('{"train": {"epochs": "ten"}}', "train.epochs must be an integer or null, got 'ten'"),
    ('{"train": {"batch_size": 8.5}}', "train.batch_size must be an integer, got 8.5"),
    ('{"augment": {"flip": "yes"}}', "augment.flip must be true or false, got 'yes'"),
    ('{"augment": {"jitter": [0.4, 0.4]}}', "augment.jitter must be a list of 4 numbers or null, got [0.4, 0.4]"),
    ('{"optim": {"lr": null}}', "optim.lr must be a number, got null"),
    ('{"train": [1, 2]}', "train must be a mapping of its settings, got a list"),
    ('[1, 2]', "expected a mapping of sections"),
    ('{"version": 9}', "version 9 is not one this isif reads"),
    ('{"train": {"epochs": 3,}\n}', "is not valid JSON: Expecting property name enclosed in double quotes at line 1, "
                                   "column 24"),
    ('{"train": {"epochs": 0}}', "--epochs must be >= 1, got 0"),
])
def test_a_bad_json_file_is_one_line(tmp_path, capsys, text, needle):
    file = write(tmp_path / "bad.json", text)
    code = main(["train", "--config", str(file), "--dry-run", "--out", str(tmp_path / "r")])
    assert_one_line_error(code, capsys.readouterr().err, needle)


@pytest.mark.parametrize("text, needle", [
    ("train:\n  epochs: 3\n bad: [\n", "is not valid YAML: expected <block end>, but found '<block mapping start>' "
                                       "at line 3, column 2"),
    ("optim:\n  lr: [0.1\n", "is not valid YAML"),
    ("data:\n  wokers: 2\n", "unknown key data.wokers; did you mean data.workers?"),
    ("log:\n  logger: mlflow\n", "--logger must be one of tensorboard, wandb, none"),
])
def test_a_bad_yaml_file_is_one_line(tmp_path, capsys, text, needle):
    file = write(tmp_path / "bad.yaml", text)
    code = main(["train", "--config", str(file), "--dry-run", "--out", str(tmp_path / "r")])
    assert_one_line_error(code, capsys.readouterr().err, needle)


def test_config_with_preset_resume_or_a_missing_file_is_one_line(tmp_path, capsys):
    file = write(tmp_path / "c.json", "{}")
    for argv, needle in ((["--config", str(file), "--preset", "cifar10"], "--preset and --config together"),
                         (["--config", str(file), "--resume", str(tmp_path)], "--config starts a new run; --resume"),
                         (["--config", str(tmp_path / "nope.yaml")], "nope.yaml: no such file")):
        code = main(["train", *argv, "--dry-run"])
        assert_one_line_error(code, capsys.readouterr().err, needle)
