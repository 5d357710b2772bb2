"""``isif serve``: a thin command over ``isif.serve.app.serve``."""

from __future__ import annotations

from ..serve.options import ServeOptions
from .flags import Command


def run_serve(o: ServeOptions) -> int:
    from ..base.device import resolve_device
    from ..serve.app import serve

    serve(o.embed_dir, o.checkpoint, o.host, o.port, o.exact, o.max_upload_mib, o.k, str(resolve_device(o.device)))
    return 0


SERVE = Command("serve", "a local search page and JSON API over an embed folder (isif[serve])", run_serve,
                ServeOptions)
