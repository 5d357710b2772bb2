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
from isif.objectives.contract import Crop, select_views, target_of
from isif.objectives.dino import dino_loss, teacher_temperature
from isif.objectives.moco import moco_loss
from isif.objectives.momentum import MomentumTarget, cosine_momentum
from isif.objectives.simclr import nt_xent
from isif.objectives.simsiam import simsiam_loss
from isif.objectives.vicreg import vicreg_loss

SUCCESSORS = ("simclr", "moco", "byol", "simsiam", "barlow-twins", "vicreg", "dino")
SMALL = {"moco": {"queue": 16}, "dino": {"prototypes": 16, "proj_hidden": 32, "proj_dim": 8, "local_crops": 2}}


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
    return lam * inv + mu * (var(z1) + var(z2)) / 2 + nu * (cov(z1) + cov(z2))  # the official code averages v


def ref_dino(s: np.ndarray, t: np.ndarray, c: np.ndarray, tau_s: float, tau_t: float, views: int) -> float:
    """DINO's loss from the paper's Algorithm 1: for every global teacher view a and student view v != a, the
    cross-entropy H(P_t, P_s) = -sum_k P_t,k log P_s,k, averaged over the batch, then over the pairs."""
    b = len(t) // 2
    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()
    total, pairs = 0.0, 0
    for a in range(2):
        for v in range(views):
            if v == a:
                continue
            h = 0.0
            for i in range(b):
                pt = softmax((t[a * b + i] - c) / tau_t)
                ps = softmax(s[v * b + i] / tau_s)
                h += -sum(pt[k] * math.log(ps[k]) for k in range(len(pt)))
            total += h / b
            pairs += 1
    return total / pairs


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
    # both branches collapsed: every column constant, the variance term is 1 - sqrt(eps) per branch, averaged
    c = torch.ones(8, 3, dtype=torch.float64)
    assert float(vicreg_loss(c, c)) == pytest.approx(25 * (1 - math.sqrt(1e-4)), rel=1e-12)
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
                          **SMALL.get(name, {})).double()
    assert obj.input == "backbone" and obj.embedding == "backbone"
    assert obj.views == (("augment", "augment") if name != "dino" else ("global", "global", "local", "local"))
    x = rand(4 * len(obj.views), 12, seed=5)
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
    # DINO: the loss is H(P_t) + KL(P_t || P_s), and on 16 points the teacher and student fall together to the
    # uniform distribution (the collapse that centring trades against sharpening); with the teacher held still
    # (m = 1) the student must lower its KL to it
    fixed = {"target_momentum": 1.0} if name == "dino" else {}
    obj = build_objective(name, num_instances=64, seed=0, features=8, backbone=backbone, total_steps=60,
                          **SMALL.get(name, {}), **fixed)
    params = [p for p in list(backbone.parameters()) + list(obj.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01 if name == "vicreg" else 0.05, momentum=0.9)  # VICReg: weights of 25
    g = torch.Generator().manual_seed(1)
    base = torch.randn(16, 12, generator=g)
    losses = []
    for _ in range(60):
        x = torch.cat([base + 0.1 * torch.randn(16, 12, generator=g) for _ in obj.views])
        kw = {"target": target_of(obj, backbone, x)} if hasattr(obj, "target_features") else {}
        entropy = _teacher_entropy(obj, kw["target"]) if name == "dino" else 0.0
        loss = obj(backbone(x), torch.arange(16), **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hasattr(obj, "after_step"):
            obj.after_step(backbone)
        losses.append(float(loss.detach()) - entropy)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.03 * abs(np.mean(losses[:10])), (name, losses[:3],
                                                                                               losses[-3:])


def _teacher_entropy(obj, target) -> float:
    """DINO's loss is H(P_t) + KL(P_t || P_s): the centring raises the teacher's entropy on purpose, so what the
    student can lower is the KL, the loss less the entropy of the teacher (with the centre before this step's
    update)."""
    with torch.no_grad():
        q = torch.softmax((obj.target.head(target) - obj.center) / obj.teacher_temp(), dim=1)
        return float(-(q * q.clamp_min(1e-30).log()).sum(1).mean())


def test_a_queue_longer_than_the_training_set_is_refused():
    backbone = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="longer than the training set"):
        build_objective("moco", num_instances=100, features=4, backbone=backbone, queue=4096)


# ----------------------------------------------------------------------------- DINO


def test_dino_loss_equals_its_reference_and_its_gradient_checks():
    b, k, views = 3, 5, 4
    s, t, c = rand(views * b, k), rand(2 * b, k, seed=1), rand(k, seed=2)
    got = dino_loss(s, t, c, 0.1, 0.04, views)
    assert float(got) == pytest.approx(ref_dino(s.numpy(), t.numpy(), c.numpy(), 0.1, 0.04, views), rel=1e-12)
    assert torch.autograd.gradcheck(lambda x: dino_loss(x, t, c, 0.1, 0.07, views), (s.clone().requires_grad_(),))
    # the teacher is a target: no gradient reaches it
    tt = t.clone().requires_grad_()
    assert torch.autograd.grad(dino_loss(s.clone().requires_grad_(), tt, c, 0.1, 0.04, views), tt,
                               allow_unused=True)[0] is None


def test_dino_closed_forms():
    """A student that says nothing (equal logits) scores log K whatever the teacher says; a teacher whose centred
    outputs are equal is uniform, and the loss is the student's mean log-sum-exp minus its mean logit; a sharp
    teacher that picks the student's own arg-max of one-hot logits scores log(1 + (K-1) e^(-1/tau_s))."""
    k, b = 6, 2
    t = rand(2 * b, k, seed=3)
    assert float(dino_loss(torch.zeros(3 * b, k, dtype=torch.float64), t, torch.zeros(k), 0.1, 0.04, 3)) \
        == pytest.approx(math.log(k), rel=1e-12)
    s = rand(3 * b, k, seed=4)
    flat = torch.ones(2 * b, k, dtype=torch.float64)
    expect = np.mean([float(torch.logsumexp(s[r] / 0.1, 0) - (s[r] / 0.1).mean())
                      for a in range(2) for v in range(3) if v != a for r in range(v * b, (v + 1) * b)])
    assert float(dino_loss(s, flat, torch.zeros(k), 0.1, 0.04, 3)) == pytest.approx(expect, rel=1e-12)
    one_hot = torch.eye(k, dtype=torch.float64)[[0, 1]].repeat(3, 1)  # instance i: axis i in every view
    got = dino_loss(one_hot, one_hot[: 2 * b] * 1e3, torch.zeros(k), 0.1, 0.04, 3)
    assert float(got) == pytest.approx(math.log(1 + (k - 1) * math.exp(-1 / 0.1)), rel=1e-9)


def test_dino_teacher_temperature_warms_up_and_the_centre_follows_the_teacher():
    assert teacher_temperature(0.04, 0.07, 0.3, 0, 100) == pytest.approx(0.04)
    assert teacher_temperature(0.04, 0.07, 0.3, 15, 100) == pytest.approx(0.055)
    assert teacher_temperature(0.04, 0.07, 0.3, 30, 100) == pytest.approx(0.07)
    assert teacher_temperature(0.04, 0.07, 0.3, 99, 100) == pytest.approx(0.07)
    assert teacher_temperature(0.04, 0.07, 0.0, 0, 100) == pytest.approx(0.07)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 8)).double()
    obj = build_objective("dino", features=8, backbone=backbone, total_steps=10, center_momentum=0.9,
                          **SMALL["dino"]).double()
    x = rand(4 * 4, 12, seed=6)
    target = target_of(obj, backbone, x)
    teacher = obj.target.head(target)
    before = obj.center.clone()
    obj(backbone(x), None, target=target)
    assert torch.allclose(obj.center, 0.9 * before + 0.1 * teacher.detach().mean(0), atol=1e-12)
    obj.eval()  # outside training (an evaluation's loss) the centre stays
    c = obj.center.clone()
    obj(backbone(x), None, target=target)
    assert torch.equal(obj.center, c)
    assert obj.teacher_temp() == pytest.approx(0.04)
    for _ in range(3):
        obj.after_step(backbone)
    assert int(obj.steps) == 3 and obj.teacher_temp() == pytest.approx(0.07)  # 30% of 10 steps


def test_dino_head_last_layer_has_unit_rows_and_its_teacher_sees_the_global_views():
    from isif.objectives.dino import DINOHead

    head = DINOHead(8, 16, 4, 10).double()
    h = rand(5, 8)
    z = torch.nn.functional.normalize(head.mlp(h), dim=1)
    w = head.last / head.last.norm(dim=1, keepdim=True)
    assert torch.allclose(head(h), z @ w.T, atol=1e-12)
    assert float(head(h).abs().max()) <= 1 + 1e-12  # a cosine
    groups = [rand(2 * 3, 4, seed=1), rand(2 * 3, 2, seed=2)]  # two global views of 3 images, two local ones
    assert torch.equal(select_views([groups[0]], (0, 1), 2), groups[0])
    assert torch.equal(select_views(rand(6, 2), (1,), 2), rand(6, 2)[3:])
    assert Crop(relative=96 / 224).side(32) == 16 and Crop(relative=96 / 224).side(224) == 96
    assert Crop(relative=96 / 224).side(64) == 24 and Crop(size=12).side(32) == 12 and Crop().side(40) == 40
    assert Crop(relative=0.1).side(16) == 8  # never below 8


def test_multi_crop_views_are_batched_per_size_and_the_step_runs_them_in_one_call():
    from isif.data.types import ArrayDataset, Splits
    from isif.training.presets import resolve
    from isif.training.step import build_parts, make_views, train_step

    from .conftest import use_method

    cfg = use_method(resolve("cifar10-tiny", {"model.width": 0.0625, "train.batch_size": 4,
                                              "train.precision": "fp32"}), "dino")
    images = torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    data = ArrayDataset(images, torch.zeros(8, dtype=torch.long), ["x"])
    parts = build_parts(cfg, Splits(data, data, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), 8, torch.device("cpu"))
    assert parts.views == ("global", "global", "local", "local") and parts.view_sides() == [32, 32, 16, 16]
    assert parts.crops["global"].crop_scale == (0.4, 1.0) and parts.crops["local"].crop_scale == (0.05, 0.4)
    views = make_views(parts, images[:4], torch.Generator().manual_seed(1))
    assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32), (8, 3, 16, 16)]
    again = make_views(parts, images[:4], torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(views, again, strict=True))
    h = parts.model(views, part="backbone")  # one call: each size group through the backbone, rows in view order
    assert torch.allclose(h, torch.cat([parts.model(v, part="backbone") for v in views]), atol=1e-6)
    before = {k: v.clone() for k, v in parts.objective.state_dict().items()}
    loss = train_step(parts, images[:4], torch.arange(4), torch.Generator().manual_seed(2))
    assert torch.isfinite(loss) and int(parts.objective.steps) == 1
    assert not torch.equal(parts.objective.center, before["center"])
    assert not torch.equal(parts.objective.target.head.last, before["target.head.last"])  # the teacher followed
