"""``isif eval knn | retrieval | linear`` and ``isif plot similarity``: thin commands over ``isif.collection``."""

from __future__ import annotations

import json
from pathlib import Path

from ..collection.options import KnnOptions, LinearOptions, RetrievalOptions, SimilarityOptions
from .flags import Command


def _loaded(o):
    from ..collection.evaluation import Loaded

    return Loaded(o.checkpoint, o.data, o.device)


def _show(o, res: dict, text: str) -> int:
    print(json.dumps(res) if o.json else text)
    return 0


def run_knn(o: KnnOptions) -> int:
    from ..collection.evaluation import knn_result

    res = knn_result(_loaded(o), o.k, o.sigma)
    return _show(o, res, f"kNN top-1 {res['knn_top1']:.2f}% (k={res['k']}, sigma={res['sigma']}) on "
                         f"{res['test_images']} test images, bank of {res['train_images']}; checkpoint epoch "
                         f"{res['epoch']}")


def run_retrieval(o: RetrievalOptions) -> int:
    from ..collection.evaluation import retrieval_result
    from ..evaluate.protocol import summary

    res = retrieval_result(_loaded(o), o.sorted_ks(), o.seed)
    mapr = f"  MAP@R {res['map@r']:.2f}" if res["map@r"] is not None else ""
    return _show(o, res, f"{summary(res)}{mapr}  on {res['images']} test images of {res['classes']} classes; "
                         f"checkpoint epoch {res['epoch']}")


def run_linear(o: LinearOptions) -> int:
    from ..collection.evaluation import linear_result
    from ..evaluate.linear import LinearRecipe

    res = linear_result(_loaded(o), LinearRecipe(epochs=o.epochs, lr=o.lr), o.features)
    return _show(o, res, f"linear probe top-1 {res['linear_top1']:.2f}% (train {res['linear_train_top1']:.2f}%) "
                         f"on {o.features} features ({res['feature_dim']}-d); backbone weights unchanged: yes; "
                         f"checkpoint epoch {res['epoch']}")


def run_similarity(o: SimilarityOptions) -> int:
    from ..collection.similarity import similarity_figure

    out = Path(o.out) if o.out else Path(o.run) / "similarity.png"
    stats = similarity_figure([o.run, *o.compare], out, o.images, o.data, o.device, o.seed)
    for name, st in stats.items():
        print(f"{name}: positives mean {st['pos_mean']:.3f}, negatives mean {st['neg_mean']:.3f}")
    print(f"wrote {out}")
    return 0


EVAL = Command("eval", "evaluate a checkpoint", sub_name="protocol", sub=(
    Command("knn", "weighted kNN top-1 on the test split", run_knn, KnnOptions),
    Command("retrieval", "Recall@K, MAP@R and NMI on the test split's classes (unseen in training)", run_retrieval,
            RetrievalOptions),
    Command("linear", "linear probe on frozen features", run_linear, LinearOptions),
))
PLOT = Command("plot", "figures from trained runs", sub_name="figure", sub=(
    Command("similarity", "cosine similarity of positives and negatives on the test set (Fig. 5)", run_similarity,
            SimilarityOptions),
))
