"""The optional dependencies (the package's extras), imported on first use with a one-line install message."""

from __future__ import annotations

from .errors import UserError

FAISS_INSTALL = ("faiss is not installed: pip install 'isif[search]' (or pip install faiss-cpu); --exact searches "
                 "without it")


def faiss_module():
    """The faiss module, or a ``UserError`` naming the install."""
    try:
        import faiss
    except ImportError:
        raise UserError(FAISS_INSTALL) from None
    return faiss
