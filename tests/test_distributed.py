"""DDP on CPU with gloo: 2 processes see exactly what 1 process with the whole batch sees."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from isif.base.dist import World, gather_rows, gather_views, shard
from isif.objectives import build_objective, method_fields, methods

B, V, IN, D = 8, 2, 6, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(V * B, IN, generator=g, dtype=torch.float64), torch.arange(B) * 3 + 1


def _objective(method):
    torch.manual_seed(5)
    small = {"nce_noise": 8} if "nce_noise" in method_fields(method) else {}
    return build_objective(method, num_instances=40, dim=D, **small).double()


def _net():
    torch.manual_seed(3)
    return torch.nn.Linear(IN, D).double()


def _single(method):
    x, idx = _inputs()
    net, crit = _net(), _objective(method)
    v = len(crit.views)
    torch.manual_seed(11)
    loss = crit(F.normalize(net(x[: v * B]), dim=1), idx)
    loss.backward()
    bank = crit.state_dict().get("bank.memory")
    return loss.item(), [p.grad.clone() for p in net.parameters()], bank


def _worker(rank, world_size, port, method, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    from isif.base.dist import setup

    world = setup("cpu")
    from torch.nn.parallel import DistributedDataParallel

    x, idx = _inputs()
    net, crit = _net(), _objective(method)
    ddp = DistributedDataParallel(net)
    v = len(crit.views)
    b = B // world_size
    local = torch.cat([x[k * B + rank * b: k * B + (rank + 1) * b] for k in range(v)])  # (V*b, IN)
    z = gather_views(F.normalize(ddp(local), dim=1), v, world)  # (V*B, D)
    torch.manual_seed(11)
    loss = crit(z, idx)
    loss.backward()
    # sharded feature gathering, as kNN evaluation uses it
    feats = torch.arange(7 * 3, dtype=torch.float64).view(7, 3)
    start, stop, per = shard(7, world)
    part = torch.cat([feats[start:stop], torch.zeros(per - (stop - start), 3, dtype=torch.float64)])
    gathered = gather_rows(part, world)[:7]
    if rank == 0:
        torch.save({"loss": loss.item(), "grads": [p.grad.clone() for p in net.parameters()],
                    "bank": crit.state_dict().get("bank.memory"), "z": z.detach(), "gathered": gathered}, out)
    torch.distributed.barrier()  # nobody leaves while another process still uses the group
    sys.stdout.flush()
    os._exit(0)  # skip gloo's thread teardown at interpreter exit, which can abort the process


def test_gathering_primitives_on_two_processes(tmp_path):
    """gather_views keeps gradients and the global row order, gather_rows and shard reassemble a sharded
    set (the registry of methods is swept by the real-step test below)."""
    method = "isif"
    out = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(2, _free_port(), method, str(out)), nprocs=2, start_method="spawn")
    got = torch.load(out, weights_only=True)
    loss, grads, bank = _single(method)
    assert abs(got["loss"] - loss) < 1e-6
    for g1, g2 in zip(got["grads"], grads, strict=True):
        assert torch.allclose(g1, g2, atol=1e-6, rtol=0)
    if bank is not None:  # the memory bank was updated with every process's features
        assert torch.allclose(got["bank"], bank, atol=1e-12)
    x, _ = _inputs()
    v = len(_objective(method).views)
    assert torch.allclose(got["z"], F.normalize(_net()(x[: v * B]), dim=1), atol=1e-12)  # global row order
    assert torch.equal(got["gathered"], torch.arange(21, dtype=torch.float64).view(7, 3))


# ----------------------------------------------------------------------------- the real training step

TRAINABLE = [m for m, e in methods().items() if e.trains]
N_IMAGES, STEP_B = 24, 8


def _real_step(method: str, world: World) -> dict:
    """One ``train_step`` of the real parts (CIFAR ResNet, fp64, frozen BatchNorm statistics) on this process's
    share of a global batch of 8: the loss, the updated weights and the objective's state."""
    from isif.data.types import ArrayDataset, Splits
    from isif.objectives import EpochContext
    from isif.training.presets import resolve
    from isif.training.step import build_parts, train_step

    from .conftest import use_method

    cfg = use_method(resolve("cifar10-tiny", {"model.width": 0.0625, "model.dim": 8, "train.precision": "fp64",
                                              "model.freeze_bn": True, "train.batch_size": STEP_B}), method)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (N_IMAGES, 3, 16, 16), generator=g, dtype=torch.uint8)
    data = ArrayDataset(images, torch.zeros(N_IMAGES, dtype=torch.long), ["x"])
    torch.manual_seed(0)
    parts = build_parts(cfg, Splits(data, data, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), N_IMAGES, torch.device("cpu"),
                        world)
    feats = F.normalize(torch.randn(N_IMAGES, 8, generator=g, dtype=torch.float64), dim=1)
    parts.objective.on_epoch_start(EpochContext(0, lambda: feats, parts.opt))
    idx = torch.arange(STEP_B) * 3  # (B,) the global batch
    b = STEP_B // world.size
    torch.manual_seed(11)  # NCE's noise and the random triplet negative come from the global generator
    loss = train_step(parts, images[idx][world.rank * b:(world.rank + 1) * b], idx, torch.Generator().manual_seed(7))
    return {"loss": loss.item(), "model": {k: v.clone() for k, v in parts.model.state_dict().items()},
            "objective": {k: v.clone() for k, v in parts.objective.state_dict().items()}}


def _step_worker(rank, world_size, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    from isif.base.dist import setup

    world = setup("cpu")
    results = {m: _real_step(m, world) for m in TRAINABLE}
    if rank == 0:
        torch.save(results, out)
    torch.distributed.barrier()
    sys.stdout.flush()
    os._exit(0)


def test_real_training_step_of_every_method_on_two_processes_equals_one_process(tmp_path):
    """The loop's own ``train_step`` (augmentation drawn for the global batch, DDP, gathered embeddings, the
    objective, SGD): 2 gloo processes give the loss, updated weights and objective state of 1 process with the
    whole batch, for every method of the registry. BatchNorm runs with frozen running statistics
    (``freeze_bn``), the one setting where per-process batch statistics cannot differ from the global ones."""
    out = tmp_path / "rank0.pt"
    mp.start_processes(_step_worker, args=(2, _free_port(), str(out)), nprocs=2, start_method="spawn")
    two = torch.load(out, weights_only=True)
    for method in TRAINABLE:
        one = _real_step(method, World())
        assert abs(two[method]["loss"] - one["loss"]) < 1e-6, method
        for part in ("model", "objective"):
            for k, v in one[part].items():
                assert torch.allclose(two[method][part][k].double(), v.double(), atol=1e-6, rtol=0), (method, k)
        moved = [k for k, v in one["model"].items() if v.is_floating_point()
                 and not torch.equal(v, _real_step_init(method)[k])]
        assert moved, f"{method}: the step changed no weight"


def _real_step_init(method: str) -> dict:
    from isif.training.presets import resolve
    from isif.training.step import make_model

    from .conftest import use_method

    cfg = use_method(resolve("cifar10-tiny", {"model.width": 0.0625, "model.dim": 8, "model.freeze_bn": True}),
                     method)
    torch.manual_seed(0)
    return {k: v.double() for k, v in make_model(cfg).state_dict().items()}


def test_single_process_fallbacks_do_nothing():
    w = World()
    z = torch.randn(6, 3)
    assert gather_views(z, 2, w) is z and gather_rows(z, w) is z and shard(10, w) == (0, 10, 10)


@pytest.mark.slow
def test_torchrun_two_processes_end_to_end(tmp_path, image_tree):
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), "-m", "isif", "train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data",
            str(image_tree), "--width", "0.03125", "--batch-size", "8", "--knn-k", "5", "--epochs", "2",
            "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(base + ["--out", str(tmp_path / "a")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 per process x 2 processes" in r.stderr
    assert r.stdout.count("kNN top-1") == 1  # rank 0 alone reports
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["knn_top1"] is not None
    # the same command again gives the same result: the processes agree on data order and augmentation
    r2 = subprocess.run(base + ["--out", str(tmp_path / "b")], capture_output=True, text=True, env=env, timeout=600)
    assert r2.returncode == 0, r2.stderr[-2000:]
    rows2 = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in rows2]
    # an odd global batch cannot be split
    r3 = subprocess.run(base + ["--batch-size", "7", "--out", str(tmp_path / "c")], capture_output=True,
                        text=True, env=env, timeout=600)
    assert r3.returncode != 0 and "must be divisible by the 2 processes" in r3.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_full_protocol.sh"])
def test_gpu_scripts_run_end_to_end_on_cpu_with_smoke(tmp_path, script):
    from .conftest import CIFAR_ZIP

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    if not CIFAR_ZIP.is_file() and not (root / "data" / "cifar10-jpeg.zip").is_file():
        pytest.skip(f"the shared CIFAR-10 copy is not at {CIFAR_ZIP}")
    env = dict(os.environ, OUT=str(tmp_path))
    r = subprocess.run(["bash", str(root / "benchmarks" / script), "--smoke"], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    if script == "gpu_check.sh":
        assert "step / limit" in r.stdout and "projected 200 epochs" in r.stdout
        lines = [x for x in r.stdout.splitlines() if "limit / step" in x]  # one line per method (two in smoke)
        assert [x.split()[0] for x in lines] == ["isif", "dino"] and all("200 epochs:" in x for x in lines), lines
    assert (tmp_path / ("gpu-check" if script == "gpu_check.sh" else "gpu-full") / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_torchrun_two_processes_stream_files(tmp_path):
    """A streamed source under torchrun: each process decodes its share of every batch; the sharded pass over
    the training files (the nearest-neighbour positives) equals one process's; rank 0 alone reports."""
    from isif.training.checkpoint import load_checkpoint

    from .test_stream import write_cub

    root = write_cub(tmp_path / "CUB_200_2011", n_classes=200, per_class=1)
    args = ["train", "--preset", "cub200", "--data", str(root), "--arch", "resnet18_cifar", "--weights", "none",
            "--width", "0.0625", "--size", "32", "--batch-size", "16", "--epochs", "1", "--lr", "0.03",
            "--workers", "1", "--device", "cpu", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "isif", *args, "--out", str(tmp_path / "one")], capture_output=True,
                         text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "isif", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("unseen classes: R@1") == 1
    a = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert torch.equal(a["neighbours"], b["neighbours"])
    assert b["history"][-1]["recall@1"] is not None and b["history"][-1]["loss"] > 0


@pytest.mark.slow
def test_torchrun_first_step_equals_one_process_through_the_command(tmp_path, image_tree):
    """The design's end-to-end check, through the real command: ``torchrun --nproc_per_node 2 -m isif train``
    and plain ``isif train`` with the same flags, one epoch of exactly one optimiser step (8 of the fixture's
    images, batch 8), float64 and frozen BatchNorm statistics: the same loss and the same updated weights."""
    args = ["-m", "isif", "train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data", str(image_tree),
            "--width", "0.03125", "--dim", "16", "--train-subset", "8", "--test-subset", "8", "--batch-size", "8",
            "--knn-k", "4", "--epochs", "1", "--precision", "fp64", "--freeze-bn", "--device", "cpu", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), *args, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    from isif.training.checkpoint import load_checkpoint

    a = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert a["history"][0]["loss"] == pytest.approx(b["history"][0]["loss"], abs=1e-6)
    assert a["optimizer"]["state"], "no optimiser step was taken"
    moved = 0
    for k, v in a["model"].items():
        assert v.dtype == torch.float64 or not v.is_floating_point(), k
        assert torch.allclose(v, b["model"][k], atol=1e-6, rtol=0), k
        moved += int(v.is_floating_point() and "running" not in k)
    assert moved > 0
