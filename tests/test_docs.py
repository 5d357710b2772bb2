"""The documentation: the README is a front page mirrored as the site's home, the API reference lists exactly
``isif.__all__``, and the front page's example runs as written (the site itself is built with
``mkdocs build --strict`` in CI, which fails on a broken link, anchor or reference)."""

from __future__ import annotations

import re
from pathlib import Path

import isif

from .test_api import run  # noqa: F401  (the module's trained run and files)

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_is_a_front_page_and_the_sites_home():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert (ROOT / "docs" / "index.md").read_text() == readme.replace("](docs/", "]("), \
        "docs/index.md is README.md with its docs/ links made relative: copy it again"
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link


def test_the_api_reference_lists_exactly_the_public_names():
    listed = re.findall(r"^::: isif\.(\w+)$", (ROOT / "docs" / "reference.md").read_text(), re.M)
    assert sorted(listed) == sorted(isif.__all__) and len(listed) == len(set(listed))


def test_every_page_is_in_the_sites_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert [p for p in pages if f": {p}" not in nav] == []


def test_the_front_page_example_runs_with_a_run_and_files(run):  # noqa: F811
    folder, files = run
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- example: front-page -->\n```python\n(.*?)```", readme, re.S).group(1)
    code, n = re.subn(r"^RUN = .*$", f"RUN = {str(folder)!r}", code, flags=re.M)
    code, m = re.subn(r"^FILES = .*$", f"FILES = {[str(f) for f in files[:3]]!r}", code, flags=re.M)
    assert n == m == 1
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["features"].shape == (3, 128) and scope["ids"].tolist()[0][0] in (1, 2)
    assert isinstance(scope["criterion"], isif.InvariantSpreading)
