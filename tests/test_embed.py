"""isif embed: features of one's own images, with broken files skipped or, with --strict, refused."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from isif.cli import main
from isif.data.augment import PlainTransform
from isif.evaluate import extract_features
from isif.training.checkpoint import load_trained


def test_embed_folder_matches_the_model_and_handles_broken_files(tmp_path, image_tree, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "cifar10-tiny", "--dataset", "folder", "--data", str(image_tree), "--width",
                 "0.03125", "--batch-size", "8", "--knn-k", "5", "--epochs", "1", "--out", str(run), "--quiet"]) == 0
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(photos / ("sub" if i == 2 else ".") / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(photos / "wide.jpg")  # resized + cropped
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    capsys.readouterr()
    out = tmp_path / "emb"
    assert main(["embed", str(run), str(photos), "--out", str(out), "--batch-size", "2"]) == 0
    text = capsys.readouterr()
    assert "skipped 1 unreadable" in text.err and "embedded 4 images" in text.out
    z = np.load(out / "features.npy")
    paths = (out / "paths.txt").read_text().split()
    assert z.shape == (4, 128) and paths == ["0.png", "1.png", "sub/2.png", "wide.jpg"]
    assert np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    # the same images through the training-time feature extractor give the same embeddings
    model, cfg, state = load_trained(run)
    spec = state["input"]
    ref = extract_features(model, torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(),
                           PlainTransform(spec["size"], tuple(spec["mean"]), tuple(spec["std"])))
    assert np.allclose(z[:3], ref.numpy(), atol=1e-5)
    assert main(["embed", str(run), str(photos), "--out", str(out), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg: unreadable image" in err and err.count("\n") == 1
    assert main(["embed", str(run), str(tmp_path / "nowhere")]) == 2
