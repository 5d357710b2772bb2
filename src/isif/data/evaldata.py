"""Labelled images to evaluate on while training on unlabelled ones (``--eval-data PATH``).

Any labelled layout isif reads:

- ``cifar-10-batches-py``, or ``train/<class>/`` and ``test/<class>/`` (a folder or a .zip): the train
  images are the kNN bank and the test images the queries (the paper's protocol on seen classes). Images of
  one size are decoded once and held in memory (cached); mixed sizes are streamed;
- one tree of ``<class>/`` folders (a folder or a .zip): every image is a query against all the others,
  itself left out: Recall@K, MAP@R and NMI.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..base.errors import UserError
from . import cifar
from .class_split import listing
from .stream import FileImages, FileReader, scan_files
from .types import ArrayDataset
from .unlabelled import find_images

_LAYOUTS = "train/<class>/ and test/<class>/ folders, <class>/ folders, or cifar-10-batches-py"


def _streamed(names: list[str], labels: list[str], reader: FileReader, side: int, strict: bool,
              workers: int | None, cache_dir: Path | None, what: str) -> ArrayDataset:
    res = scan_files(names, strict, workers, cache_dir, what, reader, draft=side)
    keep = [i for i in range(len(names)) if i not in res.bad]
    lst = listing([(Path(names[i]), labels[i]) for i in keep])
    return ArrayDataset(FileImages([names[i] for i in keep], side, workers, fit="crop", reader=reader),
                        torch.tensor(lst.labels, dtype=torch.long), lst.classes)


def _in_memory(path: str, cache_dir: Path | None) -> tuple[ArrayDataset, ArrayDataset] | None:
    try:
        arrays, _ = cifar.load_arrays(path, "eval", cache_dir)
    except cifar.MixedSizes:
        return None
    return cifar.to_dataset(arrays, "train"), cifar.to_dataset(arrays, "test")


def load_eval_data(path: str, side: int, strict: bool = False, workers: int | None = None,
                   cache_dir: str | None = None) -> tuple[ArrayDataset | None, ArrayDataset]:
    """(kNN bank or None, labelled test set) from ``path``; streamed images are brought to ``side`` pixels."""
    cache = Path(cache_dir) if cache_dir else None
    p = Path(path).expanduser()
    if p.is_dir() and cifar.find_batches(p) is not None:
        return _in_memory(str(p), cache)  # type: ignore[return-value]
    found = find_images(p)
    root = str(p) if found.archive is None else ""
    rel = [Path(n).relative_to(root).parts if root else tuple(n.split("/")) for n in found.names]
    rel = [r[1:] if len(r) > 3 and r[1] in ("train", "test") and r[0] not in ("train", "test") else r for r in rel]
    reader = FileReader(found.archive)
    if any(len(r) >= 3 and r[0] == "train" for r in rel) and any(len(r) >= 3 and r[0] == "test" for r in rel):
        mem = _in_memory(str(p), cache)
        if mem is not None:
            return mem
        sets = []
        for split in ("train", "test"):
            idx = [i for i, r in enumerate(rel) if len(r) >= 3 and r[0] == split]
            sets.append(_streamed([found.names[i] for i in idx], [rel[i][1] for i in idx], reader, side, strict,
                                  workers, cache, f"--eval-data {split}"))
        return sets[0], sets[1]
    idx = [i for i, r in enumerate(rel) if len(r) >= 2]
    classes = {rel[i][0] for i in idx}
    if len(classes) < 2:
        raise UserError(f"--eval-data {path}: no labels found; evaluation needs {_LAYOUTS} (drop --eval-data to "
                        "train with the label-free metrics only)")
    test = _streamed([found.names[i] for i in idx], [rel[i][0] for i in idx], reader, side, strict, workers, cache,
                     "--eval-data")
    return None, test
