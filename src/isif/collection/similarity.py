"""Fig. 5: how far apart positives and negatives sit in the learned embedding."""

from __future__ import annotations

from pathlib import Path

import torch

from ..base.device import resolve_device
from ..base.errors import UserError
from ..data.input_spec import InputSpec
from ..data.registry import load_sets
from ..evaluate.protocol import Extractor
from ..training.checkpoint import load_trained, resolve_checkpoint
from ..training.plots import plot_similarity


@torch.no_grad()
def similarity_samples(run: str, images: int, data: str | None, device: str | None,
                       seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, negatives): cos(view1_i, view2_i) and cos(view1_i, view1_j), j != i, over test images; the
    views drawn by the run's augmentation at its input spec (size, and a timm backbone's own mean and std), as in
    training."""
    dev = resolve_device(device or "auto")
    model, cfg, state = load_trained(resolve_checkpoint(run), dev)
    if data is not None:
        cfg.data.path = data
    sets = load_sets(cfg.data)
    aug, _ = InputSpec.from_checkpoint(state, cfg, sets.splits).transforms(cfg.augment, sets.splits)
    g = torch.Generator().manual_seed(seed)
    pool = sets.test if sets.test is not None else sets.holdout  # an unlabelled run: its held-out images
    if pool is None:
        raise UserError("this run has neither test images nor held-out images; train it with --holdout N")
    idx = torch.randperm(len(pool), generator=g)[:images]
    x = pool.images[idx]
    views = Extractor(lambda b: aug(b, g), dev, cfg.train.precision, cfg.train.channels_last, cfg.eval.batch_size)
    v1 = views(model, x)  # (n, D)
    v2 = views(model, x)
    pos = (v1 * v2).sum(1)
    shift = torch.randint(1, len(x), (1,), generator=g).item()  # pair i with (i + shift) mod n: always j != i
    neg = (v1 * v1.roll(int(shift), 0)).sum(1)
    return pos.cpu(), neg.cpu()


def similarity_figure(runs: list[str], out: Path, images: int = 5000, data: str | None = None,
                      device: str | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    series, stats = {}, {}
    for run in runs:
        name = Path(run).name
        pos, neg = similarity_samples(run, images, data, device, seed)
        series[name] = (pos.tolist(), neg.tolist())
        stats[name] = {"pos_mean": float(pos.mean()), "neg_mean": float(neg.mean())}
    plot_similarity(series, out, "test set: two views of one image (solid) vs different images (dashed)")
    return stats
