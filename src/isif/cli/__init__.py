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
from .collection import CLUSTER, DUPLICATES, EMBED, EXPORT, INDEX, MAP, SEARCH
from .evaluate import EVAL, PLOT
from .flags import Command, Parser
from .serve import SERVE
from .train import BENCH, METHODS, PRESETS, RACE, TRAIN

COMMANDS: tuple[Command, ...] = (TRAIN, RACE, EVAL, BENCH, EMBED, INDEX, PLOT, SEARCH, SERVE, EXPORT, CLUSTER,
                                 DUPLICATES, MAP, PRESETS, METHODS)


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
    from ..training.checkpoint import CheckpointWriteError
    from ..training.loop import Interrupted, TrainingDiverged

    try:
        args = build_parser().parse_args(argv)
        return args.command_(args)
    except UserError as e:
        print(f"isif: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"isif: error: {e}", file=sys.stderr)
        return 3
    except CheckpointWriteError as e:
        print(f"isif: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"isif: interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("isif: interrupted", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "build_parser", "main"]
