"""One optimisation step, shared by the training loop and the benchmark.

    views = make_views(parts, x, gen)        # (V*b, 3, S, S): this process's share, augmented
    z = net(views)                           # (V*b, D) L2-normalised, under autocast
    z = gather_views(z)                      # (V*B, D): the global batch, gradients kept
    loss = objective(z, idx)                 # every method has this call
    backward; SGD update
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..base.device import autocast
from ..base.dist import SINGLE, World, gather_views
from ..base.errors import UserError
from ..data.augment import BatchAugment, PlainTransform, view_augment
from ..data.input_spec import InputSpec
from ..data.types import Splits
from ..evaluate.protocol import Extractor
from ..models import build_model, input_recipe
from ..objectives import build_objective
from ..objectives.contract import Views, target_of
from .config import Config
from .optim import build_optimizer, clip_gradients


@dataclass
class Parts:
    """Everything one optimisation step needs."""

    cfg: Config
    device: torch.device
    model: nn.Module  # the plain module: state_dict, evaluation
    net: nn.Module  # what the step calls: the model, or its DistributedDataParallel wrapper
    objective: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    augment: BatchAugment
    plain: PlainTransform
    views: tuple[str, ...]
    aug_gen: torch.Generator  # augmentation parameters, drawn on the CPU
    input_spec: InputSpec  # how the network sees an image: stored in the checkpoint, read by isif eval and embed
    world: World = SINGLE
    probe: BatchAugment | None = None  # the label-free metrics' views: the default augmentation, for every run
    crops: dict[str, BatchAugment] = dataclasses.field(default_factory=dict)  # multi-crop: a view kind's own size
    per_view: list[BatchAugment | None] = dataclasses.field(default_factory=list)  # each view's (None: plain)

    def view_sides(self) -> list[int]:
        """The side of each of the method's views, in order."""
        return [self.crops[v].size if v in self.crops else self.plain.size for v in self.views]

    def probe_views(self) -> BatchAugment:
        """The augmentation of the held-out views: the default one at the run's size, whatever the run trains
        with, so the label-free metrics of runs with different augmentations compare."""
        if self.probe is None:
            mean, std = self.augment.mean.flatten().tolist(), self.augment.std.flatten().tolist()
            self.probe = BatchAugment(self.plain.size, tuple(mean), tuple(std))  # type: ignore[arg-type]
        return self.probe

    def extractor(self) -> Extractor:
        t = self.cfg.train
        return Extractor(self.plain, self.device, t.precision, t.channels_last, self.cfg.eval.batch_size, self.world)


def input_size(cfg: Config) -> int | None:
    """The side the network sees: ``--size``, else a timm backbone's own, else None (the stored images')."""
    recipe = input_recipe(cfg.model)
    return cfg.data.size or (recipe["size"] if recipe else None)


def run_input_spec(cfg: Config, splits: Splits) -> InputSpec:
    """How the run's network sees an image: ``input_size``, a timm model's own mean and std (else the data's
    moments), the centre crop of ``--crop-mode fixed``, the source's fit."""
    return InputSpec.for_run(cfg.data.size, cfg.augment.crop_mode, splits, input_recipe(cfg.model))


def network_embedding(cfg: Config) -> str:
    """"head" or "backbone": what the run's network embeds with (``EmbeddingNet.embedding``): ``--eval-features``,
    else the method's declaration (its registry line). A method that trains no 128-d head cannot be evaluated on
    it: a UserError naming the fix."""
    from ..objectives import get_method

    declared = get_method(cfg.method.name).embedding_of(cfg.method.settings)
    asked = cfg.eval.features
    if asked == "embedding" and declared == "backbone":
        raise UserError(f"--eval-features embedding: {cfg.method.name} trains no 128-d head here (its heads are its "
                        "own and end in its loss); use --eval-features backbone, its default")
    return declared if asked is None else ("head" if asked == "embedding" else "backbone")


def make_model(cfg: Config) -> nn.Module:
    """The configured network (on the CPU) with the run's embedding (``network_embedding``); unknown
    architectures and unusable weights are UserErrors."""
    embedding = network_embedding(cfg)
    try:
        model = build_model(cfg.model, input_size(cfg))
    except ValueError as e:
        raise UserError(str(e)) from None
    model.embedding = embedding
    return model


def build_parts(cfg: Config, splits: Splits, num_instances: int, device: torch.device,
                world: World = SINGLE, model: nn.Module | None = None) -> Parts:
    """Everything a step needs; ``model`` is built from the config when not given."""
    t = cfg.train
    model = (model if model is not None else make_model(cfg)).to(device)
    if t.precision == "fp64":
        model = model.to(torch.float64)
    if t.sync_bn and world.active:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    per_epoch = max(1, num_instances // t.batch_size)
    try:
        steps = cfg.train.resolve_epochs(num_instances) * per_epoch
    except UserError:  # no epochs and no budget (a benchmark's parts): no schedule over the run to follow
        steps = 0
    try:
        objective = build_objective(cfg.method.name, num_instances, cfg.model.dim, t.seed,
                                    settings=cfg.method.settings, engine=cfg.eval.engine,
                                    features=int(getattr(model, "features", 0)),
                                    backbone=getattr(model, "backbone", None), total_steps=steps,
                                    steps_per_epoch=per_epoch).to(device)
    except ValueError as e:
        raise UserError(f"method {cfg.method.name}: {e}") from None
    if t.precision == "fp64":
        objective = objective.to(torch.float64)
    if getattr(objective, "input", "embedding") == "backbone":
        model.head.requires_grad_(False)  # the method's own heads replace it: never trained, never stepped
    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    opt = build_optimizer(cfg.optim, params)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    spec = run_input_spec(cfg, splits)
    augment, plain = spec.transforms(cfg.augment, splits)
    net: nn.Module = model
    if world.active:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        net = torch.compile(net)
    aug_gen = torch.Generator().manual_seed(t.seed + 2)
    crops = crop_augments(cfg.method.name, objective, augment)
    per_view = view_augments(cfg, tuple(objective.views), augment, crops)
    return Parts(cfg, device, model, net, objective, opt, scaler, augment, plain, tuple(objective.views), aug_gen,
                 spec, world, crops=crops, per_view=per_view)


def view_augments(cfg: Config, views: tuple[str, ...], augment: BatchAugment,
                  crops: dict[str, BatchAugment]) -> list[BatchAugment | None]:
    """The augmentation of each view in order (None for a plain one): its kind's, with the view's own blur and
    solarisation probabilities (``--blur-p`` / ``--solarize-p``: one value, or one per view, the last one
    repeated); more values than the method has views is a UserError."""
    a = cfg.augment
    for flag, values in (("--blur-p", a.blur_p), ("--solarize-p", a.solarize_p)):
        if len(values) > max(1, len(views)):
            raise UserError(f"{flag} has {len(values)} values but method {cfg.method.name} has {len(views)} views; "
                            "give one value for every view, or one per view")
    return [None if v == "plain" else view_augment(augment if v == "augment" else crops[v], a, i)
            for i, v in enumerate(views)]


def crop_augments(method: str, objective: nn.Module, augment: BatchAugment) -> dict[str, BatchAugment]:
    """The augmentation of each of the objective's own kinds of view (``crops``: multi-crop), the run's own but for
    its side and crop area; a view larger than the input, or a view name the objective does not define, is a
    UserError."""
    crops = {k: c for k, c in getattr(objective, "crops", {}).items() if k in objective.views}
    out = {}
    for name, crop in crops.items():
        side = crop.side(augment.size)
        if side > augment.size:
            raise UserError(f"method {method}: its {name} views would be {side} px, larger than the {augment.size} px "
                            f"input; choose {crop.flag or 'a view size'} {augment.size} or less, or a larger --size")
        aug = copy.copy(augment)
        aug.size, aug.crop_scale, aug.crop_mode = side, crop.scale, "resized"
        out[name] = aug
    unknown = sorted(set(objective.views) - set(crops) - {"augment", "plain"})
    if unknown:
        raise UserError(f"method {method}: view kind {', '.join(unknown)} is neither augment, plain nor one of its "
                        "crops")
    return out


@contextlib.contextmanager
def kernel_choice(deterministic: bool) -> Iterator[None]:
    """The process-wide kernel settings of a run (``--deterministic``), put back as they were after it.

    deterministic: deterministic algorithms only (``torch.use_deterministic_algorithms``, cuDNN deterministic,
    no cuDNN autotuning; cuBLAS gets the fixed workspace it needs, ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, unless
    one is set), so a GPU run resumes bit-exact; an operation without a deterministic kernel is a UserError
    naming the fix. Else cuDNN autotunes (``benchmark``): the fastest kernels, chosen anew by every process.
    """
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.benchmark, cudnn.deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS is first used
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    cudnn.benchmark, cudnn.deterministic = not deterministic, deterministic
    try:
        yield
    except RuntimeError as e:
        if deterministic and "use_deterministic_algorithms(True)" in str(e):
            raise UserError(_not_deterministic(str(e))) from None
        raise
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.benchmark, cudnn.deterministic = saved[2], saved[3]


def _not_deterministic(message: str) -> str:
    if "CUBLAS_WORKSPACE_CONFIG" in message:
        return (f"--deterministic needs CUBLAS_WORKSPACE_CONFIG=:4096:8 or :16:8 for cuBLAS (it is "
                f"{os.environ.get('CUBLAS_WORKSPACE_CONFIG')!r}); set one of them, or drop --deterministic")
    op = message.split(" does not have a deterministic implementation")[0].strip().splitlines()[-1][:120]
    return f"--deterministic: {op} has no deterministic kernel on this device; drop --deterministic to run it"


def make_views(parts: Parts, x: torch.Tensor, gen: torch.Generator, second: torch.Tensor | None = None) -> Views:
    """(b, 3, H, W) uint8 -> (V*b, 3, S, S) float: view v of local instance i at row v*b + i; for a method with
    views of several sizes (``Parts.crops``), a list with one such tensor per group of consecutive views of one
    size.

    Augmentation parameters are drawn for the whole global batch (W*b images
    per view, the same draws on every process) and each process applies its
    own share, so the views do not depend on the number of processes.
    ``second``, when given, is the source of view 1 (the positive) instead of
    ``x``: the nearest-neighbour positive of the CUB-200 setting.
    """
    w = parts.world
    b = x.shape[0]
    share = slice(w.rank * b, (w.rank + 1) * b)
    out = []
    for i, aug in enumerate(parts.per_view):
        src = second if (i == 1 and second is not None) else x
        if aug is None:
            out.append(parts.plain(src))
            continue
        params = aug.sample(b * w.size, src.shape[2], src.shape[3], gen)
        out.append(aug.apply(src, params.select(share) if w.active else params))
    inps = [_layout(parts, g) for g in size_groups(out)]
    return inps[0] if len(inps) == 1 else inps


def size_groups(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of one size concatenated: each group goes through the network as one batch."""
    groups: list[list[torch.Tensor]] = []
    for view in views:
        if groups and groups[-1][0].shape[-1] == view.shape[-1]:
            groups[-1].append(view)
        else:
            groups.append([view])
    return [torch.cat(g) for g in groups]


def _layout(parts: Parts, inp: torch.Tensor) -> torch.Tensor:
    if parts.cfg.train.precision == "fp64":
        inp = inp.to(torch.float64)
    if parts.cfg.train.channels_last:
        inp = inp.contiguous(memory_format=torch.channels_last)
    return inp


def forward_backward(parts: Parts, inp: Views, idx: torch.Tensor,
                     grad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward the views, gather, and backpropagate: from the objective's loss, or (``grad`` given, for the
    benchmark's limit) from that fixed gradient of the embeddings, skipping the objective. Returns (loss or a
    zero, z)."""
    obj = parts.objective
    backbone = getattr(obj, "input", "embedding") == "backbone"
    with autocast(parts.device, parts.cfg.train.precision):
        z = parts.net(inp, part="backbone") if backbone else parts.net(inp)  # (V*b, D), or (V*b, F) features
    if grad is not None:
        parts.opt.zero_grad(set_to_none=True)
        z.backward(grad)
        return torch.zeros(()), z
    if backbone:  # the method's heads and loss run in at least float32, outside autocast (as the 128-d head's end)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
    z = gather_views(z, len(parts.views), parts.world)  # (V*B, D), gradients kept
    kw = {}
    if hasattr(obj, "target_features"):  # a momentum target: its features of this process's views, gathered
        with torch.no_grad(), autocast(parts.device, parts.cfg.train.precision):
            t = target_of(obj, parts.model.backbone, inp)
        kw["target"] = gather_views(t.to(z.dtype), len(obj.target_views), parts.world)
    loss = obj(z, idx, **kw)
    # the previous step's gradients are freed only now, just before the backward pass that allocates the new
    # ones: freed before the forward instead, the activations take that memory and the backward must map
    # fresh pages (measured 8-10% slower per step at full width on the 2-core CPU)
    parts.opt.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    return loss, z


def train_step(parts: Parts, x: torch.Tensor, idx: torch.Tensor, gen: torch.Generator,
               second: torch.Tensor | None = None) -> torch.Tensor:
    """One optimisation step on this process's share ``x`` of the global batch ``idx`` (all B indices).

    Returns the (undetached) loss over the global batch.
    """
    inp = make_views(parts, x, gen, second)
    loss, _ = forward_backward(parts, inp, idx)
    if parts.cfg.optim.clip_grad is not None:
        parts.scaler.unscale_(parts.opt)
        clip_gradients(parts.cfg.optim, [p for g in parts.opt.param_groups for p in g["params"]])
    parts.scaler.step(parts.opt)
    parts.scaler.update()
    if hasattr(parts.objective, "after_step"):  # a momentum target follows the online network
        parts.objective.after_step(parts.model.backbone)
    return loss


def estimate_step_seconds(parts: Parts, images, batch_size: int, repeats: int = 2) -> float:
    """Seconds one training step will take here, timed after one warm-up: the whole step (views, the method's
    networks and loss, backward, optimiser) on copies of the model, objective and optimiser, so the run's weights,
    state and random streams are untouched; under torchrun or ``--compile`` the network's forward and backward
    alone. Or decoding a batch by the workers, when that is slower."""
    import time

    from ..base.device import param_dtype, sync
    from ..data.types import LazyImages

    w, dev, t = parts.world, parts.device, parts.cfg.train
    b = max(1, batch_size // w.size)
    if not parts.views:  # no views: nothing trains
        return 0.0
    g = torch.Generator().manual_seed(0)
    whole = not w.active and parts.net is parts.model
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        if whole:  # one deepcopy keeps the optimiser's and the objective's references to the copied parameters
            model, objective, opt = copy.deepcopy((parts.model, parts.objective, parts.opt))
            shadow = dataclasses.replace(parts, model=model, net=model, objective=objective, opt=opt,
                                         scaler=torch.amp.GradScaler(dev.type, enabled=parts.scaler.is_enabled()))
            x = torch.randint(0, 256, (b, *images.shape[1:]), dtype=torch.uint8, generator=g).to(dev)
            idx = torch.arange(b, device=dev) % max(1, len(images))

            def once() -> None:
                train_step(shadow, x, idx, g)
        else:
            model = copy.deepcopy(parts.model).train()
            v = size_groups([torch.rand(b, 3, side, side, generator=g).to(dev, param_dtype(t.precision))
                             for side in parts.view_sides()])  # one tensor per size group, as make_views gives
            if t.channels_last:
                v = [u.contiguous(memory_format=torch.channels_last) for u in v]

            def once() -> None:
                with autocast(dev, t.precision):
                    z = model(v if len(v) > 1 else v[0])
                z.float().square().sum().backward()
        start = 0.0
        for i in range(repeats + 1):
            if i == 1:
                sync(dev)
                start = time.perf_counter()
            once()
        sync(dev)
    compute = (time.perf_counter() - start) / repeats
    if not isinstance(images, LazyImages):
        return compute
    t0 = time.perf_counter()
    images.take(range(min(b, len(images), 32)))
    decode = (time.perf_counter() - t0) / min(b, len(images), 32) * b / max(1, getattr(images, "workers", 1))
    return max(compute, decode)


