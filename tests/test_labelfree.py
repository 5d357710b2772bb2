"""The label-free metrics against naive float64 references written from their definitions, and known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from isif.evaluate import labelfree as lf


def _unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed),
                                                     dtype=torch.float64), dim=1)


def _naive(z1: np.ndarray, z2: np.ndarray, plain: np.ndarray) -> dict[str, float]:
    n = len(z1)
    top1 = top5 = 0
    for i in range(n):
        sims = [float(z1[i] @ z2[j]) for j in range(n)]
        better = sum(1 for j in range(n) if j != i and sims[j] >= sims[i])
        top1 += better < 1
        top5 += better < 5
    align = sum(float(((z1[i] - z2[i]) ** 2).sum()) for i in range(n)) / n

    def unif(z):
        vals = [math.exp(-2 * float(((z[i] - z[j]) ** 2).sum())) for i in range(n) for j in range(n) if i != j]
        return math.log(sum(vals) / len(vals))

    s = np.linalg.svd(plain, compute_uv=False)
    p = s / s.sum() + 1e-7
    neg = [float(z1[i] @ z1[j]) for i in range(n) for j in range(n) if i != j]
    return {"view_top1": 100 * top1 / n, "view_top5": 100 * top5 / n, "alignment": align,
            "uniformity": 0.5 * (unif(z1) + unif(z2)), "rankme": float(np.exp(-(p * np.log(p)).sum())),
            "pos_cos": float(np.mean([z1[i] @ z2[i] for i in range(n)])), "neg_cos": float(np.mean(neg))}


@pytest.mark.parametrize("noise", [0.05, 0.5, 2.0])
def test_metrics_match_the_naive_reference(noise, monkeypatch):
    monkeypatch.setattr(lf, "_BLOCK", 7)  # several blocks, a ragged last one
    z1 = _unit(40, 6, 1)
    z2 = torch.nn.functional.normalize(z1 + noise * _unit(40, 6, 2), dim=1)
    plain = _unit(40, 6, 3)
    got = lf.label_free_metrics(z1.float(), z2.float(), plain)
    want = _naive(z1.numpy(), z2.numpy(), plain.numpy())
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-5), k


def test_known_answers():
    eye = torch.eye(8, dtype=torch.float64)  # orthonormal: every pair at distance sqrt(2), cosine 0
    m = lf.label_free_metrics(eye, eye, eye)
    assert m["view_top1"] == 100 and m["view_top5"] == 100 and m["alignment"] == 0 and m["pos_cos"] == 1
    assert m["uniformity"] == pytest.approx(-4.0) and m["neg_cos"] == pytest.approx(0.0)
    assert m["rankme"] == pytest.approx(8.0, rel=1e-4)
    collapsed = torch.ones(8, 4, dtype=torch.float64) / 2  # every image at one point
    m = lf.label_free_metrics(collapsed, collapsed, collapsed)
    assert m["rankme"] == pytest.approx(1.0, rel=1e-4) and m["uniformity"] == pytest.approx(0.0)
    assert m["neg_cos"] == pytest.approx(1.0) and m["view_top1"] == 0  # ties count against: no view stands out
    swapped = lf.view_retrieval(eye, eye.roll(1, 0))  # each image's other view is someone else's
    assert swapped[1] == 0


def test_more_noise_reads_worse():
    z1 = _unit(200, 16)
    good = lf.label_free_metrics(z1, torch.nn.functional.normalize(z1 + 0.1 * _unit(200, 16, 5), dim=1), z1)
    bad = lf.label_free_metrics(z1, torch.nn.functional.normalize(z1 + 1.0 * _unit(200, 16, 5), dim=1), z1)
    assert good["view_top1"] > bad["view_top1"] and good["alignment"] < bad["alignment"]
    assert good["pos_cos"] > bad["pos_cos"]
