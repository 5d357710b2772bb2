"""``isif eval``: a checkpoint evaluated on its data, as one result dict per protocol."""

from __future__ import annotations

import time
from pathlib import Path

from ..base.device import resolve_device
from ..base.errors import UserError
from ..data.evaldata import load_eval_data
from ..data.input_spec import InputSpec
from ..data.registry import load_sets
from ..data.types import Sets
from ..evaluate.linear import LinearRecipe
from ..evaluate.protocol import Extractor, evaluate_knn, evaluate_linear, evaluate_retrieval
from ..training.checkpoint import load_trained, resolve_checkpoint


class Loaded:
    """A checkpoint's model, config, input spec and data, ready to evaluate: the features are extracted with the
    test transform of the checkpoint's input spec, the one training evaluated with (a timm backbone's own mean
    and std included), so ``isif eval`` gives the numbers of the run's own evaluation."""

    def __init__(self, checkpoint: str, data: str | None = None, device: str | None = None) -> None:
        self.path: Path = resolve_checkpoint(checkpoint)
        self.device = resolve_device(device or "auto")
        self.model, self.cfg, self.state = load_trained(self.path, self.device)
        self.cfg.train.device = str(self.device)
        if self.cfg.data.dataset == "unlabelled":  # which data: a run without labels is evaluated on other images
            self.spec, self.sets = self._labelled_for_unlabelled(data)
        else:
            if data is not None:
                self.cfg.data.path = data
            self.sets = load_sets(self.cfg.data)
            self.spec = InputSpec.from_checkpoint(self.state, self.cfg, self.sets.splits)
        t = self.cfg.train
        self.extractor = Extractor(self.spec.transform(), self.device, t.precision, t.channels_last,
                                   self.cfg.eval.batch_size)

    def _labelled_for_unlabelled(self, data: str | None) -> tuple[InputSpec, Sets]:
        """A run trained on unlabelled images is evaluated on labelled ones: ``data``, or its --eval-data."""
        path = data or self.cfg.data.eval_path
        if path is None:
            raise UserError("this run trained on unlabelled images: pass --data PATH to labelled ones (train/ and "
                            "test/ class folders for knn and linear, class folders for retrieval)")
        spec = InputSpec.in_checkpoint(self.state)
        if spec is None:
            raise UserError(f"{self.path} records no input size; evaluate it with the isif version that trained it")
        d = self.cfg.data
        bank, test = load_eval_data(path, spec.size, d.strict, d.workers, d.cache_dir)
        return spec, Sets(None, bank, bank, test.subset(d.test_subset))  # type: ignore[arg-type]

    def head(self) -> dict:
        return {"checkpoint": str(self.path), "epoch": self.state.get("epoch")}


def knn_result(ld: Loaded, k: int | None = None, sigma: float | None = None) -> dict:
    ev = ld.cfg.eval
    if k is not None:
        ev.knn_k = k
    if sigma is not None:
        ev.knn_sigma = sigma
    ld.cfg.validate()
    _need_bank(ld)
    if ev.knn_k > len(ld.sets.bank):
        raise UserError(f"--k {ev.knn_k} is larger than the training set ({len(ld.sets.bank)} images)")
    t0 = time.perf_counter()
    acc = evaluate_knn(ld.model, ld.sets.bank, ld.sets.test, ld.extractor, ev.knn_k, ev.knn_sigma, ev.engine)
    return {**ld.head(), "knn_top1": acc, "k": ev.knn_k, "sigma": ev.knn_sigma, "train_images": len(ld.sets.bank),
            "test_images": len(ld.sets.test), "eval_s": time.perf_counter() - t0}


def retrieval_result(ld: Loaded, ks: tuple[int, ...] | None = None, seed: int = 0) -> dict:
    ks = ks or tuple(int(k) for k in ld.cfg.eval.retrieval_ks)
    t0 = time.perf_counter()
    metrics = evaluate_retrieval(ld.model, ld.sets.test, ld.extractor, ks, seed, ld.cfg.eval.engine)
    return {**ld.head(), "images": len(ld.sets.test), "classes": int(ld.sets.test.labels.unique().numel()),
            **metrics, "eval_s": time.perf_counter() - t0}


def _need_bank(ld: Loaded) -> None:
    if ld.sets.bank is None:
        raise UserError("kNN and the linear probe need a labelled bank: --data with train/<class>/ and "
                        "test/<class>/ folders (one tree of class folders gives `isif eval retrieval`)")


def linear_result(ld: Loaded, recipe: LinearRecipe, features: str = "backbone") -> dict:
    _need_bank(ld)
    t0 = time.perf_counter()
    res = evaluate_linear(ld.model, ld.sets.bank, ld.sets.test, ld.extractor, recipe, backbone=features == "backbone")
    return {**ld.head(), "linear_top1": res["test_top1"], "linear_train_top1": res["train_top1"],
            "features": features, "feature_dim": res["feature_dim"], "recipe": recipe.__dict__,
            "backbone_unchanged": True, "eval_s": time.perf_counter() - t0}
