"""Settings -> argparse: the one generator of every flag, and the one check of what was parsed.

A command is a ``Command``: its name, help, the dataclass of its own options (``setting`` fields) and, for the
training commands, the config sections whose settings it also takes. ``add_options`` makes a flag (or argument)
of every options field, ``add_setting_flags`` one flag per section setting (dest ``section.field``, default None
so that a preset's value stands unless given), and ``options_from`` builds the options object from the parsed
flags and checks it with ``check_fields``: every range error reads ``--k must be >= 1, got 0``, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..base.errors import UserError
from ..base.settings import check_fields, default_of, field_hints, optional_inner

_NONE = object()  # "none" given for an optional setting: distinct from "not given"


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise UserError(f"{message} (see `{self.prog} --help`)")


@dataclass(frozen=True)
class Command:
    """One ``isif`` command: ``run(options) -> exit code``, or sub-commands (``isif eval knn``)."""

    name: str
    help: str
    run: Callable[[Any], int] | None = None
    options: type | None = None
    sections: tuple[str, ...] = ()
    description: str | None = None
    sub: tuple[Command, ...] = ()
    sub_name: str = "command"  # what the sub-commands are (``isif eval`` without one: "protocol" is required)

    def add_to(self, sub) -> None:
        p = sub.add_parser(self.name, help=self.help, description=self.description)
        if self.sub:
            inner = p.add_subparsers(dest=self.sub_name, required=True, parser_class=Parser)
            for c in self.sub:
                c.add_to(inner)
            return
        p.set_defaults(command_=self)
        if self.options is not None:
            add_options(p, self.options)
        if self.sections:
            add_setting_flags(p, self.sections)

    def __call__(self, args: argparse.Namespace) -> int:
        assert self.run is not None
        return self.run(options_from(args, self) if self.options is not None else None)


# ----------------------------------------------------------------------------- one field -> one flag


def _named(fn, name: str):
    fn.__name__ = name  # argparse names the type in "invalid int value"
    return fn


def _comma_list(elem: type, optional: bool):
    what = {int: "integers", float: "numbers"}.get(elem, "values")

    def parse(v: str):
        if optional and v.lower() == "none":
            return _NONE
        try:
            return tuple(elem(x.strip()) for x in v.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {v!r}") from None

    return parse


def _value_type(hint: Any) -> dict[str, Any]:
    """argparse's ``type`` (and metavar) of one value; ``none`` clears an optional one."""
    inner, optional = optional_inner(hint)
    if typing.get_origin(inner) is tuple:
        return {"type": _comma_list(typing.get_args(inner)[0], optional), "metavar": "A,B,..."}
    if inner in (int, float):
        return {"type": _named(lambda v: _NONE if optional and v.lower() == "none" else inner(v), inner.__name__)}
    return {"type": str}


def _help(f: dataclasses.Field, default: Any) -> str | None:
    text = f.metadata.get("help", "")
    if default is not dataclasses.MISSING and default is not None and not isinstance(default, (bool, list)):
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text = f"{text} (default {shown})" if text else None
    return text.replace("%", "%%") if text else text  # argparse formats help with %


def _metavar(f: dataclasses.Field, kw: dict[str, Any]) -> str:
    check = f.metadata.get("check")
    if check is not None and check.choices:
        return "{" + ",".join(check.choices) + "}"
    return f.metadata.get("metavar") or kw.get("metavar") or f.name.upper()


def argument(f: dataclasses.Field, hint: Any, section: str | None = None) -> tuple[list[str], dict[str, Any]]:
    """(names, add_argument keywords) of one field: of a command's options, or with ``section`` a config
    setting (dest ``section.field``, default None: given or not, a bare bool flag has a ``--no-`` form)."""
    from ..base.settings import flag_name

    m = f.metadata
    default = default_of(f)
    inner, _ = optional_inner(hint)
    kw: dict[str, Any] = {"help": _help(f, default)}
    if inner is bool:
        kw["action"] = argparse.BooleanOptionalAction if section or default else "store_true"
    elif typing.get_origin(inner) is list:
        kw.update(type=str, metavar=_metavar(f, {}), **({"nargs": "+"} if m.get("positional") else
                                                        {"action": "append"}))
    else:
        kw.update(_value_type(hint))
        kw["metavar"] = _metavar(f, kw)
        if m.get("const") is not None:
            kw.update(nargs="?", const=m["const"])
    if m.get("positional"):
        return [f.name], kw
    names = [n for n in (m.get("short"), flag_name(f)) if n]
    if section is not None:
        return names, {**kw, "dest": f"{section}.{f.name}", "default": None}
    if default is dataclasses.MISSING:
        return names, {**kw, "dest": f.name, "required": True}
    return names, {**kw, "dest": f.name, "default": default}


def add_options(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag (or argument) per field of the options dataclass ``cls``, in field order."""
    hints = field_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True):
            names, kw = argument(f, hints[f.name])
            p.add_argument(*names, **kw)


def add_setting_flags(p: argparse.ArgumentParser, sections: tuple[str, ...]) -> None:
    """One flag per setting of the config sections, dest "section.field"; for ``method``, also ``--method``."""
    from ..objectives import methods
    from ..training.options import setting_fields

    groups = {sec: p.add_argument_group(f"{sec} settings") for sec in sections}
    if "method" in sections:
        groups["method"].add_argument("--method", dest="method.name", metavar="NAME",
                                      help="training objective (see `isif methods`)")
    for owners in setting_fields(sections).values():
        sec, f, hint = owners[0]
        names, kw = argument(f, hint, sec)
        if sec == "method":  # a setting of several methods: each one's default
            mine = [m for m, e in methods().items() if f.name in {x.name for x in dataclasses.fields(e.settings)}]
            defaults = ", ".join(f"{m} {getattr(methods()[m].settings(), f.name)}" for m in mine)
            kw["help"] = f"{f.metadata.get('help', '')} (default: {defaults})".replace("%", "%%")
        groups[sec].add_argument(*names, **kw)


# ----------------------------------------------------------------------------- parsed flags -> checked options


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """{"section.field": value} of the setting flags given; ``none`` becomes None."""
    return {k: (None if v is _NONE else v) for k, v in vars(args).items() if "." in k and v is not None}


def options_from(args: argparse.Namespace, cmd: Command) -> Any:
    """The command's options object from the parsed flags, checked by its fields' checks (a UserError)."""
    cls = cmd.options
    assert cls is not None
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    values = {k: (None if v is _NONE else v) for k, v in values.items()}
    if cmd.sections:
        values["settings"] = overrides(args)
    opts = cls(**values)
    try:
        check_fields(opts)
    except ValueError as e:
        raise UserError(str(e)) from None
    return opts
