"""Command-line interface: ``isif COMMAND``, every command listed once, in ``COMMANDS``.

Each command (``cli.train``, ``cli.evaluate``, ``cli.collection``, ``cli.serve``) builds one options object from
its flags and calls the library with it; the flags of every option and setting are generated from their
dataclass fields (``cli.flags``). Every user mistake ends in one line on stderr, ``isif: error: ...``, and exit
code 2. A run stopped by Ctrl-C saves a checkpoint and exits with 130; a run whose loss diverges exits with 3;
a checkpoint that cannot be written, with 1.
"""

from __future__ import annotations

import argparse
import sys

from ..base.errors import UserError
from .collection import (
    AUDIT,
    CLUSTER,
    DUPLICATES,
    EMBED,
    EXPORT,
    EXPORT_EMBEDDINGS,
    INDEX,
    LABEL,
    MAP,
    SEARCH,
    SELECT,
)
from .evaluate import EVAL, PLOT
from .flags import Command, Parser
from .serve import SERVE
from .train import BENCH, METHODS, PRESETS, RACE, TRAIN

COMMANDS: tuple[Command, ...] = (TRAIN, RACE, EVAL, BENCH, EMBED, INDEX, PLOT, SEARCH, SERVE, EXPORT,
                                 EXPORT_EMBEDDINGS, CLUSTER, DUPLICATES, MAP, SELECT, LABEL, AUDIT, PRESETS,
                                 METHODS)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="isif", description="Unsupervised embedding learning via Invariant and Spreading "
                                             "Instance Feature (Ye et al., CVPR 2019).")
    parser.add_argument("--version", action="version", version=f"isif {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for cmd in COMMANDS:
        cmd.add_to(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure ends in one stderr line and its exit code (see the module docstring)."""
    from ..training.checkpoint import CheckpointWriteError
    from ..training.loop import Interrupted, TrainingDiverged

    ends = ((UserError, "error", 2), (TrainingDiverged, "error", 3), (CheckpointWriteError, "error", 1),
            (Interrupted, "interrupted", 130), (KeyboardInterrupt, "interrupted", 130))
    try:
        args = build_parser().parse_args(argv)
        return args.command_(args)
    except tuple(kind for kind, _, _ in ends) as e:
        word, code = next((w, c) for kind, w, c in ends if isinstance(e, kind))
        print(f"isif: {word}: {e}" if str(e) else f"isif: {word}", file=sys.stderr)
        return code


__all__ = ["COMMANDS", "build_parser", "main"]
