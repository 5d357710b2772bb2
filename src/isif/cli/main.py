"""Command-line interface: ``isif train | race | eval | bench | embed | search | export | plot | presets | methods``.

The flags of every setting are generated from the settings dataclasses (``isif.base.settings``); this module
parses, dispatches and prints. Every user mistake ends in one line on stderr, ``isif: error: ...``, and
exit code 2. A run stopped by Ctrl-C saves a checkpoint and exits with 130; a run whose loss diverges exits
with 3; a checkpoint that cannot be written, with 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path
from typing import Any

from ..base.errors import UserError

_NONE = object()  # "none" given for an optional setting: distinct from "not given"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise UserError(f"{message} (see `{self.prog} --help`)")


# ----------------------------------------------------------------------------- flags from settings


def _setting_fields(sections: tuple[str, ...]) -> dict[str, list[tuple[str, dataclasses.Field, Any]]]:
    """flag -> [(section, field, type hint)], over the sections' dataclasses; ``method`` spans every method."""
    from ..base.settings import field_hints, flag_name
    from ..objectives import methods
    from ..training.config import Config

    base = Config()
    out: dict[str, list[tuple[str, dataclasses.Field, Any]]] = {}
    for sec in sections:
        classes = [m.settings for m in methods().values()] if sec == "method" else [type(base.section(sec))]
        for cls in classes:
            hints = field_hints(cls)
            for f in dataclasses.fields(cls):
                if f.metadata.get("cli", True):
                    out.setdefault(flag_name(f), []).append((sec, f, hints[f.name]))
    return out


def _flag_type(hint: Any) -> dict[str, Any]:
    from ..base.settings import optional_inner

    inner, optional = optional_inner(hint)
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(inner) is tuple:
        elem = typing.get_args(inner)[0]
        return {"type": _named(lambda v: _NONE if optional and v.lower() == "none" else tuple(
            elem(x) for x in v.split(",") if x.strip()), elem.__name__ + " list"), "metavar": "A,B,..."}
    if inner in (int, float):
        return {"type": _named(lambda v: _NONE if optional and v.lower() == "none" else inner(v), inner.__name__)}
    return {"type": str}


def _named(fn, name: str):
    fn.__name__ = name  # argparse names the type in "invalid int value"
    return fn


def add_setting_flags(p: argparse.ArgumentParser, sections: tuple[str, ...]) -> None:
    """One flag per setting of the sections, dest "section.field"; for ``method``, also ``--method``."""
    from ..objectives import methods

    groups = {sec: p.add_argument_group(f"{sec} settings") for sec in sections}
    if "method" in sections:
        groups["method"].add_argument("--method", dest="method.name", metavar="NAME",
                                      help="training objective (see `isif methods`)")
    for flag, owners in _setting_fields(sections).items():
        sec, f, hint = owners[0]
        helptext = f.metadata.get("help", "")
        if sec == "method":
            mine = [m for m, e in methods().items() if f.name in {x.name for x in dataclasses.fields(e.settings)}]
            defaults = ", ".join(f"{m} {getattr(methods()[m].settings(), f.name)}" for m in mine)
            helptext = f"{helptext} (default: {defaults})"
        elif f.default is not dataclasses.MISSING and f.default is not None and not isinstance(f.default, bool):
            helptext = f"{helptext} (default {f.default})" if helptext else None
        kw = {"metavar": f.name.upper(), **_flag_type(hint)}
        if "action" in kw:
            kw.pop("metavar")
        helptext = helptext.replace("%", "%%") if helptext else helptext  # argparse formats help with %
        groups[sec].add_argument(flag, dest=f"{sec}.{f.name}", default=None, help=helptext, **kw)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """{"section.field": value} of the setting flags given; ``none`` becomes None."""
    return {k: (None if v is _NONE else v) for k, v in vars(args).items() if "." in k and v is not None}


def _apply_on_resume(cfg, overrides: dict[str, Any]) -> None:
    """Apply flags to a resumed run's config: only settings marked resumable may change."""
    from ..training.presets import not_a_setting

    fields = {f"{sec}.{f.name}": (flag, f) for flag, owners in _setting_fields(_ALL).items() for sec, f, _ in owners}
    for path, value in overrides.items():
        flag, f = fields.get(path, ("--method", None))
        try:
            current = cfg.get(path)
        except AttributeError:
            raise UserError(not_a_setting(path, cfg.method.name)) from None
        if current != value and not (f is not None and f.metadata.get("resume")):
            raise UserError(f"{flag} cannot change on --resume (the run has {path}={current!r}); start a new "
                            "run instead")
        cfg.set(path, value)


_ALL = ("data", "model", "method", "augment", "optim", "sampler", "eval", "train", "log")
_BENCH = ("model", "method", "augment", "optim", "train")


def _run_flags(p) -> None:
    add_setting_flags(p, _ALL)
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------- train and race


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train an embedding", description="Train an embedding without labels.")
    p.add_argument("--preset", default=None, help="named setting (see `isif presets`); default images-cpu (images-gpu "
                   "on a GPU) when --data holds unlabelled images, else cifar10-cpu")
    p.add_argument("--config", metavar="FILE", help="settings from a JSON or YAML file, any part of a config (a "
                   "run's config.json repeats that run): its \"preset\" key (else the default) is applied first, "
                   "then the file, then the flags; not with --preset or --resume")
    p.add_argument("--out", help="run folder (default runs/PRESET-TIMESTAMP)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (or --out) from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--dry-run", action="store_true",
                   help="check flags, data, device and folder, print the resolved config, and stop")
    _run_flags(p)


def _check_data_path(cfg) -> None:
    if cfg.data.path is not None and not Path(cfg.data.path).expanduser().exists():
        raise UserError(f"--data {cfg.data.path}: no such file or folder")


def _default_preset(over: dict[str, Any]) -> str:
    from ..base.device import resolve_device
    from ..training.presets import default_preset

    data = over.get("data.path")
    if data is not None and not Path(data).expanduser().exists():
        raise UserError(f"--data {data}: no such file or folder")
    return default_preset(data, over.get("data.dataset"), resolve_device(over.get("train.device") or "auto").type)


def _train_config(args):
    """(config, run folder): from the preset and flags, or from the run's checkpoint and the flags that may
    change on --resume."""
    from ..training.checkpoint import load_checkpoint
    from ..training.config import Config
    from ..training.presets import resolve
    from ..training.runlog import RunDir

    if args.resume is not None and args.config:
        raise UserError("--config starts a new run; --resume continues one with its own config (change what may "
                        "change with flags), so drop one of them")
    if args.resume is None:
        over = _overrides(args)
        name, file = _config_file(args.config, args.preset, over) if args.config else (args.preset, None)
        cfg = resolve(name or _default_preset(over), over, file=file)
        return cfg, Path(args.out) if args.out else Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.resume if isinstance(args.resume, str) else (args.out or ""))
    if not str(out):
        raise UserError("--resume needs the run folder: --resume RUN_DIR (or --out RUN_DIR --resume)")
    run = RunDir(out)
    if not run.last.is_file():
        raise UserError(f"nothing to resume in {out}: no checkpoints/last.pt; start without --resume")
    cfg = Config.from_dict(load_checkpoint(run.last)["config"])
    _apply_on_resume(cfg, _overrides(args))
    return cfg, out


def _config_file(path: str, preset: str | None, over: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(the preset, the file's settings) of ``--config FILE``: its own "preset" key, else the default preset."""
    import difflib

    from ..training.config import check_method_keys, read_config_file
    from ..training.presets import PRESETS, resolve

    if preset is not None:
        raise UserError("--preset and --config together: the file names its own preset (put \"preset\": NAME in it) "
                        "and the flags change the rest")
    name, file = read_config_file(path)
    if name is not None and name not in PRESETS and name != "custom":
        near = difflib.get_close_matches(name, list(PRESETS), n=1)
        raise UserError(f"--config {path}: unknown preset {name!r}" + (f"; did you mean {near[0]}?" if near else
                                                                         "; see `isif presets`"))
    name = name or _default_preset({**file, **over})
    own = file.get("method.name") or resolve(name).method.name
    check_method_keys(file, {own, over.get("method.name", own)}, path)
    return name, file


def cmd_train(args) -> int:
    from ..base.device import resolve_device
    from ..base.dist import check_batch, device_for, setup, teardown
    from ..evaluate.protocol import summary
    from ..training.loop import train

    _set_threads(args.threads)
    resuming = args.resume is not None
    cfg, out = _train_config(args)
    _check_data_path(cfg)
    cfg.validate()
    t = cfg.train
    world = setup(t.device)
    device = resolve_device(device_for(world, t.device))
    if t.sync_bn and world.active and device.type != "cuda":
        raise UserError("--sync-bn needs GPUs: torch's SyncBatchNorm has no CPU kernel; drop it on CPU")
    check_batch(world, t.batch_size)
    if world.active and not world.main:
        args.quiet = True
    if not args.quiet and not args.dry_run:
        share = f" = {t.batch_size // world.size} per process x {world.size} processes" if world.active else ""
        print(f"isif: {'resuming' if resuming else 'training'} {cfg.method.name} ({cfg.preset}) -> {out}; "
              f"batch {t.batch_size} instances{share} ({2 * t.batch_size} images/step), "
              f"{t.epochs if t.epochs is not None else 'budgeted'} epochs, "
              f"{t.precision}, device {device}", file=sys.stderr)
    if args.dry_run:
        train(cfg, out, resume=resuming, overwrite=args.overwrite, dry_run=True)
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    history = train(cfg, out, resume=resuming, overwrite=args.overwrite, progress=not args.quiet)
    teardown(world)  # on success only: after a failure, torchrun ends the other processes
    evals = [r for r in history if summary(r)]
    if evals and world.main:
        last = evals[-1]
        if last.get("knn_top1") is not None:
            what = f"kNN top-1 {last['knn_top1']:.2f}% (k={cfg.eval.knn_k}, sigma={cfg.eval.knn_sigma})"
        elif last.get("recall@1") is not None:
            what = f"unseen classes: {summary(last)}"
        else:
            what = f"held-out images (no labels): {summary(last)}"
        print(f"{what} after epoch {last['epoch']}; run folder: {out}")
    return 0


def _race_parser(sub) -> None:
    from ..training.race import DEFAULT_METHODS

    p = sub.add_parser("race", help="train every method under one budget; plot kNN against epoch (Fig. 3)")
    p.add_argument("--preset", default="cifar10-race", help="the shared setting (default cifar10-race)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated methods (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--out", help="race folder (default runs/race-TIMESTAMP); rerunning reuses finished runs")
    _run_flags(p)


def cmd_race(args) -> int:
    from ..training.presets import resolve
    from ..training.race import check_methods, race, race_table

    over = _overrides(args)
    if "method.name" in over:
        raise UserError("isif race takes --methods A,B,C, not --method")
    _set_threads(args.threads)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_methods(names)
    configs = {n: resolve(args.preset, {**over, "method.name": n}, strict_method=False) for n in names}
    for cfg in configs.values():
        _check_data_path(cfg)
        cfg.validate()
    out = Path(args.out) if args.out else Path("runs") / f"race-{time.strftime('%Y%m%d-%H%M%S')}"
    histories = race(configs, out, progress=not args.quiet)
    print(race_table(histories), end="")
    print(f"race folder: {out} (race.png, race.md)")
    return 0


# ----------------------------------------------------------------------------- embed, search, export, plot


def _embed_parser(sub) -> None:
    p = sub.add_parser("embed", help="embed a folder of images: features.npy and paths.txt (sharded, resumable, "
                                     "incremental)")
    p.add_argument("checkpoint", help="a .pt file or a run folder")
    p.add_argument("folder", help="a folder of images (searched recursively)")
    p.add_argument("--out", help="output folder (default FOLDER-embeddings beside the folder)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers decoding the files (default cores-1, "
                                                              "max 8)")
    p.add_argument("--shard-size", type=int, default=50_000, help="images per shard, the unit a rerun resumes from "
                                                                  "(default 50000)")
    p.add_argument("--overwrite", action="store_true", help="replace embeddings made with another checkpoint")
    p.add_argument("--strict", action="store_true", help="stop at the first broken file instead of skipping it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_embed(args) -> int:
    from ..collection.embedding import embed_folder
    from ..data.stream import default_workers

    for flag, v, low in (("--batch-size", args.batch_size, 1), ("--shard-size", args.shard_size, 1),
                         ("--workers", args.workers, 0)):
        if v is not None and v < low:
            raise UserError(f"{flag} must be >= {low}, got {v}")
    out = Path(args.out) if args.out else Path(str(Path(args.folder).resolve()) + "-embeddings")
    workers = default_workers() if args.workers is None else args.workers
    res = embed_folder(args.checkpoint, args.folder, out, args.batch_size, args.device, args.strict, workers,
                       args.shard_size, args.overwrite, progress=not args.quiet)
    if res["images"]:
        print(f"embedded {res['images']} images ({res['dim']}-d) into {res['out']}/features.npy and paths.txt; "
              f"{res['new']} new or changed" + (f", skipped {res['skipped']} unreadable" if res["skipped"] else ""))
    return 0


def _search_parser(sub) -> None:
    p = sub.add_parser("search", help="nearest gallery images of query images; prints them and writes a PNG grid")
    p.add_argument("checkpoint", help="a .pt file or a run folder")
    p.add_argument("queries", nargs="+", metavar="QUERY", help="query images or folders of them")
    p.add_argument("--gallery", required=True, help="a folder of images, or an `isif embed` output folder")
    p.add_argument("--k", type=int, default=5, help="neighbours per query (default 5)")
    p.add_argument("--out", default="search.png", help="the grid PNG (default search.png)")
    p.add_argument("--max-rows", type=int, default=8, help="queries drawn in the grid (default 8)")
    p.add_argument("--tile", type=int, default=112, help="side of each image in the grid, in pixels (default 112)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--strict", action="store_true", help="stop at the first broken image instead of skipping it")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--exact", action="store_true", help="exact search even when the gallery has a faiss index")


def cmd_search(args) -> int:
    from ..base.device import resolve_device
    from ..collection.embedding import Embedder
    from ..collection.search import grid, run_search

    if args.k < 1 or args.batch_size < 1 or args.max_rows < 1:
        raise UserError("--k, --batch-size and --max-rows must be >= 1")
    if args.tile < 32:
        raise UserError(f"--tile must be >= 32 pixels, got {args.tile}")
    if not Path(args.gallery).is_dir():
        raise UserError(f"--gallery {args.gallery}: no such folder; pass a folder of images or an isif embed output")
    embedder = Embedder(args.checkpoint, str(resolve_device(args.device or "auto")), args.batch_size)
    res = run_search(embedder, args.queries, args.gallery, args.k, args.strict, args.exact)
    rows = res["rows"]
    grid(rows[: args.max_rows], Path(args.out), size=args.tile)
    if args.json:
        print(json.dumps({"results": res["results"], "grid": args.out}))
        return 0
    for r in res["results"]:
        print(r["query"])
        for rank, n in enumerate(r["neighbours"], start=1):
            mark = "" if "same_label" not in n else ("  same class" if n["same_label"] else "  other class")
            print(f"  {rank:3d}  {n['cosine']:.4f}  {n['path']}{mark}")
    print(f"grid of {min(len(rows), args.max_rows)} queries x {res['k']} neighbours: {args.out}")
    return 0


def _index_parser(sub) -> None:
    p = sub.add_parser("index", help="a faiss index beside an embed folder, with its Recall@10 against exact search")
    p.add_argument("embed_dir", metavar="EMBED_DIR", help="an `isif embed` output folder")
    p.add_argument("--kind", default="auto", choices=("auto", "exact", "ivf", "hnsw"),
                   help="auto: exact below 100,000 images, HNSW above (default auto)")
    p.add_argument("--nlist", type=int, help="ivf: cells (default about 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, help="ivf: cells visited per query (default nlist/16)")
    p.add_argument("--m", type=int, default=32, help="hnsw: links per node (default 32)")
    p.add_argument("--ef-search", type=int, default=64, help="hnsw: candidates kept per query (default 64)")
    p.add_argument("--recall-queries", type=int, default=1000, help="sampled queries of the Recall@10 check "
                                                                    "(default 1000)")
    p.add_argument("--seed", type=int, default=0)


def cmd_index(args) -> int:
    from ..collection.index import build_index

    for flag in ("nlist", "nprobe", "m", "ef_search", "recall_queries"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    params = {"m": args.m, "ef_search": args.ef_search}
    if args.kind == "ivf":
        params = {"nlist": args.nlist, "nprobe": args.nprobe}
    meta = build_index(args.embed_dir, args.kind, args.seed, args.recall_queries,
                       **(params if args.kind in ("ivf", "hnsw") else {}))
    print(f"{meta['kind']} index of {meta['images']:,} embeddings {json.dumps(meta['params'])}: built in "
          f"{meta['build_s']:.1f} s, Recall@10 {meta['recall@10']:.4f} against exact search on "
          f"{meta['recall_queries']} queries -> {args.embed_dir}/index.faiss")
    return 0


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="a local search page and JSON API over an embed folder (isif[serve])")
    p.add_argument("embed_dir", metavar="EMBED_DIR", help="an `isif embed` output folder")
    p.add_argument("--checkpoint", help="the checkpoint that embedded it, for uploaded queries (default: the one "
                                        "recorded in EMBED_DIR/index.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine "
                                                        "only; anything else prints a warning)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--k", type=int, default=24, help="neighbours shown by default (default 24)")
    p.add_argument("--max-upload-mib", type=float, default=20.0, help="largest upload accepted (default 20)")
    p.add_argument("--exact", action="store_true", help="exact search even when EMBED_DIR has a faiss index")
    p.add_argument("--device", default="cpu", help="device embedding uploads (default cpu)")


def cmd_serve(args) -> int:
    from ..base.device import resolve_device
    from ..serve.app import serve

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0 to 65535, got {args.port}")
    serve(args.embed_dir, args.checkpoint, args.host, args.port, args.exact, args.max_upload_mib, args.k,
          str(resolve_device(args.device)))
    return 0


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="export the embedding network to TorchScript or ONNX, or its weights to "
                                      "safetensors, checked to 1e-5")
    p.add_argument("checkpoint", help="a .pt file or a run folder")
    p.add_argument("--format", choices=("torchscript", "onnx", "safetensors"), default="torchscript",
                   help="torchscript or onnx: a graph with the normalisation inside; safetensors: the weights, with "
                        "the architecture and input recipe in its metadata (isif.load_model and --weights read it)")
    p.add_argument("--out", help="output file (default CHECKPOINT_NAME.torchscript.pt, .onnx or .safetensors beside "
                                 "it)")
    p.add_argument("--atol", type=float, default=1e-5, help="largest allowed embedding difference (default 1e-5)")


def cmd_export(args) -> int:
    from ..collection.export import export

    res = export(args.checkpoint, args.format, Path(args.out) if args.out else None, args.atol)
    what = "architecture and input recipe" if res["format"] == "safetensors" else "preprocessing"
    print(f"exported {res['format']} to {res['out']} (input {res['input']}); max |difference| vs the checkpoint "
          f"{res['max_abs_diff']:.2e} on {res['checked']} images; {what} in {res['spec']}")
    return 0


def _plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="figures from trained runs")
    psub = p.add_subparsers(dest="figure", required=True, parser_class=_Parser)
    s = psub.add_parser("similarity", help="cosine similarity of positives and negatives on the test set (Fig. 5)")
    s.add_argument("run", help="a run folder or checkpoint")
    s.add_argument("--compare", action="append", default=[], help="another run to overlay (repeatable)")
    s.add_argument("--out", help="PNG path (default RUN/similarity.png)")
    s.add_argument("--images", type=int, default=5000, help="test images used (default 5000)")
    s.add_argument("--data", help="dataset path, if it moved since training")
    s.add_argument("--device", default=None)
    s.add_argument("--seed", type=int, default=0)


def cmd_plot(args) -> int:
    from ..collection.similarity import similarity_figure

    if args.images < 2:
        raise UserError(f"--images must be >= 2, got {args.images}")
    out = Path(args.out) if args.out else Path(args.run) / "similarity.png"
    stats = similarity_figure([args.run, *args.compare], out, args.images, args.data, args.device, args.seed)
    for name, st in stats.items():
        print(f"{name}: positives mean {st['pos_mean']:.3f}, negatives mean {st['neg_mean']:.3f}")
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- cluster, duplicates, map


def _explore_parsers(sub) -> None:
    emb = {"metavar": "EMBED_DIR", "help": "an `isif embed` output folder (features.npy, paths.txt, index.json)"}
    c = sub.add_parser("cluster", help="k-means clusters of an embed folder: clusters.csv, clusters.json, "
                                       "one contact sheet per cluster")
    c.add_argument("embed_dir", **emb)
    c.add_argument("--k", type=int, required=True, help="number of clusters")
    c.add_argument("--seed", type=int, default=0, help="k-means++ seed (default 0)")
    c.add_argument("--out", help="output folder (default EMBED_DIR)")
    c.add_argument("--per-sheet", type=int, default=64, help="images per contact sheet, most central first "
                                                              "(default 64)")
    c.add_argument("--tile", type=int, default=64, help="thumbnail side in pixels (default 64)")
    d = sub.add_parser("duplicates", help="near-duplicate groups of an embed folder: duplicates.csv and .png")
    d.add_argument("embed_dir", **emb)
    d.add_argument("--threshold", type=float, default=0.95, help="cosine similarity that makes a pair (default 0.95)")
    d.add_argument("--out", help="output folder (default EMBED_DIR)")
    d.add_argument("--max-groups", type=int, default=50, help="groups drawn in duplicates.png (default 50)")
    d.add_argument("--tile", type=int, default=64, help="thumbnail side in pixels (default 64)")
    d.add_argument("--block", type=int, default=2048, help="rows and columns of one similarity tile (default 2048)")
    m = sub.add_parser("map", help="a 2-D map (UMAP or PCA) of an embed folder with thumbnails: map.png, map.csv")
    m.add_argument("embed_dir", **emb)
    m.add_argument("--method", choices=("auto", "umap", "pca"), default="auto",
                   help="auto: UMAP when umap-learn is installed, else PCA (default auto)")
    m.add_argument("--out", help="the PNG (default EMBED_DIR/map.png); map.csv is written beside it")
    m.add_argument("--thumbs", type=int, default=2000, help="thumbnails drawn, a seeded sample (default 2000)")
    m.add_argument("--seed", type=int, default=0, help="seed of UMAP and of the thumbnail sample (default 0)")


def cmd_cluster(args) -> int:
    from ..collection.cluster import cluster_folder

    res = cluster_folder(args.embed_dir, args.k, args.seed, args.out, args.per_sheet, args.tile)
    print(f"{res['k']} clusters (sizes {', '.join(map(str, res['sizes']))}; inertia {res['inertia']:.4f}) -> "
          f"{res['out']}/clusters.csv, clusters.json and {res['sheets']} contact sheets in clusters/")
    return 0


def cmd_duplicates(args) -> int:
    from ..collection.duplicates import duplicates_folder

    res = duplicates_folder(args.embed_dir, args.threshold, args.out, args.max_groups, args.tile, args.block)
    print(f"{res['groups']} near-duplicate groups, {res['images']} images at cosine >= {args.threshold:g} -> "
          f"{res['out']}/duplicates.csv and duplicates.png")
    return 0


def cmd_map(args) -> int:
    from ..collection.maps import map_folder

    res = map_folder(args.embed_dir, args.method, args.out, args.thumbs, args.seed)
    colour = f", coloured by {res['classes']} folders" if res["classes"] else ""
    print(f"{res['method'].upper()} map of {res['images']} images ({res['thumbnails']} thumbnails{colour}) -> "
          f"{res['png']} and {res['csv']}")
    return 0


# ----------------------------------------------------------------------------- eval


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint")
    esub = p.add_subparsers(dest="protocol", required=True, parser_class=_Parser)
    k = _checkpoint_flags(esub.add_parser("knn", help="weighted kNN top-1 on the test split"))
    k.add_argument("--k", type=int, default=None, help="neighbours (default: the run's, 200)")
    k.add_argument("--sigma", type=float, default=None, help="vote temperature (default: the run's, 0.1)")
    ret = _checkpoint_flags(esub.add_parser(
        "retrieval", help="Recall@K, MAP@R and NMI on the test split's classes (unseen in training)"))
    ret.add_argument("--ks", default=None, help="comma-separated K for Recall@K (default: the run's; 1,2,4,8, "
                                                "or 1,10,100 for SOP)")
    ret.add_argument("--seed", type=int, default=0, help="k-means seed for NMI")
    lin = _checkpoint_flags(esub.add_parser("linear", help="linear probe on frozen features"))
    lin.add_argument("--features", choices=("backbone", "embedding"), default="backbone",
                     help="pooled backbone features (default) or the 128-d embedding")
    lin.add_argument("--epochs", type=int, default=100, help="probe epochs (default 100)")
    lin.add_argument("--lr", type=float, default=0.1, help="probe learning rate, cosine schedule (default 0.1)")


def _checkpoint_flags(p):
    p.add_argument("--checkpoint", required=True, help="a .pt file, or a run folder (uses checkpoints/last.pt)")
    p.add_argument("--data", help="dataset path, if it moved since training; for a run on unlabelled images, the "
                                  "labelled images to evaluate on (default its --eval-data)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def cmd_eval(args) -> int:
    from ..collection.evaluation import Loaded, knn_result, linear_result, retrieval_result
    from ..evaluate.linear import LinearRecipe
    from ..evaluate.protocol import summary

    if args.protocol == "linear" and (args.epochs < 1 or not args.lr > 0):
        raise UserError("--epochs must be >= 1 and --lr > 0")
    ks = _parse_ks(args.ks) if args.protocol == "retrieval" else None
    ld = Loaded(args.checkpoint, args.data, args.device)
    if args.protocol == "knn":
        res = knn_result(ld, args.k, args.sigma)
        text = (f"kNN top-1 {res['knn_top1']:.2f}% (k={res['k']}, sigma={res['sigma']}) on {res['test_images']} "
                f"test images, bank of {res['train_images']}; checkpoint epoch {res['epoch']}")
    elif args.protocol == "retrieval":
        res = retrieval_result(ld, ks, args.seed)
        mapr = f"  MAP@R {res['map@r']:.2f}" if res["map@r"] is not None else ""
        text = (f"{summary(res)}{mapr}  on {res['images']} test images of {res['classes']} classes; "
                f"checkpoint epoch {res['epoch']}")
    else:
        res = linear_result(ld, LinearRecipe(epochs=args.epochs, lr=args.lr), args.features)
        text = (f"linear probe top-1 {res['linear_top1']:.2f}% (train {res['linear_train_top1']:.2f}%) on "
                f"{args.features} features ({res['feature_dim']}-d); backbone weights unchanged: yes; checkpoint "
                f"epoch {res['epoch']}")
    print(json.dumps(res) if args.json else text)
    return 0


def _parse_ks(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        ks = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise UserError(f"--ks {text!r}: expected comma-separated integers such as 1,2,4,8") from None
    if not ks or ks[0] < 1:
        raise UserError(f"--ks {text!r}: every K must be >= 1")
    return ks


# ----------------------------------------------------------------------------- bench, presets, methods


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="training-step throughput against the network's own forward+backward (the limit)")
    p.add_argument("--preset", default="cifar10-cpu")
    p.add_argument("--steps", type=int, default=20, help="timed steps per piece (after 3 warm-up steps)")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--size", type=int, help="image side in pixels (default: the preset's, a timm backbone's own, "
                                            "else 32)")
    add_setting_flags(p, _BENCH)


def cmd_bench(args) -> int:
    from ..training.bench import run_bench
    from ..training.presets import resolve

    cfg = resolve(args.preset, _overrides(args))
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.size is not None and args.size < 8:
        raise UserError(f"--size must be >= 8 pixels, got {args.size}")
    _set_threads(args.threads)
    from ..training.step import input_size

    cfg.data.size = args.size or input_size(cfg) or 32  # the synthetic images are stored at this side
    res = run_bench(cfg, steps=args.steps, size=cfg.data.size)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"device {res['device']} ({res['threads']} threads), {res['arch']} width {res['width']}, {res['size']} px, "
          f"{res['precision']}{', channels_last' if res['channels_last'] else ''}, "
          f"batch {res['batch_instances']} instances = {res['images_per_step']} images/step")
    print(f"  training step        {res['step_images_per_s']:9.0f} images/s  ({res['step_ms']:.1f} ms)")
    print(f"  network fwd+bwd      {res['limit_images_per_s']:9.0f} images/s  ({res['limit_ms']:.1f} ms)  <- limit")
    print(f"  augmentation         {res['augment_ms']:9.1f} ms/step")
    print(f"  objective fwd+bwd    {res['objective_ms']:9.1f} ms/step")
    q, b = res["knn_sizes"]
    print(f"  eval forward         {res['eval_forward_images_per_s']:9.0f} images/s")
    print(f"  kNN search           {res['knn_search_s']:9.2f} s ({q} queries x {b} bank)")
    print(f"  one kNN evaluation   {res['eval_projected_s']:9.1f} s (projected: embed {q + b} images + search)")
    mem = res.get("peak_memory_mib", res.get("peak_rss_mib"))
    print(f"  peak memory          {mem:9.0f} MiB ({'GPU allocated' if 'peak_memory_mib' in res else 'process RSS'})")
    print(f"  step / limit         {res['ratio_step_to_limit']:9.3f}")
    return 0


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def cmd_presets(args) -> int:
    from ..training.presets import PRESETS, resolve

    for name, p in PRESETS.items():
        doc = p.doc.split(";")[0] if len(p.doc) > 100 else p.doc
        print(f"{name:21s} {doc}")
        if args.verbose:
            print(f"  parent: {p.parent or '(defaults)'}; changes: {json.dumps(p.changes)}")
            print(json.dumps(resolve(name).to_dict(), indent=2))
    return 0


def cmd_methods(args) -> int:
    from ..objectives import methods

    for name, m in sorted(methods().items()):
        print(f"{name:16s} {m.summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="isif", description="Unsupervised embedding learning via Invariant and Spreading "
                                              "Instance Feature (Ye et al., CVPR 2019).")
    parser.add_argument("--version", action="version", version=f"isif {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_train_parser, _race_parser, _eval_parser, _bench_parser, _embed_parser, _index_parser,
                _plot_parser, _search_parser, _serve_parser, _export_parser, _explore_parsers):
        add(sub)
    pp = sub.add_parser("presets", help="list the named presets")
    pp.add_argument("-v", "--verbose", action="store_true", help="print each preset's changes and full config")
    sub.add_parser("methods", help="list the training methods")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..training.checkpoint import CheckpointWriteError
    from ..training.loop import Interrupted, TrainingDiverged

    commands = {"train": cmd_train, "race": cmd_race, "eval": cmd_eval, "bench": cmd_bench, "embed": cmd_embed,
                "index": cmd_index, "search": cmd_search, "serve": cmd_serve, "export": cmd_export, "plot": cmd_plot,
                "presets": cmd_presets,
                "methods": cmd_methods, "cluster": cmd_cluster, "duplicates": cmd_duplicates, "map": cmd_map}
    try:
        args = build_parser().parse_args(argv)
        return commands[args.command](args)
    except UserError as e:
        print(f"isif: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"isif: error: {e}", file=sys.stderr)
        return 3
    except CheckpointWriteError as e:
        print(f"isif: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"isif: interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("isif: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
