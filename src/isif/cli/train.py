"""``isif train``, ``race``, ``bench``, ``presets`` and ``methods``: thin commands over ``isif.training``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..training.config import SECTIONS
from ..training.options import BENCH_SECTIONS, BenchOptions, PresetsOptions, RaceOptions, TrainOptions
from .flags import Command


def set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def run_train(o: TrainOptions) -> int:
    """Resolve the config and train; every check of the run is ``training.loop.prepare``'s."""
    from ..base.dist import setup, teardown
    from ..training.loop import train
    from ..training.metrics import final_summary
    from ..training.options import resolve_train

    set_threads(o.threads)
    cfg, out = resolve_train(o)
    resume = o.resume is not None
    if o.dry_run:
        train(cfg, out, resume=resume, overwrite=o.overwrite, dry_run=True)
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    history = train(cfg, out, resume=resume, overwrite=o.overwrite, progress=not o.quiet)
    world = setup(cfg.train.device)  # the process group train joined (setup is idempotent), to leave it together
    teardown(world)  # on success only: after a failure, torchrun ends the other processes
    line = final_summary(cfg, history, out) if world.main else None
    if line:
        print(line)
    return 0


def run_race(o: RaceOptions) -> int:
    from ..training.options import race_configs
    from ..training.race import label_free_ranking, race, race_table

    set_threads(o.threads)
    configs = race_configs(o)
    out = Path(o.out) if o.out else Path("runs") / f"race-{time.strftime('%Y%m%d-%H%M%S')}"
    histories = race(configs, out, progress=not o.quiet)
    print(race_table(histories), end="")
    ranking = label_free_ranking(histories)
    if ranking:
        print("\n" + ranking, end="")
    print(f"race folder: {out} (race.png, race.md)")
    return 0


def run_bench(o: BenchOptions) -> int:
    from ..training.bench import run_bench as bench
    from ..training.presets import resolve
    from ..training.step import input_size

    cfg = resolve(o.preset, o.settings)
    set_threads(o.threads)
    cfg.data.size = o.size or input_size(cfg) or 32  # the synthetic images are stored at this side
    res = bench(cfg, steps=o.steps, size=cfg.data.size)
    print(json.dumps(res) if o.json else bench_report(res))
    return 0


def bench_report(res: dict) -> str:
    q, b = res["knn_sizes"]
    mem = res.get("peak_memory_mib", res.get("peak_rss_mib"))
    return "\n".join([
        f"device {res['device']} ({res['threads']} threads), {res['arch']} width {res['width']}, {res['size']} px, "
        f"{res['precision']}{', channels_last' if res['channels_last'] else ''}, "
        f"batch {res['batch_instances']} instances = {res['images_per_step']} images/step",
        f"  training step        {res['step_images_per_s']:9.0f} images/s  ({res['step_ms']:.1f} ms)",
        f"  network fwd+bwd      {res['limit_images_per_s']:9.0f} images/s  ({res['limit_ms']:.1f} ms)  <- limit",
        f"  augmentation         {res['augment_ms']:9.1f} ms/step",
        f"  objective fwd+bwd    {res['objective_ms']:9.1f} ms/step",
        f"  eval forward         {res['eval_forward_images_per_s']:9.0f} images/s",
        f"  kNN search           {res['knn_search_s']:9.2f} s ({q} queries x {b} bank)",
        f"  one kNN evaluation   {res['eval_projected_s']:9.1f} s (projected: embed {q + b} images + search)",
        f"  peak memory          {mem:9.0f} MiB ({'GPU allocated' if 'peak_memory_mib' in res else 'process RSS'})",
        f"  step / limit         {res['ratio_step_to_limit']:9.3f}",
    ])


def run_presets(o: PresetsOptions) -> int:
    from ..training.presets import PRESETS, resolve

    for name, p in PRESETS.items():
        doc = p.doc.split(";")[0] if len(p.doc) > 100 else p.doc
        print(f"{name:21s} {doc}")
        if o.verbose:
            print(f"  parent: {p.parent or '(defaults)'}; changes: {json.dumps(p.changes)}")
            print(json.dumps(resolve(name).to_dict(), indent=2))
    return 0


def run_methods(_: None) -> int:
    from ..objectives import methods

    for name, m in sorted(methods().items()):
        recipe = f"; recipe: {m.recipe.source.split(' (')[0]}" if m.recipe is not None else ""
        print(f"{name:16s} {m.summary}{recipe}")
    return 0


TRAIN = Command("train", "train an embedding", run_train, TrainOptions, SECTIONS,
                description="Train an embedding without labels.")
RACE = Command("race", "train every method under one budget; plot kNN against epoch (Fig. 3)", run_race,
               RaceOptions, SECTIONS)
BENCH = Command("bench", "training-step throughput against the network's own forward+backward (the limit)",
                run_bench, BenchOptions, BENCH_SECTIONS)
PRESETS = Command("presets", "list the named presets", run_presets, PresetsOptions)
METHODS = Command("methods", "list the training methods", run_methods)
