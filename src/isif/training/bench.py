"""Throughput of the training step against the network's own forward and backward (the limit), in one process.

On the same model, batch, precision and device:

- ``step``: the full training step: gather the uint8 batch, augment two views,
  forward, objective, backward, SGD update;
- ``limit``: the step's own forward + backward of the network (``step.forward_backward``: the same
  network call, input layout, precision, gradient reset and autocast) on a ready batch of views, the
  backward started from the objective's gradient of those embeddings, recorded once: no data handling,
  no augmentation, no objective, no update. Both pieces run alike, so step / limit <= 1 up to noise;
- ``augment``: making the views alone;
- ``objective``: the loss's forward + backward on ready embeddings;
- ``eval``: forward throughput in eval mode and the kNN search for 10,000
  queries against 50,000 bank entries (CIFAR-10's sizes), from which the time
  of one kNN evaluation is projected.

Timings interleave the measured pieces round by round and report medians, so
a slow moment of the machine hits every piece alike.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch

from ..base.device import autocast, resolve_device
from ..base.device import sync as _sync
from ..base.dist import gather_views
from ..data.types import ArrayDataset, Splits
from ..evaluate import extract_features, knn_predict
from ..objectives.contract import view_rows
from .config import Config
from .step import build_parts, forward_backward, kernel_choice, make_views, train_step


def run_bench(cfg: Config, steps: int = 20, warmup: int = 3, size: int = 32, pool: int = 4096,
              eval_query: int = 10_000, eval_bank: int = 50_000) -> dict:
    cfg.validate()
    with kernel_choice(cfg.train.deterministic):  # cuDNN autotuning, or deterministic kernels only
        return _bench(cfg, steps, warmup, size, pool, eval_query, eval_bank)


def _bench(cfg: Config, steps: int, warmup: int, size: int, pool: int, eval_query: int, eval_bank: int) -> dict:
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.train.seed)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (pool, 3, size, size), generator=g, dtype=torch.uint8)
    fake = ArrayDataset(images, torch.zeros(pool, dtype=torch.long), ["x"])
    parts = build_parts(cfg, Splits(fake, fake, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)), pool, device)
    med = _time_pieces(parts, images.to(device), g, steps, warmup)
    eval_ips, knn_s = _eval_figures(parts, images.to(device), eval_query, eval_bank)
    n_img = med.pop("images")
    out = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(), "precision": cfg.train.precision,
        "channels_last": cfg.train.channels_last, "deterministic": cfg.train.deterministic, "arch": cfg.model.arch,
        "width": cfg.model.width, "size": size,
        "batch_instances": cfg.train.batch_size, "images_per_step": n_img, "steps_timed": steps,
        "step_images_per_s": n_img / med["step"], "limit_images_per_s": n_img / med["limit"],
        "ratio_step_to_limit": med["limit"] / med["step"],
        "augment_ms": 1000 * med["augment"], "objective_ms": 1000 * med["objective"],
        "step_ms": 1000 * med["step"], "limit_ms": 1000 * med["limit"],
        "eval_forward_images_per_s": eval_ips, "knn_search_s": knn_s, "knn_sizes": [eval_query, eval_bank],
        "eval_projected_s": (eval_query + eval_bank) / eval_ips + knn_s,
    }
    if device.type == "cuda":
        out["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _time_pieces(parts, images: torch.Tensor, g: torch.Generator, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds of each piece over ``steps`` interleaved rounds (after ``warmup``), and images per step."""
    device, b, pool = parts.device, parts.cfg.train.batch_size, images.shape[0]
    aug_gen = torch.Generator().manual_seed(1)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, pool, (b,), generator=g).to(device)
        return images[idx], idx

    x0, idx0 = batch()
    ready = make_views(parts, x0, aug_gen)  # (2B, 3, S, S) (a list of them for multi-crop), the step's layout
    if getattr(parts.objective, "input", "embedding") == "backbone":
        limit, objective = _own_heads_pieces(parts, ready, idx0)
    else:
        grad_ready = _objective_grad(parts, ready, idx0)  # (2B, D): where the step's backward starts
        z_ready = torch.nn.functional.normalize(torch.randn(view_rows(ready), parts.cfg.model.dim, device=device),
                                                dim=1)

        def objective() -> None:
            z = z_ready.clone().requires_grad_(True)
            parts.objective(z, torch.arange(b, device=device)).backward()

        def limit() -> None:
            forward_backward(parts, ready, idx0, grad=grad_ready)

    pieces = {"step": lambda: train_step(parts, *batch(), aug_gen),
              "limit": limit,
              "augment": lambda: make_views(parts, batch()[0], aug_gen),
              "objective": objective}
    times: dict[str, list[float]] = {k: [] for k in pieces}
    for i in range(warmup + steps):
        for name, fn in pieces.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {**{k: statistics.median(v) for k, v in times.items()}, "images": view_rows(ready)}


def _eval_figures(parts, images: torch.Tensor, eval_query: int, eval_bank: int) -> tuple[float, float]:
    """(forward images/s in eval mode, seconds of one kNN search at CIFAR-10's sizes)."""
    cfg, device = parts.cfg, parts.device
    t0 = time.perf_counter()
    extract_features(parts.model, images, parts.plain, cfg.eval.batch_size, device, cfg.train.precision,
                     cfg.train.channels_last)
    _sync(device)
    eval_ips = images.shape[0] / (time.perf_counter() - t0)
    gq = torch.Generator().manual_seed(2)
    bank = torch.nn.functional.normalize(torch.randn(eval_bank, cfg.model.dim, generator=gq), dim=1).to(device)
    query = torch.nn.functional.normalize(torch.randn(eval_query, cfg.model.dim, generator=gq), dim=1).to(device)
    labels = torch.randint(0, 10, (eval_bank,), generator=gq).to(device)
    _sync(device)
    t0 = time.perf_counter()
    knn_predict(query, bank, labels, 10, cfg.eval.knn_k, cfg.eval.knn_sigma)
    _sync(device)
    return eval_ips, time.perf_counter() - t0


def _own_heads_pieces(parts, ready: torch.Tensor, idx: torch.Tensor):
    """(limit, objective) for a method with heads of its own: the limit is the forward and backward of every
    network it runs (the backbone, its heads, and a momentum target's forward), from a fixed gradient on the heads'
    output; the objective piece is the whole objective (heads and loss) on fixed features."""
    from ..objectives.contract import target_of

    obj, t = parts.objective, parts.cfg.train

    def features():
        with autocast(parts.device, t.precision):
            h = parts.net(ready, part="backbone")
        h = h.to(torch.promote_types(h.dtype, torch.float32))
        if not hasattr(obj, "target_features"):
            return h, None
        with torch.no_grad(), autocast(parts.device, t.precision):
            tf = target_of(obj, parts.model.backbone, ready)
        return h, tf.to(h.dtype)

    def trained(h, tf) -> list[torch.Tensor]:
        """What the method's networks output that a gradient flows back from (a target's outputs have none)."""
        out = obj.outputs(h, tf)
        return [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]

    h0, t0 = features()
    grads = [torch.randn_like(o) * 1e-3 for o in trained(h0, t0)]
    h_fixed, t_fixed = h0.detach(), (t0.detach() if t0 is not None else None)

    def limit() -> None:
        h, tf = features()
        parts.opt.zero_grad(set_to_none=True)
        torch.autograd.backward(trained(h, tf), grads)

    def objective() -> None:
        h = h_fixed.clone().requires_grad_(True)
        kw = {"target": t_fixed} if t_fixed is not None else {}
        obj(h, idx, **kw).backward()

    return limit, objective


def _objective_grad(parts, inp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """d loss / d z of one real step's embeddings, to start the limit's backward from."""
    with autocast(parts.device, parts.cfg.train.precision):
        z = parts.net(inp)
    loss = parts.objective(gather_views(z, len(parts.views), parts.world), idx)
    (grad,) = torch.autograd.grad(loss, z)
    parts.opt.zero_grad(set_to_none=True)
    return grad.detach()
