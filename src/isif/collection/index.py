"""A faiss index beside an ``isif embed`` folder, checked against exact search when it is built.

    isif index EMBED_DIR [--kind auto|exact|ivf|hnsw]     (index_embed_dir; build_index indexes an array)

- ``exact``: faiss's flat inner-product index: the same answers as brute force (cosine on unit rows).
- ``ivf``: an inverted file of ``nlist`` cells (about 4 sqrt(N)), trained by k-means on a seeded sample;
  ``nprobe`` cells are visited per query.
- ``hnsw``: a graph of ``M`` links per node (``efConstruction`` when built, ``efSearch`` when searched).

At build time the index measures its own Recall@10 against exact search on a seeded sample of the collection
(each sampled image a query; the true 10 nearest by brute force in float64-accumulated float32 matrix
products), and records it with the build parameters and timings in ``index-meta.json``, with the sha256 of
the ``features.npy`` it was built on: an index of other embeddings is refused. ``auto`` picks exact search
below ``EXACT_BELOW`` images and HNSW above: measured by ``benchmarks/index_scale.py`` on the 2-core
development machine, exact search of one query over 1,000,000 128-d embeddings takes 19.8 ms (p50), linear in
the collection, so it stays within 2 ms below about 100,000; HNSW answered in 0.09 ms at Recall@10 0.99.

faiss is an extra (``pip install 'isif[search]'``); without it exact search still works everywhere.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..base.errors import UserError
from ..base.extras import FAISS_INSTALL, faiss_module
from ..base.files import atomic_write_bytes, sha256_file

KINDS = ("exact", "ivf", "hnsw")
EXACT_BELOW = 100_000  # exact search's single-query p50 reaches 2 ms here (see the module docstring)
INDEX_FILE, META_FILE = "index.faiss", "index-meta.json"
INSTALL = FAISS_INSTALL


def default_kind(n: int) -> str:
    return "exact" if n < EXACT_BELOW else "hnsw"


def exact_topk(queries: np.ndarray, z: np.ndarray, k: int, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores (q, k), ids (q, k)) by brute force, in blocks of queries (at most 2^26 similarities, 256 MiB, at
    a time by default); ties go to the lower id."""
    out_s, out_i = [], []
    zt = np.ascontiguousarray(z, dtype=np.float32).T
    block = block or max(1, 2**26 // max(1, len(z)))
    for s in range(0, len(queries), block):
        sim = np.asarray(queries[s:s + block], dtype=np.float32) @ zt  # (b, N)
        if k < sim.shape[1]:
            cand = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        else:
            cand = np.tile(np.arange(sim.shape[1]), (len(sim), 1))
        cs = np.take_along_axis(sim, cand, 1)
        order = np.lexsort((cand, -cs), axis=1)  # by score, then by id
        out_i.append(np.take_along_axis(cand, order, 1))
        out_s.append(np.take_along_axis(cs, order, 1))
    return np.concatenate(out_s), np.concatenate(out_i)


def build(z: np.ndarray, kind: str, seed: int = 0, nlist: int | None = None, nprobe: int | None = None,
          m: int = 32, ef_construction: int = 80, ef_search: int = 64):
    """(faiss index over the unit rows of ``z``, its parameters)."""
    faiss = faiss_module()
    n, d = z.shape
    x = np.ascontiguousarray(z, dtype=np.float32)
    if kind == "exact":
        index, params = faiss.IndexFlatIP(d), {}
    elif kind == "ivf":
        nlist = nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))
        nprobe = nprobe or max(1, min(nlist, nlist // 16 or 1))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        train = x[np.random.default_rng(seed).permutation(n)[: min(n, 256 * nlist)]]
        index.cp.seed = seed
        index.train(train)
        index.nprobe = nprobe
        params = {"nlist": nlist, "nprobe": nprobe}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        params = {"M": m, "efConstruction": ef_construction, "efSearch": ef_search}
    else:
        raise UserError(f"--kind {kind}: choose auto, {', '.join(KINDS)}")
    index.add(x)
    return index, params


def recall_at_10(index, z: np.ndarray, sample: int = 1000, seed: int = 0) -> float:
    """Mean share of the true 10 nearest (brute force) that the index returns, over a seeded sample of rows."""
    k = min(10, len(z))
    q = z[np.random.default_rng(seed).permutation(len(z))[: min(sample, len(z))]].astype(np.float32)
    _, truth = exact_topk(q, z, k)
    _, got = index.search(np.ascontiguousarray(q), k)
    return float(np.mean([len(set(t) & set(g)) / k for t, g in zip(truth.tolist(), got.tolist(), strict=True)]))


def build_index(embeddings, kind: str = "auto", seed: int = 0, **params: Any) -> tuple[Any, dict[str, Any]]:
    """(a faiss index over the L2-normalised rows of ``embeddings`` (N, D), its parameters): inner product, so
    ``index.search(queries, k)`` gives cosine similarities and row ids.

    ``embeddings``: a torch tensor or a numpy array. ``kind``: exact, ivf (``nlist``, ``nprobe``), hnsw (``m``,
    ``ef_construction``, ``ef_search``) or auto (exact below 100,000 rows, else hnsw). Needs faiss
    (``pip install 'isif[search]'``); ``search`` and ``exact_topk`` search exactly without it.
    """
    import torch

    z = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    z = np.ascontiguousarray(z, dtype=np.float32)
    return build(z, default_kind(len(z)) if kind == "auto" else kind, seed, **params)


def index_embed_dir(embed_dir: str | Path, kind: str = "auto", seed: int = 0, sample: int = 1000, **params) -> dict:
    """Build, measure and save the index of ``embed_dir``'s features.npy (``isif index``); returns its metadata."""
    d = Path(embed_dir)
    feats = d / "features.npy"
    if not feats.is_file():
        raise UserError(f"{d}: no features.npy; run `isif embed CHECKPOINT FOLDER --out {d}` first")
    z = np.load(feats, mmap_mode="r")
    kind = default_kind(len(z)) if kind == "auto" else kind
    faiss = faiss_module()
    t0 = time.perf_counter()
    index, used = build(np.asarray(z), kind, seed, **params)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    recall = recall_at_10(index, np.asarray(z), sample, seed)
    meta = {"kind": kind, "params": used, "images": int(len(z)), "dim": int(z.shape[1]), "recall@10": recall,
            "recall_queries": int(min(sample, len(z))), "seed": seed, "build_s": build_s,
            "recall_s": time.perf_counter() - t0, "features_sha256": sha256_file(feats),
            "faiss": getattr(faiss, "__version__", "?")}
    data = faiss.serialize_index(index)
    atomic_write_bytes(d / INDEX_FILE, lambda fh: fh.write(data.tobytes()))
    atomic_write_bytes(d / META_FILE, lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
    return meta


def load_index(embed_dir: str | Path) -> tuple[Any, dict] | None:
    """(faiss index, its metadata) of an ``isif embed`` folder indexed by ``isif index``, or None without an
    index; a ``UserError`` when it was built on other embeddings or its file is damaged."""
    d = Path(embed_dir)
    if not (d / INDEX_FILE).is_file():
        return None
    faiss = faiss_module()
    try:
        meta = json.loads((d / META_FILE).read_text())
        index = faiss.deserialize_index(np.frombuffer((d / INDEX_FILE).read_bytes(), dtype=np.uint8))
    except Exception as e:  # faiss raises RuntimeError on damage; a missing or bad meta file is OSError/ValueError
        raise UserError(f"{d / INDEX_FILE}: damaged or unreadable index ({type(e).__name__}); rebuild it with "
                        f"`isif index {d}` or search with --exact") from None
    if meta.get("features_sha256") != sha256_file(d / "features.npy") or index.ntotal != meta.get("images"):
        raise UserError(f"{d / INDEX_FILE} was built on other embeddings than {d / 'features.npy'}; rebuild it "
                        f"with `isif index {d}`, or search with --exact")
    if "efSearch" in meta.get("params", {}):
        index.hnsw.efSearch = meta["params"]["efSearch"]
    if "nprobe" in meta.get("params", {}):
        index.nprobe = meta["params"]["nprobe"]
    return index, meta
