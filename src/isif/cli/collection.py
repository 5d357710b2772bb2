"""``isif embed``, ``index``, ``search``, ``cluster``, ``duplicates``, ``map``, ``export``, ``export-embeddings``,
``select``, ``label`` and ``audit``: thin commands over ``isif.collection``; the printing of their results."""

from __future__ import annotations

import json
import sys

from ..collection.audit import AuditOptions
from ..collection.cluster import ClusterOptions
from ..collection.duplicates import DuplicatesOptions
from ..collection.embedding import EmbedOptions
from ..collection.export import ExportOptions
from ..collection.index import IndexOptions
from ..collection.label import LabelOptions
from ..collection.maps import MapOptions
from ..collection.search import SearchOptions
from ..collection.select import SelectOptions
from ..collection.table import ExportEmbeddingsOptions
from .flags import Command


def run_embed(o: EmbedOptions) -> int:
    from ..collection.embedding import embed_folder

    res = embed_folder(o)
    if res.images:
        print(f"embedded {res.images} images ({res.dim}-d) into {res.out} (paths.txt, shards/); "
              f"{res.new} new or changed" + (f", skipped {res.skipped} unreadable" if res.skipped else ""))
    ix = res.index
    if ix:
        how = (f"extended with {ix['extended']:,} new rows" if "extended" in ix else
               "rebuilt (files were removed or changed)")
        print(f"the {ix['kind']} index {how}: {ix['images']:,} embeddings, {index_recall(ix)}")
        low = low_recall(ix)
        if low:
            print(f"isif: warning: {low}", file=sys.stderr)
    cal = res.calibration
    if cal:
        print(f"near-duplicate threshold: cosine {cal['threshold']:g}, measured on {cal['sample']} images and a copy "
              f"of each: {found_by_edit(cal)} of the copies at or above it, "
              f"{cal['lookalikes_above']:.1%} of the images with a second-nearest image that close")
    return 0


def found_by_edit(cal: dict) -> str:
    """"97% (jpeg 100%, resize 99%, mirror 95%, crop 90%)": the share of the calibration's copies found."""
    each = ", ".join(f"{e} {v['found']:.0%}" for e, v in cal["copies_by_edit"].items())
    return f"{cal['copies_found']:.0%} ({each})"


def run_index(o: IndexOptions) -> int:
    from ..collection.index import index_embed_dir

    meta = index_embed_dir(o)
    print(f"{meta['kind']} index of {meta['images']:,} embeddings {json.dumps(meta['params'])}: built in "
          f"{meta['build_s']:.1f} s, {meta['bytes_per_vector']:g} bytes a vector, {index_recall(meta)} against "
          f"exact search on {meta['recall_queries']} queries -> {o.embed_dir}/index.faiss")
    low = low_recall(meta)
    if low:
        print(f"isif: warning: {low}", file=sys.stderr)
    return 0


RECALL_FLOOR = 0.9


def low_recall(meta: dict) -> str | None:
    """One line when the index finds fewer than ``RECALL_FLOOR`` of the true 10 nearest, naming the flag that fixes
    it; None otherwise."""
    best = meta.get("recall@10_reranked") if meta.get("rerank") else meta["recall@10"]
    if best is None or best >= RECALL_FLOOR:
        return None
    from ..collection.index import INDEX_KINDS

    kind = meta["kind"]
    k = INDEX_KINDS.get(kind)
    fix = ("--rerank 100 (re-rank the 100 best on the float features)" if k and k.compressed and
           not meta.get("rerank") else k.recall_flag if k else "--kind exact")
    return (f"the {kind} index finds {best:.0%} of the true 10 nearest neighbours (Recall@10 {best:.4f}, under "
            f"{RECALL_FLOOR:g}); rebuild it with {fix}")


def index_recall(meta: dict) -> str:
    """"Recall@10 0.7712, 0.9981 re-ranking the 100 best on the float features": an index's measured recall."""
    out = f"Recall@10 {meta['recall@10']:.4f}"
    if meta.get("rerank"):
        out += f", {meta['recall@10_reranked']:.4f} re-ranking the {meta['rerank']} best on the float features"
    return out


def run_search(o: SearchOptions) -> int:
    from ..collection.search import search_images

    r = search_images(o)
    if o.json:
        print(json.dumps({"results": r.results, "grid": o.out}))
        return 0
    for q in r.results:
        print(q["query"])
        for rank, n in enumerate(q["neighbours"], start=1):
            mark = "" if "same_label" not in n else ("  same class" if n["same_label"] else "  other class")
            print(f"  {rank:3d}  {n['cosine']:.4f}  {n['path']}{mark}")
    print(f"grid of {min(len(r.rows), o.max_rows)} queries x {r.k} neighbours: {o.out}")
    return 0


def run_cluster(o: ClusterOptions) -> int:
    from ..collection.cluster import cluster_folder

    r = cluster_folder(o)
    print(f"{r.k} clusters (sizes {', '.join(map(str, r.sizes))}; inertia {r.inertia:.4f}) -> "
          f"{r.out}/clusters.csv, clusters.json and {r.sheets} contact sheets in clusters/")
    return 0


def run_duplicates(o: DuplicatesOptions) -> int:
    from ..collection.duplicates import duplicates_folder

    r = duplicates_folder(o)
    cal = r.calibration
    how = (f"calibrated: {found_by_edit(cal)} of {cal['sample']} sampled copies at or above it"
           if r.source == "calibrated" else "--threshold")
    print(f"{r.groups} near-duplicate groups, {r.images} images (the largest {r.largest}) at "
          f"cosine >= {r.threshold:g} ({how})" + (f" or perceptual hashes <= {o.hash_bits} bits apart" if r.hashed
                                                  else "") + f" -> {r.out}/duplicates.csv, .png and .json")
    if r.keep is not None:
        print(f"{r.keep:,} of the {r.collection:,} images to keep (each group's representative and every "
              f"image in no group) -> {o.keep}")
    for w in r.warnings:
        print(f"isif: warning: {w}", file=sys.stderr)
    return 0


def run_map(o: MapOptions) -> int:
    from ..collection.maps import LEGEND_MAX, map_folder

    r = map_folder(o)
    colour = f", {r.coloured_by}" if r.coloured_by else ""
    print(f"{r.method.upper()} map of {r.images} images ({r.thumbnails} thumbnails{colour}) -> "
          f"{r.png}; beside it map-full.png (to zoom into), map.csv and map.json")
    if r.umap_missing:
        print("placed by PCA since umap-learn is not installed; UMAP keeps neighbours closer: `pip install umap-learn`")
    if r.colour == "none" and r.classes > LEGEND_MAX:
        print(f"not coloured: {r.classes} folders are too many to tell apart; to colour by cluster, run "
              f"`isif cluster {o.embed_dir} --k K` first")
    return 0


def run_export(o: ExportOptions) -> int:
    from ..collection.export import export

    r = export(o)
    what = "architecture and input recipe" if r.format == "safetensors" else "preprocessing"
    print(f"exported {r.format} to {r.out} (input {r.input}); max |difference| vs the checkpoint "
          f"{r.max_abs_diff:.2e} on {r.checked} images; {what} in {r.spec}")
    return 0


def run_export_embeddings(o: ExportEmbeddingsOptions) -> int:
    from ..collection.table import export_embeddings

    r = export_embeddings(o)
    print(f"wrote {r.images:,} embeddings ({r.dim}-d) to {r.out}: columns {', '.join(r.columns)}")
    return 0


def run_select(o: SelectOptions) -> int:
    from ..collection.select import select_folder

    r = select_folder(o)
    how = f"{r.strategy} ({r.why})" if r.why else r.strategy
    pool = f" of a seeded pool of {r.pool:,}" if r.pool < r.images else ""
    around = f", around the {r.labelled_before:,} already labelled" if r.labelled_before else ""
    extra = ""
    if "radius" in r.detail:
        extra = (f"; radius {r.detail['radius']:.3f} ({r.detail['pure_balls']:.0%} of the balls pure), "
                 f"{r.detail['covered']:.0%} of the images covered")
    print(f"picked {r.budget:,} of {r.images:,} images{pool}{around} by {how}{extra} -> {r.out}/selection.csv"
          + (f" and selection.png (the first {r.drawn})" if r.drawn else ""))
    return 0


def run_audit(o: AuditOptions) -> int:
    from ..collection.audit import audit_folder

    r = audit_folder(o)
    print(f"audited {r.images:,} images (neighbours: {r.neighbours}) -> {r.out}/audit.csv"
          + (", audit-ISSUE.png" if o.sheet else ""))
    for name, n in r.counts.items():
        shown = "; ".join(f"{p} ({s:.3g})" if name != "unreadable" else p for p, s in r.worst.get(name, [])[:3])
        print(f"  {name:<16} {n:>8,}" + (f"   worst: {shown}" if n else ""))
    if r.leaks is not None:
        print(f"{r.leaks:,} images have a near-duplicate in {o.against} (cosine >= {r.leak_threshold:g}) -> "
              f"{r.out}/leaks.csv")
    return 0


def run_label(o: LabelOptions) -> int:
    from ..collection.label import label_folder

    r = label_folder(o)
    print(f"{len(r.classes)} classes, {r.given:,} images labelled by hand; {r.images - r.given:,} labelled by "
          f"{r.predictor} ({r.why}) -> {r.out}/labels.csv")
    if r.expected_accuracy is not None:
        print(f"expected accuracy {r.expected_accuracy:.1%} (out-of-fold on the given labels), calibration error "
              f"{r.ece:.3f}; {r.low_confidence:,} new labels under 0.5 confidence")
        print(f"{r.flagged:,} given labels flagged as likely wrong -> {r.out}/suspects.csv (all given labels, the "
              "likeliest wrong first)")
        for path, given, suggested, score in r.worst:
            print(f"  {score:.3f}  {path}: given {given}, looks like {suggested}")
    return 0


EMBED = Command("embed", "embed a folder of images: paths.txt and memory-mapped shards (resumable, incremental)",
                run_embed, EmbedOptions)
INDEX = Command("index", "a faiss index beside an embed folder, with its Recall@10 against exact search", run_index,
                IndexOptions)
SEARCH = Command("search", "nearest gallery images of query images; prints them and writes a PNG grid", run_search,
                 SearchOptions)
CLUSTER = Command("cluster", "k-means clusters of an embed folder: clusters.csv, clusters.json, one contact sheet "
                             "per cluster", run_cluster, ClusterOptions)
DUPLICATES = Command("duplicates", "near-duplicate groups of an embed folder: duplicates.csv and .png",
                     run_duplicates, DuplicatesOptions)
MAP = Command("map", "a map of an embed folder: thumbnails on a grid placed by UMAP or PCA; map.png, map-full.png, "
                     "map.csv, map.json", run_map,
              MapOptions)
EXPORT = Command("export", "export the embedding network to TorchScript or ONNX, or its weights to safetensors, "
                           "checked to 1e-5", run_export, ExportOptions)
SELECT = Command("select", "which images to label first, without labels (TypiClust, ProbCover, k-center, "
                           "random): selection.csv, selection.png", run_select, SelectOptions)
LABEL = Command("label", "a label for every image from a few given ones, with a calibrated confidence; the given "
                         "labels likeliest wrong: labels.csv, suspects.csv", run_label, LabelOptions)
AUDIT = Command("audit", "what not to train on: outliers, blurred, dark, bright, near-constant, odd and unreadable "
                         "images; with --against, near-duplicates in another collection: audit.csv, leaks.csv",
                run_audit, AuditOptions)
EXPORT_EMBEDDINGS = Command("export-embeddings", "an embed folder as Parquet (path, embedding, cluster, duplicate "
                                                 "group) for DuckDB, pandas, LanceDB", run_export_embeddings,
                             ExportEmbeddingsOptions)
