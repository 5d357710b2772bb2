"""Fault injection: kills at every stage, full disks, unsafe or torn files, bad input, concurrent runs.

Run alone with ``python -m pytest -m faults``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from isif.base.errors import UserError
from isif.cli import main
from isif.training.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint

pytestmark = [pytest.mark.faults, pytest.mark.slow]

KILL_POINTS = [("step", 1), ("step", 6), ("step", 12), ("checkpoint-write", 1), ("checkpoint-write", 2),
               ("eval", 1), ("eval", 2), ("metrics-write", 1), ("metrics-write", 2), ("epoch-end", 1)]
RANDOM_KILLS = 4


def isif(*args, env=None, timeout=300, **kw):
    e = dict(os.environ)
    e.pop("ISIF_FAULT", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "isif", *args], capture_output=True, text=True, env=e,
                          timeout=timeout, **kw)


def tiny_args(tree, out):
    return ["train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data", str(tree), "--width", "0.03125",
            "--batch-size", "8", "--knn-k", "5", "--epochs", "2", "--out", str(out), "--quiet"]


def strip(rows):
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "train_s", "eval_s", "elapsed_s",
                                                      "peak_memory_mib")} for r in rows]


def check_invariants(run: Path) -> None:
    """What must hold the moment after a kill: readable metrics, and a checkpoint that is whole or absent."""
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            json.loads(line)  # never a half line
    last = run / "checkpoints" / "last.pt"
    if last.exists():
        load_checkpoint(last)  # never torn


def finish(tree, run: Path) -> subprocess.CompletedProcess:
    if (run / "checkpoints" / "last.pt").exists():
        return isif("train", "--resume", str(run), "--quiet")
    return isif(*tiny_args(tree, run), "--overwrite")  # killed before the first checkpoint: start again


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from .conftest import write_image_tree

    base = tmp_path_factory.mktemp("faults")
    tree = write_image_tree(base / "tree")
    t0 = time.perf_counter()
    r = isif(*tiny_args(tree, base / "ref"))
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    state = load_checkpoint(base / "ref" / "checkpoints" / "last.pt")
    rows = [json.loads(x) for x in (base / "ref" / "metrics.jsonl").read_text().splitlines()]
    return tree, state, rows, seconds


def assert_same_as_reference(run: Path, reference) -> None:
    _, ref_state, ref_rows, _ = reference
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    for part in ("model", "objective", "optimizer"):
        a, b = ref_state[part], state[part]
        if part == "optimizer":
            a, b = a["state"], b["state"]
            for k in a:
                assert torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"])
            continue
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert strip(rows) == strip(ref_rows)


@pytest.mark.parametrize("site, n", KILL_POINTS, ids=[f"{s}-{n}" for s, n in KILL_POINTS])
def test_kill_9_at_a_point_then_resume_gives_the_uninterrupted_result(tmp_path, reference, site, n):
    tree = reference[0]
    run = tmp_path / "run"
    r = isif(*tiny_args(tree, run), env={"ISIF_FAULT": f"{site}:{n}"})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    check_invariants(run)
    r = finish(tree, run)
    assert r.returncode == 0, r.stderr
    assert not list(run.glob("**/.*.tmp"))
    assert_same_as_reference(run, reference)


@pytest.mark.parametrize("site, n, at", [("step", 5, 3), ("step-checkpoint", 2, 6), ("step", 11, 9)])
def test_checkpoints_inside_an_epoch_lose_at_most_n_steps_and_resume_exactly(tmp_path, reference, site, n, at):
    """--checkpoint-every 3 (8 steps an epoch: global steps 3, 6, 9 and 12 are saved, besides the epoch ends):
    killed at step 5, just after the second step checkpoint was written, or at step 11 in epoch 2, the checkpoint
    left is the last one saved, and the resumed run ends with the bits of the uninterrupted run, which wrote no
    such checkpoints."""
    tree = reference[0]
    run = tmp_path / "run"
    r = isif(*tiny_args(tree, run), "--checkpoint-every", "3", env={"ISIF_FAULT": f"{site}:{n}"})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    check_invariants(run)
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    assert saved["epoch"] * 8 + saved["step"] == at, (saved["epoch"], saved["step"])
    r = isif("train", "--resume", str(run), "--quiet")
    assert r.returncode == 0, r.stderr
    assert_same_as_reference(run, reference)


def test_kill_9_at_random_moments(tmp_path, reference):
    tree = reference[0]
    rng = random.Random(0)
    killed = 0
    # the reference was the first run of the session (cold: .pyc files written, files read from disk); a warm
    # run is faster, and a moment drawn from the cold time could fall after a warm run's end
    t0 = time.perf_counter()
    assert isif(*tiny_args(tree, tmp_path / "warm")).returncode == 0
    wall = min(reference[3], time.perf_counter() - t0)
    for i in range(RANDOM_KILLS):
        run = tmp_path / f"run{i}"
        e = dict(os.environ)
        e.pop("ISIF_FAULT", None)
        proc = subprocess.Popen([sys.executable, "-m", "isif", *tiny_args(tree, run)], env=e,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 0.9) * wall)  # somewhere inside a run's wall time
        proc.send_signal(signal.SIGKILL)
        killed += proc.wait() == -signal.SIGKILL
        check_invariants(run)
        r = finish(tree, run)
        assert r.returncode == 0, r.stderr
        assert_same_as_reference(run, reference)
    print(f"random kills that landed before the run ended: {killed}/{RANDOM_KILLS}")
    assert killed >= RANDOM_KILLS - 1  # the moments fall inside the run, so (nearly) all of them land


def test_truncated_checkpoint_is_never_accepted(tmp_path, reference):
    tree = reference[0]
    run = tmp_path / "run"
    assert isif(*tiny_args(tree, run), "--epochs", "1").returncode == 0
    last = run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        last.write_bytes(data[:cut])
        r = isif("train", "--resume", str(run), "--quiet")
        assert r.returncode == 2 and "truncated or not a checkpoint" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- failed writes, full disks


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, image_tree, monkeypatch):
    from isif.training.loop import train

    from .test_train import tiny_config

    cfg = tiny_config(image_tree, epochs=1)
    train(cfg, tmp_path / "run", progress=False)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    good = last.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    cfg.train.epochs = 2
    with pytest.raises(CheckpointWriteError, match="No space left on device.*is intact"):
        train(cfg, tmp_path / "run", resume=True, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert last.read_bytes() == good and load_checkpoint(last)["epoch"] == 1
    assert not list(last.parent.glob(".*.tmp"))


def test_full_disk_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, reference):
    tree = reference[0]
    mnt = tmp_path / "small"
    mnt.mkdir()
    run0 = tmp_path / "seed-run"
    assert isif(*tiny_args(tree, run0), "--epochs", "1").returncode == 0
    size = sum(f.stat().st_size for f in run0.rglob("*") if f.is_file())
    ckpt = (run0 / "checkpoints" / "last.pt").stat().st_size
    limit = size + ckpt // 2 + 64 * 1024  # room for the run, not for a second checkpoint beside the first
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={limit}", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip()[:80]})")
    try:
        run = mnt / "run"
        subprocess.run(["cp", "-a", str(run0), str(run)], check=True)
        before = (run / "checkpoints" / "last.pt").read_bytes()
        r = isif("train", "--resume", str(run), "--epochs", "2", "--quiet")
        assert r.returncode == 1, r.stderr
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and "could not write checkpoint" in lines[0] and "is intact" in lines[0], r.stderr
        assert (run / "checkpoints" / "last.pt").read_bytes() == before
        assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ----------------------------------------------------------------------------- unsafe files


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_runs_code_is_refused_and_the_code_does_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "isif-checkpoint", "version": 1, "model": _Payload(marker)}, evil)
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(evil)
    assert main(["eval", "knn", "--checkpoint", str(evil)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused" in err
    assert not marker.exists()
    # the same payload as a plain pickle: not a checkpoint archive at all
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError):
        load_checkpoint(plain)
    assert not marker.exists()


def test_checkpoint_of_another_architecture_or_method_is_refused(tmp_path, image_tree, capsys):
    from isif.training.loop import train

    from .test_train import tiny_config

    cfg = tiny_config(image_tree, epochs=1)
    train(cfg, tmp_path / "run", progress=False)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["config"]["model"]["width"] = 0.25  # claims another network than its weights
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, tmp_path / "odd.pt")
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "odd.pt")]) == 2
    err = capsys.readouterr().err
    assert "do not fit resnet18_cifar width 0.25" in err and err.count("\n") == 1
    other = tiny_config(image_tree, epochs=2)
    other.set("method.name", "nce")
    with pytest.raises(UserError, match="method.name='isif' but the config asks for 'nce'"):
        train(other, tmp_path / "run", resume=True, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_divergence_names_the_step_and_keeps_the_checkpoint(tmp_path, image_tree, monkeypatch, bad):
    import isif.objectives.isif as mod
    from isif.training.loop import Interrupted, TrainingDiverged, train

    from .test_train import tiny_config

    cfg = tiny_config(image_tree, epochs=2)
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "run", progress=False, stop_after_steps=8)
    good = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    real = mod.InvariantSpreading.forward
    calls = {"n": 0}

    def poisoned(self, z, idx=None):
        calls["n"] += 1
        loss = real(self, z, idx)
        return loss * float(bad) if calls["n"] == 5 else loss

    monkeypatch.setattr(mod.InvariantSpreading, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 4 \(global step 12\)"):
        train(cfg, tmp_path / "run", resume=True, progress=False)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == good


# ----------------------------------------------------------------------------- bad input


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def test_folder_with_broken_and_odd_images_converts_or_skips_with_a_count(tmp_path, capsys):
    from .test_data import load_image_folder

    rgb = Image.fromarray(np.full((32, 32, 3), 120, np.uint8))
    files = {
        "ok.png": _encode(rgb, "PNG"),
        "grey.png": _encode(rgb.convert("L"), "PNG"),
        "rgba.png": _encode(rgb.convert("RGBA"), "PNG"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "deep.png": _encode(Image.fromarray(np.full((32, 32), 40000, np.uint16)), "PNG"),
        "zero.png": b"",
        "truncated.png": _encode(rgb, "PNG")[:40],
        "corrupt.jpg": b"\xff\xd8\xff" + os.urandom(200),
        "notimage.jpg": b"hello, I am text",
    }
    for split in ("train", "test"):
        d = tmp_path / "tree" / split / "a"
        d.mkdir(parents=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
        (d / "readme.txt").write_text("not listed: not an image extension")
    s = load_image_folder(tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert len(s.train) == 5 and len(s.test) == 5
    err = capsys.readouterr().err
    assert "skipped 4 unreadable image(s)" in err


def test_existing_folder_is_never_overwritten_without_a_flag(tmp_path, image_tree, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("do not lose me")
    argv = ["train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data", str(image_tree), "--out", str(out)]
    assert main(argv) == 2
    assert (out / "thesis.txt").read_text() == "do not lose me"
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite with a bad value changes nothing either: everything is checked before the folder is touched
    assert main(argv + ["--overwrite", "--knn-k", "100000"]) == 2
    assert (out / "thesis.txt").exists()


_FLAG_VALUES = {
    "--epochs": st.one_of(st.integers(-3, 3).map(str), st.sampled_from(["x", "1.5", ""])),
    "--batch-size": st.one_of(st.integers(-2, 40).map(str), st.sampled_from(["two", "1e3"])),
    "--width": st.sampled_from(["0.03125", "0", "-1", "nan", "inf", "abc"]),
    "--lr": st.sampled_from(["0.1", "0", "-0.1", "nan", "1e-9"]),
    "--temperature": st.sampled_from(["0.1", "0", "-1", "nan", "inf"]),
    "--precision": st.sampled_from(["fp32", "bf16", "fp16", "fp8", ""]),
    "--method": st.sampled_from(["isif", "nce", "npsoftmax", "deepcluster", "random", "nope"]),
    "--variant": st.sampled_from(["official", "paper", "x"]),
    "--negatives": st.sampled_from(["all", "hard", "easy", "some"]),
    "--schedule": st.sampled_from(["step", "cosine", "linear"]),
    "--knn-k": st.sampled_from(["1", "5", "0", "-5", "100000"]),
    "--clusters": st.sampled_from(["2", "4", "1", "100000"]),
    "--device": st.sampled_from(["cpu", "auto", "cuda:7", "gpu", ""]),
    "--eval-every": st.sampled_from(["1", "0", "-1"]),
    "--train-subset": st.sampled_from(["8", "0", "100000"]),
    "--preset": st.sampled_from(["cifar10-tiny", "cifar10-cpu", "stl10", "nope"]),
    "--split": st.sampled_from(["train", "unlabeled", "x"]),
    "--dataset": st.sampled_from(["folder", "stl10", "imagenet"]),
    "--data": st.sampled_from(["TREE", "/no/such/path", ""]),
    "--margin": st.sampled_from(["0.5", "-1"]),
    "--threads": st.sampled_from(["1", "0"]),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=st.dictionaries(st.sampled_from(sorted(_FLAG_VALUES)), st.just(None), max_size=6), data=st.data(),
       junk=st.lists(st.sampled_from(["--bogus", "-x", "extra", "--resume"]), max_size=1))
def test_fuzzed_command_lines_end_in_success_or_one_line_exit_2(tmp_path_factory, flags, data, junk):
    from .conftest import write_image_tree

    base = tmp_path_factory.getbasetemp() / "fuzz"
    tree = base / "tree"
    if not tree.exists():
        write_image_tree(tree)
    argv = ["train", "--dataset", "folder", "--data", str(tree), "--width", "0.03125", "--batch-size", "8",
            "--knn-k", "5", "--dry-run", "--out", str(base / f"out{random.random()}")]
    for flag in flags:
        value = data.draw(_FLAG_VALUES[flag], label=flag)
        argv += [flag, str(tree) if value == "TREE" else value]
    argv += junk
    out, err = io.StringIO(), io.StringIO()
    from contextlib import redirect_stderr, redirect_stdout

    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    text = err.getvalue()
    assert "Traceback" not in text
    if code == 0:
        json.loads(out.getvalue())  # the resolved config
    else:
        lines = [x for x in text.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("isif: error:"), (argv, text)


# ----------------------------------------------------------------------------- concurrency


def _load(args):
    from .test_data import load_image_folder

    tree, cache = args
    s = load_image_folder(tree, cache_dir=cache)
    return int(s.train.images.sum()), len(s.train)


def test_concurrent_loads_share_a_cache_without_corrupting_it(tmp_path):
    import multiprocessing as mp

    from .conftest import write_image_tree

    tree = write_image_tree(tmp_path / "tree", n_classes=5, train_per_class=60, test_per_class=10)
    cache = tmp_path / "cache"
    with mp.get_context("spawn").Pool(4) as pool:
        results = pool.map(_load, [(tree, cache)] * 8)
    assert len(set(results)) == 1
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and not list(cache.glob(".*.tmp"))
    with np.load(files[0]) as z:
        assert z["train_x"].shape[0] == 300
    assert _load((tree, cache)) == results[0]


def test_two_runs_at_once_in_different_folders(tmp_path, reference):
    tree = reference[0]
    e = dict(os.environ)
    e.pop("ISIF_FAULT", None)
    e["ISIF_CACHE"] = str(tmp_path / "fresh-cache")  # both decode at the same time
    procs = [subprocess.Popen([sys.executable, "-m", "isif", *tiny_args(tree, tmp_path / f"run{i}")], env=e,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    for i in range(2):
        assert_same_as_reference(tmp_path / f"run{i}", reference)


@pytest.mark.faults
def test_a_flipped_byte_inside_a_tensor_is_refused(tmp_path):
    """torch's archive reader checks no CRC: the checkpoint's own checksum must catch a changed tensor byte."""
    import zipfile

    path = tmp_path / "ck.pt"
    w = torch.arange(1000, dtype=torch.float32)
    save_checkpoint({"model": {"w": w}, "history": [{"epoch": 1, "loss": 0.5}]}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], w)
    with zipfile.ZipFile(path) as zf:  # torch stores tensor data uncompressed under <archive>/data/<key>
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED and info.file_size == 4000
        header = info.header_offset
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[header + 26:header + 28], "little"), int.from_bytes(
        raw[header + 28:header + 30], "little")
    start = header + 30 + name_len + extra_len  # first byte of the tensor's data
    raw[start + 1234] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=f"checkpoint {path} is corrupted.*checksum") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)
    # the untouched pickle still loads: without the checksum the change would have gone unseen
    state = torch.load(path, weights_only=True)
    assert not torch.equal(state["model"]["w"], w)
