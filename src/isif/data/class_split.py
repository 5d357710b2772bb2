"""Class-disjoint retrieval sets: which images train and which test, by class.

Each reader returns ``{"train": Listing, "test": Listing}`` from the data
set's distributed layout, with the paper's split:

- CUB-200-2011 (``images.txt``, ``image_class_labels.txt``, ``images/``): classes 1-100 train, 101-200 test.
- Cars196 (``cars_annos.mat``, ``car_ims/``): classes 1-98 train, 99-196 test.
- Stanford Online Products (``Ebay_train.txt``, ``Ebay_test.txt``): the distributed split,
  11,318 classes train and 11,316 test.
- Any image folder: ``train/<class>/`` and ``test/<class>/``, or one folder of class folders whose
  sorted first half trains and second half tests.

Labels are re-numbered from 0 within each split, in the order of the original class ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..base.errors import UserError
from .decode import is_image_name


@dataclass
class Listing:
    paths: list[Path]
    labels: list[int]  # 0 .. num_classes - 1 within the split
    classes: list[str]  # original class names or ids, by label

    def __len__(self) -> int:
        return len(self.paths)


def listing(items: list[tuple[Path, str]], key=None) -> Listing:
    names = sorted({c for _, c in items}, key=key)
    index = {c: i for i, c in enumerate(names)}
    return Listing([p for p, _ in items], [index[c] for _, c in items], names)


def _need(root: Path, names: list[str], layout: str) -> None:
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise UserError(f"{root}: missing {', '.join(missing)}; expected the {layout}")


def read_cub(root: str | Path) -> dict[str, Listing]:
    root = Path(root)
    layout = "CUB-200-2011 layout: images.txt, image_class_labels.txt and images/"
    _need(root, ["images.txt", "image_class_labels.txt", "images"], layout)
    paths = dict(line.split(maxsplit=1) for line in (root / "images.txt").read_text().splitlines() if line.strip())
    labels = dict(line.split() for line in (root / "image_class_labels.txt").read_text().splitlines() if line.strip())
    split: dict[str, list[tuple[Path, str]]] = {"train": [], "test": []}
    for image_id in sorted(paths, key=int):
        c = int(labels[image_id])
        split["train" if c <= 100 else "test"].append((root / "images" / paths[image_id].strip(), str(c)))
    return {s: listing(v, key=int) for s, v in split.items()}


def read_cars(root: str | Path) -> dict[str, Listing]:
    root = Path(root)
    layout = "Cars196 layout: cars_annos.mat and car_ims/"
    _need(root, ["cars_annos.mat"], layout)
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError("reading cars_annos.mat needs scipy: pip install scipy") from None
    try:
        annos = loadmat(root / "cars_annos.mat", squeeze_me=True)["annotations"]
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"{root / 'cars_annos.mat'} is not a readable Cars196 annotation file ({e})") from None
    split: dict[str, list[tuple[Path, str]]] = {"train": [], "test": []}
    for a in annos:
        c = int(a["class"])
        split["train" if c <= 98 else "test"].append((root / str(a["relative_im_path"]), str(c)))
    return {s: listing(v, key=int) for s, v in split.items()}


def read_sop(root: str | Path) -> dict[str, Listing]:
    root = Path(root)
    layout = "Stanford Online Products layout: Ebay_train.txt, Ebay_test.txt and the image folders"
    _need(root, ["Ebay_train.txt", "Ebay_test.txt"], layout)
    out = {}
    for s in ("train", "test"):
        lines = (root / f"Ebay_{s}.txt").read_text().splitlines()[1:]  # header: image_id class_id super_class_id path
        items = []
        for line in lines:
            parts = line.split()
            if len(parts) == 4:
                items.append((root / parts[3], parts[1]))
        out[s] = listing(items, key=int)
    return out


def _class_dirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir())


def _images(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if is_image_name(p))


def read_class_folders(root: str | Path) -> dict[str, Listing]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder; expected train/<class>/ and test/<class>/, or <class>/ folders")
    if (root / "train").is_dir() and (root / "test").is_dir():
        return {s: listing([(p, c.name) for c in _class_dirs(root / s) for p in _images(c)])
                for s in ("train", "test")}
    classes = _class_dirs(root)
    if len(classes) < 2:
        raise UserError(f"{root}: expected train/<class>/ and test/<class>/, or at least two <class>/ folders")
    half = len(classes) // 2
    return {"train": listing([(p, c.name) for c in classes[:half] for p in _images(c)]),
            "test": listing([(p, c.name) for c in classes[half:] for p in _images(c)])}
