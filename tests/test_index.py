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


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_each_kind_finds_the_neighbours_and_measures_itself(kind):
    z = clustered(3000)
    index, params = ix.build(z, kind)
    recall = ix.recall_at_10(index, z, sample=300)
    assert recall == 1.0 if kind == "exact" else recall >= 0.9
    _, got = index.search(z[:20], 10)
    _, truth = ix.exact_topk(z[:20], z, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), truth.tolist(), strict=True)])
    assert overlap == 1.0 if kind == "exact" else overlap >= 0.8
    assert set(params) == {"exact": set(), "ivf": {"nlist", "nprobe"}, "hnsw": {"M", "efConstruction",
                                                                             "efSearch"}}[kind]


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

    z = np.load(emb / "features.npy")
    np.save(emb / "features.npy", z[::-1].copy())  # other embeddings under the same name
    refused(["search", str(run), query, "--gallery", str(emb)], "built on other embeddings")
    np.save(emb / "features.npy", z)
    (emb / "index.faiss").write_bytes(b"\x00" * 64)
    refused(["search", str(run), query, "--gallery", str(emb)], "damaged or unreadable index")
    refused(["search", str(run), query, "--gallery", str(emb), "--k", "30", "--exact"], "larger than the gallery")
    refused(["index", str(tmp_path / "nowhere")], "no features.npy")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    refused(["search", str(run), str(broken), "--gallery", str(emb), "--exact"], "broken.jpg: not a decodable image")
    assert main(["search", str(run), query, "--gallery", str(emb), "--exact", "--out", out]) == 0  # still works


def test_without_faiss_the_error_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)
    np.save(tmp_path / "features.npy", clustered(20))
    assert main(["index", str(tmp_path)]) == 2
    assert "pip install 'isif[search]'" in capsys.readouterr().err
