"""The one table of metrics (isif.evaluate.metrics): it covers every key a run writes, in the file's order; its
directions label the plots; the console lines, the race table and isif train's last line read as before; and the
run's one banner (isif.training.loop.announce) counts images a step as views x batch."""

from __future__ import annotations

import json

import pytest

from isif.base.dist import World
from isif.evaluate.labelfree import LABEL_FREE
from isif.evaluate.metrics import EVALUATIONS, METRICS, is_evaluation, is_retrieval, lookup, metric, summary
from isif.training.loop import Interrupted, announce, prepare, train
from isif.training.metrics import final_summary
from isif.training.race import race_metric, race_table

from .conftest import use_method
from .test_train import tiny_config

KNN = {"epoch": 3, "loss": 3.86, "knn_top1": 62.8349, "lr": 0.03, "images_per_s": 1200.0, "train_s": 41.6}
RET = {"epoch": 2, "loss": 3.7, "knn_top1": None, "lr": 0.01, "images_per_s": 900.0, "train_s": 20.2,
       "recall@1": 31.2049, "recall@2": 40.5, "recall@4": 52.125, "recall@8": 64.0, "map@r": 12.3456, "nmi": 40.0999}
FREE = {"epoch": 1, "loss": 3.9, "lr": 0.03, "images_per_s": 10.0, "train_s": 1.0, "view_top1": 71.25,
        "view_top5": 90.349, "alignment": 0.41234, "uniformity": -2.3149, "rankme": 54.06, "pos_cos": 0.8,
        "neg_cos": 0.1, "holdout_s": 0.5}


def _family(key: str) -> str:
    return "recall@K" if key.startswith("recall@") else key


def test_the_table_covers_every_key_a_run_writes_in_the_files_order(tmp_path, image_tree):
    """A kNN run with held-out images, a retrieval run and an untrained one: together they write every key of the
    table, nothing else, each row in the table's order."""
    runs = {}
    cfg = tiny_config(image_tree, epochs=1)
    cfg.data.holdout = 8
    runs["knn"] = cfg
    cfg = tiny_config(image_tree, epochs=1)
    cfg.eval.protocol = "retrieval"
    runs["retrieval"] = cfg
    runs["random"] = use_method(tiny_config(image_tree, epochs=1), "random")
    order = [m.key for m in METRICS]
    seen = set()
    for name, cfg in runs.items():
        train(cfg, tmp_path / name, progress=False)
        for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines():
            keys = [_family(k) for k in json.loads(line)]
            assert all(lookup(k) is not None for k in json.loads(line)), (name, keys)
            ranks = [order.index(k) for k in dict.fromkeys(keys)]
            assert ranks == sorted(ranks), (name, keys)  # the table lists the keys in the file's order
            seen |= set(keys)
    assert seen == set(order)
    assert tuple(m.key for m in METRICS if m.protocol == "label-free" and m.evaluation) == LABEL_FREE
    assert {m.protocol for m in METRICS} == {*EVALUATIONS, "loop"}
    assert all(m.better in ("higher", "lower", "") and m.meaning and m.short and m.label for m in METRICS)


def test_lookup_knows_each_recall_and_what_is_an_evaluation():
    r4 = metric("recall@4")
    assert (r4.key, r4.short, r4.label, r4.better) == ("recall@4", "R@4", "Recall@4 on unseen classes (%)", "higher")
    assert lookup("recall@x") is None and lookup("nope") is None
    with pytest.raises(KeyError, match="nope"):
        metric("nope")
    assert is_evaluation("knn_top1") and is_evaluation("recall@16") and is_evaluation("rankme")
    assert not any(is_evaluation(k) for k in ("loss", "lr", "holdout_s", "eval_s", "epoch", "recall@"))
    assert is_retrieval("map@r") and is_retrieval("recall@1") and not is_retrieval("knn_top1")


def test_directions_label_the_plots_and_the_race_compares_the_primary_metric(tmp_path, monkeypatch):
    import isif.training.plots as plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.plot_curve([FREE, dict(FREE, epoch=2)], tmp_path / "c.png")
    labels = [ax.get_ylabel() for ax in figures[0].axes]
    for key in ("alignment", "uniformity"):  # lower is better: said on the axis, from the table
        assert metric(key).better == "lower" and f"{metric(key).label} (lower is better)" in labels
    assert metric("rankme").better == "higher" and "effective rank (RankMe)" in labels
    plots.plot_race({"isif": [RET]}, tmp_path / "r.png", key="recall@1")
    assert figures[1].axes[0].get_ylabel() == "Recall@1 on unseen classes (%)"
    assert race_metric({"a": [RET]}) == ("recall@1", "Recall@1 on unseen classes (%)")
    assert race_metric({"a": [RET], "b": [KNN]}) == ("knn_top1", "kNN top-1 (%)")


def test_console_lines_race_tables_and_the_last_line_read_as_before(tmp_path, image_tree):
    """Known rows, and the text the code before the table gave for them."""
    both = {**KNN, **{k: v for k, v in FREE.items() if k not in KNN}}
    assert summary(KNN) == "kNN 62.83%"
    assert summary(RET) == "R@1 31.20 R@2 40.50 R@4 52.12 R@8 64.00 NMI 40.10"
    assert summary(FREE) == "views top-1/5 71.2/90.3% rank 54.1 align 0.412 unif -2.31"
    assert summary(both) == "kNN 62.83%  views top-1/5 71.2/90.3% rank 54.1 align 0.412 unif -2.31"
    assert summary({"epoch": 1, "loss": 1.0, "knn_top1": None}) == ""
    h = {"random": [{"epoch": 0, "loss": None, "knn_top1": 20.0, "train_s": 0.0}],
         "isif": [dict(KNN, epoch=1, knn_top1=30.004), dict(KNN, epoch=2, knn_top1=None), KNN],
         "npsoftmax": [dict(KNN, epoch=1, knn_top1=25.5, train_s=12.6)]}
    assert race_table(h) == ("| method | ep 1 | ep 3 | train time (s) |\n|---|---|---|---|\n"
                             "| random (untrained) | 20.00 | 20.00 | 0 |\n| **isif** | 30.00 | 62.83 | 42 |\n"
                             "| npsoftmax | 25.50 | – | 13 |\n")
    h = {"random": [dict(RET, epoch=0, loss=None, train_s=0.0)],
         "isif": [dict(RET, epoch=1), dict(RET, **{"map@r": None})]}
    assert race_table(h) == (
        "| method | ep 1 | ep 2 | train time (s) |\n|---|---|---|---|\n| random (untrained) | 31.20 | 31.20 | 0 |\n"
        "| **isif** | 31.20 | 31.20 | 20 |\n\n| method | epoch | R@1 | R@2 | R@4 | R@8 | MAP@R | NMI |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| random (untrained) | 0 | 31.20 | 40.50 | 52.12 | 64.00 | 12.35 | 40.10 |\n"
        "| isif | 2 | 31.20 | 40.50 | 52.12 | 64.00 | – | 40.10 |\n")
    cfg = tiny_config(image_tree)
    assert final_summary(cfg, [KNN, dict(KNN, epoch=4, knn_top1=None)], "runs/x") == \
        "kNN top-1 62.83% (k=5, sigma=0.1) after epoch 3; run folder: runs/x"
    assert final_summary(cfg, [RET]) == \
        "unseen classes: R@1 31.20 R@2 40.50 R@4 52.12 R@8 64.00 NMI 40.10 after epoch 2"
    assert final_summary(cfg, [FREE], tmp_path) == ("held-out images (no labels): views top-1/5 71.2/90.3% rank 54.1 "
                                                     f"align 0.412 unif -2.31 after epoch 1; run folder: {tmp_path}")
    assert final_summary(cfg, [{"epoch": 1, "loss": 1.0, "knn_top1": None}]) is None


@pytest.mark.parametrize(("method", "views"), [("isif", 2), ("npsoftmax", 1)])
def test_the_banner_counts_views_times_batch_images_a_step(tmp_path, image_tree, method, views):
    cfg = use_method(tiny_config(image_tree, epochs=2), method)
    s = prepare(cfg, tmp_path / "run", resume=False, overwrite=False)
    head, schedule = announce(s).splitlines()
    assert head.startswith(f"isif: training {method} (preset cifar10-tiny: ") and f"-> {tmp_path / 'run'}; " in head
    assert head.endswith("; 64 images")
    assert schedule.startswith(f"  network resnet18_cifar width 0.03125; batch 8 instances, {8 * views} images/step "
                               f"({views} view")
    assert "2 epochs of 8 steps at 32px, fp32, device cpu; about " in schedule and "s a step, measured" in schedule
    s.world = World(rank=0, size=2)  # under torchrun: each process's share
    assert "batch 8 instances = 4 per process x 2 processes, " in announce(s)
    assert not (tmp_path / "run").exists()  # prepare and the banner write nothing


def test_the_banner_says_a_budget_and_where_a_resumed_run_goes_on(tmp_path, image_tree, capsys):
    cfg = tiny_config(image_tree, epochs=None)
    cfg.train.budget = 128  # 2 epochs of 64 images
    assert "2 epochs (from --budget 128 instances) of 8 steps" in announce(prepare(cfg, tmp_path / "b", False, False))
    cfg = tiny_config(image_tree, epochs=1)
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "run", stop_after_steps=3)
    assert capsys.readouterr().err.startswith("isif: training isif ")
    train(cfg, tmp_path / "run", resume=True)
    err = capsys.readouterr().err
    assert err.startswith("isif: resuming isif (preset cifar10-tiny: ") and \
        f"-> {tmp_path / 'run'} from epoch 1/1, step 3/8; 64 images" in err
    assert "of training left on this machine" in err and err.count("isif: ") == 1  # one banner
    s = prepare(cfg, tmp_path / "run", resume=True, overwrite=False)
    assert f"-> {tmp_path / 'run'}, all 1 epochs done; " in announce(s)


def test_prepare_keeps_the_checks_the_cli_banner_made(tmp_path, image_tree, monkeypatch):
    """The command no longer checks before the loop: prepare refuses --sync-bn on CPU processes and a batch that
    the processes cannot share, before anything is written."""
    import isif.training.loop as loop
    from isif.base.errors import UserError

    monkeypatch.setattr(loop, "setup", lambda device: World(rank=0, size=2))  # as under torchrun
    monkeypatch.setattr(loop, "barrier", lambda world: None)
    # the run folder agreed on as by two processes (its collectives are elastic's, tested in test_elastic.py)
    monkeypatch.setattr(loop, "settle_run", lambda out, resume, overwrite, world: (loop.RunDir(out), resume,
                                                                                   overwrite, None))
    monkeypatch.setattr(loop, "check_shared", lambda out, world: None)
    cfg = tiny_config(image_tree)
    cfg.train.sync_bn = True
    with pytest.raises(UserError, match="--sync-bn needs GPUs"):
        prepare(cfg, tmp_path / "run", resume=False, overwrite=False)
    cfg = tiny_config(image_tree)
    cfg.train.batch_size = 7
    with pytest.raises(UserError, match="--batch-size 7 .* divisible by the 2 processes"):
        prepare(cfg, tmp_path / "run", resume=False, overwrite=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["moco", "isif"])
def test_the_banner_times_the_whole_step_on_copies(tmp_path, image_tree, method, monkeypatch):
    """The estimate runs the method's own step (its heads, loss, momentum target, optimiser) three times, on
    copies: the run's weights, optimiser, objective state (MoCo's queue) and random streams stay as they were."""
    import torch

    from isif.training import step

    s = prepare(use_method(tiny_config(image_tree, epochs=1), method), tmp_path / "run", False, False)
    before = {k: v.clone() for k, v in {**s.parts.model.state_dict(), **s.parts.objective.state_dict()}.items()}
    calls, rng, aug = [], torch.random.get_rng_state(), s.parts.aug_gen.get_state()
    real = step.train_step
    monkeypatch.setattr(step, "train_step", lambda parts, *a, **k: calls.append(parts) or real(parts, *a, **k))
    assert step.estimate_step_seconds(s.parts, s.sets.train.images, 8) > 0
    assert len(calls) == 3 and all(p.objective is not s.parts.objective and p.model is not s.parts.model
                                   for p in calls)
    after = {**s.parts.model.state_dict(), **s.parts.objective.state_dict()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not s.parts.opt.state and torch.equal(rng, torch.random.get_rng_state())
    assert torch.equal(aug, s.parts.aug_gen.get_state())
