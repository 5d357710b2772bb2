"""A faiss index beside an ``isif embed`` folder, checked against exact search when it is built.

    isif index EMBED_DIR [--kind auto|exact|ivf|hnsw|ivfpq|ivfpq-hnsw] [--rerank K]
                                                        (index_embed_dir; build_index indexes an array)

The kinds are one table, ``INDEX_KINDS``: exact (flat inner product), ivf (an inverted file of ``nlist`` cells),
hnsw (a graph of ``M`` links), ivfpq (the inverted file with product-quantised codes, optionally after OPQ) and
ivfpq-hnsw (the same codes behind an HNSW coarse quantiser, for hundreds of thousands of cells). Training uses a
seeded sample (``TRAIN_PER_CELL`` vectors a cell, at most ``TRAIN_MAX``, never under ``MIN_PER_CELL``); rows are
added block by block from the memory-mapped features, so a build never holds the float collection in memory.
``rerank`` K re-scores the index's K best candidates exactly on the float features (``exact_rescore``).

Each build measures its own Recall@10 against exact search on a seeded sample (with and without re-ranking) and
records it, the parameters, timings, bytes a vector and the ``features_id`` of its rows in ``index-meta.json``: an
index of other embeddings is refused. ``isif embed`` extends it with new rows (row ids are stable) or rebuilds it
with the same settings. ``auto`` picks by size (``EXACT_BELOW``, ``HNSW_BELOW``; ivfpq with ``AUTO_RERANK`` above),
from ``benchmarks/index_scale.py``: the measurements behind each threshold are in docs/collection.md. faiss is an
extra (``pip install 'isif[search]'``); without it exact search still works everywhere.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..base.errors import UserError
from ..base.extras import FAISS_INSTALL, faiss_module
from ..base.files import atomic_write_bytes
from ..base.settings import at_least, one_of, setting
from .rows import BLOCK, Rows


@dataclass(frozen=True)
class IndexKind:
    """One kind of index, a row of ``INDEX_KINDS``: its faiss factory string from the build options, the options it
    takes (``isif index`` flags), whether it trains (k-means of a seeded sample into ``nlist`` cells), whether it
    holds compressed codes (``auto`` re-ranks those; the PQ checks apply), the ``nprobe`` it visits by default for
    ``nlist`` cells, and the flag that raises its recall."""

    name: str
    factory: Callable[[dict], str]
    takes: tuple[str, ...]
    trains: bool = False
    compressed: bool = False
    nprobe: Callable[[int], int] | None = None
    recall_flag: str = "--kind exact"


def _pq(coarse: str) -> Callable[[dict], str]:
    """The factory of product-quantised codes behind the ``coarse`` quantiser (an OPQ rotation first if asked)."""
    return lambda o: (f"OPQ{o['pq_m']}," if o["opq"] else "") + coarse.format(**o) + f",PQ{o['pq_m']}x{o['pq_bits']}"


_PQ = ("nlist", "nprobe", "pq_m", "pq_bits", "opq")
INDEX_KINDS: dict[str, IndexKind] = {k.name: k for k in (
    IndexKind("exact", lambda o: "Flat", ()),
    IndexKind("ivf", lambda o: "IVF{nlist},Flat".format(**o), ("nlist", "nprobe"), trains=True,
              nprobe=lambda nlist: max(1, nlist // 16), recall_flag="a larger --nprobe"),
    IndexKind("hnsw", lambda o: "HNSW{m},Flat".format(**o), ("m", "ef_search"), recall_flag="a larger --ef-search"),
    IndexKind("ivfpq", _pq("IVF{nlist}"), _PQ, trains=True, compressed=True, nprobe=lambda nlist: IVFPQ_NPROBE,
              recall_flag="a larger --rerank"),
    IndexKind("ivfpq-hnsw", _pq("IVF{nlist}_HNSW32"), _PQ, trains=True, compressed=True, nprobe=lambda nlist: 64,
              recall_flag="a larger --rerank"),
)}
KINDS = tuple(INDEX_KINDS)
EXACT_BELOW = 100_000  # exact search's single-query p50 reaches 2 ms here (see the module docstring)
HNSW_BELOW = 2_000_000  # HNSW's ~780 bytes a vector pass 1.5 GiB here; compressed codes above
AUTO_RERANK = 100  # the re-ranking ``auto`` gives a compressed index
IVFPQ_NPROBE = 32  # 10M vectors, re-ranking 100: Recall@10 0.989 with 16 of 12,649 cells, 0.993 with 64
TRAIN_PER_CELL, TRAIN_MAX = 64, 1_000_000  # the seeded training sample: vectors a k-means centroid, at most
MIN_PER_CELL = 39  # below this many training vectors a centroid, faiss's k-means warns; isif refuses
INDEX_FILE, META_FILE = "index.faiss", "index-meta.json"
INSTALL = FAISS_INSTALL


def default_kind(n: int) -> str:
    return "exact" if n < EXACT_BELOW else "hnsw" if n < HNSW_BELOW else "ivfpq"


def default_nlist(n: int, kind: str) -> int:
    """Cells of the inverted file: about 4 sqrt(N) (flat quantiser), or the faiss wiki's 65,536 / 262,144 /
    1,048,576 for 1M / 10M / 100M vectors (HNSW quantiser); never more than the training floor allows."""
    if kind == "ivfpq-hnsw":
        want = 1_048_576 if n >= 100_000_000 else 262_144 if n >= 10_000_000 else 65_536 if n >= 1_000_000 else \
            int(16 * np.sqrt(n))
    else:
        want = int(4 * np.sqrt(n))
    return max(1, min(want, n // MIN_PER_CELL, TRAIN_MAX // MIN_PER_CELL))


def exact_topk(queries: np.ndarray, z, k: int, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores (q, k), ids (q, k)) by brute force, in blocks of queries (at most 2^26 similarities, 256 MiB, at
    a time by default); ties go to the lower id. ``z``: an array, or ``Rows`` on disk (read a block at a time)."""
    if isinstance(z, Rows):
        return _exact_topk_rows(np.asarray(queries, np.float32), z, k)
    out_s, out_i = [], []
    zt = np.ascontiguousarray(z, dtype=np.float32).T
    block = block or max(1, 2**26 // max(1, len(z)))
    for s in range(0, len(queries), block):
        sim = np.asarray(queries[s:s + block], dtype=np.float32) @ zt  # (b, N)
        cs, cand = _topk(sim, k)
        out_i.append(cand)
        out_s.append(cs)
    return np.concatenate(out_s), np.concatenate(out_i)


def _topk(sim: np.ndarray, k: int, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns of each row of ``sim`` by (score, id), their ids ``ids`` (default the column)."""
    if k < sim.shape[1]:
        cand = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    else:
        cand = np.tile(np.arange(sim.shape[1]), (len(sim), 1))
    cs = np.take_along_axis(sim, cand, 1)
    cid = cand if ids is None else np.take_along_axis(ids, cand, 1) if ids.ndim == 2 else ids[cand]
    order = np.lexsort((cid, -cs), axis=1)  # by score, then by id
    return np.take_along_axis(cs, order, 1), np.take_along_axis(cid, order, 1)


def _exact_topk_rows(q: np.ndarray, rows: Rows, k: int, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """``exact_topk`` over rows on disk: each block's k best, merged by (score, id), with all queries at once."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for s0, z in rows.blocks(block):
        cs, ci = _topk(q @ z.T, min(k, len(z)))
        both_s, both_i = np.concatenate([best_s, cs], 1), np.concatenate([best_i, ci + s0], 1)
        best_s, best_i = _topk(both_s, min(k, both_s.shape[1]), both_i)
    return best_s, best_i


def _check(n: int, d: int, kind: str, nlist: int | None, pq_m: int, pq_bits: int) -> None:
    """Refuse, in one line with the fix, settings faiss cannot build (or would train on too little)."""
    if kind not in INDEX_KINDS:
        raise UserError(f"--kind {kind}: choose auto, {', '.join(KINDS)}")
    if INDEX_KINDS[kind].compressed:
        if pq_m > d or d % pq_m:
            ok = [m for m in (4, 8, 16, 32, 48, 64) if m <= d and d % m == 0]
            raise UserError(f"--pq-m {pq_m}: the {d}-d vectors split into sub-vectors only when --pq-m divides {d} "
                            f"(and is at most {d}); try {', '.join(map(str, ok))}")
        if not 1 <= pq_bits <= 16:
            raise UserError(f"--pq-bits {pq_bits}: choose 1 to 16 (8 is faiss's fast path)")
        need = MIN_PER_CELL * (1 << pq_bits)
        if n < need:
            raise UserError(f"too few vectors to train --kind {kind}: {n:,} embeddings, and {pq_bits}-bit codes need "
                            f"{need:,} ({MIN_PER_CELL} a centroid); use --kind exact or hnsw, or fewer --pq-bits")
    if INDEX_KINDS[kind].trains and nlist is not None and n < MIN_PER_CELL * nlist:
        raise UserError(f"too few vectors to train --nlist {nlist}: {n:,} embeddings, {MIN_PER_CELL} a cell needs "
                        f"{MIN_PER_CELL * nlist:,}; lower --nlist (or leave it to the default)")


def _train_sample(z, n_train: int, seed: int) -> np.ndarray:
    n = len(z)
    if n_train >= n:
        return np.ascontiguousarray(z[:], dtype=np.float32)
    ids = np.sort(np.random.default_rng(seed).choice(n, size=n_train, replace=False))
    return np.ascontiguousarray(z[ids], dtype=np.float32)


def build(z, kind: str, seed: int = 0, nlist: int | None = None, nprobe: int | None = None,
          m: int = 32, ef_construction: int = 80, ef_search: int = 64, pq_m: int = 32, pq_bits: int = 8,
          opq: bool = False):
    """(faiss index over the rows of ``z`` (an array or ``Rows``; added block by block), its parameters)."""
    faiss = faiss_module()
    n, d = z.shape
    _check(n, d, kind, nlist, pq_m, pq_bits)
    k = INDEX_KINDS[kind]
    if k.trains:
        nlist = nlist or default_nlist(n, kind)
        nprobe = nprobe or min(nlist, k.nprobe(nlist))
    opts = {"nlist": nlist, "m": m, "pq_m": pq_m, "pq_bits": pq_bits, "opq": opq}
    factory = k.factory(opts)
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    params: dict[str, Any] = {}
    if kind == "hnsw":  # the graph's build and search breadth
        graph = faiss.downcast_index(index).hnsw
        graph.efConstruction, graph.efSearch = ef_construction, ef_search
        params = {"M": m, "efConstruction": ef_construction, "efSearch": ef_search}
    if k.trains:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.seed = seed
        if hasattr(ivf, "do_polysemous_training"):  # the factory's default; isif never searches by Hamming
            ivf.do_polysemous_training = False  # distance, and it was 95% of the training time
        cells = max(nlist, 1 << pq_bits if k.compressed else 1)
        # 64 a cell up to 1M vectors; an explicit --nlist past 1M / 39 still gets faiss's floor of 39 a cell
        train = _train_sample(z, min(n, max(min(TRAIN_PER_CELL * cells, TRAIN_MAX), MIN_PER_CELL * cells)), seed)
        t0 = time.perf_counter()
        index.train(train)
        params = {"nlist": nlist, "nprobe": nprobe, "factory": factory, "train": int(len(train)),
                  "train_s": round(time.perf_counter() - t0, 2)}
        if k.compressed:
            params |= {"pq_m": pq_m, "pq_bits": pq_bits, "opq": opq}
        if "_HNSW" in factory:
            params["quantizer_efSearch"] = quantizer_ef_search(nprobe)
        set_search_params(index, params)
    add_rows(index, z)
    return index, params


def add_rows(index, z, start: int = 0) -> None:
    """Add rows ``start`` on of ``z`` (an array or ``Rows``) to ``index``, 4 blocks at a time (bounded memory)."""
    for s in range(start, len(z), 4 * BLOCK):
        index.add(np.ascontiguousarray(z[s:s + 4 * BLOCK], dtype=np.float32))


def quantizer_ef_search(nprobe: int) -> int:
    """The HNSW coarse quantiser's efSearch for ``nprobe`` cells: enough candidates to return them all."""
    return max(64, 2 * nprobe)


def set_search_params(index, params: dict) -> None:
    """The search-time parameters a build recorded (efSearch, nprobe, the HNSW quantiser's efSearch)."""
    faiss = faiss_module()
    if "efSearch" in params:
        faiss.downcast_index(index).hnsw.efSearch = params["efSearch"]
    if "nprobe" in params:
        ps = faiss.ParameterSpace()
        ps.set_index_parameter(index, "nprobe", params["nprobe"])
        if "quantizer_efSearch" in params:
            ps.set_index_parameter(index, "quantizer_efSearch", params["quantizer_efSearch"])


def recall_at_10(index, z, sample: int = 1000, seed: int = 0, rerank: int = 0) -> float:
    """Mean share of the true 10 nearest (brute force) that the index returns, over a seeded sample of rows; with
    ``rerank``, of the index's ``rerank`` best re-scored exactly on ``z``."""
    return _recalls(index, z, sample, seed, rerank)[1 if rerank else 0]


def exact_rescore(query: np.ndarray, rows: Rows, ids: np.ndarray, k: int,
                  exclude: list[int | None]) -> tuple[np.ndarray, np.ndarray]:
    """The index's candidates ``ids`` (q, c) re-scored exactly against the rows on disk: (scores (q, k), ids (q, k))
    by exact inner product, ties to the lower id; -1 (a shortfall of the index) and ``exclude`` left out."""
    out_s, out_i = [], []
    for i, j in enumerate(exclude):
        cand = np.unique(ids[i][(ids[i] >= 0) & (ids[i] != (-1 if j is None else j))])
        sc = rows[cand] @ np.asarray(query[i], np.float32)
        order = np.lexsort((cand, -sc))[:k]
        out_s.append(sc[order])
        out_i.append(cand[order])
    return np.stack(out_s), np.stack(out_i)


def _recalls(index, z, sample: int, seed: int, rerank: int) -> tuple[float, float | None]:
    k = min(10, len(z))
    pick = np.sort(np.random.default_rng(seed).permutation(len(z))[: min(sample, len(z))])
    q = np.ascontiguousarray(z[pick], dtype=np.float32)
    _, truth = exact_topk(q, z, k)

    def share(got: np.ndarray) -> float:
        return float(np.mean([len(set(t) & set(g)) / k for t, g in zip(truth.tolist(), got.tolist(), strict=True)]))

    _, got = index.search(q, max(k, rerank))
    plain = share(got[:, :k])
    if not rerank:
        return plain, None
    rows = z if isinstance(z, Rows) else Rows([np.asarray(z, np.float32)])
    _, ids = exact_rescore(q, rows, got, k, [None] * len(q))
    return plain, share(ids)


def build_index(embeddings, kind: str = "auto", seed: int = 0, **params: Any) -> tuple[Any, dict[str, Any]]:
    """(a faiss index over the L2-normalised rows of ``embeddings`` (N, D), its parameters): inner product, so
    ``index.search(queries, k)`` gives cosine similarities and row ids.

    ``embeddings``: a torch tensor or a numpy array. ``kind``: exact, ivf (``nlist``, ``nprobe``), hnsw (``m``,
    ``ef_construction``, ``ef_search``), ivfpq or ivfpq-hnsw (``nlist``, ``nprobe``, ``pq_m``, ``pq_bits``,
    ``opq``) or auto (by size, see the module docstring). Needs faiss (``pip install 'isif[search]'``); ``search``
    and ``exact_topk`` search exactly without it.
    """
    import torch

    z = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    z = np.ascontiguousarray(z, dtype=np.float32)
    return build(z, default_kind(len(z)) if kind == "auto" else kind, seed, **params)


@dataclass(kw_only=True)
class IndexOptions:
    embed_dir: str = setting(help="an `isif embed` output folder", positional=True, metavar="EMBED_DIR")
    kind: str = setting("auto", "auto: exact below 100,000 images, HNSW below 2,000,000, ivfpq with --rerank 100 "
                                "above; ivfpq and ivfpq-hnsw hold product-quantised codes (--pq-m bytes a vector)",
                        check=one_of("auto", *KINDS))
    nlist: int | None = setting(None, "ivf, ivfpq: cells (default about 4 sqrt(N)); ivfpq-hnsw: the faiss wiki's "
                                      "65,536 from 1M vectors, 262,144 from 10M", check=at_least(1))
    nprobe: int | None = setting(None, "cells visited per query (default ivf nlist/16, ivfpq 32, ivfpq-hnsw 64)",
                                 check=at_least(1))
    m: int = setting(32, "hnsw: links per node", check=at_least(1))
    ef_search: int = setting(64, "hnsw: candidates kept per query", check=at_least(1))
    pq_m: int = setting(32, "ivfpq: sub-quantisers, must divide the dimension (bytes a code at 8 bits)",
                        check=at_least(1))
    pq_bits: int = setting(8, "ivfpq: bits a sub-quantiser", check=at_least(1))
    opq: bool = setting(False, "ivfpq: an OPQ rotation before the codes (learnt on the training sample)")
    rerank: int | None = setting(None, "re-score the index's K best candidates exactly on the float features (0: "
                                       "none; default 100 for a compressed index chosen by auto, else 0)",
                                 check=at_least(0))
    recall_queries: int = setting(1000, "sampled queries of the Recall@10 check", check=at_least(1))
    seed: int = setting(0, "seed of the index build and of the Recall@10 queries")

    def params(self) -> dict[str, int | None]:
        """The index's own parameters, for the kind that takes them (``INDEX_KINDS``; auto: none)."""
        takes = INDEX_KINDS[self.kind].takes if self.kind in INDEX_KINDS else ()
        return {name: getattr(self, name) for name in takes}


def index_embed_dir(o: IndexOptions) -> dict[str, Any]:
    """Build, measure and save the index of ``o.embed_dir``'s features (``isif index``); returns its metadata, as
    index.json beside it holds it. ``o.rerank``: candidates re-scored exactly at search time (default:
    ``AUTO_RERANK`` for a compressed index that ``auto`` chose, else none)."""
    embed_dir, kind, seed, sample, rerank, params = o.embed_dir, o.kind, o.seed, o.recall_queries, o.rerank, o.params()
    ed = _embed_dir(embed_dir)
    z = ed.features
    chosen = default_kind(len(z)) if kind == "auto" else kind
    if rerank is None:
        rerank = AUTO_RERANK if kind == "auto" and INDEX_KINDS[chosen].compressed else 0
    if rerank and rerank < 10:
        raise UserError(f"--rerank {rerank}: re-rank at least the 10 candidates Recall@10 counts (or 0 for none)")
    return _build_and_save(ed, chosen, seed, sample, rerank, params)


def _embed_dir(embed_dir):
    from .embed_dir import is_embed_dir, load_embed_dir

    d = Path(embed_dir)
    if not is_embed_dir(d):
        raise UserError(f"{d}: no embed output (features and paths.txt); run `isif embed CHECKPOINT FOLDER --out {d}` "
                        "first")
    return load_embed_dir(d, unit=False)


def _build_and_save(ed, kind: str, seed: int, sample: int, rerank: int, params: dict,
                    index=None, t_build: float | None = None) -> dict:
    faiss = faiss_module()
    z = ed.features
    if index is None:
        t0 = time.perf_counter()
        index, used = build(z, kind, seed, **params)
        t_build = time.perf_counter() - t0
    else:
        used = params
    t0 = time.perf_counter()
    plain, reranked = _recalls(index, z, sample, seed, rerank)
    atomic_write_bytes(ed.folder / INDEX_FILE, lambda fh: faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write)))
    meta = {"kind": kind, "params": used, "images": int(len(z)), "dim": int(z.shape[1]), "recall@10": plain,
            "rerank": rerank, "recall@10_reranked": reranked, "recall_queries": int(min(sample, len(z))),
            "seed": seed, "build_s": t_build, "recall_s": time.perf_counter() - t0,
            "bytes_per_vector": round((ed.folder / INDEX_FILE).stat().st_size / len(z), 1),
            "features_id": ed.features_id,
            "segments": ed.segments, "faiss": getattr(faiss, "__version__", "?")}
    atomic_write_bytes(ed.folder / META_FILE, lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
    return meta


def build_options(meta: dict) -> dict:
    """The ``build`` keyword arguments that made an index, from its recorded parameters."""
    p = meta.get("params", {})
    names = {"nlist": "nlist", "nprobe": "nprobe", "M": "m", "efConstruction": "ef_construction",
             "efSearch": "ef_search", "pq_m": "pq_m", "pq_bits": "pq_bits", "opq": "opq"}
    return {names[k]: v for k, v in p.items() if k in names}


def extend_index(embed_dir: str | Path) -> dict | None:
    """After ``isif embed`` changed the collection: the existing index extended with the new rows when the old
    rows are all still there in order (its segments a prefix of the folder's), else rebuilt with the same kind and
    settings; Recall@10 measured again either way. None when there is no index or it is already current."""
    d = Path(embed_dir)
    if not (d / INDEX_FILE).is_file():
        return None
    ed = _embed_dir(d)
    try:
        meta = json.loads((d / META_FILE).read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("features_id") == ed.features_id:
        return None
    faiss_module()  # one line naming the install when faiss is missing
    old, new = [tuple(s) for s in meta.get("segments", [])], ed.segments
    kind = meta.get("kind", default_kind(len(ed.features)))
    sample, seed, rerank = meta.get("recall_queries", 1000), meta.get("seed", 0), meta.get("rerank", 0)
    if old and new[:len(old)] == old and kind in KINDS:
        t0 = time.perf_counter()
        index = read_index_file(d / INDEX_FILE)
        start = int(sum(hi - lo for _, lo, hi in old))
        add_rows(index, ed.features, start)
        set_search_params(index, meta.get("params", {}))
        res = _build_and_save(ed, kind, seed, sample, rerank, meta.get("params", {}), index,
                              (meta.get("build_s") or 0.0) + time.perf_counter() - t0)
        return res | {"extended": len(ed.features) - start}
    return _build_and_save(ed, kind, seed, sample, rerank, build_options(meta)) | {"rebuilt": True}


def read_index_file(path: Path):
    """A faiss index streamed from its file (never the whole file in memory beside the index it becomes)."""
    faiss = faiss_module()
    with open(path, "rb") as fh:
        return faiss.read_index(faiss.PyCallbackIOReader(fh.read))


def load_index(embed_dir: str | Path, features_id: str | None = None) -> tuple[Any, dict] | None:
    """(faiss index, its metadata) of an ``isif embed`` folder indexed by ``isif index``, or None without an
    index; a ``UserError`` when it was built on other embeddings (``features_id``: the folder's, when the caller
    has read it) or its file is damaged."""
    from .embed_dir import load_embed_dir

    d = Path(embed_dir)
    if not (d / INDEX_FILE).is_file():
        return None
    faiss_module()  # one line naming the install when faiss is missing
    try:
        meta = json.loads((d / META_FILE).read_text())
        index = read_index_file(d / INDEX_FILE)
    except Exception as e:  # faiss raises RuntimeError on damage; a missing or bad meta file is OSError/ValueError
        raise UserError(f"{d / INDEX_FILE}: damaged or unreadable index ({type(e).__name__}); rebuild it with "
                        f"`isif index {d}` or search with --exact") from None
    built_on = meta.get("features_id") or meta.get("features_sha256")
    if built_on != (features_id or load_embed_dir(d, unit=False).features_id) or index.ntotal != meta.get("images"):
        raise UserError(f"{d / INDEX_FILE} was built on other embeddings than those of {d}; rebuild it with "
                        f"`isif index {d}`, or search with --exact")
    set_search_params(index, meta.get("params", {}))
    return index, meta
