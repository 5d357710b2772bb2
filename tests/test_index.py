"""isif index: faiss indexes checked against exact search, used by isif search, refused when stale or damaged."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'isif[search]')")

from isif.cli import main  # noqa: E402
from isif.collection import index as ix  # noqa: E402

from .test_embed_scale import photos, run  # noqa: E402,F401  (the module's trained checkpoint)


def clustered(n: int, d: int = 32, centres: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d))
    z = c[rng.integers(0, centres, n)] + 0.3 * rng.normal(size=(n, d))
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


def test_exact_topk_matches_a_float64_reference():
    z = clustered(500)
    q = z[:40]
    s, i = ix.exact_topk(q, z, 7, block=16)
    ref = q.astype(np.float64) @ z.astype(np.float64).T
    for r in range(len(q)):
        order = sorted(range(len(z)), key=lambda j: (-ref[r, j], j))[:7]
        assert i[r].tolist() == order
        assert np.allclose(s[r], ref[r, order], atol=1e-5)


KINDS = {"exact": {}, "ivf": {}, "hnsw": {}, "ivfpq": {"pq_m": 8, "pq_bits": 6},
         "ivfpq-opq": {"pq_m": 8, "pq_bits": 6, "opq": True}, "ivfpq-hnsw": {"pq_m": 8, "pq_bits": 6}}


@pytest.mark.parametrize("name", list(KINDS))
def test_each_kind_finds_the_neighbours_and_measures_itself(name):
    kind = name.replace("-opq", "")
    z = clustered(3000)
    index, params = ix.build(z, kind, **KINDS[name])
    recall = ix.recall_at_10(index, z, sample=300)
    _, got = index.search(z[:20], 10)
    _, truth = ix.exact_topk(z[:20], z, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), truth.tolist(), strict=True)])
    if kind == "exact":
        assert recall == 1.0 and overlap == 1.0 and params == {}
    elif kind in ("ivf", "hnsw"):
        assert recall >= 0.9 and overlap >= 0.8
    else:  # 6-byte codes of 32-d vectors lose neighbours; the exact re-ranking of 100 candidates wins them back
        assert 0.2 <= recall < 0.9, recall
        assert ix.recall_at_10(index, z, sample=300, rerank=100) >= 0.97
        assert params["factory"] == ("OPQ8," if "opq" in name else "") + (
            f"IVF{params['nlist']}_HNSW32" if kind == "ivfpq-hnsw" else f"IVF{params['nlist']}") + ",PQ8x6"
        assert params["train"] == 3000 and params["nlist"] == ix.default_nlist(3000, kind)
        import faiss  # no polysemous training (the factory's default): isif never searches by Hamming distance
        assert not faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training
    want = {"exact": set(), "ivf": {"nlist", "nprobe", "factory", "train"}, "hnsw": {"M", "efConstruction",
                                                                                   "efSearch"}}
    assert set(params) >= want.get(kind, {"nlist", "nprobe", "pq_m", "pq_bits", "opq"})


def test_auto_follows_the_measured_sizes_and_the_compressed_kinds_default_nprobe():
    """auto: exact below 100k, HNSW below 2M, IVF-PQ with a flat quantiser above (built 3x faster than the HNSW
    quantiser at 10M, at the same recall; benchmarks/index_scale.py); nprobe 32 for ivfpq, 64 for ivfpq-hnsw."""
    assert [ix.default_kind(n) for n in (99_999, 100_000, 1_999_999, 2_000_000, 10**9)] == [
        "exact", "hnsw", "hnsw", "ivfpq", "ivfpq"]
    z = clustered(3000)
    assert ix.build(z, "ivfpq", nlist=40, pq_m=8, pq_bits=6)[1]["nprobe"] == 32
    assert ix.build(z, "ivfpq", nlist=20, pq_m=8, pq_bits=6)[1]["nprobe"] == 20  # never more than the cells
    assert ix.build(z, "ivfpq-hnsw", nlist=70, pq_m=8, pq_bits=6)[1]["nprobe"] == 64


def test_an_explicit_nlist_past_the_sample_cap_still_trains_39_vectors_a_cell(monkeypatch):
    """The sample is 64 a cell up to TRAIN_MAX; a --nlist beyond TRAIN_MAX / 39 (the faiss wiki's 262,144 cells at
    100M) gets faiss's floor of 39 a cell instead of a sample too small for its cells."""
    monkeypatch.setattr(ix, "TRAIN_MAX", 1000)
    z = clustered(3000)
    assert ix.build(z, "ivf", nlist=10)[1]["train"] == 640  # 64 a cell, under the cap
    assert ix.build(z, "ivf", nlist=20)[1]["train"] == 1000  # the cap, above 39 a cell
    assert ix.build(z, "ivf", nlist=40)[1]["train"] == 39 * 40  # past the cap: the floor


def test_exact_search_over_rows_on_disk_equals_one_search_over_all(tmp_path):
    """Block by block over memory-mapped parts (blocks that cut across parts, ties planted across blocks) gives
    the answer of one search over the array: exact_topk, search_rows and the exact re-scoring."""
    import torch

    from isif.collection.index import exact_rescore
    from isif.collection.rows import Rows
    from isif.collection.search import search, search_rows

    z = clustered(700)
    z[650] = z[10]  # a tie across blocks and parts: the lower id first
    parts = []
    for i, (lo, hi) in enumerate([(0, 250), (250, 251), (251, 700)]):
        np.save(tmp_path / f"{i}.npy", z[lo:hi])
        parts.append(np.load(tmp_path / f"{i}.npy", mmap_mode="r"))
    rows = Rows(parts)
    assert np.array_equal(np.asarray(rows), z) and np.array_equal(rows[[699, 0, 250]], z[[699, 0, 250]])
    q = z[[10, 3, 251]]
    s_ref, i_ref = ix.exact_topk(q, z, 12)
    s, i = ix._exact_topk_rows(q, rows, 12, block=64)
    assert np.array_equal(i, i_ref) and np.allclose(s, s_ref, atol=1e-6)
    assert i[0, 0] == 10 and i[0, 1] == 650
    exclude = [10, None, 251]
    v_ref, j_ref = search(torch.from_numpy(q), torch.from_numpy(z), 5, exclude)
    v, j = search_rows(torch.from_numpy(q), rows, 5, exclude, block=64)
    assert torch.equal(j, j_ref) and torch.allclose(v, v_ref, atol=1e-6)
    cand = np.argsort(-(q @ z.T), axis=1)[:, :40]
    v2, j2 = exact_rescore(q, rows, cand, 5, exclude)
    assert np.array_equal(j2, j_ref.numpy())  # the true top 5 are among the 40 candidates


def test_compressed_settings_faiss_cannot_build_are_refused_in_one_line():
    z = clustered(3000)
    for kwargs, phrase in [({"pq_m": 5}, "--pq-m 5: the 32-d vectors split into sub-vectors only when --pq-m divides"),
                           ({"pq_m": 64}, "at most 32"),
                           ({"pq_m": 8}, "too few vectors to train --kind ivfpq: 3,000 embeddings, and 8-bit codes "
                                         "need 9,984"),
                           ({"pq_m": 8, "pq_bits": 6, "nlist": 100}, "too few vectors to train --nlist 100")]:
        with pytest.raises(ix.UserError) as e:
            ix.build(z, "ivfpq", **kwargs)
        assert phrase in str(e.value) and "\n" not in str(e.value)


def test_index_is_used_by_search_and_refused_when_stale_or_damaged(run, tmp_path, capsys):  # noqa: F811
    folder = photos(tmp_path / "p", 30)
    emb = tmp_path / "emb"
    assert main(["embed", str(run), str(folder), "--out", str(emb), "--quiet", "--workers", "0"]) == 0
    assert main(["index", str(emb), "--kind", "hnsw"]) == 0
    meta = json.loads((emb / "index-meta.json").read_text())
    assert meta["kind"] == "hnsw" and meta["images"] == 30 and 0.9 <= meta["recall@10"] <= 1.0
    query = str(next(folder.rglob("*.png")))
    capsys.readouterr()
    out = str(tmp_path / "s.png")
    assert main(["search", str(run), query, "--gallery", str(emb), "--k", "5", "--json", "--out", out]) == 0
    via_index = json.loads(capsys.readouterr().out)["results"][0]["neighbours"]
    assert main(["search", str(run), query, "--gallery", str(emb), "--k", "5", "--json", "--exact", "--out", out]) == 0
    exact = json.loads(capsys.readouterr().out)["results"][0]["neighbours"]
    assert [n["path"] for n in via_index] == [n["path"] for n in exact]  # 30 images: HNSW is exact here
    assert all(n["path"] != query for n in via_index)
    def refused(argv: list[str], message: str) -> None:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err

    other = tmp_path / "emb2"  # another collection's index, copied in
    assert main(["embed", str(run), str(photos(tmp_path / "q", 30, start=50)), "--out", str(other), "--quiet",
                 "--workers", "0"]) == 0
    assert main(["index", str(other), "--kind", "hnsw"]) == 0
    kept = {n: (emb / n).read_bytes() for n in ("index.faiss", "index-meta.json")}
    for n in kept:
        (emb / n).write_bytes((other / n).read_bytes())
    refused(["search", str(run), query, "--gallery", str(emb)], "built on other embeddings")
    for n, b in kept.items():
        (emb / n).write_bytes(b)
    (emb / "index.faiss").write_bytes(b"\x00" * 64)
    refused(["search", str(run), query, "--gallery", str(emb)], "damaged or unreadable index")
    refused(["search", str(run), query, "--gallery", str(emb), "--k", "30", "--exact"], "larger than the gallery")
    refused(["index", str(tmp_path / "nowhere")], "no embed output")
    refused(["index", str(emb), "--kind", "ivfpq", "--pq-m", "7"], "--pq-m 7")
    refused(["index", str(emb), "--kind", "hnsw", "--rerank", "5"], "--rerank 5: re-rank at least the 10")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    refused(["search", str(run), str(broken), "--gallery", str(emb), "--exact"], "broken.jpg: not a decodable image")
    assert main(["search", str(run), query, "--gallery", str(emb), "--exact", "--out", out]) == 0  # still works


def test_embed_extends_the_index_with_new_files_and_rebuilds_it_after_removals(run, tmp_path, capsys):  # noqa: F811
    folder = photos(tmp_path / "p", 24)
    emb = tmp_path / "emb"
    flags = ["--out", str(emb), "--quiet", "--workers", "0", "--shard-size", "10"]
    assert main(["embed", str(run), str(folder), *flags]) == 0
    assert main(["index", str(emb), "--kind", "hnsw", "--rerank", "12"]) == 0
    out = capsys.readouterr().out
    assert "re-ranking the 12 best on the float features" in out and "bytes a vector" in out
    before = json.loads((emb / "index-meta.json").read_text())
    paths0 = (emb / "paths.txt").read_text().split()
    photos(folder, 5, start=200)
    assert main(["embed", str(run), str(folder), *flags]) == 0
    assert "the hnsw index extended with 5 new rows: 29 embeddings, Recall@10" in capsys.readouterr().out
    meta = json.loads((emb / "index-meta.json").read_text())
    paths1 = (emb / "paths.txt").read_text().split()
    assert paths1[:24] == paths0 and sorted(paths1[24:]) == paths1[24:]  # stable ids: the new rows come after
    assert meta["images"] == 29 and meta["params"] == before["params"] and meta["rerank"] == 12
    index, _ = ix.load_index(emb)
    assert index.ntotal == 29
    z = np.load(emb / "features.npy")
    _, got = index.search(z[24:], 1)
    assert got[:, 0].tolist() == list(range(24, 29))  # each new image is its own nearest: the rows are its own
    (folder / paths1[3]).unlink()
    assert main(["embed", str(run), str(folder), *flags]) == 0
    assert "the hnsw index rebuilt (files were removed or changed): 28 embeddings" in capsys.readouterr().out
    assert ix.load_index(emb)[0].ntotal == 28


def test_without_faiss_the_error_says_how_to_install(tmp_path, monkeypatch, capsys):
    from tests.test_explore import write_embed_dir

    monkeypatch.setitem(sys.modules, "faiss", None)
    write_embed_dir(tmp_path / "e", clustered(20), [f"{i}.png" for i in range(20)], tmp_path)
    assert main(["index", str(tmp_path / "e")]) == 2
    assert "pip install 'isif[search]'" in capsys.readouterr().err


def test_a_gallery_on_disk_gives_the_answers_of_one_in_memory(run, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Above IN_MEMORY_MAX a gallery stays on disk (block-wise exact search, re-ranking from the memory map); the
    answers equal those of the same gallery read into memory, with --exact and through an index with --rerank."""
    import isif.collection.rows as rows_mod
    import isif.collection.search as search_mod

    folder = photos(tmp_path / "p", 30)
    emb = tmp_path / "emb"
    assert main(["embed", str(run), str(folder), "--out", str(emb), "--quiet", "--workers", "0"]) == 0
    query = str(sorted(folder.rglob("*.png"))[4])

    def answers(*flags) -> list:
        capsys.readouterr()
        assert main(["search", str(run), query, "--gallery", str(emb), "--k", "6", "--json", "--out",
                     str(tmp_path / "s.png"), *flags]) == 0
        return [(n["path"], round(n["cosine"], 5)) for n in json.loads(capsys.readouterr().out)["results"][0][
            "neighbours"]]

    in_memory = answers("--exact")
    monkeypatch.setattr(rows_mod, "IN_MEMORY_MAX", 5)
    monkeypatch.setattr(search_mod, "BLOCK", 7)
    assert answers("--exact") == in_memory
    assert main(["index", str(emb), "--kind", "exact", "--rerank", "10"]) == 0
    assert answers() == in_memory  # the exact index's 10 candidates re-scored on the rows on disk
    monkeypatch.setattr(rows_mod, "IN_MEMORY_MAX", 1_000_000)
    assert answers() == in_memory


def test_an_index_under_recall_0_9_says_so_and_names_the_flag_that_fixes_it():
    from isif.cli.collection import low_recall

    assert low_recall({"kind": "ivfpq", "recall@10": 0.50, "rerank": 0}).endswith("--rerank 100 (re-rank the 100 "
                                                                                    "best on the float features)")
    assert "Recall@10 0.5000" in low_recall({"kind": "ivfpq", "recall@10": 0.50, "rerank": 0})
    assert low_recall({"kind": "ivfpq", "recall@10": 0.50, "rerank": 100, "recall@10_reranked": 0.97}) is None
    assert low_recall({"kind": "ivfpq", "recall@10": 0.5, "rerank": 10, "recall@10_reranked": 0.8}).endswith(
        "a larger --rerank")
    assert low_recall({"kind": "hnsw", "recall@10": 0.85}).endswith("--ef-search")
    assert low_recall({"kind": "ivf", "recall@10": 0.85}).endswith("--nprobe")
    assert low_recall({"kind": "exact", "recall@10": 1.0}) is None
