"""Which evaluation a run gets, and running it: kNN on seen classes, retrieval metrics on unseen ones.

Used alike by the training loop, ``isif eval``, ``isif race`` and the plots; the keys it writes are those of
``metrics.py``.
Features are extracted with the test transform (sharded under torchrun); the
metrics themselves are the pure functions of ``knn.py`` and ``retrieval.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..base.dist import SINGLE, World
from ..base.faults import fault_point
from ..base.settings import POSITIVE, at_least, one_of, setting
from ..data.types import ArrayDataset, Sets
from .engine import ENGINES
from .features import extract_features, sharded_features
from .knn import knn_accuracy
from .labelfree import holdout_embeddings, label_free_metrics
from .linear import LinearRecipe, linear_probe
from .metrics import recall_key
from .metrics import summary as summary  # a metrics row as one console line; isif eval imports it from here
from .retrieval import map_at_r, nmi, recall_at_k


@dataclass
class EvalConfig:
    every: int = setting(1, "evaluation every N epochs (always after the last)", check=at_least(1),
                         flag="--eval-every", resume=True)
    protocol: str = setting("auto", "knn, retrieval, auto (retrieval when the test classes are unseen), or none "
                                    "(no evaluation at all, label-free metrics included)",
                            check=one_of("auto", "knn", "retrieval", "none"), flag="--eval-protocol", resume=True)
    retrieval_ks: tuple[int, ...] = setting((1, 2, 4, 8), "K of Recall@K during training (SOP: 1,10,100)")
    knn_k: int = setting(200, "kNN neighbours", check=at_least(1))
    knn_sigma: float = setting(0.1, "kNN vote temperature sigma", check=POSITIVE)
    batch_size: int = setting(256, "images per forward pass when extracting features", check=at_least(1),
                              flag="--eval-batch-size", resume=True)
    features: str | None = setting(None, "the network's embedding, evaluated, embedded and exported: embedding (the "
                                         "128-d head) or backbone (the pooled features, L2-normalised); default: "
                                         "the method's own (embedding for isif and the paper's baselines, backbone "
                                         "for the successors)", check=one_of("embedding", "backbone"),
                                   flag="--eval-features")
    engine: str = setting("auto", "nearest-neighbour search of kNN, Recall@K, MAP@R and k-means (NMI, DeepCluster): "
                                  "torch, faiss (the same results; on the CPU, faster for retrieval and "
                                  "k-means), or auto (faiss for retrieval and k-means when installed and the "
                                  "features are on the CPU; kNN on torch, faster here)",
                          check=one_of(*ENGINES), flag="--eval-engine", resume=True)

    def check(self) -> None:
        if not self.retrieval_ks or not all(int(k) >= 1 for k in self.retrieval_ks):
            raise ValueError(f"--retrieval-ks values must be >= 1, got {self.retrieval_ks}")


@dataclass(frozen=True)
class Extractor:
    """How to embed images for evaluation: the test transform, device, precision and batch."""

    transform: Callable[[torch.Tensor], torch.Tensor]  # the test transform (PlainTransform)
    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    batch_size: int = 256
    world: World = SINGLE

    def __call__(self, model: nn.Module, images, backbone_only: bool = False) -> torch.Tensor:
        kw = dict(batch_size=self.batch_size, device=self.device, precision=self.precision,
                  channels_last=self.channels_last)
        if backbone_only:
            return extract_features(model, images, self.transform, backbone_only=True, **kw)
        return sharded_features(model, images, self.transform, self.world, **kw)


def protocol_for(cfg: EvalConfig, bank: ArrayDataset | None, test: ArrayDataset | None) -> str:
    """"knn" when the test classes were seen in training, "retrieval" when none of them was (or there is no
    bank), "none" without labelled test images or when evaluation is off."""
    if test is None or cfg.protocol == "none":
        return "none"
    if cfg.protocol != "auto":
        return cfg.protocol
    if bank is None:
        return "retrieval"
    seen = {bank.classes[int(c)] for c in torch.unique(bank.labels) if int(c) >= 0}
    tested = {test.classes[int(c)] for c in torch.unique(test.labels)}
    return "retrieval" if not seen & tested else "knn"


def evaluate_knn(model: nn.Module, bank: ArrayDataset, test: ArrayDataset, ex: Extractor, k: int = 200,
                 sigma: float = 0.1, engine: str = "auto") -> float:
    """The paper's kNN: bank features recomputed with the test transform, k=200, sigma=0.1 by default."""
    bank_z = ex(model, bank.images)
    fault_point("eval")
    query = ex(model, test.images)
    # auto keeps kNN on torch: at CIFAR-10's size faiss took 1.99 s against torch's 1.77 s here (k=200 puts many
    # boundaries within the rounding bound, 10.6% of the queries went back to the reference)
    engine = "torch" if engine == "auto" else engine
    return knn_accuracy(query, test.labels, bank_z, bank.labels, len(bank.classes), k, sigma, engine=engine)


def evaluate_retrieval(model: nn.Module, test: ArrayDataset, ex: Extractor, ks: tuple[int, ...] = (1, 2, 4, 8),
                       seed: int = 0, engine: str = "auto") -> dict[str, float | None]:
    """Recall@K, MAP@R and NMI on the test split, every test image a query against all the others."""
    feats = ex(model, test.images)
    fault_point("eval")
    labels = test.labels.to(feats.device)
    out: dict[str, float | None] = {recall_key(k): v
                                    for k, v in recall_at_k(feats, labels, ks, engine=engine).items()}
    multi = bool((torch.bincount(labels - labels.min()) > 1).any())
    out["map@r"] = map_at_r(feats, labels, engine=engine) if multi else None  # undefined: every class has one image
    out["nmi"] = nmi(feats, labels, seed=seed, engine=engine)
    return out


def evaluate(model: nn.Module, bank: ArrayDataset, test: ArrayDataset, ex: Extractor, cfg: EvalConfig,
             seed: int = 0) -> dict[str, float | None]:
    """The run's evaluation as metrics-row fields: kNN top-1, or the retrieval metrics on unseen classes."""
    if protocol_for(cfg, bank, test) == "retrieval":
        ks = tuple(int(k) for k in cfg.retrieval_ks)
        return {"knn_top1": None, **evaluate_retrieval(model, test, ex, ks, seed, cfg.engine)}
    return {"knn_top1": evaluate_knn(model, bank, test, ex, cfg.knn_k, cfg.knn_sigma, cfg.engine)}


def evaluate_sets(model: nn.Module, sets: Sets, ex: Extractor, augment: Callable, cfg: EvalConfig,
                  seed: int = 0) -> dict[str, float | None]:
    """A training run's evaluation: the labelled one (when there are labelled test images) and the label-free
    metrics on the held-out images (when there are some); nothing with ``--eval-protocol none``."""
    row: dict[str, float | None] = {}
    if protocol_for(cfg, sets.bank, sets.test) != "none":
        row.update(evaluate(model, sets.bank, sets.test, ex, cfg, seed))  # type: ignore[arg-type]
    if sets.holdout is not None and cfg.protocol != "none":
        t0 = time.perf_counter()
        z = holdout_embeddings(model, sets.holdout.images, augment, ex.transform, ex.device, ex.precision,
                               ex.channels_last, ex.batch_size)
        row.update(label_free_metrics(*z))
        row["holdout_s"] = time.perf_counter() - t0
    return row


def evaluate_linear(model: nn.Module, bank: ArrayDataset, test: ArrayDataset, ex: Extractor,
                    recipe: LinearRecipe, backbone: bool = True) -> dict[str, float]:
    """The linear probe on frozen features (pooled backbone features, or the embedding), checked as MoCo's
    sanity check: the probe must leave every weight of the network as it was."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_x = ex(model, bank.images, backbone_only=backbone)
    test_x = ex(model, test.images, backbone_only=backbone)
    res = linear_probe(train_x, bank.labels.to(train_x.device), test_x, test.labels, len(bank.classes), recipe)
    after = model.state_dict()
    if not all(torch.equal(before[k], after[k]) for k in before):
        raise RuntimeError("the network's weights changed during the linear probe")
    return {**res, "feature_dim": int(train_x.shape[1])}
