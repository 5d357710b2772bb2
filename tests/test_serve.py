"""isif serve: the JSON API against brute-force search, its refusals (path escapes, bad uploads, oversized bodies,
forged Host headers, cross-site requests, decodes beyond its slots) and the command's one-line errors. The page
itself is tested in a real browser in test_serve_browser.py. CI installs FastAPI and its test client; there (CI
set) a missing one fails this module instead of skipping it."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _missing(msg: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(msg + "; CI installs it (pip install -e '.[test]')", pytrace=False)
    pytest.skip(msg, allow_module_level=True)


try:
    import fastapi  # noqa: F401
except ImportError:
    _missing("FastAPI is not installed (pip install 'isif[serve]')")
try:
    from fastapi.testclient import TestClient
except RuntimeError:  # its HTTP client is missing
    _missing("httpx2 (the test client of FastAPI) is not installed (pip install httpx2)")

import isif.serve.errors  # noqa: E402
import isif.serve.guard  # noqa: E402
import isif.serve.routes  # noqa: E402
from isif.cli import main  # noqa: E402
from isif.serve.app import bind, create_app, serve  # noqa: E402
from isif.serve.collection import Collection  # noqa: E402
from isif.serve.options import ServeOptions  # noqa: E402

from .test_embed_scale import photos, run  # noqa: E402,F401  (the module's trained checkpoint)
from .test_unlabelled import _png_with_size  # noqa: E402

N = 30
BASE = "http://127.0.0.1:8000"  # an address create_app answers to by default (TestClient's own is "testserver")
ROOT = Path(__file__).resolve().parents[1]


def client_of(app) -> TestClient:
    return TestClient(app, base_url=BASE)


@pytest.fixture(scope="module")
def collection(run, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("serve")
    folder = photos(tmp / "photos", N)
    emb = tmp / "emb"
    assert main(["embed", str(run), str(folder), "--out", str(emb), "--quiet", "--workers", "0"]) == 0
    return emb


@pytest.fixture(scope="module")
def mapped(collection, tmp_path_factory):
    """The collection with `isif map` output (map.json, map-full.png) beside it."""
    emb = tmp_path_factory.mktemp("serve-map") / "emb"
    shutil.copytree(collection, emb)
    make_map(emb)
    return emb


def make_map(emb: Path) -> None:
    assert main(["map", str(emb), "--method", "pca"]) == 0
    assert (emb / "map.json").is_file() and (emb / "map-full.png").is_file()


@pytest.fixture(scope="module")
def client(mapped):
    return client_of(create_app(Collection(mapped), max_upload_mib=1.0, default_k=5))


def brute_force(z: np.ndarray, q: np.ndarray, k: int, exclude: int | None) -> list[int]:
    sims = z.astype(np.float64) @ q.astype(np.float64)
    order = sorted((j for j in range(len(z)) if j != exclude), key=lambda j: (-sims[j], j))
    return order[:k]


def unit(z: np.ndarray) -> np.ndarray:
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_search_by_id_is_the_brute_force_answer(client, collection):
    z = unit(np.load(collection / "features.npy"))
    paths = (collection / "paths.txt").read_text().split()
    for i in (0, 7, N - 1):
        r = client.get(f"/api/search?id={i}&k=6")
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["query"] == {"id": i, "path": paths[i], "label": paths[i].split("/")[0]}
        ids = [h["id"] for h in out["results"]]
        assert ids == brute_force(z, z[i], 6, exclude=i)
        assert np.allclose([h["similarity"] for h in out["results"]], z[ids] @ z[i], atol=1e-5)
        assert [h["path"] for h in out["results"]] == [paths[j] for j in ids]
    assert len(client.get("/api/search?id=3").json()["results"]) == 5  # the server's default k


@pytest.mark.parametrize("form", ["raw", "multipart"])
def test_an_uploaded_copy_finds_itself_first_then_its_neighbours(client, collection, form):
    z = unit(np.load(collection / "features.npy"))
    meta = json.loads((collection / "index.json").read_text())
    paths = (collection / "paths.txt").read_text().split()
    i = 4
    data = (Path(meta["root"]) / paths[i]).read_bytes()
    if form == "raw":
        r = client.post("/api/search?k=4", content=data, headers={"content-type": "image/png"})
    else:
        r = client.post("/api/search?k=4", files={"image": ("mine.png", data, "image/png")})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["query"]["id"] is None and out["query"]["path"] == ("mine.png" if form == "multipart" else "upload")
    ids = [h["id"] for h in out["results"]]
    assert ids[0] == i and out["results"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert ids[1:] == brute_force(z, z[i], 3, exclude=i)


def test_bad_uploads_get_a_json_4xx_and_the_server_keeps_serving(client, collection):
    good = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 200, 30)).save(good, format="PNG")
    cases = {
        "empty": (b"", 400, "empty upload"),
        "text": (b"hello, this is not an image", 400, "not a decodable image"),
        "truncated": (good.getvalue()[:60], 400, "not a decodable image"),
        "bomb": (_png_with_size(20_000, 20_000), 413, "too large to decode safely"),  # past PIL's hard limit
        "bomb-warning-range": (_png_with_size(10_000, 10_000), 413, "too large to decode safely"),
    }
    for name, (data, status, words) in cases.items():
        r = client.post("/api/search", content=data, headers={"content-type": "application/octet-stream"})
        assert r.status_code == status, (name, r.text)
        assert r.headers["content-type"] == "application/json" and words in r.json()["error"], (name, r.text)
    big = b"\0" * (2**20 + 1)
    r = client.post("/api/search", content=big)  # refused from Content-Length before reading
    assert r.status_code == 413 and "larger than 1 MiB" in r.json()["error"]
    r = client.post("/api/search", content=iter([big[:600_000], big[600_000:]]))  # chunked: refused while reading
    assert r.status_code == 413 and "larger than 1 MiB" in r.json()["error"]
    r = client.post("/api/search", files={"other": ("x.png", good.getvalue(), "image/png")})
    assert r.status_code == 400 and "named 'image'" in r.json()["error"]
    r = client.post("/api/search", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"})
    assert 400 <= r.status_code < 500 and "error" in r.json()
    assert client.get("/api/info").status_code == 200
    assert client.get("/api/search?id=0&k=2").status_code == 200


@pytest.mark.parametrize("url", [
    "/api/image/../../../../etc/passwd", "/api/image/..%2F..%2F..%2Fetc%2Fpasswd", "/api/image/%2Fetc%2Fpasswd",
    "/api/image//etc/passwd", "/api/image/-1", f"/api/image/{N}", "/api/image/1e3", "/api/thumb/../index.json",
    "/static/../serve.py", "/static/..%2Fserve.py", "/static/%2e%2e/%2e%2e/index.json", "/api/image/0/../../x",
    "/../../../../etc/passwd", "/api/search?id=-5", f"/api/search?id={N}", "/api/search?id=0&k=0",
    f"/api/search?id=0&k={N}", "/api/search?id=abc", "/api/clusters/0", "/nothing", "/api/map.json",
    "/api/map-full.png", "/api/map/../index.json", "/api/map.png/../../index.json", "/api/map.png/x",
    "/api/map.png%2F..%2Findex.json", "/map-full.png", "/map.json",
])
def test_requests_outside_the_collection_are_refused_as_json(client, url):
    r = client.get(url)
    assert 400 <= r.status_code < 500, (url, r.status_code)
    assert r.headers["content-type"] == "application/json" and r.json()["error"], url
    assert "root:" not in r.text and "def " not in r.text


def test_images_are_served_by_id_and_never_through_a_link_out_of_the_folder(run, tmp_path):  # noqa: F811
    folder = photos(tmp_path / "photos", 6)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(secret)
    (folder / "album0" / "link.png").symlink_to(secret)  # a file link inside the folder, pointing outside
    emb = tmp_path / "emb"
    assert main(["embed", str(run), str(folder), "--out", str(emb), "--quiet", "--workers", "0"]) == 0
    paths = (emb / "paths.txt").read_text().split()
    c = client_of(create_app(Collection(emb)))
    ok = paths.index("album1/001.png")
    r = c.get(f"/api/image/{ok}")
    assert r.status_code == 200 and r.content == (folder / "album1" / "001.png").read_bytes()
    assert r.headers["content-type"] == "image/png"
    thumb = c.get(f"/api/thumb/{ok}?size=100")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (32, 33)  # a small image is not enlarged
    link = paths.index("album0/link.png")  # embedded like any file, but its file lies outside: never served
    for url in (f"/api/image/{link}", f"/api/thumb/{link}"):
        r = c.get(url)
        assert r.status_code == 403 and "outside the collection" in r.json()["error"]
    big = folder / "album2" / "big.png"
    Image.new("RGB", (900, 600), (5, 5, 5)).save(big)
    col = Collection(emb)
    col.ed.paths.append("album2/big.png")  # a thumbnail of a large image is reduced, aspect kept
    assert Image.open(io.BytesIO(col.thumb(len(paths), 256))).size == (256, 171)
    # a paths.txt edited to lead out of the folder: refused too
    edited = tmp_path / "edited"
    shutil.copytree(emb, edited)
    lines = paths[:]
    lines[0] = "../secret.png"
    (edited / "paths.txt").write_text("\n".join(lines) + "\n")
    c2 = client_of(create_app(Collection(edited)))
    r = c2.get("/api/image/0")
    assert r.status_code == 403 and "outside the collection" in r.json()["error"]


def test_clusters_are_browsable_when_isif_cluster_made_them(run, collection, tmp_path, capsys):  # noqa: F811
    emb = tmp_path / "emb"
    shutil.copytree(collection, emb)
    assert main(["cluster", str(emb), "--k", "3", "--per-sheet", "4"]) == 0
    c = client_of(create_app(Collection(emb)))
    assert c.get("/api/info").json()["clusters"] == 3
    listing = c.get("/api/clusters").json()
    assert listing["k"] == 3 and sum(x["size"] for x in listing["clusters"]) == N
    sizes = [x["size"] for x in listing["clusters"]]
    assert sizes == sorted(sizes, reverse=True)  # isif cluster numbers clusters by size
    one = c.get("/api/clusters/0?limit=100").json()
    d = [x["distance_to_centre"] for x in one["images"]]
    assert one["size"] == sizes[0] == len(d) and d == sorted(d)  # most central first
    assert all(x["cluster"] == 0 for x in one["images"])
    assert c.get("/api/search?id=0&k=2").json()["results"][0]["cluster"] in (0, 1, 2)
    assert c.get("/api/clusters/3").status_code == 404
    # a stale clusters.csv (from before the last embed) is ignored with a warning
    (emb / "clusters.csv").write_text("path,cluster,distance_to_centre\nalbum0/999.png,0,0.1\n")
    capsys.readouterr()
    c3 = client_of(create_app(Collection(emb)))
    assert "made before the last `isif embed`" in capsys.readouterr().err
    assert c3.get("/api/info").json()["clusters"] is None


def test_label_next_suspects_and_labels_are_served_when_select_and_label_made_them(collection, tmp_path, capsys):
    emb = tmp_path / "emb"
    shutil.copytree(collection, emb)
    assert client_of(create_app(Collection(emb))).get("/api/labels/next").status_code == 404  # none yet
    assert main(["select", str(emb), "--budget", "4", "--sheet", "0"]) == 0
    paths = (emb / "paths.txt").read_text().split()
    given = tmp_path / "given.csv"
    given.write_text("path,label\n" + "".join(f"{p},{p.split('/')[0]}\n" for p in paths[::2]))
    assert main(["label", str(emb), str(given)]) == 0
    c = client_of(create_app(Collection(emb)))
    lab = c.get("/api/info").json()["labelling"]
    assert lab["next"] == 4 and lab["suspects"] == len(paths[::2])
    assert [x["label"] for x in lab["classes"]] == ["album0", "album1", "album2"]
    nxt = c.get("/api/labels/next").json()
    ranked = [r.split(",")[1] for r in (emb / "selection.csv").read_text().split()[1:]]
    assert [x["path"] for x in nxt["images"]] == ranked and [x["rank"] for x in nxt["images"]] == [1, 2, 3, 4]
    sus = c.get("/api/labels/suspects?limit=3").json()
    scores = [x["suspect"] for x in sus["images"]]
    assert sus["total"] == len(paths[::2]) and len(scores) == 3 and scores == sorted(scores, reverse=True)
    one = c.get("/api/labels/class-2").json()
    conf = [x["confidence"] for x in one["images"]]
    assert all(x["assigned"] == "album2" for x in one["images"]) and conf == sorted(conf, reverse=True)
    for url, code in (("/api/labels/class-3", 404), ("/api/labels/other", 404), ("/api/labels/next?limit=0", 400),
                      ("/api/labels/next?offset=-1", 400)):
        r = c.get(url)
        assert r.status_code == code and "error" in r.json(), url
    (emb / "selection.json").write_text("{}")  # as if made from other features: left out, with one warning
    capsys.readouterr()
    stale = client_of(create_app(Collection(emb))).get("/api/info").json()["labelling"]
    assert stale["next"] == 0 and "isif select" in capsys.readouterr().err


def test_the_map_of_isif_map_is_served_with_gallery_ids(client, mapped):
    from isif.collection.map_layout import load_map_layout

    paths = (mapped / "paths.txt").read_text().split()
    layout = load_map_layout(mapped, paths)
    assert layout is not None and layout.method == "pca" and layout.cells
    assert client.get("/api/info").json()["map"] == {"method": "pca", "colour": layout.colour,
                                                     "thumbnails": len(layout.cells)}
    r = client.get("/api/map")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    out = r.json()
    grid = ("cols", "rows", "tile", "left", "top", "width", "height", "method", "colour")
    assert set(out) == {*grid, "cells", "paths", "version"}
    assert {k: out[k] for k in grid} == {k: getattr(layout, k) for k in grid}
    # each cell as [col, row, gallery id]: the id is the index of the cell's path in paths.txt
    assert all(len(c) == 3 and all(isinstance(v, int) for v in c) for c in out["cells"])
    assert [(c, r, paths[i]) for c, r, i in out["cells"]] == layout.cells
    assert out["paths"] == [p for _, _, p in layout.cells]
    assert len({i for _, _, i in out["cells"]}) == len(out["cells"])
    png = client.get(f"/api/map.png?v={out['version']}")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["cache-control"] == "private, max-age=3600"
    assert png.content == (mapped / "map-full.png").read_bytes()
    assert Image.open(io.BytesIO(png.content)).size == (out["width"], out["height"])
    assert client.get("/api/map.png?path=../index.json").content == png.content  # no path is taken from a request


def test_without_a_map_the_info_says_so_and_the_map_routes_say_how_to_make_one(collection):
    c = client_of(create_app(Collection(collection)))
    assert c.get("/api/info").json()["map"] is None
    for url in ("/api/map", "/api/map.png"):
        r = c.get(url)
        assert r.status_code == 404 and r.headers["content-type"] == "application/json", url
        err = r.json()["error"]
        assert err == f"no map: run `isif map {collection}` first" and "\n" not in err, err


def test_a_stale_or_foreign_map_is_ignored_with_one_warning_line(mapped, tmp_path, capsys):
    emb = tmp_path / "emb"
    shutil.copytree(mapped, emb)
    meta = json.loads((emb / "map.json").read_text())
    stale = {**meta, "cells": [*meta["cells"][:-1], [*meta["cells"][-1][:2], "album0/999.png"]]}
    (emb / "map.json").write_text(json.dumps(stale))  # made before the last `isif embed`
    capsys.readouterr()
    c = client_of(create_app(Collection(emb)))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and "re-run `isif map" in err, err
    assert c.get("/api/info").json()["map"] is None and c.get("/api/map").status_code == 404
    (emb / "map.json").write_text("{not json")
    c = client_of(create_app(Collection(emb)))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreadable" in err and "re-run `isif map" in err, err
    assert c.get("/api/map.png").status_code == 404
    # a map.json naming another file of the folder as its picture: that file is never served
    (emb / "map.json").write_text(json.dumps({**meta, "full_png": "index.json"}))
    c = client_of(create_app(Collection(emb)))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not map-full.png" in err, err
    assert c.get("/api/map.png").status_code == 404 and c.get("/api/info").json()["map"] is None
    # map-full.png removed while serving: a 404 that says how to remake it
    (emb / "map.json").write_text(json.dumps(meta))
    c = client_of(create_app(Collection(emb)))
    assert capsys.readouterr().err == "" and c.get("/api/map.png").status_code == 200
    (emb / "map-full.png").unlink()
    r = c.get("/api/map.png")
    assert r.status_code == 404 and "re-run `isif map" in r.json()["error"]


def test_the_faiss_index_is_used_when_present(run, collection, tmp_path):  # noqa: F811
    pytest.importorskip("faiss")
    emb = tmp_path / "emb"
    shutil.copytree(collection, emb)
    assert main(["index", str(emb), "--kind", "hnsw"]) == 0
    c = client_of(create_app(Collection(emb)))
    info = c.get("/api/info").json()
    assert info["index"]["kind"] == "hnsw" and 0.9 <= info["index"]["recall@10"] <= 1.0
    exact = client_of(create_app(Collection(emb, exact=True)))
    assert exact.get("/api/info").json()["index"]["kind"].startswith("exact")
    a = [h["id"] for h in c.get("/api/search?id=2&k=5").json()["results"]]
    b = [h["id"] for h in exact.get("/api/search?id=2&k=5").json()["results"]]
    assert len(set(a) & set(b)) >= 4


def _stop_at_once(server, port):
    server.should_exit = True


def test_the_command_warns_off_loopback_and_refuses_in_one_line(run, collection, tmp_path, capsys):  # noqa: F811
    serve(ServeOptions(embed_dir=str(collection), host="127.0.0.1", port=0), ready=_stop_at_once)
    out = capsys.readouterr()
    assert f"serving {N} images (exact search) at http://127.0.0.1:" in out.out and "warning" not in out.err
    serve(ServeOptions(embed_dir=str(collection), host="0.0.0.0", port=0), ready=_stop_at_once)
    assert "warning: --host 0.0.0.0 lets anyone" in capsys.readouterr().err

    def refused(*args: str) -> str:
        capsys.readouterr()
        assert main(["serve", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("isif: error: "), err
        return err

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        assert "choose another with --port" in refused(str(collection), "--port", str(busy.getsockname()[1]))
    finally:
        busy.close()
    assert "not an `isif embed` output" in refused(str(tmp_path))
    other = tmp_path / "other"
    shutil.copytree(collection, other)
    meta = json.loads((other / "index.json").read_text())
    meta["checkpoint_sha256"] = "0" * 64
    (other / "index.json").write_text(json.dumps(meta))
    assert "is not the checkpoint that embedded" in refused(str(other))
    meta["checkpoint"] = str(tmp_path / "gone.pt")
    (other / "index.json").write_text(json.dumps(meta))
    assert "pass it with --checkpoint" in refused(str(other))
    assert "--port must be" in refused(str(collection), "--port", "70000")


def test_a_real_server_answers_over_http(collection):
    """uvicorn on a free loopback port, requests over a socket: the page, the API, an error."""
    import urllib.error
    import urllib.request

    box: dict = {}
    ready = threading.Event()

    def keep(server, port):
        box.update(server=server, port=port)
        ready.set()

    t = threading.Thread(target=serve, args=(ServeOptions(embed_dir=str(collection), port=0),),
                         kwargs={"ready": keep}, daemon=True)
    t.start()
    assert ready.wait(60)
    base = f"http://127.0.0.1:{box['port']}"
    try:
        for _ in range(100):
            try:
                page = urllib.request.urlopen(base + "/", timeout=5).read().decode()
                break
            except urllib.error.URLError:
                threading.Event().wait(0.05)
        assert "<title>isif search</title>" in page
        assert urllib.request.urlopen(base + "/static/app.js", timeout=5).status == 200
        out = json.loads(urllib.request.urlopen(base + "/api/search?id=1&k=3", timeout=5).read())
        assert len(out["results"]) == 3
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/api/image/..%2F..%2Fetc%2Fpasswd", timeout=5)
        assert 400 <= e.value.code < 500 and "error" in json.loads(e.value.read())
        # the names it answers to carry the port it was given (0: the one bound), and no other
        for host, status in ((f"localhost:{box['port']}", 200), ("rebound.example", 421), ("127.0.0.1:8000", 421)):
            req = urllib.request.Request(base + "/api/info", headers={"Host": host})
            try:
                got = urllib.request.urlopen(req, timeout=5).status
            except urllib.error.HTTPError as err:
                got = err.code
                assert f"open http://127.0.0.1:{box['port']}/" in json.loads(err.read())["error"]
            assert got == status, (host, got)
    finally:
        box["server"].should_exit = True
        t.join(30)
    assert not t.is_alive()


def test_the_listening_socket_is_tcp_so_keep_alive_responses_are_not_delayed():
    """asyncio sets TCP_NODELAY only on connections of sockets whose protocol is IPPROTO_TCP; a socket made with
    protocol 0 made every keep-alive response wait ~40 ms for the client's delayed ACK (measured: 44 ms instead
    of 1 ms by benchmarks/serve_load.py)."""
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP and sock.type == socket.SOCK_STREAM
    finally:
        sock.close()


# ----------------------------------------------------------------------------- hosts, other sites, many requests

EVERY_ROUTE = [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/api/info"), ("GET", "/api/search?id=0"),
               ("POST", "/api/search"), ("GET", "/api/image/0"), ("GET", "/api/thumb/0"), ("GET", "/api/map"),
               ("GET", "/api/map.png"), ("GET", "/api/map.png?v=1"), ("GET", "/api/clusters"),
               ("GET", "/api/clusters/0"), ("GET", "/nothing")]


def _send(c: TestClient, method: str, url: str, headers: dict[str, str]):
    if method == "POST":
        body = Image.new("RGB", (8, 8))
        buf = io.BytesIO()
        body.save(buf, format="PNG")
        return c.post(url, content=buf.getvalue(), headers={"content-type": "text/plain", **headers})
    return c.get(url, headers=headers)


@pytest.mark.parametrize("method,url", EVERY_ROUTE)
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1:9999", "127.0.0.1.evil.example:8000",
                                  ""])
def test_a_forged_host_header_is_refused_on_every_route(client, method, url, host):
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example."""
    r = _send(client, method, url, {"host": host})
    assert r.status_code == 421, (method, url, r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    assert "not this server's address; open http://127.0.0.1:8000/" in r.json()["error"]
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "LOCALHOST:8000", "[::1]:8000"])
def test_the_loopback_names_are_answered(client, host):
    assert client.get("/api/search?id=0&k=2", headers={"host": host}).status_code == 200


def test_the_hosts_are_those_the_server_was_started_for(collection):
    assert isif.serve.guard.allowed_hosts("127.0.0.1", 5000) == ("127.0.0.1:5000", "localhost:5000", "[::1]:5000")
    assert isif.serve.guard.allowed_hosts("::1", 80)[:2] == ("[::1]:80", "[::1]")  # browsers leave port 80 out
    assert isif.serve.guard.allowed_hosts("10.1.2.3", 5000)[0] == "10.1.2.3:5000"  # the one to name in errors
    wild = isif.serve.guard.allowed_hosts("0.0.0.0", 5000)
    assert {"0.0.0.0:5000", f"{socket.gethostname().lower()}:5000", "127.0.0.1:5000"} <= set(wild)
    c = client_of(create_app(Collection(collection), hosts=("photos.lan:9000",)))
    assert c.get("http://photos.lan:9000/api/info").status_code == 200
    r = c.get("/api/info")  # 127.0.0.1:8000 is no longer among them
    assert r.status_code == 421 and "open http://photos.lan:9000/" in r.json()["error"]


OTHER_SITE = [{"sec-fetch-site": "cross-site"}, {"sec-fetch-site": "same-site"},  # same-site: another port
              {"origin": "http://evil.example"}, {"origin": "null"}, {"origin": "http://127.0.0.1:9999"},
              {"origin": "http://evil.example", "sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"}]


@pytest.mark.parametrize("headers", OTHER_SITE)
@pytest.mark.parametrize("method,url", [r for r in EVERY_ROUTE if r[1].startswith("/api")] + [("POST", "/")])
def test_requests_from_another_site_are_refused(client, method, url, headers):
    """A text/plain form or no-cors fetch posts raw bytes to the decoder without a preflight; an <img> of
    another site would show the user's photos there."""
    r = _send(client, method, url, headers)
    assert r.status_code == 403, (method, url, headers, r.text)
    assert r.headers["content-type"] == "application/json"
    assert "cross-site request refused" in r.json()["error"] and "http://127.0.0.1:8000/" in r.json()["error"]


def test_the_page_itself_and_same_origin_requests_are_answered(client):
    nav = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate", "sec-fetch-dest": "document"}
    assert client.get("/", headers=nav).status_code == 200  # a link from another site opens the page
    assert client.get("/static/app.js", headers={"sec-fetch-site": "cross-site"}).status_code == 200
    own = {"origin": BASE, "sec-fetch-site": "same-origin"}
    for method, url in EVERY_ROUTE[:-3]:  # all but the clusters (none here) and the unknown page; the map is here
        r = _send(client, method, url, own)
        assert r.status_code == 200, (method, url, r.text)
    assert client.get("/api/info", headers={"sec-fetch-site": "none"}).status_code == 200  # typed in the address bar
    assert client.get("/api/info", headers={"origin": "http://LOCALHOST:8000"}).status_code == 200


def test_every_answer_has_the_security_headers_and_private_caching(client):
    csp = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    answers = {url: _send(client, method, url, {}) for method, url in EVERY_ROUTE}
    answers["413"] = client.post("/api/search", content=b"\0" * (2**20 + 1))
    answers["421"] = client.get("/api/info", headers={"host": "evil.example"})
    for url, r in answers.items():
        assert r.headers["x-content-type-options"] == "nosniff", url
        assert r.headers["referrer-policy"] == "no-referrer" and r.headers["x-frame-options"] == "DENY", url
        want = "private, max-age=3600" if url.startswith(("/api/image", "/api/thumb", "/api/map.png")) else "no-store"
        assert r.headers["cache-control"] == want, (url, r.headers.get("cache-control"))
    assert answers["/"].headers["content-security-policy"] == csp


def test_the_page_runs_under_its_content_security_policy():
    """No inline script, style or handler, nothing from another origin: what script-src/style-src 'self' allow."""
    import re

    web = ROOT / "src" / "isif" / "serve" / "web"
    html = (web / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/static/app.js">']
    assert "<style" not in html and not re.search(r"\sstyle\s*=", html)
    assert not re.search(r"\son[a-z]+\s*=", html, re.I) and "javascript:" not in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    js = (web / "app.js").read_text()
    for banned in ("innerHTML", "eval(", "new Function", "setAttribute(\"style", ".style.cssText", "http://", "https://"):
        assert banned not in js, banned


def _blocked_embedder(col: Collection) -> tuple[threading.Event, threading.Event]:
    """Make col's uploads wait inside the embedder until ``release`` is set; ``entered`` says one is there."""
    entered, release = threading.Event(), threading.Event()
    real = col.embedder.image_bytes

    def slow(data, name="upload"):
        entered.set()
        assert release.wait(60), "the test never released the upload"
        return real(data, name)

    col.embedder.image_bytes = slow
    return entered, release


def test_decodes_beyond_the_slots_get_503_and_searches_by_id_do_not_wait(collection, monkeypatch):
    col = Collection(collection)
    reads = []
    real_upload = isif.serve.routes._upload

    async def counted(request):
        reads.append(1)
        return await real_upload(request)

    monkeypatch.setattr(isif.serve.routes, "_upload", counted)
    png = (Path(json.loads((collection / "index.json").read_text())["root"]) /
           (collection / "paths.txt").read_text().split()[3]).read_bytes()
    with TestClient(create_app(col, max_upload_mib=1.0, default_k=5, decodes=1, wait_s=0.05), base_url=BASE) as c:
        assert c.get("/api/thumb/1?size=64").status_code == 200  # cached from now on
        entered, release = _blocked_embedder(col)
        first: dict = {}
        t = threading.Thread(target=lambda: first.update(r=c.post("/api/search?k=3", content=png)))
        t.start()
        try:
            assert entered.wait(60)  # the only slot is held, inside the network
            for url in ("/api/search?k=3", "/api/thumb/2?size=64"):
                r = c.post(url, content=png) if url.startswith("/api/search") else c.get(url)
                assert r.status_code == 503 and r.headers["retry-after"] == "2", (url, r.text)
                assert r.headers["content-type"] == "application/json" and "busy: 1 image(s)" in r.json()["error"]
            assert len(reads) == 1  # the refused upload's body was never read into memory
            assert c.get("/api/search?id=4&k=3").status_code == 200  # no decode: never waits
            assert c.get("/api/thumb/1?size=64").status_code == 200  # cached: no decode either
            assert c.get("/api/image/2").status_code == 200
        finally:
            release.set()
            t.join(60)
        assert first["r"].status_code == 200 and len(first["r"].json()["results"]) == 3
        assert c.post("/api/search?k=3", content=png).status_code == 200  # the slot is free again
        assert c.get("/api/thumb/2?size=64").status_code == 200


def test_decode_slots_queue_a_few_and_refuse_the_rest_at_once():
    async def scenario():
        slots = isif.serve.guard.DecodeSlots(1, wait_s=60, queue=1)
        await slots.acquire()
        waiter = asyncio.ensure_future(slots.acquire())
        await asyncio.sleep(0)
        assert slots.waiting == 1 and not waiter.done()
        with pytest.raises(isif.serve.errors.RequestError) as e:  # the queue is full: refused without waiting
            await slots.acquire()
        assert e.value.status == 503 and e.value.headers == {"Retry-After": "2"}
        slots.release()
        await asyncio.wait_for(waiter, 60)  # the waiting one gets the slot
        assert slots.waiting == 0
        slots.release()
        async with slots.hold():
            pass

    asyncio.run(scenario())
    assert isif.serve.guard.decode_slots(2**20) >= 1
    assert isif.serve.guard.decode_slots(2**50) == 1  # more than the machine holds: still one at a time


def _blocked_module(name: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Collect this module in a fresh interpreter where ``import NAME`` fails."""
    code = (f"import sys; sys.modules.update(dict.fromkeys({name.split(',')!r})); import pytest; "
            "raise SystemExit(pytest.main(['-q', '--co', '-p', 'no:cacheprovider', 'tests/test_serve.py']))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_under_ci_a_missing_fastapi_or_test_client_fails_instead_of_skipping():
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    for blocked, words in (("fastapi", "FastAPI is not installed"), ("httpx2,httpx", "httpx2 (the test client")):
        r = _blocked_module(blocked, {**env, "CI": "true"})
        assert r.returncode not in (0, 5) and words in r.stdout and "CI installs it" in r.stdout, r.stdout[-2000:]
    r = _blocked_module("fastapi", env)
    assert r.returncode in (0, 5) and "SKIPPED" in r.stdout and "FastAPI is not installed" in r.stdout, r.stdout


def test_the_load_benchmark_makes_a_synthetic_collection_without_like(collection, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import serve_load
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "synthetic"
    serve_load.main([str(collection), "--synthetic", "2000", "--kind", "exact", "--out", str(out),
                     "--clients", "2", "--requests", "5"])
    printed = capsys.readouterr().out
    assert (out / "features.npy").is_file() and len((out / "paths.txt").read_text().split()) == 2000
    assert "serving 2000 images" in printed and "2 clients x 5 requests" in printed
    row = next(line for line in printed.splitlines() if line.startswith("search id"))
    assert row.split()[2] == "10" and row.split()[-1] == "0"  # 10 searches, no errors
