"""``isif export-embeddings``: an embed folder as one Parquet file that DuckDB, pandas, Polars and LanceDB read.

    isif export-embeddings EMBED_DIR [--out FILE.parquet]       (default EMBED_DIR/embeddings.parquet)

One row per image, in paths.txt's order:

    path             string                         relative to the image root, as in paths.txt
    embedding        fixed_size_list<float32>[D]    features.npy's row as written (not re-normalised)
    cluster          int32, null when not clustered ``isif cluster``'s cluster (0 the largest), when clusters.csv
                                                    is there and made for these images
    duplicate_group  int32, null outside a group    ``isif duplicates``' group (0 the largest), when duplicates.csv
                                                    is there and made for these images

The columns cluster and duplicate_group are present only when their file is. The file's key-value metadata
``isif`` holds the image root, the checkpoint and its sha256, the dimension and the number of images, so a reader
knows what the vectors are. The file is written in row groups of ``ROW_GROUP`` rows, streamed from the
memory-mapped features (memory stays at one row group, whatever the collection's size), to a temporary name and
renamed: a kill leaves the old file or the new one. It is never written inside the image folder.

pyarrow is an extra (``pip install 'isif[parquet]'``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..base.errors import UserError
from ..base.files import atomic_write_bytes
from .embed_dir import load_embed_dir, output_dir

ROW_GROUP = 65_536
PARQUET_INSTALL = "writing Parquet needs pyarrow: pip install 'isif[parquet]' (or pip install pyarrow)"


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(PARQUET_INSTALL) from None
    return pa, pq


def export_embeddings(embed_dir: str | Path, out: str | Path | None = None, row_group: int = ROW_GROUP) -> dict:
    """Write the Parquet file of ``embed_dir`` (see the module docstring); returns what was written."""
    from .cluster import read_clusters
    from .duplicates import read_duplicates

    ed = load_embed_dir(embed_dir, unit=False)
    target = Path(out) if out else ed.folder / "embeddings.parquet"
    if target.suffix.lower() != ".parquet":
        raise UserError(f"--out {target}: name a .parquet file")
    output_dir(ed, target.parent)  # never inside the image folder (refused in one line)
    pa, pq = _pyarrow()
    n, d = ed.features.shape
    columns = {}
    clusters = read_clusters(ed, "the cluster column is left out")
    if clusters is not None:
        columns["cluster"] = clusters.of.astype(np.int32)
    groups = read_duplicates(ed, "the duplicate_group column is left out")
    if groups is not None:
        columns["duplicate_group"] = groups.astype(np.int32)
    fields = [pa.field("path", pa.string(), nullable=False),
              pa.field("embedding", pa.list_(pa.field("item", pa.float32(), nullable=False), d), nullable=False)]
    fields += [pa.field(name, pa.int32()) for name in columns]
    meta = {"root": str(ed.root), "checkpoint": ed.checkpoint, "checkpoint_sha256": ed.checkpoint_sha256,
            "dim": int(d), "images": int(n)}
    schema = pa.schema(fields, metadata={"isif": json.dumps(meta)})

    def write(fh) -> None:
        with pq.ParquetWriter(fh, schema, compression="zstd") as w:
            for s in range(0, n, row_group):
                z = np.ascontiguousarray(ed.features[s:s + row_group], dtype=np.float32)
                arrays = [pa.array(ed.paths[s:s + row_group], pa.string()),
                          pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1), pa.float32()), d)]
                for v in columns.values():
                    part = v[s:s + row_group]
                    arrays.append(pa.array(part, pa.int32(), mask=part < 0))
                w.write_table(pa.Table.from_arrays(arrays, schema=schema))

    atomic_write_bytes(target, write)
    return {"out": str(target), "images": int(n), "dim": int(d), "columns": ["path", "embedding", *columns]}
