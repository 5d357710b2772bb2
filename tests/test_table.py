"""isif export-embeddings: the embed folder as Parquet, read back by pyarrow, DuckDB, pandas and LanceDB (each that
installs) equal to features.npy, paths.txt, clusters.csv and duplicates.csv; one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from isif.cli import main
from tests.test_explore import emb, images, one_line_error, read_csv  # noqa: F401  (fixtures)

pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install 'isif[parquet]')")
pq = pytest.importorskip("pyarrow.parquet")


def written(emb, capsys, *flags) -> tuple:  # noqa: F811
    assert main(["export-embeddings", str(emb), *flags]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    z = np.load(emb / "features.npy")
    paths = (emb / "paths.txt").read_text().splitlines()
    return out, z, paths


def test_the_table_equals_the_embed_folder_with_its_clusters_and_duplicate_groups(emb, capsys):  # noqa: F811
    out, z, paths = written(emb, capsys)
    t = pq.read_table(emb / "embeddings.parquet")
    assert t.column_names == ["path", "embedding"] and "columns path, embedding" in out
    assert t.schema.field("embedding").type == pa.list_(pa.field("item", pa.float32(), nullable=False), z.shape[1])
    assert t.column("path").to_pylist() == paths
    got = np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(len(paths), -1)
    assert got.dtype == np.float32 and np.array_equal(got, z)  # as written, bit for bit
    meta = json.loads(t.schema.metadata[b"isif"])
    assert meta["dim"] == z.shape[1] and meta["images"] == len(paths) and meta["checkpoint_sha256"] == "0" * 64

    assert main(["cluster", str(emb), "--k", "3"]) == 0
    assert main(["duplicates", str(emb), "--threshold", "0.95"]) == 0
    capsys.readouterr()
    out, z, paths = written(emb, capsys, "--out", str(emb / "x.parquet"))
    t = pq.read_table(emb / "x.parquet").to_pydict()
    cl = {r["path"]: int(r["cluster"]) for r in read_csv(emb / "clusters.csv")}
    dup = {r["path"]: int(r["group"]) for r in read_csv(emb / "duplicates.csv")}
    assert len(dup) == 6 and set(t) == {"path", "embedding", "cluster", "duplicate_group"}
    assert t["cluster"] == [cl[p] for p in paths]
    assert t["duplicate_group"] == [dup.get(p) for p in paths]  # null outside every group
    assert t["duplicate_group"].count(None) == len(paths) - 6


def test_row_groups_stream_the_features_and_keep_their_order(emb, tmp_path):  # noqa: F811
    from isif.collection.table import ExportEmbeddingsOptions, export_embeddings

    res = export_embeddings(ExportEmbeddingsOptions(embed_dir=str(emb), out=str(tmp_path / "t.parquet")), row_group=5)
    f = pq.ParquetFile(tmp_path / "t.parquet")
    z = np.load(emb / "features.npy")
    assert res.images == len(z) and f.metadata.num_row_groups == -(-len(z) // 5)
    got = np.asarray(f.read().column("embedding").combine_chunks().flatten()).reshape(z.shape)
    assert np.array_equal(got, z)


def test_duckdb_pandas_and_lancedb_read_it_as_written(emb, capsys, tmp_path):  # noqa: F811
    _, z, paths = written(emb, capsys)
    target = emb / "embeddings.parquet"
    readers = 0
    try:
        import duckdb
    except ImportError:
        duckdb = None
    if duckdb is not None:
        rows = duckdb.sql(f"SELECT path, embedding FROM read_parquet('{target}')").fetchall()
        assert [r[0] for r in rows] == paths
        assert np.array_equal(np.array([r[1] for r in rows], np.float32), z)
        # a cosine query as a user would type it: the nearest other image of the first row
        nearest = duckdb.sql(f"SELECT path FROM read_parquet('{target}') WHERE path <> '{paths[0]}' ORDER BY "
                             f"array_cosine_similarity(embedding::FLOAT[{z.shape[1]}], (SELECT embedding::FLOAT"
                             f"[{z.shape[1]}] FROM read_parquet('{target}') LIMIT 1)) DESC LIMIT 1").fetchall()[0][0]
        zu = z / np.linalg.norm(z, axis=1, keepdims=True)
        sims = zu[1:] @ zu[0]
        assert nearest == paths[1 + int(np.argmax(sims))]
        readers += 1
    try:
        import pandas as pd
    except ImportError:
        pd = None
    if pd is not None:
        df = pd.read_parquet(target)
        assert df["path"].tolist() == paths and np.array_equal(np.stack(df["embedding"].to_numpy()), z)
        readers += 1
    try:
        import lancedb
    except ImportError:
        lancedb = None
    if lancedb is not None:
        db = lancedb.connect(str(tmp_path / "lance"))
        table = db.create_table("images", data=pq.read_table(target))
        assert table.count_rows() == len(paths)
        hit = table.search(z[3]).metric("cosine").limit(1).to_list()[0]
        assert hit["path"] in {paths[3]} | {p for p, q in zip(paths, z, strict=True) if np.array_equal(q, z[3])}
        readers += 1
    if not readers:
        pytest.skip("none of duckdb, pandas, lancedb is installed")


def test_bad_targets_are_refused_in_one_line(emb, images, capsys):  # noqa: F811
    assert main(["export-embeddings", str(emb), "--out", str(images / "x.parquet")]) == 2
    one_line_error(capsys, "inside the image folder", "--out")
    assert not (images / "x.parquet").exists()
    assert main(["export-embeddings", str(emb), "--out", str(emb / "x.csv")]) == 2
    one_line_error(capsys, "--out", ".parquet")
    assert main(["export-embeddings", str(emb.parent / "nowhere")]) == 2
    one_line_error(capsys, "isif embed")


def test_stale_cluster_and_duplicate_files_are_left_out_with_one_warning_each(emb, capsys):  # noqa: F811
    assert main(["cluster", str(emb), "--k", "3"]) == 0
    assert main(["duplicates", str(emb), "--threshold", "0.95"]) == 0
    capsys.readouterr()
    paths = (emb / "paths.txt").read_text().splitlines()
    (emb / "paths.txt").write_text("\n".join(paths[:-1]) + "\n")  # the collection changed since
    np.save(emb / "features.npy", np.load(emb / "features.npy")[:-1])
    assert main(["export-embeddings", str(emb)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "clusters.csv" in err and "duplicates.csv" in err
    assert pq.read_table(emb / "embeddings.parquet").column_names == ["path", "embedding"]
