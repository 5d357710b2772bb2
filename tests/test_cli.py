"""The command line: one-line errors with exit code 2, and end-to-end runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from isif.cli import main

from .conftest import CIFAR_ZIP, requires_cifar


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, needle):
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("isif: error:") and "Traceback" not in err
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("argv, needle", [
    (["train", "--batch-size", "1"], "--batch-size must be >= 2"),
    (["train", "--temperature", "-0.5"], "--temperature must be > 0"),
    (["train", "--temperature", "0"], "--temperature must be > 0"),
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--data", "/definitely/not/here"], "no such file or folder"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--epochs", "abc"], "invalid int value"),
    (["train", "--epochs", "0"], "--epochs must be >= 1"),
    (["train", "--lr", "-1"], "--lr must be > 0"),
    (["train", "--precision", "fp8"], "--precision must be one of"),
    (["train", "--method", "nope"], "unknown --method 'nope'"),
    (["train", "--variant", "nope"], "--variant must be one of official, paper"),
    (["train", "--margin", "0.3"], "--margin is a setting of triplet, triplet-hard, not of method isif"),
    (["train", "--device", "tpu9"], "--device"),
    (["train", "--resume", "/definitely/not/here"], "nothing to resume"),
    (["train", "--threads", "0"], "--threads must be >= 1"),
    (["nope"], "invalid choice"),
    (["eval", "knn", "--checkpoint", "/definitely/not/here.pt"], "does not exist"),
    (["eval", "knn"], "--checkpoint"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, needle)


# Every command's options are settings: a value outside a field's check is refused before anything is read, in the
# one wording "FLAG must be ..., got VALUE" (the paths below need not exist).
@pytest.mark.parametrize("argv, needle", [
    (["embed", "c.pt", "f", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["embed", "c.pt", "f", "--workers", "-1"], "--workers must be >= 0, got -1"),
    (["search", "c.pt", "q.png", "--gallery", "g", "--k", "0"], "--k must be >= 1, got 0"),
    (["search", "c.pt", "q.png", "--gallery", "g", "--tile", "16"], "--tile must be >= 32, got 16"),
    (["search", "c.pt", "q.png"], "the following arguments are required: --gallery"),
    (["index", "e", "--kind", "flat"], "--kind must be one of auto, exact, ivf, hnsw, ivfpq, ivfpq-hnsw, got 'flat'"),
    (["index", "e", "--ef-search", "0"], "--ef-search must be >= 1, got 0"),
    (["serve", "e", "--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["export", "c.pt", "--format", "keras"], "--format must be one of torchscript, onnx, safetensors, got 'keras'"),
    (["cluster", "e", "--k", "2", "--tile", "8"], "--tile must be >= 16, got 8"),
    (["duplicates", "e", "--block", "0"], "--block must be >= 1, got 0"),
    (["map", "e", "--method", "tsne"], "--method must be one of auto, umap, pca, got 'tsne'"),
    (["eval", "knn", "--checkpoint", "c.pt", "--sigma", "0"], "--sigma must be > 0, got 0.0"),
    (["eval", "retrieval", "--checkpoint", "c.pt", "--ks", "0,4"], "--ks must be one or more values, each >= 1"),
    (["eval", "retrieval", "--checkpoint", "c.pt", "--ks", "a,b"], "expected comma-separated integers"),
    (["eval", "linear", "--checkpoint", "c.pt", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["eval", "linear", "--checkpoint", "c.pt", "--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["eval"], "required: protocol"),
    (["plot", "similarity", "r", "--images", "1"], "--images must be >= 2, got 1"),
    (["race", "--method", "isif"], "isif race takes --methods A,B,C, not --method"),
    (["race", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["bench", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["train", "--config", "a.json", "--resume", "r"], "--config starts a new run"),
    (["train", "--milestones", "x"], "argument --milestones: expected comma-separated integers, got 'x'"),
])
def test_every_commands_range_errors_read_the_same(capsys, argv, needle):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, needle)


def test_options_build_from_their_defaults_and_the_flags():
    from isif.cli import build_parser
    from isif.cli.flags import options_from

    args = build_parser().parse_args(["plot", "similarity", "r", "--compare", "a", "--compare", "b"])
    o = options_from(args, args.command_)
    assert (o.run, o.compare, o.images, o.seed, o.out) == ("r", ["a", "b"], 5000, 0, None)
    args = build_parser().parse_args(["train", "--resume", "--out", "x", "--epochs", "3", "--no-flip"])
    o = options_from(args, args.command_)
    assert (o.resume, o.out, o.settings) == (True, "x", {"train.epochs": 3, "augment.flip": False})
    args = build_parser().parse_args(["search", "c.pt", "q1", "q2", "--gallery", "g"])
    assert options_from(args, args.command_).queries == ["q1", "q2"]


def test_cuda_device_without_cuda_is_a_user_error(capsys, image_tree, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_cli(capsys, "train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data",
                           str(image_tree), "--device", "cuda", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "CUDA is not available")


def test_multi_crop_views_larger_than_the_input_are_refused(capsys):
    code, _, err = run_cli(capsys, "bench", "--preset", "cifar10-tiny", "--method", "dino", "--local-crops", "2",
                           "--local-size", "64", "--steps", "1", "--json")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "local views would be 64 px, larger than the 32 px input; choose --local-size 32 or less" in err


@pytest.mark.parametrize("flags, words", [
    (["--method", "dino", "--local-size", "16"], "--local-size has no effect in this run (dino, recipe own); add "
                                                 "--local-crops N or drop --local-size"),
    (["--method", "byol", "--lars-eta", "0.01"], "--lars-eta has no effect in this run (byol, recipe own); add "
                                                 "--optimizer lars"),
    (["--blur-sigma", "0.5,1"], "--blur-sigma has no effect in this run (isif, recipe own); add --blur-p P"),
    (["--method", "byol", "--solarize-p", "0,0.1,0.2"], "--solarize-p has 3 values but method byol has 2 views"),
    (["--method", "byol", "--solarize-p", "1.5"], "--solarize-p must be in [0, 1], got 1.5"),
    (["--method", "vicreg", "--lars-eta", "0"], "--lars-eta must be > 0, got 0"),
    (["--recipe", "mine"], "--recipe must be one of own, shared"),
])
def test_a_recipe_part_the_run_cannot_use_is_refused(capsys, image_tree, tmp_path, flags, words):
    code, _, err = run_cli(capsys, "train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data",
                           str(image_tree), *flags, "--out", str(tmp_path / "r"), "--dry-run")
    assert_one_line_error(code, err, words)


def test_garbage_checkpoint_is_refused(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    code, _, err = run_cli(capsys, "eval", "knn", "--checkpoint", str(bad))
    assert_one_line_error(code, err, "truncated or not a checkpoint")


def test_train_resume_eval_on_a_folder(capsys, tmp_path, image_tree):
    out = tmp_path / "run"
    common = ["--dataset", "folder", "--data", str(image_tree), "--width", "0.03125", "--batch-size", "8",
              "--knn-k", "5", "--out", str(out), "--quiet"]
    code, stdout, err = run_cli(capsys, "train", "--preset", "cifar10-tiny", "--epochs", "1", *common)
    assert code == 0, err
    assert "kNN top-1" in stdout
    # an existing folder needs --resume or --overwrite
    code, _, err = run_cli(capsys, "train", "--preset", "cifar10-tiny", *common)
    assert_one_line_error(code, err, "--overwrite")
    # resume may extend the epochs but not change the model
    code, _, err = run_cli(capsys, "train", "--resume", str(out), "--width", "0.5")
    assert_one_line_error(code, err, "cannot change on --resume")
    code, stdout, err = run_cli(capsys, "train", "--resume", str(out), "--epochs", "2")
    assert code == 0, err
    assert err.count("isif: resuming") == 1 and "isif: training" not in err  # one banner, the loop's
    assert stdout.count("kNN top-1") == 1 and stdout.strip().endswith(f"run folder: {out}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    code, stdout, err = run_cli(capsys, "eval", "knn", "--checkpoint", str(out), "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["epoch"] == 2 and res["knn_top1"] == pytest.approx(rows[-1]["knn_top1"])
    code, _, err = run_cli(capsys, "eval", "knn", "--checkpoint", str(out), "--k", "100000")
    assert_one_line_error(code, err, "larger than the training set")


def test_console_entry_point_exit_code_and_presets():
    r = subprocess.run([sys.executable, "-m", "isif", "train", "--batch-size", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "isif", "presets"], capture_output=True, text=True)
    assert r.returncode == 0 and "cifar10-cpu" in r.stdout


@requires_cifar
@pytest.mark.slow
def test_end_to_end_on_a_slice_of_the_shared_cifar10_copy(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "isif", "train", "--preset", "cifar10-tiny", "--data", str(CIFAR_ZIP),
                        "--epochs", "1", "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1
    assert 10.0 < rows[0]["knn_top1"] <= 100.0  # 10 classes: chance is 10%
    assert rows[0]["images_per_s"] > 0 and rows[0]["elapsed_s"] > 0
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "curve.png").is_file()


@pytest.fixture
def keep_threads():
    """--threads sets torch's thread count for the whole process: put it back for the tests that follow."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_reports_consistent_figures(capsys, keep_threads):
    code, out, err = run_cli(capsys, "bench", "--preset", "cifar10-tiny", "--batch-size", "8", "--steps", "6",
                             "--precision", "fp32", "--threads", "1", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["images_per_step"] == 16 and res["batch_instances"] == 8 and res["size"] == 32
    assert res["steps_timed"] == 6 and res["knn_sizes"] == [10_000, 50_000] and res["threads"] == 1
    assert res["step_images_per_s"] == pytest.approx(16 / (res["step_ms"] / 1000))
    assert res["limit_images_per_s"] == pytest.approx(16 / (res["limit_ms"] / 1000))
    assert res["ratio_step_to_limit"] == pytest.approx(res["limit_ms"] / res["step_ms"])
    # the invariant: the limit is the step's own network forward + backward on ready views, one part of the
    # step's work (the step also gathers, augments, runs the objective and updates), so the step cannot take less
    # time than the limit: step_ms >= limit_ms, i.e. ratio_step_to_limit = limit/step <= 1, up to timing noise.
    # One thread keeps the medians steady on a shared machine: about 0.7 here, and 2.0-2.3 when the limit was
    # made to run its forward + backward three times; the bound allows the step 25% under its limit.
    noise = 0.25
    for piece in ("limit_ms", "augment_ms", "objective_ms"):  # each a part of the step's work
        assert res["step_ms"] >= (1 - noise) * res[piece] > 0, (piece, res)
    assert res["ratio_step_to_limit"] <= 1 / (1 - noise), res
    code, _, err = run_cli(capsys, "bench", "--steps", "0")
    assert_one_line_error(code, err, "--steps must be >= 1")
    code, _, err = run_cli(capsys, "bench", "--size", "4")
    assert_one_line_error(code, err, "--size must be >= 8")


def test_sigint_saves_a_checkpoint_and_resume_finishes(tmp_path, image_tree):
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "isif", "train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data",
           str(image_tree), "--width", "0.03125", "--batch-size", "8", "--knn-k", "5", "--epochs", "400",
           "--eval-every", "1000", "--out", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stderr:  # wait for the first finished epoch
        if "epoch 1/400  loss" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, err
    assert "isif: interrupted" in err and "--resume" in err and "Traceback" not in err
    from isif.training.checkpoint import load_checkpoint

    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert 1 <= state["epoch"] < 400
    r = subprocess.run([sys.executable, "-m", "isif", "train", "--resume", str(out), "--epochs",
                        str(state["epoch"] + 1), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] == state["epoch"] + 1
    r = subprocess.run([sys.executable, "-m", "isif", "eval", "knn", "--checkpoint", str(out), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)  # the resumed run's last kNN is that of the checkpoint it saved
    assert res["epoch"] == rows[-1]["epoch"] and res["knn_top1"] == pytest.approx(rows[-1]["knn_top1"])


@pytest.mark.parametrize("method", ["simclr", "byol", "moco", "dino", "isif --projector mlp"])
def test_bench_of_a_method_with_its_own_heads_and_target_counts_them_in_the_limit(capsys, keep_threads, method):
    """The limit of a successor is every network it runs (backbone, heads, a momentum target's forward): still one
    part of the step, so the step cannot take less time than it (the invariant of the test above). DINO's views
    are of two sizes (multi-crop: 2 global and 2 local ones)."""
    flags = ["--proj-hidden", "32", "--proj-dim", "16"] + (["--queue", "64"] if method == "moco" else []) + \
        (["--prototypes", "32", "--local-crops", "2"] if method == "dino" else [])
    if method.startswith("isif"):
        method, flags = "isif", method.split()[1:]
    code, out, err = run_cli(capsys, "bench", "--preset", "cifar10-tiny", "--method", method, "--batch-size", "8",
                             "--steps", "4", "--precision", "fp32", "--threads", "1", "--json", *flags)
    assert code == 0, err
    res = json.loads(out)
    assert res["images_per_step"] == (32 if method == "dino" else 16)
    assert res["limit_ms"] > 0 and res["objective_ms"] > 0
    assert res["step_ms"] >= 0.75 * res["limit_ms"] and res["ratio_step_to_limit"] <= 1 / 0.75, res
