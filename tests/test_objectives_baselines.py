"""Baseline objectives against naive references, and generic checks over the whole registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from isif.evaluate.kmeans import kmeans
from isif.objectives import (
    NCE,
    DeepCluster,
    EpochContext,
    Exemplar,
    NPSoftmax,
    Triplet,
    build_objective,
    method_fields,
    methods,
)
from isif.objectives.contract import target_of


def unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=1)


# ----------------------------------------------------------------------------- memory bank methods


def test_npsoftmax_matches_reference_and_updates_bank():
    torch.manual_seed(0)
    crit = NPSoftmax(20, dim=8, temperature=0.07, momentum=0.5).double()
    mem = crit.bank.memory.clone()
    z = unit(5, 8, seed=1).requires_grad_(True)
    idx = torch.tensor([3, 0, 19, 7, 11])
    loss = crit(z, idx)
    ref = 0.0
    for b in range(5):
        e = [math.exp(float(z[b].detach() @ mem[j]) / 0.07) for j in range(20)]
        ref += -math.log(e[int(idx[b])] / sum(e))
    assert abs(loss.item() - ref / 5) < 1e-8
    expect = F.normalize(0.5 * mem[idx] + 0.5 * z.detach(), dim=1)
    assert torch.allclose(crit.bank.memory[idx], expect, atol=1e-12)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(crit.bank.memory[untouched], mem[untouched])
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_nce_matches_reference_including_normalising_constant():
    n, k, tau = 50, 7, 0.07
    torch.manual_seed(0)
    crit = NCE(n, dim=6, temperature=tau, momentum=0.5, noise=k).double()
    mem = crit.bank.memory.clone()
    z = unit(4, 6, seed=2)
    idx = torch.tensor([1, 5, 9, 49])
    torch.manual_seed(123)
    loss = crit(z, idx)
    torch.manual_seed(123)
    sample = torch.randint(0, n, (4, k + 1))
    sample[:, 0] = idx
    ex = torch.exp(torch.einsum("bkd,bd->bk", mem[sample], z) / tau)  # (B, K+1)
    zc = ex.mean().item() * n  # estimated on the first batch
    assert abs(math.exp(crit.log_z.item()) - zc) < 1e-6 * zc
    p = ex / zc
    pn = 1.0 / n
    ref = 0.0
    for b in range(4):
        ref += math.log(p[b, 0] / (p[b, 0] + k * pn))
        for j in range(1, k + 1):
            ref += math.log(k * pn / (p[b, j] + k * pn))
    assert abs(loss.item() - (-ref / 4)) < 1e-8
    # Z is kept from the first batch on
    before = crit.log_z.item()
    crit(unit(4, 6, seed=3), idx)
    assert crit.log_z.item() == before


# ----------------------------------------------------------------------------- exemplar, triplet, deepcluster


def test_exemplar_matches_reference():
    torch.manual_seed(0)
    crit = Exemplar(10, dim=4, temperature=0.1).double()
    z = unit(6, 4, seed=4)
    idx = torch.tensor([2, 7, 9])
    loss = crit(z, idx)
    w = crit.weight.detach()
    ref = 0.0
    for r in range(6):
        e = [math.exp(float(z[r] @ w[j]) / 0.1) for j in range(10)]
        ref += -math.log(e[int(idx[r % 3])] / sum(e))
    assert abs(loss.item() - ref / 6) < 1e-8


def _ref_triplet(z, margin, pick):
    n = z.shape[0]
    b = n // 2
    total = 0.0
    for a in range(n):
        p = (a + b) % n
        cands = [j for j in range(n) if j not in (a, p)]
        j = pick(a, cands)
        total += max(0.0, float((z[a] - z[p]).norm() - (z[a] - z[j]).norm()) + margin)
    return total / n


def test_triplet_hard_matches_reference():
    z = unit(8, 5, seed=5)
    loss = Triplet(0.5, "hard")(z)
    ref = _ref_triplet(z, 0.5, lambda a, c: min(c, key=lambda j: float((z[a] - z[j]).norm())))
    assert abs(loss.item() - ref) < 1e-6


def test_triplet_random_matches_reference_with_the_same_draws():
    z = unit(10, 5, seed=6)
    torch.manual_seed(7)
    loss = Triplet(0.5, "random")(z)
    torch.manual_seed(7)
    r = torch.randint(0, 8, (10,))
    ref = _ref_triplet(z, 0.5, lambda a, c: c[int(r[a])])
    assert abs(loss.item() - ref) < 1e-6


def test_triplet_zero_when_margin_satisfied():
    e = torch.eye(4, dtype=torch.float64)
    assert Triplet(0.5, "hard")(torch.cat([e, e])).item() == 0.0  # d(a,p)=0, d(a,n)=sqrt(2) > 0.5


def test_kmeans_recovers_separated_clusters_deterministically():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 3, generator=g) * 10
    truth = torch.arange(200) % 5
    x = centers[truth] + 0.1 * torch.randn(200, 3, generator=g)
    labels, cents = kmeans(x, 5, iters=30, seed=1)
    # the partition is the true one, up to renaming
    pairs = {(int(a), int(b)) for a, b in zip(truth, labels, strict=True)}
    assert len(pairs) == 5
    again, _ = kmeans(x, 5, iters=30, seed=1)
    assert torch.equal(labels, again)
    with pytest.raises(ValueError):
        kmeans(x, 201)


def test_deepcluster_assigns_pseudo_labels_and_resets_head():
    torch.manual_seed(0)
    crit = DeepCluster(40, dim=4, clusters=4, temperature=0.1, iters=10, seed=0)
    feats = torch.cat([F.normalize(torch.eye(4)[i].repeat(10, 1) + 0.01 * torch.randn(10, 4), dim=1)
                       for i in range(4)])
    opt = torch.optim.SGD(crit.parameters(), lr=0.1, momentum=0.9)
    crit(feats[:8], torch.arange(8)).backward()
    opt.step()
    assert len(opt.state) > 0
    crit.on_epoch_start(EpochContext(0, lambda: feats, opt))
    assert len({(i // 10, int(c)) for i, c in enumerate(crit.pseudo_labels)}) == 4
    assert all(p not in opt.state for p in crit.head.parameters())
    idx = torch.tensor([0, 15, 39])
    loss = crit(feats[idx], idx)
    ref = F.cross_entropy(crit.head(feats[idx]) / 0.1, crit.pseudo_labels[idx])
    assert torch.allclose(loss, ref)


# ----------------------------------------------------------------------------- the whole registry

TRAINABLE = sorted(m for m, e in methods().items() if e.trains)


SMALL = {"nce_noise": 16, "clusters": 4, "proj_hidden": 16, "proj_dim": 8, "pred_hidden": 4, "queue": 16,
         "prototypes": 16, "local_crops": 2}


def _make(name, n=32, dim=8, backbone=None):
    """Method ``name`` with small settings; a method with heads of its own gets features of width ``dim`` from
    ``backbone`` (default a fresh Linear(5, dim)), the network a momentum target copies."""
    torch.manual_seed(0)
    small = {k: v for k, v in SMALL.items() if k in method_fields(name)}
    backbone = backbone if backbone is not None else torch.nn.Linear(5, dim)
    return build_objective(name, num_instances=n, dim=dim, seed=0, features=dim, backbone=backbone, total_steps=10,
                           **small)


def _call(crit, z, idx, x=None, backbone=None):
    """The loop's call: with a momentum target, its features of the views ``x`` through ``backbone``."""
    if not hasattr(crit, "target_features"):
        return crit(z, idx)
    return crit(z, idx, target=target_of(crit, backbone, x))


def _batch(crit, b=6, dim=8, seed=0):
    v = len(crit.views)
    return unit(v * b, dim, seed=seed, dtype=torch.float32), torch.arange(b) * 3


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_method_gives_finite_loss_and_gradients_to_every_parameter(name):
    net = torch.nn.Linear(5, 8)
    crit = _make(name, backbone=net)
    x = torch.randn(len(crit.views) * 6, 5)
    trained = [p for p in crit.parameters() if p.requires_grad]  # a momentum target's are buffers of state
    opt = torch.optim.SGD(trained or [torch.nn.Parameter(torch.zeros(1))], 0.1)
    crit.on_epoch_start(EpochContext(0, lambda: F.normalize(torch.randn(32, 8), dim=1), opt))
    idx = torch.arange(6) * 3
    h = net(x) if getattr(crit, "input", "embedding") == "backbone" else F.normalize(net(x), dim=1)
    loss = _call(crit, h, idx, x, net)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for p in list(net.parameters()) + trained:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in crit.parameters() if not p.requires_grad)


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_method_state_round_trips(name):
    net = torch.nn.Linear(5, 8)
    a = _make(name, backbone=net)
    z, idx = _batch(a)
    x = torch.randn(z.shape[0], 5, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(list(a.parameters()) or [torch.nn.Parameter(torch.zeros(1))], 0.1)
    a.on_epoch_start(EpochContext(0, lambda: F.normalize(torch.randn(32, 8), dim=1), opt))
    torch.manual_seed(1)
    _call(a, z, idx, x, net)  # changes banks and queues, sets NCE's constant
    if hasattr(a, "after_step"):
        a.after_step(net)  # moves a momentum target and its step counter
    b = _make(name, backbone=torch.nn.Linear(5, 8))
    b.load_state_dict(a.state_dict())
    torch.manual_seed(2)
    la = _call(a, z, idx, x, net)
    torch.manual_seed(2)
    lb = _call(b, z, idx, x, net)
    assert torch.equal(la, lb)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_method_declares_views(name):
    crit = _make(name)
    crops = getattr(crit, "crops", {})
    assert len(crit.views) >= 1 and set(crit.views) <= {"augment", "plain"} | set(crops)
    if crops:  # multi-crop: views of one size are consecutive, so each size group is one batch of the network
        sides = [crops[v].side(32) if v in crops else 32 for v in crit.views]
        assert sides == sorted(sides, reverse=True), sides
    else:
        assert len(crit.views) in (1, 2)


def test_random_method_takes_no_step():
    crit = build_objective("random")
    assert methods()["random"].trains is False and crit.views == ()
