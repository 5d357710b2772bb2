"""Distributed training through torchrun, with the paper's batch semantics.

Under ``torchrun`` (RANK and WORLD_SIZE in the environment) every process
holds the whole in-memory data set and draws the same global batch of
``batch_size`` instances; process r embeds its contiguous share, the
embeddings are gathered with their gradients kept, and the objective sees
exactly the (V * batch_size, D) matrix one process would see. Without
torchrun everything here falls back to rank 0 of 1 and does nothing.
"""

from __future__ import annotations

import datetime
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


SHARED_STORE_FIX = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"


def check_restartable() -> None:
    """Refuse, before joining any group, a torchrun that would hang on its first restart: several nodes, restarts
    allowed, and the rendezvous store shared with the workers (torch's default). The workers of a restarted group
    look up each other under a prefix of their own node's restart count, and a node whose workers were restarted
    because another node's failed does not count it (pytorch issues 108158 and 135712), so the group waits for
    peers under different names until the 30-minute timeout. With the store not shared, every round gets a fresh
    store and port."""
    env = os.environ
    nodes, restarts = int(env.get("GROUP_WORLD_SIZE", "1") or 1), int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if nodes > 1 and restarts > 0 and env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        raise UserError(f"torchrun across {nodes} nodes with --max-restarts {restarts} needs {SHARED_STORE_FIX} in "
                        "torchrun's environment on every node (else a restarted group hangs: the nodes count restarts "
                        f"differently); run `{SHARED_STORE_FIX} torchrun ...`")


def setup(device_name: str) -> World:
    """Join the process group that torchrun describes (nccl on CUDA, gloo on CPU); a no-op otherwise."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        check_restartable()
    if world.size == 1:
        return world
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return world


def device_for(world: World, name: str) -> str:
    """Under torchrun, ``auto`` and ``cuda`` mean this process's own GPU."""
    if world.active and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{world.local_rank}"
    return name


def check_batch(world: World, batch_size: int) -> int:
    """The per-process share of a global batch."""
    if batch_size % world.size:
        raise UserError(f"--batch-size {batch_size} (the global number of instances) must be divisible by the "
                        f"{world.size} processes")
    return batch_size // world.size


def gather_views(z: torch.Tensor, views: int, world: World) -> torch.Tensor:
    """(V*b, D) local rows -> (V*W*b, D) global rows, view-major, keeping gradients.

    Local rows are [view 0 of the b local instances; view 1; ...]; the result
    is [view 0 of all W*b instances in rank order; view 1; ...], the layout of
    one process holding the whole batch.
    """
    if not world.active:
        return z
    import torch.distributed.nn.functional as dnn

    parts = dnn.all_gather(z.contiguous())  # W tensors (V*b, D), differentiable
    b = z.shape[0] // views
    blocks = [p.view(views, b, -1) for p in parts]  # W x (V, b, D)
    return torch.cat(blocks, dim=1).reshape(views * b * world.size, -1)


def gather_rows(x: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate equal-sized shards from every process, in rank order (no gradient)."""
    if not world.active:
        return x
    out = [torch.empty_like(x) for _ in range(world.size)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def any_flag(flag: bool, world: World, device: torch.device) -> bool:
    """True on every process if it is true on any (so that all stop at the same step)."""
    if not world.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def gather_objects(obj, world: World) -> list:
    """Every process's ``obj`` (picklable), in rank order, on every process."""
    if not world.active:
        return [obj]
    out: list = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def agree(world: World, error: str | None) -> None:
    """Raise ``UserError`` on every process when any has an ``error`` (the lowest rank's), else return on all:
    a refusal on one process never leaves the others waiting in a collective."""
    errors = [e for e in gather_objects(error, world) if e]
    if errors:
        raise UserError(errors[0])


def shared_folder(folder: Path, world: World, what: str) -> None:
    """Refuse, on every process together, a ``folder`` that some process cannot see: rank 0 creates it and writes
    a probe file, every process looks for it. ``what``: the end of the one-line refusal, after "cannot see"."""
    if not world.active:
        return
    probe = Path(folder) / gather_objects(f".isif-probe-{secrets.token_hex(8)}.tmp", world)[0]
    if world.main:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
    barrier(world)  # written before anyone looks
    seen = gather_objects(probe.is_file(), world)
    if world.main:
        probe.unlink(missing_ok=True)
    missing = [r for r, s in enumerate(seen) if not s]
    agree(world, None if not missing else
          f"{folder}: rank{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} cannot see {what}")


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def shard(n: int, world: World) -> tuple[int, int, int]:
    """(start, stop, padded size) of this process's contiguous shard of n items, shards of equal size."""
    per = -(-n // world.size)
    start = min(n, world.rank * per)
    return start, min(n, start + per), per


SINGLE = World()  # one process, no group


def teardown(world: World) -> None:
    """Leave the process group together: a barrier, then destroy it."""
    if world.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
