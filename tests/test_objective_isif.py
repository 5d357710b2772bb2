"""InvariantSpreading against naive per-element references written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from isif.objectives import InvariantSpreading, build_objective, methods


def unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=1)


def ref_official(x: torch.Tensor, tau: float, negm: float = 1.0) -> torch.Tensor:
    """BatchCriterion as PAPER.md describes it, one scalar at a time; keys are detached."""
    n = x.shape[0]
    b = n // 2
    keys = x.detach()
    total = x.new_zeros(())
    for a in range(n):
        pos = (a + b) % n
        e = [torch.exp(x[a] @ keys[j] / tau) for j in range(n)]
        if negm == 1.0:
            den = sum(e[j] for j in range(n) if j != a)
        else:
            den = negm * sum(e[j] for j in range(n) if j not in (a, pos)) + e[pos]
        total = total + torch.log(e[pos] / den)
        for j in range(n):
            if j not in (a, pos):
                total = total + negm * torch.log(1 - e[j] / den)
    return -total / n


def ref_paper(z: torch.Tensor, tau: float, negm: float = 1.0) -> torch.Tensor:
    """Eq. 7: rows 0..B-1 are f, rows B..2B-1 are f^; every sum over k includes the self term."""
    b = z.shape[0] // 2
    f, fh = z[:b], z[b:]
    total = z.new_zeros(())
    for i in range(b):
        den = sum(torch.exp(f[k] @ fh[i] / tau) for k in range(b))
        total = total + torch.log(torch.exp(f[i] @ fh[i] / tau) / den)
    for j in range(b):
        den = sum(torch.exp(f[k] @ f[j] / tau) for k in range(b))
        for i in range(b):
            if i != j:
                total = total + negm * torch.log(1 - torch.exp(f[i] @ f[j] / tau) / den)
    return -total / b


@pytest.mark.parametrize("negm", [1.0, 2.0, 3.5])
@pytest.mark.parametrize("tau", [0.1, 0.5])
@pytest.mark.parametrize("b", [2, 5])
def test_official_matches_reference_value_and_gradient(b, tau, negm):
    x = unit(2 * b, 16, seed=b).requires_grad_(True)
    loss = InvariantSpreading(tau, "official", negm)(x, torch.arange(b))
    (g,) = torch.autograd.grad(loss, x)
    x2 = x.detach().clone().requires_grad_(True)
    ref = ref_official(x2, tau, negm)
    (g_ref,) = torch.autograd.grad(ref, x2)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - ref.item()) < 1e-8
    assert torch.allclose(g, g_ref, atol=1e-8, rtol=0)


@pytest.mark.parametrize("negm", [1.0, 2.0])
@pytest.mark.parametrize("tau", [0.1, 0.5])
@pytest.mark.parametrize("b", [2, 5])
def test_paper_matches_reference_value_and_gradient(b, tau, negm):
    z = unit(2 * b, 16, seed=10 + b).requires_grad_(True)
    loss = InvariantSpreading(tau, "paper", negm)(z)
    (g,) = torch.autograd.grad(loss, z)
    z2 = z.detach().clone().requires_grad_(True)
    ref = ref_paper(z2, tau, negm)
    (g_ref,) = torch.autograd.grad(ref, z2)
    assert abs(loss.item() - ref.item()) < 1e-8
    assert torch.allclose(g, g_ref, atol=1e-8, rtol=0)


def test_official_gradient_flows_only_through_anchor_rows():
    """With keys detached, row a's gradient comes from row a's own terms alone."""
    b, tau = 4, 0.1
    x = unit(2 * b, 8, seed=3).requires_grad_(True)
    (g,) = torch.autograd.grad(InvariantSpreading(tau)(x), x)

    # the same formula with nothing detached has a different gradient, so the check can fail
    def undetached(y):
        logits = y @ y.t() / tau
        n = y.shape[0]
        eye = torch.eye(n, dtype=torch.bool)
        logits = logits.masked_fill(eye, float("-inf"))
        pos = (torch.arange(n) + b) % n
        logp = logits - torch.logsumexp(logits, 1, keepdim=True)
        mask = ~eye
        mask[torch.arange(n), pos] = False
        return -(logp[torch.arange(n), pos].sum() + torch.log1p(-logp.exp())[mask].sum()) / n

    y = x.detach().clone().requires_grad_(True)
    (g_full,) = torch.autograd.grad(undetached(y), y)
    assert abs(undetached(y).item() - InvariantSpreading(tau)(x).item()) < 1e-10  # same value
    assert (g - g_full).abs().max() > 1e-3  # different gradient: the key side carries none

    # row by row: the gradient of row a equals that of loss_a with every other row held constant
    for a in range(2 * b):
        xa = x.detach().clone().requires_grad_(True)
        others = x.detach()
        rows = [xa[a] if j == a else others[j] for j in range(2 * b)]
        stacked = torch.stack(rows)
        n = 2 * b
        pos = (a + b) % n
        e = [torch.exp(stacked[a] @ others[j] / tau) for j in range(n)]
        den = sum(e[j] for j in range(n) if j != a)
        la = torch.log(e[pos] / den) + sum(torch.log(1 - e[j] / den) for j in range(n) if j not in (a, pos))
        (ga,) = torch.autograd.grad(-la / n, xa)
        assert torch.allclose(g[a], ga[a], atol=1e-10)


def test_closed_form_identical_views_orthogonal_instances():
    b, tau = 6, 0.1
    e = torch.eye(16, dtype=torch.float64)[:b]  # orthonormal instances
    z = torch.cat([e, e])
    den = math.exp(1 / tau) + (2 * b - 2)
    expect = -(math.log(math.exp(1 / tau) / den) + (2 * b - 2) * math.log(1 - 1 / den))
    assert abs(InvariantSpreading(tau, "official")(z).item() - expect) < 1e-10
    d = math.exp(1 / tau) + b - 1
    expect_paper = -(math.log(math.exp(1 / tau) / d) + (b - 1) * math.log(1 - 1 / d))
    assert abs(InvariantSpreading(tau, "paper")(z).item() - expect_paper) < 1e-10


def test_perfect_embedding_beats_collapsed_and_swapped():
    b = 4
    e = torch.eye(8, dtype=torch.float64)[:b]
    crit = InvariantSpreading(0.1)
    good = crit(torch.cat([e, e])).item()
    collapsed = crit(torch.cat([e[:1].repeat(b, 1), e[:1].repeat(b, 1)])).item()
    swapped = crit(torch.cat([e, e.roll(1, 0)])).item()
    assert good < collapsed and good < swapped


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_loss_falls_on_a_batch_it_can_overfit(variant):
    torch.manual_seed(0)
    x = torch.randn(16, 20)
    net = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    crit = InvariantSpreading(0.1, variant)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for _ in range(150):
        v1 = x if variant == "paper" else x + 0.1 * torch.randn_like(x)
        v2 = x + 0.1 * torch.randn_like(x)
        z = F.normalize(net(torch.cat([v1, v2])), dim=1)
        loss = crit(z)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_low_precision_is_stable_and_close_to_fp32(variant):
    z = unit(256, 128, seed=1, dtype=torch.float32)
    z[128:] = F.normalize(z[:128] + 0.05 * torch.randn(128, 128), dim=1)  # near-identical views: large logits
    crit = InvariantSpreading(0.05, variant)
    ref = crit(z).item()
    for dtype in (torch.bfloat16, torch.float16):
        low = z.to(dtype).requires_grad_(True)
        loss = crit(low)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(low.grad.float()).all()
        assert abs(loss.item() - ref) < 0.02 * abs(ref) + 0.02


@pytest.mark.parametrize(
    "kwargs, z, match",
    [
        ({"temperature": 0.0}, None, "temperature"),
        ({"temperature": -0.1}, None, "temperature"),
        ({"temperature": float("nan")}, None, "temperature"),
        ({"variant": "nope"}, None, "variant"),
        ({"neg_weight": 0.0}, None, "neg_weight"),
        ({"neg_weight": 0.5}, None, "neg_weight"),
        ({}, torch.zeros(5, 4), "even"),
        ({}, torch.zeros(2, 4), "at least 2 instances"),
        ({}, torch.zeros(8), "2-D"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, z, match):
    with pytest.raises(ValueError, match=match):
        crit = InvariantSpreading(**kwargs)
        crit(z)


def test_registry_builds_isif_and_views():
    assert "isif" in methods()
    crit = build_objective("isif", temperature=0.2, variant="paper", num_instances=100)
    assert isinstance(crit, InvariantSpreading) and crit.temperature == 0.2
    assert crit.views == ("plain", "augment")
    assert InvariantSpreading().views == ("augment", "augment")
    with pytest.raises(KeyError, match="unknown method"):
        build_objective("nope")


def test_projector_mlp_is_the_isif_loss_on_a_projection_of_the_backbone_features():
    """--projector mlp: the loss is exactly the paper's loss on the L2-normalised output of SimCLR's 2-layer
    projector; the objective then owns that network and the run embeds with the backbone features."""
    from isif.objectives import build_objective, get_method
    from isif.objectives.isif import IsifSettings
    from isif.training.presets import resolve
    from isif.training.step import network_embedding

    torch.manual_seed(0)
    crit = build_objective("isif", dim=8, features=16, projector="mlp")
    plain = build_objective("isif")
    widths = [m.out_features for m in crit.projector if hasattr(m, "out_features")]
    assert crit.input == "backbone" and widths == [16, 8]
    h = torch.randn(12, 16)
    z = torch.nn.functional.normalize(crit.projector(h), dim=1)
    assert torch.allclose(crit(h, torch.arange(6)), plain(z, torch.arange(6)), atol=1e-6)
    assert get_method("isif").embedding_of(IsifSettings(projector="mlp")) == "backbone"
    assert get_method("isif").embedding_of() == "head" and not hasattr(plain, "input")
    cfg = resolve("cifar10-tiny", {"method.projector": "mlp"})
    assert network_embedding(cfg) == "backbone"
    with pytest.raises(ValueError, match="projector"):
        build_objective("isif", projector="mlp")  # no backbone width to build it on
