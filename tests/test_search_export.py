"""isif search (top-k and the Fig. 4 grid) and isif export (TorchScript, ONNX) on a tiny trained checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from isif.cli import main
from isif.collection.search import search


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tests.conftest import train_tiny_run

    run, tree = train_tiny_run(tmp_path_factory.mktemp("search"))
    return tree, run


def test_search_matches_brute_force_and_leaves_the_query_out():
    g = torch.Generator().manual_seed(0)
    gal = torch.nn.functional.normalize(torch.randn(40, 6, generator=g, dtype=torch.float64), dim=1)
    gal[9] = gal[4]  # a tie: the lower index ranks first
    q = gal[[4, 0, 17]].clone()
    scores, idx = search(q, gal, 5, [4, None, 17])
    sim = q @ gal.t()
    for i, ex in enumerate([4, None, 17]):
        s = sim[i].clone()
        if ex is not None:
            s[ex] = -float("inf")
        ref = sorted(range(40), key=lambda j: (-float(s[j]), j))[:5]
        assert idx[i].tolist() == ref
        assert torch.allclose(scores[i], s[ref])
    assert idx[0, 0] == 9 and idx[1, 0] == 0  # 4 itself is left out; 0 is in the gallery and not excluded


@pytest.mark.parametrize("k", [1, 3, 7, 49, 50])
def test_search_equals_a_full_sort_when_many_scores_tie(k):
    """Small-integer features make exact float32 dot products with many ties, also at the k-th place: the
    top-k shortcut must give the (score, then lower index) order of a full float64 sort."""
    g = torch.Generator().manual_seed(k)
    gal = torch.randint(-2, 3, (50, 4), generator=g).float()
    q = torch.randint(-2, 3, (9, 4), generator=g).float()
    exclude = [None, 3, None, 49, 0, None, None, 12, None]
    scores, idx = search(q, gal, min(k, 49), exclude)
    sim = q.double() @ gal.double().t()
    ties_at_k = 0
    for i, ex in enumerate(exclude):
        cand = [j for j in range(50) if j != ex]
        ref = sorted(cand, key=lambda j: (-float(sim[i, j]), j))
        kk = min(k, 49)
        assert idx[i].tolist() == ref[:kk], i
        assert scores[i].tolist() == [float(sim[i, j]) for j in ref[:kk]]
        ties_at_k += kk < len(ref) and sim[i, ref[kk - 1]] == sim[i, ref[kk]]
    assert k == 50 or k == 49 or ties_at_k > 0  # the ambiguous case is exercised


def test_search_cli_prints_neighbours_and_writes_a_grid(tiny_run, tmp_path, capsys):
    tree, run = tiny_run
    gallery = tree / "test"
    q1 = gallery / "class1" / "0004.png"  # in the gallery: it must not find itself
    outside = tmp_path / "q.png"
    Image.open(q1).save(outside)
    out = tmp_path / "grid.png"
    capsys.readouterr()
    assert main(["search", str(run), str(q1), str(outside), "--gallery", str(gallery), "--k", "3", "--out", str(out),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    r0, r1 = res["results"]
    assert len(r0["neighbours"]) == 3 and all(n["path"] != str(q1.resolve()) for n in r0["neighbours"])
    assert r1["neighbours"][0]["path"] == str(q1.resolve()) and r1["neighbours"][0]["cosine"] > 0.9999
    assert all("same_label" in n for n in r0["neighbours"])
    assert r0["neighbours"][0]["same_label"] == (r0["neighbours"][0]["path"].split("/")[-2] == "class1")
    im = Image.open(out)
    assert im.size[0] > im.size[1] > 100
    # the frames: green or red around neighbours, as labels say
    arr = np.asarray(im.convert("RGB"))
    frame = arr[6 + 1, 6 + (112 + 6) * 1 + 56]  # top border of the first neighbour of query 1
    expect = (40, 170, 60) if r0["neighbours"][0]["same_label"] else (210, 40, 40)
    assert tuple(frame) == expect
    # an isif embed output works as the gallery and gives the same neighbours
    emb = tmp_path / "emb"
    assert main(["embed", str(run), str(gallery), "--out", str(emb)]) == 0
    capsys.readouterr()
    assert main(["search", str(run), str(q1), "--gallery", str(emb), "--k", "3", "--out", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["results"][0]["neighbours"]
    assert [n["path"] for n in again] == [n["path"] for n in r0["neighbours"]]
    assert np.allclose([n["cosine"] for n in again], [n["cosine"] for n in r0["neighbours"]], atol=1e-5)
    # bad input: one line, exit 2
    assert main(["search", str(run), str(tmp_path / "none.png"), "--gallery", str(gallery)]) == 2
    assert main(["search", str(run), str(q1), "--gallery", str(tmp_path / "nowhere")]) == 2
    assert main(["search", str(run), str(q1), "--gallery", str(gallery), "--k", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "none.png: no such query image" in err


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_gives_the_checkpoints_embeddings(tiny_run, tmp_path, fmt, capsys):
    from isif.data.augment import normalize
    from isif.training.checkpoint import load_trained

    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="pip install 'isif[onnx]' for the ONNX export")
    _, run = tiny_run
    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    assert "max |difference|" in capsys.readouterr().out
    spec = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    assert spec["input"] == [None, 3, 32, 32] and spec["max_abs_diff"] <= 1e-5
    model, _, state = load_trained(run)
    x = torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    mean = torch.tensor(state["input"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(state["input"]["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model.float()(normalize(x, mean, std))
    if fmt == "torchscript":
        import warnings

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
            got = torch.jit.load(str(out))(x)
    else:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
    assert got.shape == (7, 128) and float((got - want).abs().max()) <= 1e-5


def test_export_refuses_bad_input(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    assert main(["export", str(tmp_path / "missing.pt")]) == 2
    assert main(["export", str(run), "--format", "keras"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(x.startswith("isif: error: ") for x in err), err
    assert "missing.pt" in err[0] and "--format must be one of torchscript, onnx, safetensors, got 'keras'" in err[1]


@pytest.mark.parametrize("fmt, name", [("torchscript", "m.pt"), ("onnx", "m.onnx"), ("safetensors", "m.safetensors")])
def test_an_export_that_fails_its_check_writes_nothing(tiny_run, tmp_path, capsys, fmt, name):
    """--atol -1 fails every check (a difference is >= 0): one line, exit 2, and neither the model nor its JSON
    written, nor a temporary file left; an earlier export at --out stays as it was."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="pip install 'isif[onnx]' for the ONNX export")
    _, run = tiny_run
    fresh, kept = tmp_path / "fresh", tmp_path / "kept"
    fresh.mkdir()
    assert main(["export", str(run), "--format", fmt, "--out", str(fresh / name), "--atol", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"isif: error: the {fmt} export differs from the checkpoint by ")
    assert "(> --atol -1); nothing was kept" in err
    assert sorted(p.name for p in fresh.iterdir()) == []  # no model, no .json, no hidden temporary file
    assert main(["export", str(run), "--format", fmt, "--out", str(kept / name)]) == 0
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    assert sorted(before) == [name, f"{name}.json"]
    capsys.readouterr()
    assert main(["export", str(run), "--format", fmt, "--out", str(kept / name), "--atol", "-1"]) == 2
    assert "nothing was kept" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before
