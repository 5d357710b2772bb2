"""Class-disjoint splits of CUB-200-2011, Cars196, SOP and image folders, on fixtures in the real layouts."""

from __future__ import annotations

import numpy as np
import pytest

from isif.base.errors import UserError
from isif.data.class_split import read_cars, read_class_folders, read_cub, read_sop


def test_cub_layout_splits_classes_1_100_and_101_200(tmp_path):
    root = tmp_path / "CUB_200_2011"
    (root / "images").mkdir(parents=True)
    lines, labels = [], []
    image_id = 0
    for c in range(1, 201):
        for k in range(2 if c % 2 else 1):
            image_id += 1
            lines.append(f"{image_id} {c:03d}.Bird_{c}/Bird_{c}_{k}.jpg")
            labels.append(f"{image_id} {c}")
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    s = read_cub(root)
    assert len(s["train"].classes) == 100 and len(s["test"].classes) == 100
    assert s["train"].classes[0] == "1" and s["test"].classes[0] == "101"
    assert len(s["train"]) == 150 and len(s["test"]) == 150
    assert s["test"].paths[0].name == "Bird_101_0.jpg" and set(s["test"].labels) == set(range(100))
    (root / "images.txt").unlink()
    with pytest.raises(UserError, match="missing images.txt; expected the CUB-200-2011 layout"):
        read_cub(root)


def test_cars_layout_splits_classes_1_98_and_99_196(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "cars"
    (root / "car_ims").mkdir(parents=True)
    n = 196 * 2
    rec = np.zeros(n, dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")])
    for i in range(n):
        rec[i] = (f"car_ims/{i + 1:06d}.jpg", np.uint8(i // 2 + 1), np.uint8(i % 2))
    savemat(root / "cars_annos.mat", {"annotations": rec})
    s = read_cars(root)
    assert len(s["train"].classes) == 98 and len(s["test"].classes) == 98
    assert len(s["train"]) == 196 and len(s["test"]) == 196
    assert s["train"].paths[0] == root / "car_ims" / "000001.jpg" and s["test"].classes[0] == "99"
    with pytest.raises(UserError, match="Cars196 layout"):
        read_cars(tmp_path / "nothing")


def test_sop_layout_uses_the_distributed_split(tmp_path):
    root = tmp_path / "Stanford_Online_Products"
    root.mkdir()
    head = "image_id class_id super_class_id path\n"
    (root / "Ebay_train.txt").write_text(head + "".join(
        f"{i} {i // 2 + 1} 1 bicycle_final/{i}.JPG\n" for i in range(1, 9)))
    (root / "Ebay_test.txt").write_text(head + "".join(
        f"{i} {i // 3 + 100} 2 chair_final/{i}.JPG\n" for i in range(9, 18)))
    s = read_sop(root)
    assert s["train"].classes == ["1", "2", "3", "4", "5"] and len(s["train"]) == 8
    assert s["test"].classes == ["103", "104", "105"] and len(s["test"]) == 9
    assert s["test"].paths[0] == root / "chair_final" / "9.JPG"


def test_class_folders_train_test_or_split_in_half(tmp_path):
    for c in ("a", "b", "c", "d"):
        d = tmp_path / "flat" / c
        d.mkdir(parents=True)
        for k in range(3):
            (d / f"{k}.png").write_bytes(b"x")
    s = read_class_folders(tmp_path / "flat")
    assert s["train"].classes == ["a", "b"] and s["test"].classes == ["c", "d"] and len(s["test"]) == 6
    (tmp_path / "tt" / "train" / "x").mkdir(parents=True)
    (tmp_path / "tt" / "test" / "y").mkdir(parents=True)
    (tmp_path / "tt" / "train" / "x" / "1.jpg").write_bytes(b"x")
    (tmp_path / "tt" / "test" / "y" / "2.jpg").write_bytes(b"x")
    s = read_class_folders(tmp_path / "tt")
    assert s["train"].classes == ["x"] and s["test"].classes == ["y"]
    with pytest.raises(UserError, match="no such folder"):
        read_class_folders(tmp_path / "missing")
