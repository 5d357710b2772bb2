"""Command-line interface: ``isif train | eval knn | presets``.

Every user mistake ends in one line on stderr, ``isif: error: ...``, and exit
code 2. A run stopped by Ctrl-C saves a checkpoint and exits with 130; a run
whose loss diverges exits with 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train an embedding", description="Train an embedding without labels.")
    p.add_argument("--preset", default="cifar10-cpu", help="named setting (see `isif presets`); default cifar10-cpu")
    p.add_argument("--out", help="run folder (default runs/PRESET-TIMESTAMP)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (or --out) from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--dry-run", action="store_true",
                   help="check flags, data, device and folder, print the resolved config, and stop")
    _config_flags(p)


def _race_parser(sub) -> None:
    from .race import DEFAULT_METHODS

    p = sub.add_parser("race", help="train every method under one budget; plot kNN against epoch (Fig. 3)")
    p.add_argument("--preset", default="cifar10-race", help="the shared setting (default cifar10-race)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated methods (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--out", help="race folder (default runs/race-TIMESTAMP); rerunning reuses finished runs")
    _config_flags(p)


def _config_flags(p) -> None:
    p.add_argument("--data", help="dataset path: cifar-10-batches-py folder, train/ test/ image folders, a .zip, "
                                  "or an stl10_binary folder")
    p.add_argument("--dataset", help="dataset kind: cifar10, stl10, folder (in memory), or streamed from files: "
                                     "cub200, cars196, sop, images")
    p.add_argument("--split", help="training split: train; stl10 also unlabeled, train+unlabeled")
    p.add_argument("--cache-dir", help="where decoded arrays are cached (default $ISIF_CACHE or ~/.cache/isif)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="instances per step (a step sees twice as many images)")
    p.add_argument("--width", type=float, help="backbone channel multiplier (resnet18_cifar)")
    p.add_argument("--arch", help="resnet18_cifar, googlenet, resnet18 or resnet50")
    p.add_argument("--weights", help="torchvision backbones: none, imagenet, or a state-dict path")
    p.add_argument("--method", help="training objective (see `isif methods`)")
    p.add_argument("--variant", help="isif objective: official (reference code) or paper (Eq. 7)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--neg-weight", type=float, help="the reference code's negM")
    p.add_argument("--negatives", help="isif: all, hard or easy (Table 8 keeps half of them)")
    p.add_argument("--clusters", type=int, help="deepcluster: k of k-means (10, 100, 1000)")
    p.add_argument("--nce-noise", type=int, help="nce: noise samples per instance (default 4096)")
    p.add_argument("--margin", type=float, help="triplet: margin (default 0.5)")
    p.add_argument("--lr", type=float)
    p.add_argument("--schedule", help="step or cosine")
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--precision", help="fp32, bf16 or fp16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the network")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", type=int, help="kNN evaluation every N epochs (always after the last)")
    p.add_argument("--knn-k", type=int)
    p.add_argument("--eval-protocol", help="knn, retrieval, or auto (retrieval when the test classes are unseen)")
    p.add_argument("--size", type=int, help="network input side in pixels (default: the images' own size)")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None,
                   help="streamed data sets: stop at the first unreadable image instead of skipping it")
    p.add_argument("--workers", type=int, help="streamed data sets: DataLoader workers (default cores-1, max 8)")
    p.add_argument("--nn-positive", type=float,
                   help="probability that the positive is the image's nearest neighbour in the initial "
                        "network's feature space (cub200 preset: 0.5)")
    p.add_argument("--train-subset", type=int, help="train on a stratified slice of N images")
    p.add_argument("--test-subset", type=int, help="evaluate on a stratified slice of N images")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# flag -> (section, field); the flags a resumed run may change are marked True
_OVERRIDES = {
    "data": ("data", "path", True),
    "dataset": ("data", "dataset", False),
    "split": ("data", "split", False),
    "negatives": ("method", "negatives", False),
    "clusters": ("method", "clusters", False),
    "nce_noise": ("method", "nce_noise", False),
    "margin": ("method", "margin", False),
    "cache_dir": ("data", "cache_dir", True),
    "train_subset": ("data", "train_subset", False),
    "test_subset": ("data", "test_subset", False),
    "epochs": ("train", "epochs", True),
    "batch_size": ("train", "batch_size", False),
    "width": ("model", "width", False),
    "arch": ("model", "arch", False),
    "weights": ("model", "weights", False),
    "method": ("method", "name", False),
    "variant": ("method", "variant", False),
    "temperature": ("method", "temperature", False),
    "neg_weight": ("method", "neg_weight", False),
    "lr": ("optim", "lr", False),
    "schedule": ("optim", "schedule", False),
    "warmup_epochs": ("optim", "warmup_epochs", False),
    "precision": ("train", "precision", False),
    "channels_last": ("train", "channels_last", True),
    "compile": ("train", "compile", True),
    "sync_bn": ("train", "sync_bn", False),
    "device": ("train", "device", True),
    "seed": ("train", "seed", False),
    "eval_every": ("train", "eval_every", True),
    "knn_k": ("train", "knn_k", False),
    "eval_protocol": ("train", "eval_protocol", True),
    "size": ("data", "size", False),
    "strict": ("data", "strict", True),
    "workers": ("data", "workers", True),
    "nn_positive": ("method", "nn_positive", False),
}


def _apply_overrides(cfg, args, resuming: bool) -> None:
    for flag, (section, key, resumable) in _OVERRIDES.items():
        value = getattr(args, flag)
        if value is None:
            continue
        sec = getattr(cfg, section)
        if resuming and not resumable and getattr(sec, key) != value:
            raise UserError(f"--{flag.replace('_', '-')} cannot change on --resume (the run has "
                            f"{section}.{key}={getattr(sec, key)!r}); start a new run instead")
        setattr(sec, key, value)


def cmd_train(args) -> int:
    from .checkpoint import load_checkpoint
    from .config import Config, preset
    from .dist import check_batch, device_for, setup, teardown
    from .train import RunDir, resolve_device, train

    _set_threads(args.threads)
    resuming = args.resume is not None
    if resuming:
        out = Path(args.resume if isinstance(args.resume, str) else (args.out or ""))
        if not str(out):
            raise UserError("--resume needs the run folder: --resume RUN_DIR (or --out RUN_DIR --resume)")
        run = RunDir(out)
        if not run.last.is_file():
            raise UserError(f"nothing to resume in {out}: no checkpoints/last.pt; start without --resume")
        cfg = Config.from_dict(load_checkpoint(run.last)["config"])
    else:
        cfg = preset(args.preset)
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    _apply_overrides(cfg, args, resuming)
    if cfg.data.path is not None and not Path(cfg.data.path).expanduser().exists():
        raise UserError(f"--data {cfg.data.path}: no such file or folder")
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
              f"batch {t.batch_size} instances{share} ({2 * t.batch_size} images/step), {t.epochs} epochs, "
              f"{t.precision}, device {device}", file=sys.stderr)
    if args.dry_run:
        train(cfg, out, resume=resuming, overwrite=args.overwrite, dry_run=True)
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    history = train(cfg, out, resume=resuming, overwrite=args.overwrite, progress=not args.quiet)
    teardown(world)  # on success only: after a failure, torchrun ends the other processes
    from .train import eval_summary

    evals = [r for r in history if eval_summary(r)]
    if evals and world.main:
        last = evals[-1]
        what = (f"kNN top-1 {last['knn_top1']:.2f}% (k={t.knn_k}, sigma={t.knn_sigma})"
                if last.get("knn_top1") is not None else f"unseen classes: {eval_summary(last)}")
        print(f"{what} after epoch {last['epoch']}; run folder: {out}")
    return 0


def cmd_race(args) -> int:
    from .config import preset
    from .race import race, race_table

    if args.method is not None:
        raise UserError("isif race takes --methods A,B,C, not --method")
    _set_threads(args.threads)
    cfg = preset(args.preset)
    _apply_overrides(cfg, args, resuming=False)
    if cfg.data.path is not None and not Path(cfg.data.path).expanduser().exists():
        raise UserError(f"--data {cfg.data.path}: no such file or folder")
    cfg.validate()
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    out = Path(args.out) if args.out else Path("runs") / f"race-{time.strftime('%Y%m%d-%H%M%S')}"
    histories = race(cfg, names, out, progress=not args.quiet)
    print(race_table(histories), end="")
    print(f"race folder: {out} (race.png, race.md)")
    return 0


def _embed_parser(sub) -> None:
    p = sub.add_parser("embed", help="embed a folder of images: features.npy and paths.txt")
    p.add_argument("checkpoint", help="a .pt file or a run folder")
    p.add_argument("folder", help="a folder of images (searched recursively)")
    p.add_argument("--out", help="output folder (default FOLDER-embeddings beside the folder)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--strict", action="store_true", help="stop at the first broken file instead of skipping it")


def cmd_embed(args) -> int:
    from .embed import embed_folder
    from .train import resolve_device

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out) if args.out else Path(str(Path(args.folder).resolve()) + "-embeddings")
    res = embed_folder(args.checkpoint, args.folder, out, args.batch_size, str(resolve_device(args.device or "auto")),
                       args.strict)
    print(f"embedded {res['images']} images ({res['dim']}-d) into {res['out']}/features.npy and paths.txt"
          + (f"; skipped {res['skipped']} unreadable" if res["skipped"] else ""))
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


def cmd_search(args) -> int:
    from .embed import Embedder
    from .search import grid, load_gallery, query_files, search
    from .train import resolve_device

    if args.k < 1 or args.batch_size < 1 or args.max_rows < 1:
        raise UserError("--k, --batch-size and --max-rows must be >= 1")
    if args.tile < 32:
        raise UserError(f"--tile must be >= 32 pixels, got {args.tile}")
    if not Path(args.gallery).is_dir():
        raise UserError(f"--gallery {args.gallery}: no such folder; pass a folder of images or an isif embed output")
    files = query_files(args.queries)
    embedder = Embedder(args.checkpoint, str(resolve_device(args.device or "auto")), args.batch_size)
    gal = load_gallery(embedder, args.gallery, args.strict)
    qz, qfiles, _ = embedder.files(files, args.strict)
    if not qfiles:
        raise UserError("none of the query images could be read")
    where = {p: i for i, p in enumerate(gal.paths)}
    exclude = [where.get(p.resolve()) for p in qfiles]
    k = min(args.k, len(gal.paths) - (1 if any(e is not None for e in exclude) else 0))
    if k < 1:
        raise UserError("the gallery has no image besides the query")
    scores, idx = search(qz, gal.features, k, exclude)
    results, rows = [], []
    for i, q in enumerate(qfiles):
        neigh = [gal.paths[int(j)] for j in idx[i]]
        qlabel = q.resolve().parent.name if gal.labels is not None else None
        same = [None if gal.labels is None else gal.labels[int(j)] == qlabel for j in idx[i]]
        results.append({"query": str(q), "neighbours": [
            {"path": str(p), "cosine": float(sc), **({"same_label": s} if s is not None else {})}
            for p, sc, s in zip(neigh, scores[i].tolist(), same, strict=True)]})
        rows.append((q, neigh, same, scores[i].tolist()))
    grid(rows[: args.max_rows], Path(args.out), size=args.tile)
    if args.json:
        print(json.dumps({"results": results, "grid": args.out}))
        return 0
    for r in results:
        print(r["query"])
        for rank, n in enumerate(r["neighbours"], start=1):
            mark = "" if "same_label" not in n else ("  same class" if n["same_label"] else "  other class")
            print(f"  {rank:3d}  {n['cosine']:.4f}  {n['path']}{mark}")
    print(f"grid of {min(len(rows), args.max_rows)} queries x {k} neighbours: {args.out}")
    return 0


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="export the embedding network to TorchScript or ONNX, checked to 1e-5")
    p.add_argument("checkpoint", help="a .pt file or a run folder")
    p.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript")
    p.add_argument("--out", help="output file (default CHECKPOINT_NAME.torchscript.pt or .onnx beside it)")
    p.add_argument("--atol", type=float, default=1e-5, help="largest allowed embedding difference (default 1e-5)")


def cmd_export(args) -> int:
    from .export import export

    res = export(args.checkpoint, args.format, Path(args.out) if args.out else None, args.atol)
    print(f"exported {res['format']} to {res['out']} (input {res['input']}); max |difference| vs the checkpoint "
          f"{res['max_abs_diff']:.2e} on {res['checked']} images; preprocessing in {res['spec']}")
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
    from .similarity import similarity_figure

    if args.images < 2:
        raise UserError(f"--images must be >= 2, got {args.images}")
    out = Path(args.out) if args.out else Path(args.run) / "similarity.png"
    stats = similarity_figure([args.run, *args.compare], out, args.images, args.data, args.device, args.seed)
    for name, st in stats.items():
        print(f"{name}: positives mean {st['pos_mean']:.3f}, negatives mean {st['neg_mean']:.3f}")
    print(f"wrote {out}")
    return 0


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
    p.add_argument("--data", help="dataset path, if it moved since training")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _load_for_eval(args):
    """Model, config, checkpoint, device and data for the eval and plot commands."""
    from .checkpoint import load_model, resolve_checkpoint
    from .train import load_splits, resolve_device

    path = resolve_checkpoint(args.checkpoint)
    device = resolve_device(args.device or "auto")
    model, cfg, state = load_model(path, device)
    if args.data is not None:
        cfg.data.path = args.data
    cfg.train.device = str(device)
    return path, model, cfg, state, device, load_splits(cfg)


def cmd_eval(args) -> int:
    if args.protocol == "linear":
        return cmd_eval_linear(args)
    if args.protocol == "retrieval":
        return cmd_eval_retrieval(args)
    from .train import build_augment, evaluate_knn

    path, model, cfg, state, device, (splits, _, bank_set, test_set) = _load_for_eval(args)
    if args.k is not None:
        cfg.train.knn_k = args.k
    if args.sigma is not None:
        cfg.train.knn_sigma = args.sigma
    cfg.validate()
    if cfg.train.knn_k > len(bank_set):
        raise UserError(f"--k {cfg.train.knn_k} is larger than the training set ({len(bank_set)} images)")
    _, plain = build_augment(cfg, splits)
    t0 = time.perf_counter()
    acc = evaluate_knn(model, bank_set, test_set, plain, cfg, device)
    res = {"checkpoint": str(path), "epoch": state.get("epoch"), "knn_top1": acc, "k": cfg.train.knn_k,
           "sigma": cfg.train.knn_sigma, "train_images": len(bank_set), "test_images": len(test_set),
           "eval_s": time.perf_counter() - t0}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"kNN top-1 {acc:.2f}% (k={res['k']}, sigma={res['sigma']}) on {len(test_set)} test images, "
              f"bank of {len(bank_set)}; checkpoint epoch {res['epoch']}")
    return 0


def cmd_eval_retrieval(args) -> int:
    from .train import build_augment, evaluate_retrieval

    ks: tuple[int, ...] | None = None
    if args.ks is not None:
        try:
            ks = tuple(sorted({int(k) for k in args.ks.split(",") if k.strip()}))
        except ValueError:
            raise UserError(f"--ks {args.ks!r}: expected comma-separated integers such as 1,2,4,8") from None
        if not ks or ks[0] < 1:
            raise UserError(f"--ks {args.ks!r}: every K must be >= 1")
    path, model, cfg, state, device, (splits, _, _, test_set) = _load_for_eval(args)
    cfg.train.retrieval_ks = ks or tuple(int(k) for k in cfg.train.retrieval_ks)
    _, plain = build_augment(cfg, splits)
    t0 = time.perf_counter()
    metrics = evaluate_retrieval(model, test_set, plain, cfg, device, seed=args.seed)
    res = {"checkpoint": str(path), "epoch": state.get("epoch"), "images": len(test_set),
           "classes": int(test_set.labels.unique().numel()), **metrics, "eval_s": time.perf_counter() - t0}
    if args.json:
        print(json.dumps(res))
    else:
        from .train import eval_summary

        mapr = f"  MAP@R {res['map@r']:.2f}" if res["map@r"] is not None else ""
        print(f"{eval_summary(res)}{mapr}  on {res['images']} test images of {res['classes']} classes; "
              f"checkpoint epoch {res['epoch']}")
    return 0


def cmd_eval_linear(args) -> int:
    import torch

    from .evaluate import extract_features
    from .evaluate.linear import LinearRecipe, linear_probe
    from .train import build_augment

    if args.epochs < 1 or not args.lr > 0:
        raise UserError("--epochs must be >= 1 and --lr > 0")
    path, model, cfg, state, device, (splits, _, bank_set, test_set) = _load_for_eval(args)
    _, plain = build_augment(cfg, splits)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    kw = dict(batch_size=cfg.train.eval_batch_size, device=device, precision=cfg.train.precision,
              channels_last=cfg.train.channels_last, backbone_only=args.features == "backbone")
    train_x = extract_features(model, bank_set.images, plain, **kw)
    test_x = extract_features(model, test_set.images, plain, **kw)
    recipe = LinearRecipe(epochs=args.epochs, lr=args.lr)
    res = linear_probe(train_x, bank_set.labels.to(device), test_x, test_set.labels, len(bank_set.classes), recipe)
    # as MoCo's sanity check: the probe never touched the network
    after = model.state_dict()
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    if not unchanged:
        raise RuntimeError("the network's weights changed during the linear probe")
    out = {"checkpoint": str(path), "epoch": state.get("epoch"), "linear_top1": res["test_top1"],
           "linear_train_top1": res["train_top1"], "features": args.features, "feature_dim": int(train_x.shape[1]),
           "recipe": recipe.__dict__, "backbone_unchanged": unchanged, "eval_s": time.perf_counter() - t0}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"linear probe top-1 {res['test_top1']:.2f}% (train {res['train_top1']:.2f}%) on {args.features} "
              f"features ({train_x.shape[1]}-d); backbone weights unchanged: yes; checkpoint epoch {out['epoch']}")
    return 0


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="training-step throughput against the backbone's forward+backward limit")
    p.add_argument("--preset", default="cifar10-cpu")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--width", type=float)
    p.add_argument("--precision")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device")
    p.add_argument("--steps", type=int, default=20, help="timed steps per piece (after 3 warm-up steps)")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_bench(args) -> int:
    from .bench import run_bench
    from .config import preset

    cfg = preset(args.preset)
    for flag, (section, key) in {"batch_size": ("train", "batch_size"), "width": ("model", "width"),
                                 "precision": ("train", "precision"), "channels_last": ("train", "channels_last"),
                                 "device": ("train", "device")}.items():
        if getattr(args, flag) is not None:
            setattr(getattr(cfg, section), key, getattr(args, flag))
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    _set_threads(args.threads)
    res = run_bench(cfg, steps=args.steps)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"device {res['device']} ({res['threads']} threads), {res['arch']} width {res['width']}, "
          f"{res['precision']}{', channels_last' if res['channels_last'] else ''}, "
          f"batch {res['batch_instances']} instances = {res['images_per_step']} images/step")
    print(f"  training step        {res['step_images_per_s']:9.0f} images/s  ({res['step_ms']:.1f} ms)")
    print(f"  backbone fwd+bwd     {res['limit_images_per_s']:9.0f} images/s  ({res['limit_ms']:.1f} ms)  <- limit")
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
    from .config import PRESETS

    for name, fn in PRESETS.items():
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        print(f"{name:21s} {doc}")
        if args.verbose:
            print(json.dumps(fn().to_dict(), indent=2))
    return 0


def cmd_methods(args) -> int:
    from .objectives import methods

    for name, m in sorted(methods().items()):
        print(f"{name:16s} {m.summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="isif", description="Unsupervised embedding learning via Invariant and Spreading "
                                              "Instance Feature (Ye et al., CVPR 2019).")
    parser.add_argument("--version", action="version", version=f"isif {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)
    _race_parser(sub)
    _eval_parser(sub)
    _bench_parser(sub)
    _embed_parser(sub)
    _plot_parser(sub)
    _search_parser(sub)
    _export_parser(sub)
    pp = sub.add_parser("presets", help="list the named presets")
    pp.add_argument("-v", "--verbose", action="store_true", help="print each preset's full config")
    sub.add_parser("methods", help="list the training methods")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointWriteError
    from .train import Interrupted, TrainingDiverged

    try:
        args = build_parser().parse_args(argv)
        commands = {"train": cmd_train, "race": cmd_race, "eval": cmd_eval, "bench": cmd_bench, "embed": cmd_embed,
                    "search": cmd_search, "export": cmd_export,
                    "plot": cmd_plot, "presets": cmd_presets, "methods": cmd_methods}
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
