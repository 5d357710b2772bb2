"""Two torchrun "nodes" on loopback, one worker killed by kill -9 after the first checkpoint: the time the restart
costs, and the final weights against an uninterrupted run of the same command.

    python benchmarks/elastic_restart.py [--data IMAGE_TREE] [--epochs 8] [--out /tmp/isif-elastic]

Each node is its own ``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT
--max-restarts 1`` with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (see the README), training on CPU with gloo.
Without --data, a small labelled image tree is written (the test fixture's). Prints one line per run (wall seconds,
exit codes), the seconds lost to the restart (killed run minus uninterrupted run) and whether every tensor of the
final checkpoints is equal. ``tests/test_elastic.py`` runs the same functions at a tiny size.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_command(data: Path, out: Path, port: int, epochs: int, restarts: int = 1) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"isif-{port}",
            "--max-restarts", str(restarts), "--monitor-interval", "0.2", "-m", "isif", "train", "--preset",
            "cifar10-tiny", "--dataset", "folder", "--data", str(data), "--width", "0.03125", "--batch-size", "8",
            "--knn-k", "5", "--epochs", str(epochs), "--device", "cpu", "--out", str(out), "--quiet"]


def workers(out: Path) -> list[int]:
    """The pids of the isif training workers (not the torchrun agents) writing to ``out``."""
    r = subprocess.run(["pgrep", "-f", "--", f"-u -m isif train .*--out {out} "], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def two_nodes(data: Path, out: Path, epochs: int, kill_after_checkpoint: bool, env: dict | None = None,
              timeout: float = 600, wrap: list[str] | None = None) -> dict:
    """Run the two nodes to the end (killing one worker after the first checkpoint when asked); returns the wall
    seconds, both exit codes, both logs, and the pid killed."""
    port = free_port()
    e = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **(env or {})}
    t0 = time.perf_counter()
    cmd = node_command(data, out, port, epochs)
    procs = [subprocess.Popen((wrap or []) * (i == 1) + cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=e) for i in range(2)]
    killed = None
    if kill_after_checkpoint:
        last = out / "checkpoints" / "last.pt"
        while not last.is_file() and time.perf_counter() - t0 < timeout and all(p.poll() is None for p in procs):
            time.sleep(0.05)
        pids = workers(out)
        if pids:
            killed = pids[-1]
            os.kill(killed, signal.SIGKILL)
    logs, codes = [], []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))[0])
        except subprocess.TimeoutExpired:
            p.kill()
            logs.append(p.communicate()[0] + "\n[killed: timeout]")
        codes.append(p.returncode)
    return {"seconds": time.perf_counter() - t0, "codes": codes, "logs": logs, "killed": killed}


def same_weights(a: Path, b: Path) -> tuple[bool, int]:
    """(every tensor of the two checkpoints' model and optimiser states equal, how many were compared)."""
    import torch

    from isif.training.checkpoint import load_checkpoint

    x, y = load_checkpoint(a), load_checkpoint(b)
    pairs = [(x["model"][k], y["model"][k]) for k in x["model"]]

    def tensors(o):
        if isinstance(o, torch.Tensor):
            yield o
        elif isinstance(o, dict):
            for v in o.values():
                yield from tensors(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                yield from tensors(v)

    pairs += list(zip(tensors(x["optimizer"]), tensors(y["optimizer"]), strict=True))
    return all(torch.equal(p, q) for p, q in pairs) and x["model"].keys() == y["model"].keys(), len(pairs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("/tmp/isif-elastic"))
    args = ap.parse_args()
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    data = args.data
    if data is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.conftest import write_image_tree

        data = write_image_tree(args.out / "tree")
    plain = two_nodes(data, args.out / "plain", args.epochs, False)
    print(f"uninterrupted: {plain['seconds']:.1f} s, exit codes {plain['codes']}")
    hit = two_nodes(data, args.out / "killed", args.epochs, True)
    print(f"one worker killed (pid {hit['killed']}) after the first checkpoint: {hit['seconds']:.1f} s, exit codes "
          f"{hit['codes']}; resumed: {'resuming' in ''.join(hit['logs'])}")
    equal, n = same_weights(args.out / "plain" / "checkpoints" / "last.pt",
                            args.out / "killed" / "checkpoints" / "last.pt")
    print(f"time lost to the restart: {hit['seconds'] - plain['seconds']:.1f} s; final weights and optimiser state "
          f"equal to the uninterrupted run: {equal} ({n} tensors)")
    return 0 if equal and plain["codes"] == hit["codes"] == [0, 0] else 1


if __name__ == "__main__":
    sys.exit(main())
