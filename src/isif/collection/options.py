"""The options of the commands over checkpoints and image collections: one dataclass of ``setting`` fields each.

``isif embed``, ``search``, ``index``, ``export``, ``export-embeddings``, ``cluster``, ``duplicates``, ``map``,
``eval knn | retrieval | linear`` and ``plot similarity``. A field gives the flag (or argument), its default, its
help and its check (``isif.base.settings.check_fields``); a field without a default is required. Checks that need
the data (``--k`` against the number of images, ``--threshold`` of a cosine) stay with the functions that read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base.settings import POSITIVE, at_least, each, one_of, setting
from .index import INDEX_KINDS, KINDS

_EMBED_DIR = "an `isif embed` output folder (features.npy, paths.txt, index.json)"


def _checkpoint_arg() -> str:
    return setting(help="a .pt file or a run folder", positional=True)


def _embed_dir() -> str:
    return setting(help=_EMBED_DIR, positional=True, metavar="EMBED_DIR")


def _tile(default: int, what: str = "thumbnail side in pixels") -> int:
    return setting(default, what, check=at_least(16))


@dataclass(kw_only=True)
class EmbedOptions:
    checkpoint: str = _checkpoint_arg()
    folder: str = setting(help="a folder of images (searched recursively)", positional=True)
    out: str | None = setting(None, "output folder (default FOLDER-embeddings beside the folder)")
    batch_size: int = setting(256, "images per forward pass", check=at_least(1))
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    workers: int | None = setting(None, "DataLoader workers decoding the files (default cores-1, max 8)",
                                  check=at_least(0))
    shard_size: int = setting(50_000, "images per shard, the unit a rerun resumes from", check=at_least(1))
    overwrite: bool = setting(False, "replace embeddings made with another checkpoint")
    strict: bool = setting(False, "stop at the first broken file instead of skipping it")
    quiet: bool = setting(False, "no progress bar")


@dataclass(kw_only=True)
class SearchOptions:
    checkpoint: str = _checkpoint_arg()
    queries: list[str] = setting(help="query images or folders of them", positional=True, metavar="QUERY")
    gallery: str = setting(help="a folder of images, or an `isif embed` output folder")
    k: int = setting(5, "neighbours per query", check=at_least(1))
    out: str = setting("search.png", "the grid PNG")
    max_rows: int = setting(8, "queries drawn in the grid", check=at_least(1))
    tile: int = setting(112, "side of each image in the grid, in pixels", check=at_least(32))
    batch_size: int = setting(256, "images per forward pass", check=at_least(1))
    device: str | None = setting(None, "auto, cpu, cuda or cuda:N (default auto)")
    strict: bool = setting(False, "stop at the first broken image instead of skipping it")
    json: bool = setting(False, "print one JSON object")
    exact: bool = setting(False, "exact search even when the gallery has a faiss index")


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


@dataclass(kw_only=True)
class ExportOptions:
    checkpoint: str = _checkpoint_arg()
    format: str = setting("torchscript", "torchscript or onnx: a graph with the normalisation inside; safetensors: "
                                         "the weights, with the architecture and input recipe in its metadata "
                                         "(isif.load_model and --weights read it)",
                          check=one_of("torchscript", "onnx", "safetensors"))
    out: str | None = setting(None, "output file (default CHECKPOINT_NAME.torchscript.pt, .onnx or .safetensors "
                                    "beside it)")
    atol: float = setting(1e-5, "largest allowed embedding difference")


@dataclass(kw_only=True)
class ExportEmbeddingsOptions:
    embed_dir: str = _embed_dir()
    out: str | None = setting(None, "the Parquet file (default EMBED_DIR/embeddings.parquet); never inside the image "
                                    "folder")


@dataclass(kw_only=True)
class ClusterOptions:
    embed_dir: str = _embed_dir()
    k: int = setting(help="number of clusters (1 to the number of images)")
    seed: int = setting(0, "k-means++ seed (and of the training sample)")
    train_rows: int = setting(1_000_000, "k-means trains on every image up to this many, above on a seeded sample "
                                         "of this many (then every image goes to its nearest centre)",
                              check=at_least(1))
    out: str | None = setting(None, "output folder (default EMBED_DIR)")
    per_sheet: int = setting(64, "images per contact sheet, most central first", check=at_least(1))
    tile: int = _tile(64)


@dataclass(kw_only=True)
class DuplicatesOptions:
    embed_dir: str = _embed_dir()
    threshold: float | None = setting(None, "cosine similarity that makes two images copies, in (-1, 1] "
                                            "(default: calibrated by `isif embed` on the collection)")
    out: str | None = setting(None, "output folder (default EMBED_DIR)")
    max_groups: int = setting(50, "groups drawn in duplicates.png", check=at_least(1))
    tile: int = _tile(64)
    block: int = setting(2048, "rows and columns of one similarity tile", check=at_least(1))
    keep: str | None = setting(None, "also write the images to keep to this file, one absolute path a line: every "
                                     "image in no group and each group's representative")


@dataclass(kw_only=True)
class MapOptions:
    embed_dir: str = _embed_dir()
    method: str = setting("auto", "auto: UMAP when umap-learn is installed, else PCA",
                          check=one_of("auto", "umap", "pca"))
    out: str | None = setting(None, "the screen-size PNG (default EMBED_DIR/map.png); map-full.png, map.csv and "
                                    "map.json are written beside it")
    thumbs: int = setting(2000, "thumbnails drawn, a seeded sample, one per grid cell", check=at_least(0))
    seed: int = setting(0, "seed of UMAP, of the thumbnail sample and of the greedy grid placement")
    tile: int = setting(28, "pixels per grid cell in map.png", check=at_least(8))
    full_tile: int = setting(96, "pixels per grid cell in map-full.png, the picture to zoom into", check=at_least(16))


# ----------------------------------------------------------------------------- eval and plot


@dataclass(kw_only=True)
class CheckpointOptions:
    """What every ``isif eval`` protocol takes."""

    checkpoint: str = setting(help="a .pt file, or a run folder (uses checkpoints/last.pt)")
    data: str | None = setting(None, "dataset path, if it moved since training; for a run on unlabelled images, "
                                     "the labelled images to evaluate on (default its --eval-data)")
    device: str | None = setting(None, "auto, cpu, cuda or cuda:N (default auto)")
    json: bool = setting(False, "print one JSON object")


@dataclass(kw_only=True)
class KnnOptions(CheckpointOptions):
    k: int | None = setting(None, "neighbours (default: the run's, 200)", check=at_least(1))
    sigma: float | None = setting(None, "vote temperature (default: the run's, 0.1)", check=POSITIVE)


@dataclass(kw_only=True)
class RetrievalOptions(CheckpointOptions):
    ks: tuple[int, ...] | None = setting(None, "comma-separated K for Recall@K (default: the run's; 1,2,4,8, or "
                                               "1,10,100 for SOP)", check=each(at_least(1)))
    seed: int = setting(0, "k-means seed for NMI")

    def sorted_ks(self) -> tuple[int, ...] | None:
        return tuple(sorted(set(self.ks))) if self.ks else None


@dataclass(kw_only=True)
class LinearOptions(CheckpointOptions):
    features: str = setting("backbone", "pooled backbone features or the 128-d embedding",
                            check=one_of("backbone", "embedding"))
    epochs: int = setting(100, "probe epochs", check=at_least(1))
    lr: float = setting(0.1, "probe learning rate, cosine schedule", check=POSITIVE)


@dataclass(kw_only=True)
class SimilarityOptions:
    run: str = setting(help="a run folder or checkpoint", positional=True)
    compare: list[str] = setting(help="another run to overlay (repeatable)", factory=list, metavar="RUN")
    out: str | None = setting(None, "PNG path (default RUN/similarity.png)")
    images: int = setting(5000, "test images used", check=at_least(2))
    data: str | None = setting(None, "dataset path, if it moved since training")
    device: str | None = setting(None, "auto, cpu, cuda or cuda:N (default auto)")
    seed: int = setting(0, "seed of the images drawn and of their augmented views")

