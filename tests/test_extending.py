"""The extensions of docs/extending.md (a method, a dataset, a backbone, a collection command), made as written
there.

The page's code blocks are edits, each under a marker line (the page's opening comment describes them):

    <!-- extend: new-file PATH -->                 the block is the whole of the new file PATH
    <!-- extend: insert PATH after "LINE" -->      the block goes right after the one line of PATH that is LINE
    <!-- extend: replace PATH line "LINE" -->      the block replaces the one line of PATH that is LINE

LINE is a JSON string compared with every line of PATH stripped of its indentation: it must match exactly one.
A code block without a marker, a malformed marker, a missing or ambiguous anchor, or a new file that already
exists fails. The edits are made to a copy of src/ (and pyproject.toml), never to this checkout; the copy then
runs, in subprocesses with PYTHONPATH at its src/ (faster than a pip install, and the copy's isif comes first
on the path), the registry-driven tests and the unchanged command line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "extending.md"
MARKER = re.compile(r'<!-- extend: (new-file|insert|replace) (\S+)(?: (after|line) ("(?:[^"\\]|\\.)*"))? -->')
WORD = {"new-file": None, "insert": "after", "replace": "line"}
# the repository's tests that sweep the registries (method, backbone, source), run on the extended copy; the
# two-process registry test of test_distributed.py is left out: about a minute on 2 cores already
REGISTRY_TESTS = ["tests/test_objectives_baselines.py", "tests/test_architecture.py", "tests/test_data.py"]
REGISTRY_SELECTION = ("every_method or every_backbone or every_setting or random_method or markers or sources or "
                      "commands")
TINY = ["--preset", "cifar10-tiny", "--epochs", "1", "--quiet"]


@dataclass(frozen=True)
class Edit:
    kind: str  # new-file, insert, replace
    path: str  # relative to the repository root, under src/
    anchor: str | None  # the line to insert after or to replace
    text: str  # the code block, ending in a newline


def doc_edits(text: str) -> list[Edit]:
    """Every code block of the page as an ``Edit``, in page order; AssertionError for a block without a marker
    line right above it, or a malformed marker."""
    lines, edits, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            raise AssertionError(f"line {i + 1}: a code block with no `<!-- extend: ... -->` line above it")
        if not line.startswith("<!-- extend:"):
            i += 1
            continue
        m = MARKER.fullmatch(line)
        assert m is not None and WORD[m[1]] == m[3], f"line {i + 1}: malformed extend marker: {line}"
        assert m[2].startswith("src/") and ".." not in Path(m[2]).parts, f"line {i + 1}: {m[2]} is not under src/"
        assert i + 1 < len(lines) and lines[i + 1].startswith("```"), f"line {i + 1}: no code block under the marker"
        end = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"line {i + 2}: the code block never closes"
        edits.append(Edit(m[1], m[2], json.loads(m[4]) if m[4] else None, "\n".join(lines[i + 2:end]) + "\n"))
        i = end + 1
    return edits


def apply_edit(root: Path, e: Edit) -> None:
    """Make ``e`` under ``root``, strictly (see the module's docstring)."""
    p = root / e.path
    if e.kind == "new-file":
        assert not p.exists(), f"{e.path} already exists; new-file makes a new one"
        p.write_text(e.text)
        return
    assert p.is_file(), f"{e.path}: no such file to {e.kind} into"
    lines = p.read_text().splitlines(keepends=True)
    at = [k for k, line in enumerate(lines) if line.strip() == e.anchor]
    assert len(at) == 1, f"{e.path}: the anchor {e.anchor!r} is on {len(at)} lines, not exactly one"
    k = at[0]
    lines[k:k + 1] = [lines[k], e.text] if e.kind == "insert" else [e.text]
    p.write_text("".join(lines))


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root / "src"), "PYTHONDONTWRITEBYTECODE": "1"}


def run_copy(root: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` in the copy, its src/ first on the path."""
    return subprocess.run([sys.executable, *args], cwd=root, env=_env(root), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def extended(tmp_path_factory) -> Path:
    """A copy of src/, pyproject.toml and the registry tests with every edit of docs/extending.md made."""
    root = tmp_path_factory.mktemp("extended")
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", root)
    (root / "tests").mkdir()
    for name in ("__init__.py", "conftest.py", *(Path(t).name for t in REGISTRY_TESTS)):
        shutil.copy(ROOT / "tests" / name, root / "tests" / name)
    for e in doc_edits(DOC.read_text()):
        apply_edit(root, e)
    return root


# ----------------------------------------------------------------------------- the page's format, strictly


def test_the_page_shows_the_three_extensions_and_every_block_is_an_edit():
    edits = doc_edits(DOC.read_text())
    assert [e.path for e in edits if e.kind == "new-file"] == ["src/isif/objectives/ntxent.py",
                                                                "src/isif/data/csv_listing.py",
                                                                "src/isif/collection/neighbours.py"]
    assert {e.path for e in edits} >= {"src/isif/objectives/__init__.py", "src/isif/data/registry.py",
                                       "src/isif/models/__init__.py"}


def test_a_missing_or_ambiguous_anchor_or_an_unmarked_block_fails(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n    y = 2\ny = 2\n")
    with pytest.raises(AssertionError, match="on 0 lines"):
        apply_edit(tmp_path, Edit("insert", "src/a.py", "z = 3", "w = 0\n"))
    with pytest.raises(AssertionError, match="on 2 lines"):
        apply_edit(tmp_path, Edit("replace", "src/a.py", "y = 2", "w = 0\n"))
    with pytest.raises(AssertionError, match="already exists"):
        apply_edit(tmp_path, Edit("new-file", "src/a.py", None, "w = 0\n"))
    apply_edit(tmp_path, Edit("insert", "src/a.py", "x = 1", "w = 0\n"))
    apply_edit(tmp_path, Edit("replace", "src/a.py", "w = 0", "v = 0\n"))
    assert (tmp_path / "src" / "a.py").read_text() == "x = 1\nv = 0\n    y = 2\ny = 2\n"
    with pytest.raises(AssertionError, match="no `<!-- extend"):
        doc_edits("text\n\n```python\nx = 1\n```\n")
    with pytest.raises(AssertionError, match="malformed"):
        doc_edits('<!-- extend: insert src/a.py line "x = 1" -->\n```python\nx = 1\n```\n')
    assert doc_edits('<!-- extend: replace src/a.py line "say \\"hi\\"" -->\n```python\nx = 1\n```\n') == [
        Edit("replace", "src/a.py", 'say "hi"', "x = 1\n")]


# ----------------------------------------------------------------------------- the extended copy


def test_the_edits_leave_the_copy_lint_clean(extended):
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install ruff)")
    touched = sorted({e.path for e in doc_edits(DOC.read_text())})
    r = subprocess.run([ruff, "check", "--no-cache", *touched], cwd=extended, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_the_registry_driven_tests_cover_the_extensions(extended):
    r = run_copy(extended, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *REGISTRY_TESTS,
                 "-k", REGISTRY_SELECTION, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    for covered in ("[ntxent]", "[mobilenet_v3_small]", "[csv]", "[neighbours-"):  # the new entries, swept in the copy
        assert covered in r.stdout, (covered, r.stdout[-4000:])


def test_the_new_method_matches_a_naive_reference_and_is_listed(extended):
    script = """
import sys
import torch, torch.nn.functional as F
import isif
from isif.cli import main
from isif.objectives import build_objective
assert isif.__file__.startswith(sys.argv[1]), isif.__file__  # the copy's isif
crit = build_objective("ntxent", temperature=0.2)
z = F.normalize(torch.randn(8, 16, dtype=torch.float64), dim=1)
ref = 0.0
for a in range(8):  # naive loop reference, float64
    e = {j: torch.exp(z[a] @ z[j] / 0.2) for j in range(8) if j != a}
    ref -= torch.log(e[(a + 4) % 8] / sum(e.values())).item()
assert abs(crit(z).item() - ref / 8) < 1e-5
assert main(["methods"]) == 0
assert main(["train", "--method", "ntxent", "--temperature", "0", "--dry-run"]) == 2
"""
    r = run_copy(extended, "-c", script, str(extended / "src"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ntxent" in r.stdout and "NT-Xent (SimCLR)" in r.stdout
    assert "--temperature must be > 0, got 0" in r.stderr


@pytest.mark.slow
def test_isif_train_runs_the_new_method(extended, image_tree, tmp_path):
    r = run_copy(extended, "-m", "isif", "train", *TINY, "--dataset", "folder", "--data", str(image_tree),
                 "--method", "ntxent", "--temperature", "0.3", "--width", "0.03125", "--batch-size", "8",
                 "--knn-k", "5", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["method"] == {"name": "ntxent",
                                                                                     "temperature": 0.3}
    assert "kNN top-1" in r.stdout
    r = run_copy(extended, "-m", "isif", "bench", "--preset", "cifar10-tiny", "--method", "ntxent", "--steps", "1",
                 "--width", "0.03125", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["step_images_per_s"] > 0


def _csv_set(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    lines = ["path,class,split"]
    for i in range(48):
        c = i % 6
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,c{c},{'train' if c < 3 else 'test'}")
    (root / "images.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_isif_train_reads_the_new_dataset(extended, tmp_path):
    root = _csv_set(tmp_path / "set")
    r = run_copy(extended, "-m", "isif", "train", *TINY, "--dataset", "csv", "--data", str(root), "--size", "32",
                 "--width", "0.03125", "--batch-size", "8", "--workers", "0", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "unseen classes: R@1" in r.stdout
    r = run_copy(extended, "-c", f"from isif.data.registry import labelled_layout as f; assert f({str(root)!r})")
    assert r.returncode == 0, r.stderr[-2000:]  # its marker file makes the folder a labelled layout


@pytest.mark.slow
def test_isif_train_builds_the_new_backbone(extended, image_tree, tmp_path):
    r = run_copy(extended, "-m", "isif", "train", *TINY, "--dataset", "folder", "--data", str(image_tree),
                 "--arch", "mobilenet_v3_small", "--batch-size", "4", "--train-subset", "8", "--test-subset", "8",
                 "--knn-k", "4", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kNN top-1" in r.stdout
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["arch"] == "mobilenet_v3_small"


def test_the_new_collection_command_runs_and_keeps_the_rules(extended, tmp_path):
    from .test_explore import write_embed_dir

    rng = np.random.default_rng(0)
    z = rng.normal(size=(12, 8)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    root = tmp_path / "images"
    root.mkdir()
    d = write_embed_dir(tmp_path / "emb", z, [f"{i}.png" for i in range(12)], root)
    r = run_copy(extended, "-m", "isif", "neighbours", str(d), "--k", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = (d / "neighbours.csv").read_text().splitlines()
    assert rows[0] == "path,rank,neighbour,cosine" and len(rows) == 1 + 12 * 3
    sim = z @ z.T
    np.fill_diagonal(sim, -np.inf)
    assert rows[1].split(",")[2] == f"{int(np.argmax(sim[0]))}.png"
    for bad, words in ((["--k", "0"], "--k must be >= 1"), (["--k", "12"], "must be below the number of images"),
                       (["--out", str(root)], "inside the image folder")):
        r = run_copy(extended, "-m", "isif", "neighbours", str(d), *bad)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
