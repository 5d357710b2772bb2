"""The public Python API: exactly ``isif.__all__``, documented; load_model, embed, and the README's examples run as
written."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import isif
from isif import UserError, embed, load_model
from isif.cli import main

README = Path(__file__).resolve().parents[1] / "docs" / "api.md"  # the examples of the Python API page
PUBLIC = {
    "InvariantSpreading", "NPSoftmax", "NCE", "Exemplar", "Triplet", "DeepCluster", "build_objective", "methods",
    "LoadedModel", "ImageTransform", "load_model", "embed",
    "knn_scores", "knn_predict", "knn_accuracy", "recall_at_k", "map_at_r", "nmi",
    "search", "exact_topk", "build_index", "load_index", "UserError",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.conftest import train_tiny_run

    out, tree = train_tiny_run(tmp_path_factory.mktemp("api"))
    return out, sorted((tree / "test").rglob("*.png"))


def readme_example(name: str) -> str:
    """The python block after ``<!-- example: NAME -->`` in docs/api.md."""
    m = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert m, f"docs/api.md has no example {name}"
    return m.group(1)


def test_all_is_exactly_the_public_names_and_each_is_documented():
    assert sorted(isif.__all__) == sorted(PUBLIC) and len(isif.__all__) == len(PUBLIC)
    for name in isif.__all__:
        obj = getattr(isif, name)
        assert inspect.getdoc(obj), name
        if inspect.isfunction(obj):
            assert "return" in inspect.get_annotations(obj), name
    assert "private" in isif.__doc__ and "may change" in isif.__doc__
    with pytest.raises(AttributeError):
        isif.Embedder  # noqa: B018  (not exported)


def test_import_isif_is_light_and_the_functions_stay_functions():
    code = ("import sys, isif; heavy = ('torch', 'faiss', 'onnx', 'onnxruntime', 'timm'); "
            "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]; "
            "import isif.collection.embedding, isif.collection.search; from isif import *; "
            "assert callable(isif.embed) and callable(isif.search) and embed is isif.embed and search is isif.search; "
            "from isif.collection.embedding import Embedder; "
            "assert callable(embed) and not isinstance(isif.embed, type(sys)); "
            "assert not [m for m in ('faiss', 'onnx', 'timm') if m in sys.modules]")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_every_registered_objective_builds_by_name():
    small = {"deepcluster": {"clusters": 4}, "moco": {"queue": 16}}
    for name, m in isif.methods().items():
        obj = isif.build_objective(name, num_instances=16, dim=8, features=8, backbone=torch.nn.Linear(4, 8),
                                   **small.get(name, {}))
        assert m.summary and isinstance(obj, torch.nn.Module)
    for name in ("moco", "byol"):  # a momentum target copies the network: without one, the error says so
        with pytest.raises(ValueError, match="needs the network"):
            isif.build_objective(name, num_instances=16)
    crit = isif.build_objective("isif", temperature=0.2)
    assert isinstance(crit, isif.InvariantSpreading) and crit.temperature == 0.2


def test_readme_training_loop_runs_as_written(capsys):
    scope: dict = {}
    exec(compile(readme_example("own-training-loop"), "README.md", "exec"), scope)
    assert isinstance(scope["criterion"], isif.InvariantSpreading)
    assert torch.isfinite(scope["loss"]) and "epoch 1: loss" in capsys.readouterr().out


def test_readme_load_and_embed_runs_with_a_run_and_files(run, capsys):
    folder, files = run
    code = readme_example("load-and-embed")
    code, n = re.subn(r"^RUN = .*$", f"RUN = {str(folder)!r}", code, flags=re.M)
    code, m = re.subn(r"^FILES = .*$", f"FILES = {[str(f) for f in files]!r}", code, flags=re.M)
    assert n == m == 1
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["features"].shape == (len(files), 128) and scope["ids"].shape == (1, 3)
    assert torch.allclose(scope["one"][0], scope["features"][0], atol=1e-5)
    assert capsys.readouterr().out.count("\n") == 3


def test_embed_equals_isif_embed_for_paths_images_and_arrays(run, tmp_path):
    folder, files = run
    assert main(["embed", str(folder), str(files[0].parents[1]), "--out", str(tmp_path / "e"), "--quiet"]) == 0
    want = torch.from_numpy(np.load(tmp_path / "e" / "features.npy"))
    order = [str(files[0].parents[1] / p) for p in (tmp_path / "e" / "paths.txt").read_text().split()]
    model = load_model(folder)
    got = embed(model, order, batch_size=5)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(len(got)), atol=1e-5)
    pil = [Image.open(f) for f in order[:5]]  # the same first batch of 5: the very same numbers
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in order[:5]]
    assert torch.equal(embed(model, pil), got[:5]) and torch.equal(embed(model, arrays), got[:5])
    assert torch.allclose(embed(folder, order[0]), got[:1], atol=1e-6)  # a path as the model, one image alone
    assert embed(model, []).shape == (0, 128)


def test_load_model_unpacks_and_its_transform_is_the_test_transform(run, tmp_path):
    folder, files = run
    loaded = load_model(folder / "checkpoints" / "last.pt")
    network, transform = loaded
    assert not network.training and loaded.config is not None and loaded.precision == "fp32"
    assert loaded.source.name == "last.pt" and loaded.dim == 128 and loaded.device == torch.device("cpu")
    x = transform(files[0])
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 3  # normalised, not in [0, 1] pixel units
    with torch.no_grad():
        assert torch.allclose(network(x[None])[0], embed(loaded, [files[0]])[0], atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        transform(np.zeros((8, 8), np.float32))
    with pytest.raises(TypeError, match="a path, a PIL image"):
        transform(3)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png: unreadable image"):
        embed(loaded, [files[0], tmp_path / "broken.png"])
    with pytest.raises(UserError, match="does not exist"):
        load_model(folder / "nothing.pt")


def test_search_and_the_index_agree():
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    scores, ids = isif.search(z[:4], z, 5)
    s2, i2 = isif.exact_topk(z[:4].numpy(), z.numpy(), 5)
    assert ids.tolist() == i2.tolist() and np.allclose(scores.numpy(), s2, atol=1e-6)
    assert ids[:, 0].tolist() == [0, 1, 2, 3]  # without exclude, a row finds itself first
    pytest.importorskip("faiss")
    index, params = isif.build_index(z, kind="exact")
    _, i3 = index.search(z[:4].numpy(), 5)
    assert i3.tolist() == i2.tolist() and params == {}


def test_the_evaluation_functions_are_the_ones_isif_uses():
    from isif.evaluate import knn, retrieval

    assert isif.knn_accuracy is knn.knn_accuracy and isif.recall_at_k is retrieval.recall_at_k
    z = torch.nn.functional.normalize(torch.eye(4).repeat_interleave(3, 0) + 0.01 * torch.rand(12, 4), dim=1)
    y = torch.arange(4).repeat_interleave(3)
    assert isif.recall_at_k(z, y, (1,)) == {1: 100.0} and isif.map_at_r(z, y) == 100.0
    assert isif.nmi(z, y) == pytest.approx(100.0)
    assert isif.knn_accuracy(z, y, z, y, 4, k=3) == 100.0
