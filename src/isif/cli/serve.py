"""``isif serve``: a thin command over ``isif.serve.app.serve``."""

from __future__ import annotations

from ..serve.options import ServeOptions
from .flags import Command


def run_serve(o: ServeOptions) -> int:
    from ..serve.app import serve

    serve(o)
    return 0


SERVE = Command("serve", "a local search page and JSON API over an embed folder (isif[serve])", run_serve,
                ServeOptions)
