"""Each method trains with its own recipe unless the run asks for the shared one: the recipe lands in the config
under the user's flags, its learning rate follows the batch, old runs keep what they trained with; and the
defects the review of the successors found stay fixed (MoCo's projector and loss, DINO's views and head, the
frozen last layer, LARS and gradient clipping reach the optimiser)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from isif.objectives import build_objective, get_method, methods
from isif.objectives.contract import target_of
from isif.objectives.moco import moco_loss
from isif.training.config import Config
from isif.training.presets import resolve

WITH_RECIPE = [n for n, m in methods().items() if m.recipe is not None]


def test_every_successor_has_a_recipe_that_names_its_source_and_the_papers_methods_have_none():
    assert set(WITH_RECIPE) == {"simclr", "moco", "byol", "simsiam", "barlow-twins", "vicreg", "dino"}
    for name in WITH_RECIPE:
        assert any(s in get_method(name).recipe.source for s in ("lightly", "solo-learn")), name
    assert get_method("isif").recipe is None  # the presets are ISIF's recipe


@pytest.mark.parametrize("name", WITH_RECIPE)
def test_the_recipe_lands_in_the_config_and_shared_keeps_the_presets(name):
    recipe = get_method(name).recipe
    own = resolve("cifar10-race", {"method.name": name})
    for key, value in recipe.changes(own.train.batch_size).items():
        got = own.get(key)
        assert (list(got) if isinstance(got, tuple) else got) == (list(value) if isinstance(value, tuple) else value)
    shared = resolve("cifar10-race", {"method.name": name, "train.recipe": "shared"})
    isif = resolve("cifar10-race")
    for sec in ("augment", "optim"):
        assert dataclasses.asdict(shared.section(sec)) == dataclasses.asdict(isif.section(sec))
    assert dataclasses.asdict(shared.method.settings) == dataclasses.asdict(get_method(name).settings())
    assert own.train.recipe == "own" and shared.train.recipe == "shared"


def test_the_lightly_matched_recipes_resolve_and_differ_from_the_own_where_said():
    """Barlow Twins trains with solo-learn's recipe (lightly's does not learn in 3 epochs here) and MoCo's without
    split BatchNorm; their lightly-matched recipes (the side-by-side benchmark's) are settings that exist."""
    from isif.objectives import barlow_twins, moco

    bt = resolve("cifar10-race", {"method.name": "barlow-twins", **barlow_twins.LIGHTLY_RECIPE.changes(128)})
    assert bt.optim.optimizer == "sgd" and bt.optim.lr == pytest.approx(0.06) and bt.method.settings.loss_scale == 1
    own = resolve("cifar10-race", {"method.name": "barlow-twins"})
    assert own.optim.optimizer == "lars" and own.method.settings.loss_scale == pytest.approx(0.1)
    assert own.method.settings.proj_layers == 3 and own.augment.solarize_p == (0.0, 0.2)
    shared = {"train.recipe": "shared"}  # the run's SGD: the losses scaled as measured to learn under it
    assert resolve("cifar10-race", {"method.name": "barlow-twins", **shared}).method.settings.loss_scale == 0.01
    assert resolve("cifar10-race", {"method.name": "vicreg", **shared}).method.settings.loss_scale == 0.04
    m = resolve("cifar10-race", {"method.name": "moco", **moco.LIGHTLY_RECIPE.changes(128)})
    assert m.method.settings.bn_splits == 8 and m.method.settings.queue_update == "term"
    own = resolve("cifar10-race", {"method.name": "moco"}).method.settings
    assert own.bn_splits == 1 and own.queue_update == "step"


def test_the_recipes_learning_rate_scales_with_the_batch_and_flags_win():
    assert resolve("cifar10-race", {"method.name": "byol"}).optim.lr == pytest.approx(0.06)
    assert resolve("cifar10-race", {"method.name": "byol", "train.batch_size": 256}).optim.lr == pytest.approx(0.12)
    assert resolve("cifar10-race", {"method.name": "simsiam", "train.batch_size": 256}).optim.lr == pytest.approx(0.06)
    vicreg = resolve("cifar10-race", {"method.name": "vicreg"})
    assert vicreg.optim.optimizer == "lars" and vicreg.optim.lr == pytest.approx(0.3 * 128 / 256)
    assert vicreg.optim.exclude_bias_norm and vicreg.method.settings.loss_scale == 1.0
    mine = resolve("cifar10-race", {"method.name": "byol", "optim.lr": 0.5, "method.proj_hidden": 64,
                                    "augment.solarize_p": (0.0,)})
    assert mine.optim.lr == 0.5 and mine.method.settings.proj_hidden == 64 and mine.augment.solarize_p == (0.0,)


def test_a_runs_config_with_its_recipe_resolves_to_itself():
    cfg = resolve("cifar10-race", {"method.name": "dino"})
    again = Config.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_a_config_from_before_the_recipes_keeps_what_its_run_trained_with():
    old = resolve("cifar10-race", {"method.name": "moco", "train.recipe": "shared"}).to_dict()
    old["version"] = 2
    for key in ("symmetric", "projector_bn"):
        del old["method"][key]
    del old["train"]["recipe"]
    cfg = Config.from_dict(old)
    assert cfg.method.settings.symmetric is False and cfg.method.settings.projector_bn is True
    assert cfg.train.recipe == "shared"
    plain = resolve("cifar10").to_dict()  # ISIF has no recipe: an old config of it reads as it was
    plain["version"] = 2
    del plain["train"]["recipe"]
    assert Config.from_dict(plain).to_dict() == resolve("cifar10").to_dict()


# ----------------------------------------------------------------------------- the review's fixes


def _backbone():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8)).double()


def test_moco_has_no_batchnorm_in_its_projector_and_its_loss_is_symmetric():
    backbone = _backbone()
    obj = build_objective("moco", num_instances=64, features=8, backbone=backbone, queue=16, proj_hidden=32,
                          proj_dim=16).double()
    assert not any(isinstance(m, nn.BatchNorm1d) for m in obj.projector.modules())
    assert obj.target_views == (0, 1)
    x = torch.randn(2 * 4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = target_of(obj, backbone, x)
    queue = obj.queue.clone()
    q, k = obj.outputs(backbone(x), target)
    expect = (moco_loss(q[:4], k[4:], queue, 0.2) + moco_loss(q[4:], k[:4], queue, 0.2)) / 2
    assert torch.allclose(obj(backbone(x), None, target=target), expect, atol=1e-12)
    assert torch.allclose(obj.queue[:8], k)  # both views' keys entered the queue
    old = build_objective("moco", num_instances=64, features=8, backbone=backbone, queue=16, proj_hidden=32,
                          proj_dim=16, symmetric=False, projector_bn=True)
    assert old.target_views == (1,) and any(isinstance(m, nn.BatchNorm1d) for m in old.projector.modules())


def test_dinos_recipe_trains_two_32px_views_with_lightlys_head():
    cfg = resolve("cifar10-race", {"method.name": "dino"})
    s = cfg.method.settings
    obj = build_objective("dino", features=8, backbone=_backbone(), total_steps=10, settings=s)
    assert obj.views == ("global", "global")
    assert sum(isinstance(m, nn.Linear) for m in obj.head.mlp) == 2
    assert any(isinstance(m, nn.BatchNorm1d) for m in obj.head.mlp)
    assert obj.head.last.shape == (2048, 256) and obj.teacher_temp() == pytest.approx(0.04)
    for _ in range(5):
        obj.after_step(_backbone())
    assert obj.momentum() == pytest.approx(0.99)  # held constant, as lightly's benchmark


def test_dinos_last_layer_gets_no_gradient_while_frozen():
    backbone = _backbone()
    obj = build_objective("dino", features=8, backbone=backbone, total_steps=20, steps_per_epoch=2,
                          freeze_last_layer=1.0, prototypes=16, proj_hidden=16, proj_dim=8, local_crops=0).double()
    x = torch.randn(2 * 4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for step in range(3):
        obj.zero_grad()
        obj(backbone(x), None, target=target_of(obj, backbone, x)).backward()
        assert (obj.head.last.grad is None) == (step < 2), step
        obj.after_step(backbone)


@pytest.mark.parametrize("flags", [{}, {"optim.optimizer": "lars", "optim.exclude_bias_norm": True,
                                        "optim.clip_grad": 1e-3}])
def test_the_optimiser_of_the_recipe_reaches_the_step(flags):
    from isif.data.types import ArrayDataset, Splits
    from isif.training.optim import LARS
    from isif.training.step import build_parts, train_step

    from .conftest import use_method

    cfg = use_method(resolve("cifar10-tiny", {"model.width": 0.0625, "train.batch_size": 4,
                                              "train.precision": "fp32", **flags}), "byol")
    images = torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    data = ArrayDataset(images, torch.zeros(8, dtype=torch.long), ["x"])
    parts = build_parts(cfg, Splits(data, data, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), 8, torch.device("cpu"))
    lars = flags.get("optim.optimizer") == "lars"
    assert isinstance(parts.opt, LARS) == lars and len(parts.opt.param_groups) == (2 if lars else 1)
    train_step(parts, images[:4], torch.arange(4), torch.Generator().manual_seed(2))
    if lars:  # clipped to 1e-3 before the step
        grads = [p.grad for g in parts.opt.param_groups for p in g["params"] if p.grad is not None]
        assert float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) <= 1e-3 * (1 + 1e-4)


def test_race_on_a_folder_without_labels_races_it_unlabelled(tmp_path):
    from isif.training.options import RaceOptions, race_configs

    from .conftest import class_images

    folder = tmp_path / "flat"
    folder.mkdir()
    for i, img in enumerate(class_images(np.random.default_rng(0), 2, 4)[0]):
        Image.fromarray(img).save(folder / f"{i}.png")
    configs = race_configs(RaceOptions(methods=("isif", "byol"), settings={"data.path": str(folder)}))
    assert {c.data.dataset for c in configs.values()} == {"unlabelled"}


def test_split_batchnorm_normalises_each_group_apart_and_the_keys_come_back_in_order():
    from isif.objectives.moco import SplitBatchNorm2d, split_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).double()
    plain = nn.BatchNorm2d(4).double()
    plain.load_state_dict(net[1].state_dict())
    split_batchnorm(net, 2)
    assert isinstance(net[1], SplitBatchNorm2d) and set(net.state_dict()) == {"0.weight", "0.bias", "1.weight",
                                                                             "1.bias", "1.running_mean",
                                                                             "1.running_var", "1.num_batches_tracked"}
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64)
    y = net(x)
    h = net[0](x)
    for j in range(2):  # group j: images j, j + 2, ...
        ref = nn.functional.batch_norm(h[j::2], None, None, net[1].weight, net[1].bias, True, 0.1, net[1].eps)
        assert torch.allclose(y[j::2], ref, atol=1e-10)
    expect_mean = 0.9 * 0 + 0.1 * torch.stack([h[j::2].mean((0, 2, 3)) for j in range(2)]).mean(0)
    assert torch.allclose(net[1].running_mean, expect_mean, atol=1e-10)
    net.eval()
    plain.load_state_dict(net[1].state_dict())
    plain.eval()
    assert torch.allclose(net(x), plain(net[0](x)), atol=1e-12)  # evaluation: a plain BatchNorm
    with pytest.raises(ValueError, match="--bn-splits 2 does not divide the 7 images"):
        net.train()(x[:7])

    backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(1), nn.LazyLinear(8)).double()
    backbone(x)
    obj = build_objective("moco", num_instances=64, features=8, backbone=backbone, queue=16, proj_hidden=32,
                          proj_dim=16, bn_splits=4).double()
    keys = target_of(obj, backbone, x)
    obj.target.eval()  # with the statistics frozen the shuffle must not change any row's features
    backbone.eval()
    assert torch.allclose(target_of(obj, backbone, x), obj.target.backbone(x), atol=1e-12)
    assert keys.shape == (8, 8)
