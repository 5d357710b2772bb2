"""Fidelity check against lightly: lightly's own model code and CIFAR-10 recipe beside isif's method, same network,
images, epochs and seed, both evaluated by isif's kNN.

    python benchmarks/fidelity_lightly.py --method simclr --epochs 3 [--data ../shared/datasets/cifar10-jpeg.zip]
        [--train-subset N] [--test-subset N] [--seed S] [--out DIR] [--threads T] [--precision fp32|bf16]
        [--sides lightly,isif] [--isif-set KEY=VALUE ...] [--tag NAME]

methods: simclr, moco, byol, simsiam, barlow-twins, dino. One after the other:

- side "lightly": the model classes of lightly's docs/source/getting_started/benchmarks/cifar10_benchmark.py
  (SimCLRModel, MocoModel, BYOLModel, SimSiamModel, BarlowTwinsModel, DINOModel) re-typed with lightly's own heads,
  losses, transforms and update_momentum / batch_shuffle: their training_step, SGD (lr 6e-2 * batch/128, SimSiam
  6e-2; momentum 0.9, wd 5e-4) and CosineAnnealingLR over the epochs stepped once an epoch. A plain PyTorch loop,
  no Lightning: per batch training_step, zero_grad, backward, step, as Lightning's automatic optimisation does.
- side "isif": ``isif.training.loop.train`` of preset cifar10-race with the method and its own recipe, or its
  module's ``LIGHTLY_RECIPE`` where its own recipe is not lightly's (Barlow Twins) (logger none: no TensorBoard
  files), checked first (dry run) so that a method isif refuses on this data (MoCo's queue of
  4096 needs at least 4096 training images) stops before anything trains.

Writes DIR/fidelity-M-eE-sS.json (both sides, the machine) and .md (a table row per side), and isif's run folder.

Differences from lightly's benchmark, on purpose (so that only the method code and recipe differ):
- backbone: isif's quarter-width CIFAR ResNet-18 with the same initial weights on both sides (seeded as isif's
  loop seeds it), not ResNetGenerator("resnet-18"): the heads' input width is its pooled width (128 here) instead
  of 512, their hidden and output widths are lightly's. MoCo keeps lightly's SplitBatchNorm (8 splits), swapped in.
- data: the shared CIFAR-10 JPEG zip as isif decodes it (``load_sets``: the same train subset), handed to lightly's
  transforms as PIL images (lightly's benchmark reads PNG folders, decoding each time); 2 DataLoader workers,
  batch 128, drop_last. Lightly's transforms normalise with ImageNet statistics, kept.
- lightly 1.6's NTXentLoss wants the memory bank as (4096, 128) where the benchmark says 4096: the same bank.
- evaluation: isif's weighted kNN (``evaluate_knn``: k 200, sigma 0.1, what isif's training loop calls) on the
  L2-normalised pooled features after the last epoch (lightly reports its best epoch), bank = the training images,
  test transform isif's ``PlainTransform``, normalised for lightly's side with ImageNet statistics as lightly's
  test transform does (each network sees the normalisation it trained with).
- precision: --precision for both (default fp32; bf16 autocast on lightly's side like Lightning's bf16-mixed);
  channels_last off on both.

Throughput: images/s counts every view as one image (2 per training image in lightly's recipes; isif's method may
make more, as its loop counts them); instances/s counts each training image once. Train seconds: the epochs' loops
only (data loading and augmentation included, evaluation not).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

METHODS = ("simclr", "moco", "byol", "simsiam", "barlow-twins", "dino")
WORKERS, BATCH = 2, 128
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpeg.zip"


# ----------------------------------------------------------------------------- lightly's models, re-typed


class LightlyModel(nn.Module):
    """lightly's backbone + heads of one method: ``training_step(views, epoch)`` and ``optim_params()``."""

    lr = 6e-2 * BATCH / 128  # lr_factor = batch_size / 128

    def embed(self, head: nn.Module, x: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        return head((self.backbone if backbone is None else backbone)(x).flatten(start_dim=1))

    def optim_params(self):
        return self.parameters()


class SimCLRModel(LightlyModel):
    def __init__(self, backbone: nn.Module, f: int) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import heads

        super().__init__()
        self.backbone, self.projection_head = backbone, heads.SimCLRProjectionHead(f, 512, 128)
        self.criterion = NTXentLoss()

    def training_step(self, views, epoch):
        x0, x1 = views
        return self.criterion(self.embed(self.projection_head, x0), self.embed(self.projection_head, x1))


class MocoModel(LightlyModel):
    def __init__(self, backbone: nn.Module, f: int) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models import utils
        from lightly.models.modules import heads

        super().__init__()
        self.backbone = split_batchnorm(backbone, 8)
        self.projection_head = heads.MoCoProjectionHead(f, 512, 128)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        utils.deactivate_requires_grad(self.backbone_momentum)
        utils.deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(temperature=0.1, memory_bank_size=(4096, 128))

    def training_step(self, views, epoch):
        from lightly.models import utils

        x0, x1 = views
        utils.update_momentum(self.backbone, self.backbone_momentum, 0.99)
        utils.update_momentum(self.projection_head, self.projection_head_momentum, 0.99)

        def step(x0_, x1_):
            x1_, shuffle = utils.batch_shuffle(x1_, distributed=False)
            q = self.embed(self.projection_head, x0_)
            k = self.embed(self.projection_head_momentum, x1_, self.backbone_momentum)
            return q, utils.batch_unshuffle(k, shuffle, distributed=False)

        return 0.5 * (self.criterion(*step(x0, x1)) + self.criterion(*step(x1, x0)))

    def optim_params(self):
        return list(self.backbone.parameters()) + list(self.projection_head.parameters())


class SimSiamModel(LightlyModel):
    lr = 6e-2  # no lr scaling (lightly: better training stability)

    def __init__(self, backbone: nn.Module, f: int) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import heads

        super().__init__()
        self.backbone = backbone
        self.prediction_head = heads.SimSiamPredictionHead(2048, 512, 2048)
        self.projection_head = heads.ProjectionHead([(f, 2048, nn.BatchNorm1d(2048), nn.ReLU(inplace=True)),
                                                     (2048, 2048, nn.BatchNorm1d(2048), None)])
        self.criterion = NegativeCosineSimilarity()

    def forward(self, x):
        z = self.embed(self.projection_head, x)
        return z.detach(), self.prediction_head(z)

    def training_step(self, views, epoch):
        (z0, p0), (z1, p1) = self(views[0]), self(views[1])
        return 0.5 * (self.criterion(z0, p1) + self.criterion(z1, p0))


class BarlowTwinsModel(LightlyModel):
    def __init__(self, backbone: nn.Module, f: int) -> None:
        from lightly.loss import BarlowTwinsLoss
        from lightly.models.modules import heads

        super().__init__()
        self.backbone = backbone
        self.projection_head = heads.ProjectionHead([(f, 2048, nn.BatchNorm1d(2048), nn.ReLU(inplace=True)),
                                                     (2048, 2048, None, None)])
        self.criterion = BarlowTwinsLoss(gather_distributed=False)

    def training_step(self, views, epoch):
        return self.criterion(self.embed(self.projection_head, views[0]), self.embed(self.projection_head, views[1]))


class BYOLModel(LightlyModel):
    def __init__(self, backbone: nn.Module, f: int) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models import utils
        from lightly.models.modules import heads

        super().__init__()
        self.backbone = backbone
        self.projection_head = heads.BYOLProjectionHead(f, 1024, 256)
        self.prediction_head = heads.BYOLPredictionHead(256, 1024, 256)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        utils.deactivate_requires_grad(self.backbone_momentum)
        utils.deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def training_step(self, views, epoch):
        from lightly.models import utils

        utils.update_momentum(self.backbone, self.backbone_momentum, m=0.99)
        utils.update_momentum(self.projection_head, self.projection_head_momentum, m=0.99)
        x0, x1 = views
        p0, p1 = (self.prediction_head(self.embed(self.projection_head, x)) for x in (x0, x1))
        z0, z1 = (self.embed(self.projection_head_momentum, x, self.backbone_momentum).detach() for x in (x0, x1))
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

    def optim_params(self):
        return [*self.backbone.parameters(), *self.projection_head.parameters(), *self.prediction_head.parameters()]


class DINOModel(LightlyModel):
    def __init__(self, backbone: nn.Module, f: int) -> None:
        from lightly.loss import DINOLoss
        from lightly.models import utils

        super().__init__()
        self.f = f
        self.backbone = backbone
        self.head = self._build_projection_head()
        self.teacher_backbone = copy.deepcopy(self.backbone)
        self.teacher_head = self._build_projection_head()  # lightly's: a fresh head, not a copy
        utils.deactivate_requires_grad(self.teacher_backbone)
        utils.deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=2048)

    def _build_projection_head(self):
        from lightly.models.modules import heads

        head = heads.DINOProjectionHead(self.f, 2048, 256, 2048, batch_norm=True)
        head.layers = heads.ProjectionHead([(self.f, 2048, nn.BatchNorm1d(2048), nn.GELU()),
                                            (2048, 256, None, None)]).layers  # only 2 layers for cifar10
        return head

    def training_step(self, views, epoch):
        from lightly.models import utils

        utils.update_momentum(self.backbone, self.teacher_backbone, m=0.99)
        utils.update_momentum(self.head, self.teacher_head, m=0.99)
        teacher_out = [self.embed(self.teacher_head, v, self.teacher_backbone) for v in views[:2]]
        student_out = [self.embed(self.head, v) for v in views]
        return self.criterion(teacher_out, student_out, epoch=epoch)

    def optim_params(self):
        return [*self.backbone.parameters(), *self.head.parameters()]


MODELS = {"simclr": SimCLRModel, "moco": MocoModel, "byol": BYOLModel, "simsiam": SimSiamModel,
          "barlow-twins": BarlowTwinsModel, "dino": DINOModel}


def lightly_transform(method: str):
    """The benchmark's training transform of ``method``, verbatim."""
    from lightly import transforms as T

    if method in ("byol", "barlow-twins"):
        return T.BYOLTransform(view_1_transform=T.BYOLView1Transform(input_size=32, gaussian_blur=0.0),
                               view_2_transform=T.BYOLView2Transform(input_size=32, gaussian_blur=0.0))
    if method == "simsiam":
        return T.SimSiamTransform(input_size=32, gaussian_blur=0.0)
    if method == "dino":
        return T.DINOTransform(global_crop_size=32, n_local_views=0, cj_strength=0.5, gaussian_blur=(0, 0, 0))
    return T.SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)  # simclr, moco


def split_batchnorm(net: nn.Module, splits: int) -> nn.Module:
    """Every BatchNorm2d replaced by lightly's SplitBatchNorm (ResNetGenerator's num_splits), weights kept."""
    from lightly.models.batchnorm import SplitBatchNorm

    for name, m in list(net.named_modules()):
        if type(m) is nn.BatchNorm2d:
            parent = net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else net
            sbn = SplitBatchNorm(m.num_features, splits).to(m.weight.device)
            sbn.weight.data.copy_(m.weight.data)
            sbn.bias.data.copy_(m.bias.data)
            setattr(parent, name.rsplit(".", 1)[-1], sbn)
    return net


class PilViews(torch.utils.data.Dataset):
    """(views, label) of uint8 images (N, 3, H, W) as PIL images through a lightly transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.arr = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels, self.transform = labels, transform

    def __len__(self) -> int:
        return len(self.arr)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.arr[i])), int(self.labels[i])


# ----------------------------------------------------------------------------- the two sides


def isif_config(a: argparse.Namespace, method: str):
    from isif.training.presets import resolve

    over = {"method.name": method, "train.epochs": a.epochs, "train.seed": a.seed, "data.path": str(a.data),
            "train.precision": a.precision, "train.channels_last": False, "eval.every": a.epochs,
            "log.logger": "none"}
    if a.train_subset:
        over["data.train_subset"] = a.train_subset
    if a.test_subset:
        over["data.test_subset"] = a.test_subset
    over.update(lightly_match(method))
    for kv in a.isif_set:
        key, _, value = kv.partition("=")
        try:
            over[key] = json.loads(value)
        except ValueError:
            over[key] = value
    return resolve("cifar10-race", over)


def lightly_match(method: str) -> dict:
    """The settings that make isif's side train with lightly's recipe where the method's own recipe is another
    (its module's ``LIGHTLY_RECIPE``: Barlow Twins, whose own recipe is solo-learn's)."""
    import importlib

    match = getattr(importlib.import_module(f"isif.objectives.{method.replace('-', '_')}"), "LIGHTLY_RECIPE", None)
    return match.changes(BATCH) if match else {}


def knn_top1(model: nn.Module, sets, cfg, mean=None, std=None) -> float:
    """isif's kNN top-1 (``evaluate_knn``, as the training loop calls it) with isif's test transform; ``mean``/``std``
    replace the normalisation."""
    from isif.base.device import resolve_device
    from isif.evaluate.protocol import Extractor, evaluate_knn
    from isif.training.step import run_input_spec

    spec = run_input_spec(cfg, sets.splits)
    if mean is not None:
        spec = dataclasses.replace(spec, mean=tuple(mean), std=tuple(std))
    ex = Extractor(spec.transform(), resolve_device(cfg.train.device), cfg.train.precision, False,
                   cfg.eval.batch_size)
    e = cfg.eval
    return evaluate_knn(model, sets.bank, sets.test, ex, e.knn_k, e.knn_sigma, e.engine)


def run_lightly(a: argparse.Namespace, method: str, cfg, sets) -> dict:
    """lightly's recipe of ``method`` on isif's backbone (the initial weights of isif's run)."""
    from lightly.transforms.utils import IMAGENET_NORMALIZE

    from isif.base.device import autocast, resolve_device, sync
    from isif.models import EmbeddingNet
    from isif.training.step import make_model, network_embedding

    device = resolve_device(cfg.train.device)
    random.seed(cfg.train.seed)  # as Lightning's seed_everything; torch's seed is also isif's loop's, set before
    np.random.seed(cfg.train.seed)  # make_model: the same initial backbone as isif's side
    torch.manual_seed(cfg.train.seed)
    isif_net = make_model(cfg)
    model = MODELS[method](copy.deepcopy(isif_net.backbone), isif_net.features).to(device)
    train = sets.train
    loader = torch.utils.data.DataLoader(PilViews(train.images, train.labels, lightly_transform(method)),
                                         batch_size=BATCH, shuffle=True, drop_last=True, num_workers=WORKERS,
                                         pin_memory=device.type == "cuda")
    opt = torch.optim.SGD(model.optim_params(), lr=model.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.epochs)
    model.train()
    views = steps = n_views = 0
    losses = []
    t0 = time.perf_counter()
    for epoch in range(a.epochs):
        total = torch.zeros((), device=device, dtype=torch.float64)
        for batch_views, _ in loader:
            batch_views = [v.to(device, non_blocking=True) for v in batch_views]
            with autocast(device, cfg.train.precision):
                loss = model.training_step(batch_views, epoch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach()
            n_views, views, steps = len(batch_views), views + sum(v.shape[0] for v in batch_views), steps + 1
        sched.step()
        losses.append(float(total) / max(len(loader), 1))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"lightly {method}: the loss became {losses[-1]} in epoch {epoch + 1}")
    sync(device)
    seconds = time.perf_counter() - t0
    net = EmbeddingNet(model.backbone, isif_net.features, embedding=network_embedding(cfg)).to(device)
    knn = knn_top1(net, sets, cfg, IMAGENET_NORMALIZE["mean"], IMAGENET_NORMALIZE["std"])
    return {"side": "lightly", "knn_top1": knn, "train_s": seconds, "images_per_s": views / seconds,
            "instances_per_s": steps * BATCH / seconds, "views": n_views, "loss": losses[-1],
            "recipe": f"lightly cifar10_benchmark {MODELS[method].__name__}: SGD lr {model.lr:g} m 0.9 wd 5e-4, "
                      f"cosine per epoch, batch {BATCH}"}


def run_isif(a: argparse.Namespace, method: str, cfg, sets, out: Path) -> dict:
    """isif's own training of ``method`` (its recipe), then its kNN recomputed by the code lightly's side gets."""
    from isif.base.device import resolve_device
    from isif.training.checkpoint import load_trained
    from isif.training.loop import train

    run = out / f"isif-{method}"
    history = train(copy.deepcopy(cfg), run, overwrite=True, progress=False)  # train settles cfg's epochs in place
    model, _, _ = load_trained(run, resolve_device(cfg.train.device))
    last, seconds = history[-1], history[-1]["train_s"]
    prev, views = 0.0, 0.0
    for r in history:  # each epoch's rate x its seconds: the views seen
        views, prev = views + r["images_per_s"] * (r["train_s"] - prev), r["train_s"]
    n = len(sets.train)
    instances = a.epochs * (n // cfg.train.batch_size) * cfg.train.batch_size
    o = cfg.optim
    return {"side": "isif", "knn_top1": knn_top1(model, sets, cfg), "knn_top1_loop": last["knn_top1"],
            "train_s": seconds, "images_per_s": views / seconds, "instances_per_s": instances / seconds,
            "views": round(views / max(instances, 1)), "loss": last["loss"],
            "recipe": f"isif cifar10-race {method} (train.recipe {getattr(cfg.train, 'recipe', 'own')}"
                      f"{', lightly-matched' if lightly_match(method) else ''}): "
                      f"{getattr(o, 'optimizer', 'sgd')} lr {o.lr:g} m {o.momentum:g} wd "
                      f"{o.weight_decay:g}, {o.schedule} warmup {o.warmup_epochs:g}, batch {cfg.train.batch_size}",
            "run": str(run)}


# ----------------------------------------------------------------------------- the report


def machine(device: str) -> str:
    """CPU model (lscpu's model name, else platform.processor()), torch threads, and the GPU when one is used."""
    name = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""
    return f"{name or 'unknown CPU'} ({os.cpu_count()} cores), torch {torch.get_num_threads()} threads{gpu}"


def table_row(r: dict, method: str, epochs: int, host: str) -> str:
    return (f"| {method} | {r['side']} | {epochs} | {r['knn_top1']:.2f} | {r['train_s']:.1f} | "
            f"{r['images_per_s']:.0f} | {r['instances_per_s']:.0f} | {host} |")


HEADER = ("| method | side | epochs | kNN top-1 | train s | images/s (views) | instances/s | machine |\n"
          "|---|---|---:|---:|---:|---:|---:|---|")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--train-subset", type=int, default=None, help="the first N/10 training images of each class")
    p.add_argument("--test-subset", type=int, default=None, help="the first N/10 test images of each class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/fidelity-lightly"))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="both sides")
    p.add_argument("--sides", default="lightly,isif", help="which sides to run, in order")
    p.add_argument("--isif-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of isif's side over its recipe (repeatable): optim.schedule=cosine-epoch")
    p.add_argument("--tag", default="", help="added to the output file names (runs with other --isif-set)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if not a.data.exists():
        print(f"no data at {a.data}; pass --data PATH (the CIFAR-10 JPEG zip)", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    from isif.base.device import resolve_device
    from isif.data.registry import load_sets

    cfg = isif_config(a, a.method)
    sets = load_sets(cfg.data)
    a.out.mkdir(parents=True, exist_ok=True)
    host = machine(resolve_device(cfg.train.device).type)
    rows = []
    sides = a.sides.split(",")
    if not set(sides) <= {"lightly", "isif"}:
        print(f"--sides: lightly and/or isif, got {a.sides}", file=sys.stderr)
        return 2
    if "isif" in sides:  # isif's own checks (its method's limits on this data) before anything trains
        from isif.base.errors import UserError
        from isif.training.loop import train

        try:
            train(copy.deepcopy(cfg), a.out / f"isif-{a.method}", overwrite=True, progress=False, dry_run=True)
        except UserError as e:
            print(f"isif's side cannot run: {e}", file=sys.stderr)
            return 2
    for side in sides:
        r = run_lightly(a, a.method, cfg, sets) if side == "lightly" else run_isif(a, a.method, cfg, sets, a.out)
        rows.append(r)
        print(table_row(r, a.method, a.epochs, host), flush=True)
    result = {"method": a.method, "epochs": a.epochs, "seed": a.seed, "precision": a.precision,
              "isif_set": a.isif_set,
              "train_images": len(sets.train), "test_images": len(sets.test), "batch": BATCH, "machine": host,
              "machine_processor": platform.processor(), "torch_threads": torch.get_num_threads(),
              "images_per_s_counts": "views (each view one image); instances_per_s: training images",
              "sides": rows}
    stem = a.out / f"fidelity-{a.method}-e{a.epochs}-s{a.seed}{'-' + a.tag if a.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = "\n".join([HEADER, *(table_row(r, a.method, a.epochs, host) for r in rows)]) + "\n"
    stem.with_suffix(".md").write_text(md)
    print(f"\n{md}\nwritten: {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
