"""The options of ``isif serve``: one dataclass of ``setting`` fields (default, help, check)."""

from __future__ import annotations

from dataclasses import dataclass

from ..base.settings import PORT, POSITIVE, setting


@dataclass(kw_only=True)
class ServeOptions:
    embed_dir: str = setting(help="an `isif embed` output folder", positional=True, metavar="EMBED_DIR")
    checkpoint: str | None = setting(None, "the checkpoint that embedded it, for uploaded queries (default: the one "
                                           "recorded in EMBED_DIR/index.json)")
    host: str = setting("127.0.0.1", "address to listen on (127.0.0.1 is this machine only; anything else prints a "
                                     "warning)")
    port: int = setting(8000, "port (0 picks a free one)", check=PORT)
    k: int = setting(24, "neighbours shown by default (1 to the server's limit, 500)")
    max_upload_mib: float = setting(20.0, "largest upload accepted", check=POSITIVE)
    exact: bool = setting(False, "exact search even when EMBED_DIR has a faiss index")
    device: str = setting("cpu", "device embedding uploads")
