"""Restarts under torchrun: a restarted group finds its run folder and resumes by itself, or refuses in one line.

torchrun (``--max-restarts N``) restarts every worker of the group when one fails, with the command line it was
given: the same ``--out``, and no ``--resume``. ``settle_run`` decides, the same on every process, what that command
means now, from what each process sees (a collective, so no process waits on another that refused):

- a first start (no restart, or plain ``isif train``): as always; an existing folder needs --resume or --overwrite;
- a restarted group whose every process sees ``checkpoints/last.pt``, written by this command (``launch.json``
  records the command line a run folder was started with): it resumes from there, as ``--resume`` would, and
  ends with the weights of an uninterrupted run (the resume is bit-exact on CPU);
- a restarted group that died before its first checkpoint (the folder holds this command's launch.json and no
  checkpoint): it starts again;
- a restarted group where some processes see the checkpoint and others do not: refused, since the run folder is
  not on storage every node shares, and the processes would otherwise continue from different states;
- a checkpoint of another command in the folder: refused (pass another --out).

Under torchrun with restarts allowed, ``check_shared`` also refuses at the start a run folder that some process
cannot see (rank 0 writes a probe file; every process looks for it): the promise of a restart is only as good as the
checkpoint every node can read. The restart count comes from ``TORCHELASTIC_RESTART_COUNT``, which torchrun keeps
per node (a node restarted because another failed may still say 0), so the group takes the largest.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from ..base.dist import World, agree, gather_objects, shared_folder
from ..base.errors import UserError
from ..base.files import atomic_write_bytes
from .runlog import RunDir, check_run_dir

LAUNCH = "launch.json"


def launch_record() -> dict:
    """What ``launch.json`` holds: the command line (as torchrun repeats it on a restart) and the torchrun job."""
    return {"argv": sys.argv[1:], "torchrun_run_id": os.environ.get("TORCHELASTIC_RUN_ID")}


def write_launch(run: RunDir, record: dict) -> None:
    """``RUN/launch.json`` of a new run under torchrun, atomically (this module owns the file)."""
    atomic_write_bytes(run.root / LAUNCH, lambda f: f.write(json.dumps(record).encode()))


def restart_count(world: World) -> int:
    """How many times torchrun has restarted this group: the largest count of any process (0 without torchrun)."""
    own = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) if "RANK" in os.environ else 0
    if not world.active:
        return own
    t = torch.tensor([own], dtype=torch.int64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def _launched_by_this_command(run: RunDir) -> bool:
    try:
        return json.loads((run.root / LAUNCH).read_text()).get("argv") == launch_record()["argv"]
    except (OSError, ValueError, AttributeError):
        return False


def decide(restarted: bool, sees_checkpoint: list[bool], own_launch: bool, folder_in_use: bool,
           out: Path) -> tuple[str, str]:
    """(what to do: "as-asked", "resume", "start-again" or "refuse", why), from the facts of every process: the
    group is a restart, which processes see the checkpoint, whether the folder ``out`` was started by this
    command, whether it holds anything."""
    if not restarted:
        return "as-asked", ""
    missing = [r for r, seen in enumerate(sees_checkpoint) if not seen]
    if not missing:
        if own_launch:
            return "resume", ""
        return "refuse", (f"{out} holds a checkpoint of another command (its {LAUNCH} differs), and torchrun "
                          "restarted this one into it; pass another --out")
    if len(missing) < len(sees_checkpoint):
        ranks = ", ".join(map(str, missing))
        return "refuse", (f"torchrun restarted the group, and rank{'s' * (len(missing) > 1)} {ranks} cannot see the "
                          f"{out}/checkpoints/last.pt that rank 0 wrote: the run folder must be on storage every node "
                          "shares "
                          "(a network file system), or the processes would resume from different states; put --out "
                          "there and start again")
    if own_launch or not folder_in_use:
        return "start-again", ""
    return "as-asked", ""


def settle_run(out: Path, resume: bool, overwrite: bool, world: World) -> tuple[RunDir, bool, bool, str | None]:
    """(the run folder, resume, overwrite, a line for the console or None) after a possible torchrun restart (see
    the module docstring); the folder checks of ``check_run_dir``, refused on every process together."""
    run = RunDir(out)
    restarts = restart_count(world)
    note = None
    if restarts and not resume:
        seen = gather_objects(run.last.is_file(), world)
        own = _launched_by_this_command(run) if world.main else False
        in_use = out.exists() and (not out.is_dir() or any(out.iterdir())) if world.main else False
        action, why = gather_objects(decide(True, seen, own, in_use, out), world)[0]  # rank 0 read the folder
        if action == "refuse":
            agree(world, why)
        if action == "resume":
            resume, note = True, f"isif: torchrun restarted the group (restart {restarts}): resuming {out} from its " \
                                 "last checkpoint"
        elif action == "start-again":
            overwrite = True
            note = (f"isif: torchrun restarted the group (restart {restarts}) before the first checkpoint of {out}: "
                    "starting it again")
    error = None
    if world.main:
        try:
            check_run_dir(out, resume, overwrite)
        except UserError as e:
            error = str(e)
    agree(world, error)
    return run, resume, overwrite, note


def check_shared(out: Path, world: World) -> None:
    """Under torchrun with restarts allowed, refuse a run folder some process cannot see (``shared_folder``)."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) >= 1:
        shared_folder(out, world, "the run folder rank 0 writes; with torchrun --max-restarts the group resumes from "
                                  "its checkpoints, so the folder must be on storage every node shares (a network file "
                                  "system): put --out there, or pass --max-restarts 0")
