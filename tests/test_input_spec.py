"""The input spec: how a trained network sees an image. One typed record read from every source (a checkpoint,
an old checkpoint, a safetensors export, an embed folder) and written back unchanged; the one test transform
built from it, so that ``isif eval`` and ``isif plot similarity`` see the images exactly as training did."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from isif.base.errors import UserError
from isif.cli import main
from isif.data.input_spec import InputSpec
from isif.training.checkpoint import load_checkpoint
from isif.training.config import Config

from .conftest import write_image_tree
from .test_train import tiny_config


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _train_timm(tmp_path):
    """A timm:test_resnet run of one epoch at 32 px on 8 colour classes, its 1-NN evaluated after training (on
    the code before the input spec: 0.0% at training, 12.5% by ``isif eval knn``)."""
    pytest.importorskip("timm", reason="timm is not installed (pip install 'isif[timm]')")
    from isif.training.loop import train

    cfg = tiny_config(write_image_tree(tmp_path / "tree", n_classes=8, seed=2), epochs=1)
    cfg.model.arch = "timm:test_resnet"
    cfg.model.width = 1.0
    cfg.data.size = 32
    cfg.eval.knn_k = 1
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    return cfg, run


def test_isif_eval_knn_of_a_timm_run_equals_its_training_time_knn(tmp_path, capsys):
    """The reported bug: training normalised a timm backbone's input with timm's mean and std, ``isif eval``
    with the data's: 17.5% vs 21.0% kNN on a CIFAR-10 slice. Both now read the checkpoint's input spec."""
    from isif.collection.evaluation import Loaded
    from isif.data.registry import load_sets
    from isif.training.step import build_parts

    cfg, run = _train_timm(tmp_path)
    trained = [r for r in _metrics(run) if r.get("knn_top1") is not None][-1]["knn_top1"]
    capsys.readouterr()
    assert main(["eval", "knn", "--checkpoint", str(run), "--json", "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out)["knn_top1"]
    # the features themselves: what training's extractor gives and what isif eval's gives, bit for bit
    ld = Loaded(str(run), device="cpu")
    sets = load_sets(cfg.data)
    parts = build_parts(cfg, sets.splits, len(sets.train), torch.device("cpu"), model=ld.model)
    want = parts.extractor()(ld.model, sets.test.images)
    got = ld.extractor(ld.model, ld.sets.test.images)
    assert evaluated == trained
    assert torch.equal(got, want)


def test_the_similarity_plot_sees_the_views_training_saw(tmp_path):
    """``isif plot similarity`` draws its two views with the run's augmentation at the run's input spec (a timm
    backbone's own mean and std), not the data's moments."""
    from isif.collection.similarity import similarity_samples
    from isif.data.registry import load_sets
    from isif.evaluate.protocol import Extractor
    from isif.training.checkpoint import load_trained
    from isif.training.step import build_parts

    cfg, run = _train_timm(tmp_path)
    pos, neg = similarity_samples(str(run), 12, None, "cpu", seed=3)
    model, _, _ = load_trained(run / "checkpoints" / "last.pt", "cpu")
    sets = load_sets(cfg.data)
    aug = build_parts(cfg, sets.splits, len(sets.train), torch.device("cpu"), model=model).augment
    g = torch.Generator().manual_seed(3)  # the same draws as similarity_samples
    x = sets.test.images[torch.randperm(len(sets.test), generator=g)[:12]]
    views = Extractor(lambda b: aug(b, g), torch.device("cpu"), batch_size=cfg.eval.batch_size)
    v1, v2 = views(model, x), views(model, x)
    shift = int(torch.randint(1, len(x), (1,), generator=g).item())
    assert torch.equal(pos, (v1 * v2).sum(1))
    assert torch.equal(neg, (v1 * v1.roll(shift, 0)).sum(1))


# ----------------------------------------------------------------------------- the record: readers and writer

OLD = Path(__file__).parent / "fixtures" / "main-c7df253-tiny-mid-epoch.pt"


def test_an_old_checkpoints_spec_reads_and_writes_back_its_keys():
    """A checkpoint written before ``fit`` was recorded (c7df253): a square fit, no crop; written back as the
    checkpoint stores it (size, mean, std, resize: the stored side, center_crop), with fit added at the end."""
    state = load_checkpoint(OLD)
    spec = InputSpec.from_checkpoint(state, Config.from_dict(state["config"]))
    assert (spec.size, spec.resize, spec.fit, spec.stored, spec.version) == (32, None, "square", 32, 1)
    d = spec.to_dict(checkpoint=True)
    assert list(d) == [*state["input"], "fit"] and {k: d[k] for k in state["input"]} == state["input"]
    assert pickle.dumps(InputSpec.in_checkpoint({"input": d}).to_dict(checkpoint=True)) == pickle.dumps(d)


def _splits(side: int = 32):
    from isif.data.types import ArrayDataset, Splits

    train = ArrayDataset(torch.zeros(4, 3, side, side, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), ["a"])
    return Splits(train, None, (0.25, 0.5, 0.75), (0.5, 0.25, 0.125))


def test_a_checkpoint_without_a_spec_gets_what_its_training_saw():
    cfg = Config()
    spec = InputSpec.from_checkpoint({}, cfg, _splits())
    assert spec == InputSpec(32, (0.25, 0.5, 0.75), (0.5, 0.25, 0.125)) and spec.fit == "square"
    cfg.data.size, cfg.augment.crop_mode = 28, "fixed"  # the unseen-category protocol: the centre crop of 32
    spec = InputSpec.from_checkpoint({}, cfg, _splits())
    assert (spec.size, spec.resize) == (28, 32) and spec.transform().center_crop


def test_the_source_declares_the_fit():
    import dataclasses

    assert InputSpec.for_run(None, "resized", _splits()).fit == "square"
    unlabelled = dataclasses.replace(_splits(), fit="crop")  # as data.unlabelled declares it
    assert InputSpec.for_run(16, "resized", unlabelled).fit == "crop"
    recipe = {"size": 160, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # a timm backbone's own
    assert InputSpec.for_run(None, "resized", _splits(), recipe) == InputSpec(160, recipe["mean"], recipe["std"])


def test_the_recipe_of_index_json_and_safetensors_round_trips_byte_for_byte():
    for d in ({"size": 32, "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "resize": None, "fit": "square"},
              {"size": 28, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize": 256,
               "fit": "square"},
              {"size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resize": None, "fit": "crop"}):
        a, b = InputSpec.from_embed_dir({"input": d}), InputSpec.from_safetensors({"input": d})
        assert a == b and json.dumps(a.to_dict(), indent=2) == json.dumps(d, indent=2)
        assert a["size"] == d["size"] and a["mean"] == tuple(d["mean"])  # the dict's keys still work
    assert InputSpec.from_embed_dir({"root": "/x"}) is None  # a folder written without a spec


def test_a_newer_or_malformed_spec_is_refused_in_one_line():
    d = {"size": 32, "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "resize": None, "fit": "square"}
    for bad, phrase in (({**d, "version": 2}, "upgrade isif"), ({**d, "mean": [0.1]}, "malformed"),
                        ({**d, "fit": "stretch"}, "malformed"), ({"size": 32}, "malformed")):
        with pytest.raises(UserError) as e:
            InputSpec.from_embed_dir({"input": bad}, "emb/index.json")
        assert phrase in str(e.value) and "\n" not in str(e.value) and "emb/index.json" in str(e.value)
    with pytest.raises(UserError, match="upgrade isif"):
        InputSpec.in_checkpoint({"input": {**d, "version": 2}})
    with pytest.raises(KeyError):
        InputSpec.from_embed_dir({"input": d})["stored"]  # only the recipe's keys
