"""Settings written once: a dataclass field carries its default, help, check and resume rule.

Every part of isif that has settings (the data source, the backbone, each
method, augmentation, the optimiser, the sampler, evaluation, the loop)
declares them as a small dataclass whose fields are made with ``setting``;
so does every command's own options (``isif.collection.options``,
``isif.serve.options``, ``isif.training.options``). From those fields the
command line gets its flags (``isif.cli.flags``), the config and the options
their one check (``check_fields``), and ``--resume`` its rule of what may change.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Check:
    """A predicate on one value and the words that complete "must be ..."."""

    ok: Callable[[Any], bool]
    words: str
    choices: tuple[str, ...] = ()  # the values of a ``one_of``: the flag's metavar shows them


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


POSITIVE = Check(lambda v: _finite(v) and v > 0, "> 0")
NON_NEGATIVE = Check(lambda v: _finite(v) and v >= 0, ">= 0")
PROBABILITY = Check(lambda v: _finite(v) and 0 <= v <= 1, "in [0, 1]")
FRACTION = Check(lambda v: _finite(v) and 0 < v <= 1, "in (0, 1]")
MOMENTUM = Check(lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)")
PORT = Check(lambda v: _finite(v) and 0 <= v <= 65535, "in [0, 65535]")


def at_least(n: int) -> Check:
    return Check(lambda v: _finite(v) and v >= n, f">= {n}")


def one_of(*choices: str) -> Check:
    return Check(lambda v: v in choices, f"one of {', '.join(choices)}", choices)


def each(c: Check) -> Check:
    """Every value of a non-empty list passes ``c``."""
    return Check(lambda v: len(v) > 0 and all(c.ok(x) for x in v), f"one or more values, each {c.words}")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, check: Check | None = None,
            resume: bool = False, flag: str | None = None, cli: bool = True,
            factory: Callable[[], Any] | None = None, positional: bool = False, metavar: str | None = None,
            short: str | None = None, const: Any = None) -> Any:
    """A dataclass field with its metadata.

    help: the flag's help text. check: a ``Check`` of the value (``None`` is
    always allowed for optional fields). resume: may the flag change a resumed
    run? flag: the flag's name when it is not ``--field-name``. cli: False for
    settings with no flag. Without a default, the flag is required.

    For a command's options: positional: an argument, not a flag (a ``list``
    takes one or more words); metavar: the value's name in the help; short:
    a one-letter alias (``-v``); const: the value of the flag given bare
    (``--resume`` alone). A ``list`` option is repeatable (``--compare A
    --compare B``); a ``tuple`` one takes a comma-separated list.
    """
    meta = {"help": help, "check": check, "resume": resume, "flag": flag, "cli": cli, "positional": positional,
            "metavar": metavar, "short": short, "const": const}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(f: dataclasses.Field) -> str:
    """``--field-name`` (or the field's own ``flag``); an argument's metavar (``EMBED_DIR``)."""
    if f.metadata.get("positional"):
        return f.metadata.get("metavar") or f.name.upper()
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def default_of(f: dataclasses.Field) -> Any:
    """The field's default (a factory's value), or ``dataclasses.MISSING`` for a required one."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def optional_inner(hint: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


def check_fields(obj: Any, flags: bool = True) -> None:
    """Raise ValueError naming the first field whose value fails its check, then the section's ``check()``.

    Messages name the flag (``--lr must be > 0, got -1``) or, with ``flags=False``, the field.
    """
    hints = field_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = flag_name(f) if flags else f.name
        inner, optional = optional_inner(hints[f.name])
        if value is None:
            if not optional:
                raise ValueError(f"{name} needs a value")
            continue
        c = f.metadata.get("check")
        if c is not None and not c.ok(value):
            raise ValueError(f"{name} must be {c.words}, got {value!r}")
    extra = getattr(obj, "check", None)
    if extra is not None:
        extra()
