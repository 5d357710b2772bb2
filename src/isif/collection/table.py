"""``isif export-embeddings``: an embed folder as one Parquet file that DuckDB, pandas, Polars and LanceDB read.

    isif export-embeddings EMBED_DIR [--out FILE.parquet]       (default EMBED_DIR/embeddings.parquet)

One row per image, in paths.txt's order: ``path``, ``embedding`` (fixed_size_list<float32>[D], as written), then
the columns of the other commands' files when they were made from these features, each read by its owner (a stale
one is named in one warning line and left out): ``cluster``, ``duplicate_group`` (int32, null outside a group),
``selection_rank`` (int32), ``label``, ``confidence``, ``label_given``, ``suspect_score``, and ``isif audit``'s
scores (float32) and flags (bool): ``outlier``, ``outlier_flag``, ``blurry``, ... (docs/collection.md lists them).
The key-value metadata ``isif`` names the image root, the checkpoint, its sha256, D and N. Written in row groups of
``ROW_GROUP`` rows streamed from the memory-mapped features (memory stays at one row group), to a temporary name
and renamed; never inside the image folder. pyarrow is an extra (``pip install 'isif[parquet]'``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base.errors import UserError
from ..base.files import atomic_write_bytes
from ..base.settings import setting
from .embed_dir import load_embed_dir, output_dir
from .options import embed_dir_arg

ROW_GROUP = 65_536
PARQUET_INSTALL = "writing Parquet needs pyarrow: pip install 'isif[parquet]' (or pip install pyarrow)"


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(PARQUET_INSTALL) from None
    return pa, pq


@dataclass(kw_only=True)
class ExportEmbeddingsOptions:
    embed_dir: str = embed_dir_arg()
    out: str | None = setting(None, "the Parquet file (default EMBED_DIR/embeddings.parquet); never inside the image "
                                    "folder")


@dataclass
class TableResult:
    out: Path
    images: int
    dim: int
    columns: list[str]


def _columns(ed, pa) -> dict[str, tuple]:
    """The optional columns, name -> (arrow type, values, null mask or None), from each current file beside the
    features (a stale or unreadable one is named on stderr by its reader and left out)."""
    from .audit import read_audit
    from .cluster import read_clusters
    from .duplicates import read_duplicates
    from .label import read_labels_table
    from .select import read_selection

    n = len(ed.paths)
    columns: dict[str, tuple] = {}
    clusters = read_clusters(ed, "the cluster column is left out")
    if clusters is not None:
        columns["cluster"] = (pa.int32(), clusters.of.astype(np.int32), clusters.of < 0)
    groups = read_duplicates(ed, "the duplicate_group column is left out")
    if groups is not None:
        columns["duplicate_group"] = (pa.int32(), groups.astype(np.int32), groups < 0)
    ranks = read_selection(ed, "the selection_rank column is left out")
    if ranks is not None:
        rank = np.zeros(n, np.int32)
        rank[list(ranks)] = list(ranks.values())
        columns["selection_rank"] = (pa.int32(), rank, rank == 0)
    labels = read_labels_table(ed, "the label columns are left out")
    if labels is not None:
        columns["label"] = (pa.string(), np.array(labels.label, dtype=object), None)
        columns["confidence"] = (pa.float32(), labels.confidence.astype(np.float32), None)
        columns["label_given"] = (pa.bool_(), labels.given, None)
        if np.isfinite(labels.suspect).any():
            columns["suspect_score"] = (pa.float32(), labels.suspect.astype(np.float32), ~np.isfinite(labels.suspect))
    for name, v in (read_audit(ed, "the audit columns are left out") or {}).items():
        flag = name.endswith("_flag")
        columns[name] = (pa.bool_(), v, None) if flag else (pa.float32(), v.astype(np.float32), ~np.isfinite(v))
    return columns


def export_embeddings(o: ExportEmbeddingsOptions, row_group: int = ROW_GROUP) -> TableResult:
    """Write the Parquet file of ``o.embed_dir`` (see the module docstring); returns what was written."""
    ed = load_embed_dir(o.embed_dir, unit=False)
    target = Path(o.out) if o.out else ed.folder / "embeddings.parquet"
    if target.suffix.lower() != ".parquet":
        raise UserError(f"--out {target}: name a .parquet file")
    output_dir(ed, target.parent)  # never inside the image folder (refused in one line)
    pa, pq = _pyarrow()
    n, d = ed.features.shape
    columns = _columns(ed, pa)
    fields = [pa.field("path", pa.string(), nullable=False),
              pa.field("embedding", pa.list_(pa.field("item", pa.float32(), nullable=False), d), nullable=False)]
    fields += [pa.field(name, kind) for name, (kind, _, _) in columns.items()]
    meta = {"root": str(ed.root), "checkpoint": ed.checkpoint, "checkpoint_sha256": ed.checkpoint_sha256,
            "dim": int(d), "images": int(n)}
    schema = pa.schema(fields, metadata={"isif": json.dumps(meta)})

    def write(fh) -> None:
        with pq.ParquetWriter(fh, schema, compression="zstd") as w:
            for s in range(0, n, row_group):
                z = np.ascontiguousarray(ed.features[s:s + row_group], dtype=np.float32)
                arrays = [pa.array(ed.paths[s:s + row_group], pa.string()),
                          pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1), pa.float32()), d)]
                for kind, v, null in columns.values():
                    arrays.append(pa.array(v[s:s + row_group], kind,
                                           mask=None if null is None else null[s:s + row_group]))
                w.write_table(pa.Table.from_arrays(arrays, schema=schema))

    atomic_write_bytes(target, write)
    return TableResult(target, int(n), int(d), ["path", "embedding", *columns])
