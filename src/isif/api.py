"""The public Python API for trained networks: load one, turn images into its input, embed them, index them.

Everything here is re-exported from ``isif`` (``from isif import load_model, embed``); see ``isif.__init__`` for
the whole public surface. This module is the facade only: loading and embedding live in
``isif.collection.network``, the faiss index in ``isif.collection.index``. ``embed`` goes through the same
decoding, test transform, precision and memory format as ``isif embed``, so its features equal the command's.
"""

from __future__ import annotations

from .collection.index import build_index
from .collection.network import ImageLike, ImageTransform, LoadedModel, embed, load_model

__all__ = ["ImageLike", "ImageTransform", "LoadedModel", "build_index", "embed", "load_model"]
