"""The shape of the code: imports run one way, functions fit on a screen, registries agree with their parts."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from isif.models import BACKBONES

SRC = Path(__file__).resolve().parents[1] / "src" / "isif"


def _module_name(p: Path) -> str:
    parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """isif module -> isif modules it imports (top-level and inside functions)."""
    mods = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                names = [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for t in names:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != m:
                    graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "isif.training.loop" in graph["isif.cli.train"]
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# The layers of docs/layout.md, from the bottom up: a module imports only from its own layer or below.
LAYERS = (
    ("isif.base",),
    ("isif.data", "isif.models", "isif.objectives", "isif.evaluate"),
    ("isif.training",),
    ("isif.collection",),
    ("isif.serve",),
    ("isif.api", "isif"),
    ("isif.cli", "isif.__main__"),
)


def layer_of(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names if n != "isif") or module in names:
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS (add its folder there and to docs/layout.md)")


def test_imports_run_one_way_down_the_layers():
    graph = import_graph()
    up = sorted((m, t) for m, targets in graph.items() for t in targets if layer_of(t) > layer_of(m))
    assert up == []


def test_the_layer_check_finds_an_upward_import():
    assert layer_of("isif.base.errors") < layer_of("isif.data.decode") < layer_of("isif.training.loop")
    assert layer_of("isif.training.loop") < layer_of("isif.collection.index") < layer_of("isif.serve.app")
    assert layer_of("isif.serve.app") < layer_of("isif") < layer_of("isif.cli.train")


def test_the_package_has_no_flat_modules_but_its_facade():
    flat = sorted(p.name for p in SRC.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "api.py"]


def test_every_function_fits_on_a_screen():
    long = []
    for p in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{p.relative_to(SRC)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_gives_its_declared_width(name):
    from isif.models import ModelConfig, build_model

    entry = BACKBONES[name]
    width = 0.25 if entry.widthable else 1.0
    model = build_model(ModelConfig(name, width=width, dim=16)).eval()
    with torch.no_grad():
        h = model.backbone(torch.zeros(2, 3, 64, 64))
    assert h.shape == (2, entry.features(width)) and model.head.fc.in_features == entry.features(width)


def test_every_method_satisfies_the_contract():
    from isif.objectives import Objective, build_objective, methods

    for name, m in methods().items():
        obj = build_objective(name, num_instances=8192, dim=8, features=16, backbone=torch.nn.Linear(4, 16),
                              total_steps=10)
        assert isinstance(obj, Objective) and isinstance(obj, torch.nn.Module), name
        assert m.summary and m.settings is not None
        assert getattr(obj, "input", "embedding") in ("embedding", "backbone"), name
        assert m.embedding_of() == getattr(obj, "embedding", "head"), name  # the registry line says what it does
        if hasattr(obj, "target_features"):  # a momentum target: which views it sees, and its step after each step
            assert set(obj.target_views) <= set(range(len(obj.views))) and callable(obj.after_step), name
        own_heads = getattr(obj, "input", "embedding") == "backbone" and name != "isif"
        if own_heads:  # heads of its own: one shape, its networks apart from its loss
            from isif.objectives import OwnHeads

            assert isinstance(obj, OwnHeads) and type(obj).outputs is not OwnHeads.outputs, name
            assert type(obj).loss is not OwnHeads.loss, name
        if m.recipe is not None:  # a recipe sets only settings that exist, and says where it comes from
            from isif.training.config import Config

            cfg = Config()
            cfg.set("method.name", name)
            for key in m.recipe.changes(128):
                cfg.get(key)
            assert m.recipe.source, name


def test_every_setting_has_one_flag_and_help():
    from isif.training.config import SECTIONS
    from isif.training.options import setting_fields

    flags = setting_fields(SECTIONS)
    for flag, owners in flags.items():
        assert flag.startswith("--") and owners[0][1].metadata.get("help"), flag
        types = {str(h) for _, _, h in owners}
        assert len(types) == 1, (flag, types)  # a flag shared by several methods means one thing


def _commands():
    from isif.cli import COMMANDS

    for cmd in COMMANDS:
        yield from ((f"{cmd.name} {c.name}", c) for c in cmd.sub) if cmd.sub else [(cmd.name, cmd)]


@pytest.mark.parametrize("name, cmd", list(_commands()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_commands_options_are_settings_with_help_and_a_uniform_check(name, cmd):
    """Each command's options: a dataclass of ``setting`` fields, each with help; the flags are generated from
    them (argparse refuses a flag given twice, so a clash with a config setting fails the parser), and a value
    outside a field's check is refused in the one wording."""
    import dataclasses

    from isif.base.settings import check_fields, flag_name
    from isif.cli import build_parser

    build_parser()
    assert cmd.run is not None, name
    if cmd.options is None:
        return
    seen = set()
    for f in dataclasses.fields(cmd.options):
        if not f.metadata.get("cli", True):
            continue
        assert f.metadata.get("help"), (name, f.name)
        assert flag_name(f) not in seen, (name, f.name)
        seen.add(flag_name(f))
        check = f.metadata.get("check")
        if check is not None and not f.metadata.get("positional"):
            required = {g.name: 1 if "int" in str(g.type) else "x" for g in dataclasses.fields(cmd.options)
                        if g.default is dataclasses.MISSING and g.default_factory is dataclasses.MISSING}
            low = -(10 ** 9)
            value = "not-a-value" if check.choices else (low,) if "tuple" in str(f.type) else low
            bad = cmd.options(**{**required, f.name: value})
            with pytest.raises(ValueError, match=f"^{flag_name(f)} must be {re.escape(check.words)}, got "):
                check_fields(bad)


def test_one_list_of_commands_and_the_docstring_does_not_repeat_it():
    import isif.cli
    from isif.cli import COMMANDS, build_parser

    names = [c.name for c in COMMANDS]
    parser_names = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert list(parser_names) == names and len(set(names)) == len(names)
    assert {"train", "embed", "select", "label"} <= set(names)
    assert "COMMANDS" in isif.cli.__doc__
