"""Throughput of the training step against the backbone's own limit, in one process.

On the same model, batch, precision and device:

- ``step``: the full training step: gather the uint8 batch, augment two views,
  forward, objective, backward, SGD update;
- ``limit``: forward + backward of the network alone on a ready batch of the
  same images (no data handling, no augmentation, no objective, no update);
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

from .config import Config
from .data.sources import ArrayDataset, Splits
from .evaluate import extract_features, knn_predict
from .precision import autocast
from .train import build_parts, make_views, resolve_device, train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(cfg: Config, steps: int = 20, warmup: int = 3, size: int = 32, pool: int = 4096,
              eval_query: int = 10_000, eval_bank: int = 50_000) -> dict:
    cfg.validate()
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.train.seed)
    b = cfg.train.batch_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (pool, 3, size, size), generator=g, dtype=torch.uint8)
    fake = ArrayDataset(images, torch.zeros(pool, dtype=torch.long), ["x"])
    splits = Splits(fake, fake, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), "synthetic", "random uint8")
    parts = build_parts(cfg, splits, pool, device)
    images = images.to(device)
    aug_gen = torch.Generator().manual_seed(1)
    prec = cfg.train.precision

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, pool, (b,), generator=g).to(device)
        return images[idx], idx

    ready = make_views(parts, batch()[0], aug_gen)  # (2B, 3, S, S)
    z_ready = torch.nn.functional.normalize(torch.randn(ready.shape[0], cfg.model.dim, device=device), dim=1)

    def step() -> None:
        x, idx = batch()
        train_step(parts, x, idx, aug_gen)

    def limit() -> None:
        with autocast(device, prec):
            z = parts.model(ready)
        z.float().sum().backward()

    def augment() -> None:
        make_views(parts, batch()[0], aug_gen)

    def objective() -> None:
        z = z_ready.clone().requires_grad_(True)
        parts.objective(z, torch.arange(b, device=device)).backward()

    pieces = {"step": step, "limit": limit, "augment": augment, "objective": objective}
    times: dict[str, list[float]] = {k: [] for k in pieces}
    for i in range(warmup + steps):
        for name, fn in pieces.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    # evaluation: forward throughput in eval mode, and the kNN search at CIFAR-10's sizes
    feats_t0 = time.perf_counter()
    extract_features(parts.model, images, parts.plain, cfg.train.eval_batch_size, device, prec,
                     cfg.train.channels_last)
    _sync(device)
    eval_ips = images.shape[0] / (time.perf_counter() - feats_t0)
    gq = torch.Generator().manual_seed(2)
    bank = torch.nn.functional.normalize(torch.randn(eval_bank, cfg.model.dim, generator=gq), dim=1).to(device)
    query = torch.nn.functional.normalize(torch.randn(eval_query, cfg.model.dim, generator=gq), dim=1).to(device)
    labels = torch.randint(0, 10, (eval_bank,), generator=gq).to(device)
    _sync(device)
    knn_t0 = time.perf_counter()
    knn_predict(query, bank, labels, 10, cfg.train.knn_k, cfg.train.knn_sigma)
    _sync(device)
    knn_s = time.perf_counter() - knn_t0
    n_img = ready.shape[0]
    out = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "precision": prec,
        "channels_last": cfg.train.channels_last,
        "arch": cfg.model.arch,
        "width": cfg.model.width,
        "batch_instances": b,
        "images_per_step": n_img,
        "steps_timed": steps,
        "step_images_per_s": n_img / med["step"],
        "limit_images_per_s": n_img / med["limit"],
        "ratio_step_to_limit": med["limit"] / med["step"],
        "augment_ms": 1000 * med["augment"],
        "objective_ms": 1000 * med["objective"],
        "step_ms": 1000 * med["step"],
        "limit_ms": 1000 * med["limit"],
        "eval_forward_images_per_s": eval_ips,
        "knn_search_s": knn_s,
        "knn_sizes": [eval_query, eval_bank],
        "eval_projected_s": (eval_query + eval_bank) / eval_ips + knn_s,
    }
    if device.type == "cuda":
        out["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out
