"""isif: unsupervised embedding learning via Invariant and Spreading Instance Feature.

The public Python API is exactly the names in ``__all__``, importable from ``isif``:

- objectives: ``InvariantSpreading`` (the paper's loss), the baselines ``NPSoftmax``, ``NCE``, ``Exemplar``,
  ``Triplet``, ``DeepCluster``; ``build_objective(name, ...)`` builds any registered method's objective, and
  ``methods()`` lists them;
- trained networks: ``load_model(run_or_checkpoint_or_safetensors)`` -> ``LoadedModel`` (unpacks as
  ``network, transform``; ``ImageTransform`` is the transform), ``embed(model, images)`` -> (N, D) embeddings;
- evaluation over feature tensors: ``knn_scores``, ``knn_predict``, ``knn_accuracy`` (weighted kNN),
  ``recall_at_k``, ``map_at_r``, ``nmi``;
- nearest neighbours: ``search`` and ``exact_topk`` (exact), ``build_index`` and ``load_index`` (faiss);
- ``UserError``: the one-line error every bad input raises.

Anything not exported here, including every submodule, is private and may change without notice. The names are
imported on first use, so ``import isif`` stays light (no torch, faiss, onnx or timm until needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import __version__ as __version__  # re-exported

__all__ = [
    "NCE",
    "DeepCluster",
    "Exemplar",
    "ImageTransform",
    "InvariantSpreading",
    "LoadedModel",
    "NPSoftmax",
    "Triplet",
    "UserError",
    "build_index",
    "build_objective",
    "embed",
    "exact_topk",
    "knn_accuracy",
    "knn_predict",
    "knn_scores",
    "load_index",
    "load_model",
    "map_at_r",
    "methods",
    "nmi",
    "recall_at_k",
    "search",
]

_HOME = {
    "isif.objectives": ("InvariantSpreading", "NPSoftmax", "NCE", "Exemplar", "Triplet", "DeepCluster",
                        "build_objective", "methods"),
    "isif.api": ("LoadedModel", "ImageTransform", "load_model", "embed", "build_index"),
    "isif.evaluate.knn": ("knn_scores", "knn_predict", "knn_accuracy"),
    "isif.evaluate.retrieval": ("recall_at_k", "map_at_r", "nmi"),
    "isif.collection.index": ("exact_topk", "load_index"),
    "isif.collection.search": ("search",),
    "isif.base.errors": ("UserError",),
}
_WHERE = {name: module for module, names in _HOME.items() for name in names}

if TYPE_CHECKING:
    from .api import ImageTransform, LoadedModel, build_index, embed, load_model
    from .base.errors import UserError
    from .collection.index import exact_topk, load_index
    from .collection.search import search
    from .evaluate.knn import knn_accuracy, knn_predict, knn_scores
    from .evaluate.retrieval import map_at_r, nmi, recall_at_k
    from .objectives import NCE, DeepCluster, Exemplar, InvariantSpreading, NPSoftmax, Triplet, build_objective, methods


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'isif' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
