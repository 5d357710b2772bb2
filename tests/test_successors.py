"""The successors' losses against naive float64 references written from their papers' equations, closed forms,
gradients (gradcheck), stop-gradients and EMA targets that receive no gradient, and losses that fall."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from isif.objectives import build_objective
from isif.objectives.barlow_twins import barlow_twins_loss
from isif.objectives.byol import byol_loss
from isif.objectives.contract import target_of
from isif.objectives.moco import moco_loss
from isif.objectives.momentum import MomentumTarget, cosine_momentum
from isif.objectives.simclr import nt_xent
from isif.objectives.simsiam import simsiam_loss
from isif.objectives.vicreg import vicreg_loss

SUCCESSORS = ("simclr", "moco", "byol", "simsiam", "barlow-twins", "vicreg")


def rand(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape)).double()


def cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------- references, from the equations


def ref_nt_xent(p: np.ndarray, tau: float) -> float:
    n = len(p)
    b = n // 2
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        den = sum(math.exp(cos(p[i], p[k]) / tau) for k in range(n) if k != i)
        total += -math.log(math.exp(cos(p[i], p[pos]) / tau) / den)
    return total / n


def ref_barlow(z1: np.ndarray, z2: np.ndarray, lambd: float) -> float:
    b, d = z1.shape
    def std(z):
        m = z.mean(0)
        s = np.sqrt(((z - m) ** 2).mean(0) + 1e-5)
        return (z - m) / s
    a, c2 = std(z1), std(z2)
    total = 0.0
    for i in range(d):
        for j in range(d):
            cij = sum(a[n, i] * c2[n, j] for n in range(b)) / b
            total += (1 - cij) ** 2 if i == j else lambd * cij ** 2
    return total


def ref_vicreg(z1: np.ndarray, z2: np.ndarray, lam=25.0, mu=25.0, nu=1.0) -> float:
    b, d = z1.shape
    inv = sum((z1[n, j] - z2[n, j]) ** 2 for n in range(b) for j in range(d)) / (b * d)
    def var(z):
        return sum(max(0.0, 1 - math.sqrt(z[:, j].var(ddof=1) + 1e-4)) for j in range(d)) / d
    def cov(z):
        zc = z - z.mean(0)
        c = zc.T @ zc / (b - 1)
        return sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d
    return lam * inv + mu * (var(z1) + var(z2)) + nu * (cov(z1) + cov(z2))


def ref_moco(q: np.ndarray, k: np.ndarray, queue: np.ndarray, tau: float) -> float:
    total = 0.0
    for i in range(len(q)):
        pos = math.exp(q[i] @ k[i] / tau)
        neg = sum(math.exp(q[i] @ queue[j] / tau) for j in range(len(queue)))
        total += -math.log(pos / (pos + neg))
    return total / len(q)


def test_nt_xent_equals_its_reference_and_its_gradient_checks():
    p = rand(10, 6)
    assert float(nt_xent(p, 0.5)) == pytest.approx(ref_nt_xent(p.numpy(), 0.5), rel=1e-12)
    assert torch.autograd.gradcheck(lambda x: nt_xent(x, 0.5), (rand(6, 4, seed=1).requires_grad_(),))


def test_nt_xent_closed_form_with_orthogonal_pairs():
    """B = 2 instances on orthogonal axes, both views identical: each anchor has cos 1 to its positive and 0 to the
    two others, so l = -log(e^(1/t) / (e^(1/t) + 2))."""
    e = torch.eye(4, dtype=torch.float64)
    p = torch.cat([e[:2], e[:2]])
    t = 0.5
    assert float(nt_xent(p, t)) == pytest.approx(-math.log(math.exp(1 / t) / (math.exp(1 / t) + 2)), rel=1e-12)


def test_barlow_twins_equals_its_reference_and_closed_forms():
    z1, z2 = rand(12, 5), rand(12, 5, seed=1)
    assert float(barlow_twins_loss(z1, z2, 0.3)) == pytest.approx(ref_barlow(z1.numpy(), z2.numpy(), 0.3), rel=1e-10)
    # identical views whose columns are uncorrelated (orthogonal, zero-mean): C = I up to eps, loss ~ 0
    q = torch.linalg.qr(rand(16, 4, seed=2) - rand(16, 4, seed=2).mean(0))[0]
    q = q - q.mean(0)
    q = torch.linalg.qr(q)[0]
    assert float(barlow_twins_loss(q, q, 0.5)) < 1e-6
    # z2 = -z1: C = -I exactly (up to eps): on-diagonal (1 - (-1))^2 per dimension, no off-diagonal
    assert float(barlow_twins_loss(q, -q, 0.5)) == pytest.approx(4 * 4, rel=1e-3)
    assert torch.autograd.gradcheck(lambda a, b: barlow_twins_loss(a, b, 0.1),
                                    (rand(6, 3, seed=3).requires_grad_(), rand(6, 3, seed=4).requires_grad_()))


def test_vicreg_equals_its_reference_and_closed_forms():
    z1, z2 = rand(10, 4), rand(10, 4, seed=1)
    assert float(vicreg_loss(z1, z2)) == pytest.approx(ref_vicreg(z1.numpy(), z2.numpy()), rel=1e-10)
    # identical views, columns of std 3 (>= gamma) and uncorrelated: every term 0
    q = torch.linalg.qr(rand(16, 4, seed=2))[0]
    q = q - q.mean(0)
    q = torch.linalg.qr(q)[0] * 3 * math.sqrt(15)  # orthogonal columns of unbiased std 3
    assert float(vicreg_loss(q, q)) == pytest.approx(0.0, abs=1e-9)
    # a collapsed branch: every column constant, the variance term is 1 - sqrt(eps) per branch
    c = torch.ones(8, 3, dtype=torch.float64)
    assert float(vicreg_loss(c, c)) == pytest.approx(25 * 2 * (1 - math.sqrt(1e-4)), rel=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: vicreg_loss(a, b),
                                    (rand(6, 3, seed=3).requires_grad_(), rand(6, 3, seed=4).requires_grad_()))


def test_moco_equals_its_reference():
    q = torch.nn.functional.normalize(rand(5, 4), dim=1)
    k = torch.nn.functional.normalize(rand(5, 4, seed=1), dim=1)
    queue = torch.nn.functional.normalize(rand(7, 4, seed=2), dim=1)
    assert float(moco_loss(q, k, queue, 0.2)) == pytest.approx(ref_moco(q.numpy(), k.numpy(), queue.numpy(), 0.2),
                                                               rel=1e-12)


def test_simsiam_and_byol_send_no_gradient_to_their_targets():
    p1, p2, z1, z2 = (rand(6, 4, seed=s).requires_grad_() for s in range(4))
    loss = simsiam_loss(p1, p2, z1, z2)
    g = torch.autograd.grad(loss, (p1, p2, z1, z2), allow_unused=True)
    assert g[0] is not None and g[1] is not None and g[2] is None and g[3] is None
    # the value: -(cos(p1, z2) + cos(p2, z1)) / 2, averaged over rows
    ref = -np.mean([(cos(p1[i].detach().numpy(), z2[i].detach().numpy()) + cos(p2[i].detach().numpy(),
                                                                              z1[i].detach().numpy())) / 2
                    for i in range(6)])
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-12)
    loss = byol_loss(p1, p2, z1, z2)
    g = torch.autograd.grad(loss, (p1, p2, z1, z2), allow_unused=True)
    assert g[2] is None and g[3] is None
    ref = sum(np.mean([2 - 2 * cos(a[i].detach().numpy(), b[i].detach().numpy()) for i in range(6)])
              for a, b in ((p1, z2), (p2, z1)))
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-12)


def test_the_momentum_schedule_and_the_ema_update():
    assert cosine_momentum(0.996, 0, 100) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 50, 100) == pytest.approx(0.998)
    assert cosine_momentum(0.996, 100, 100) == pytest.approx(1.0)
    online_b, online_h = nn.Linear(3, 2).double(), nn.Linear(2, 2).double()
    t = MomentumTarget(online_b, online_h)
    assert all(not p.requires_grad for p in t.parameters())
    before = [p.clone() for p in t.parameters()]
    with torch.no_grad():
        for p in list(online_b.parameters()) + list(online_h.parameters()):
            p.add_(1.0)
    t.update(online_b, online_h, 0.9)
    online = list(online_b.parameters()) + list(online_h.parameters())
    for a, b, o in zip(t.parameters(), before, online, strict=True):
        assert torch.allclose(a, 0.9 * b + 0.1 * o)


@pytest.mark.parametrize("name", SUCCESSORS)
def test_each_successor_builds_from_the_registry_and_its_target_gets_no_gradient(name):
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 8)).double()
    obj = build_objective(name, num_instances=64, seed=0, features=8, backbone=backbone, total_steps=10,
                          **({"queue": 16} if name == "moco" else {})).double()
    assert obj.input == "backbone" and obj.embedding == "backbone" and obj.views == ("augment", "augment")
    x = rand(8, 12, seed=5)
    h = backbone(x)
    kw = {}
    if hasattr(obj, "target_features"):
        kw["target"] = target_of(obj, backbone, x)
    loss = obj(h, torch.arange(4), **kw)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in backbone.parameters())
    target = getattr(obj, "target", None)
    if target is not None:
        assert all(p.grad is None and not p.requires_grad for p in target.parameters())
        obj.after_step(backbone)


@pytest.mark.parametrize("name", SUCCESSORS)
def test_each_successor_lowers_its_loss_on_a_batch_it_can_overfit(name):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))
    obj = build_objective(name, num_instances=64, seed=0, features=8, backbone=backbone, total_steps=60,
                          **({"queue": 16} if name == "moco" else {}))
    params = [p for p in list(backbone.parameters()) + list(obj.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01 if name == "vicreg" else 0.05, momentum=0.9)  # VICReg: weights of 25
    g = torch.Generator().manual_seed(1)
    base = torch.randn(16, 12, generator=g)
    losses = []
    for _ in range(60):
        x = torch.cat([base + 0.1 * torch.randn(16, 12, generator=g), base + 0.1 * torch.randn(16, 12, generator=g)])
        kw = {"target": target_of(obj, backbone, x)} if hasattr(obj, "target_features") else {}
        loss = obj(backbone(x), torch.arange(16), **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hasattr(obj, "after_step"):
            obj.after_step(backbone)
        losses.append(float(loss.detach()))
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.03 * abs(np.mean(losses[:10])), (name, losses[:3],
                                                                                               losses[-3:])


def test_a_queue_longer_than_the_training_set_is_refused():
    backbone = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="longer than the training set"):
        build_objective("moco", num_instances=100, features=4, backbone=backbone, queue=4096)
