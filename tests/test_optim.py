"""The optimisers: LARS against a float64 reference of its formulas, the builder's groups, gradient clipping."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from isif.base.settings import check_fields
from isif.training.optim import LARS, OptimConfig, build_optimizer, clip_gradients, set_lr


def _norm(t: torch.Tensor) -> float:
    return math.sqrt(float((t * t).sum()))


def reference_lars(params: list[torch.Tensor], grads_per_step: list[list[torch.Tensor]], excluded: list[bool],
                   lrs: list[float], momentum: float, wd: float, eta: float, clip: bool,
                   eps: float = 1e-8) -> list[torch.Tensor]:
    """The LARS update written out from its formulas, in float64, one parameter at a time."""
    ps = [p.detach().clone().double() for p in params]
    bufs: list[torch.Tensor | None] = [None] * len(ps)
    for lr, grads in zip(lrs, grads_per_step, strict=True):
        for i, (p, g) in enumerate(zip(ps, grads, strict=True)):
            g = g.double()
            if excluded[i]:
                d = g
            else:
                pn, gn = _norm(p), _norm(g)
                trust = eta * pn / (gn + wd * pn + eps) if pn > 0 and gn > 0 else 1.0
                if clip and pn > 0 and gn > 0:
                    trust = min(trust / lr, 1.0)
                d = (g + wd * p) * trust
            bufs[i] = d.clone() if bufs[i] is None else momentum * bufs[i] + d
            ps[i] = p - lr * bufs[i]
    return ps


def _tensors(seed: int = 0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """A 2-d weight, a 4-d kernel, a 1-d bias (excluded), a 2-d weight with zero gradient; 4 steps of gradients."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (2, 3, 2, 2), (5,), (4, 2)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = []
    for step in range(4):
        gs = [torch.randn(s, generator=gen, dtype=torch.float64) * (0.1 if step % 2 else 3.0) for s in shapes]
        gs[3] = torch.zeros(shapes[3], dtype=torch.float64)
        grads.append(gs)
    return params, grads


def _run_lars(params, grads, excluded, lrs, **kw) -> tuple[list[torch.nn.Parameter], LARS]:
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    groups = [{"params": [p for p, e in zip(ps, excluded, strict=True) if not e]},
              {"params": [p for p, e in zip(ps, excluded, strict=True) if e], "weight_decay": 0.0,
               "lars_exclude": True}]
    opt = LARS(groups, lr=lrs[0], **kw)
    for lr, gs in zip(lrs, grads, strict=True):
        set_lr(opt, lr)
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    return ps, opt


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("momentum,wd", [(0.9, 5e-4), (0.0, 1e-2), (0.5, 0.0)])
def test_lars_matches_reference(clip: bool, momentum: float, wd: float) -> None:
    params, grads = _tensors()
    excluded = [False, False, True, False]
    lrs = [0.5, 0.3, 2.0, 0.01]  # large and small: the clip binds on some steps and not on others
    eta = 0.02 if clip else 0.001
    got, _ = _run_lars(params, grads, excluded, lrs, momentum=momentum, weight_decay=wd, eta=eta, clip_lr=clip)
    want = reference_lars(params, grads, excluded, lrs, momentum, wd, eta, clip)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.detach(), w, rtol=1e-12, atol=1e-12)
    # the zero-gradient weight still decays, as SGD's would (trust 1): b = wd*p, p -= lr*b
    if wd > 0:
        assert not torch.equal(got[3].detach(), params[3])


def test_lars_float32_close_to_reference() -> None:
    params, grads = _tensors(1)
    excluded = [False, False, True, False]
    lrs = [0.1, 0.2, 0.3]
    got, _ = _run_lars([p.float() for p in params], [[g.float() for g in gs] for gs in grads[:3]], excluded, lrs,
                       momentum=0.9, weight_decay=1e-3)
    want = reference_lars(params, grads[:3], excluded, lrs, 0.9, 1e-3, 0.02, True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.detach().double(), w, rtol=1e-5, atol=1e-6)


def test_lars_lr_zero_is_finite() -> None:
    """The warm-up starts at lr 0: with clip_lr the trust ratio must not become nan."""
    params, grads = _tensors()
    got, opt = _run_lars(params, grads[:2], [False] * 4, [0.0, 0.1], momentum=0.9, weight_decay=1e-3)
    for p in got:
        assert torch.isfinite(p).all()
    for s in opt.state.values():
        assert torch.isfinite(s["momentum_buffer"]).all()


def test_lars_state_dict_resumes_exactly() -> None:
    params, grads = _tensors()
    excluded = [False, False, True, False]
    lrs = [0.5, 0.3, 0.2, 0.1]
    kw = dict(momentum=0.9, weight_decay=5e-4)
    full, _ = _run_lars(params, grads, excluded, lrs, **kw)

    half, opt = _run_lars(params, grads[:2], excluded, lrs[:2], **kw)
    saved = copy.deepcopy(opt.state_dict())
    ps = [torch.nn.Parameter(p.detach().clone()) for p in half]
    groups = [{"params": [p for p, e in zip(ps, excluded, strict=True) if not e]},
              {"params": [p for p, e in zip(ps, excluded, strict=True) if e], "weight_decay": 0.0,
               "lars_exclude": True}]
    fresh = LARS(groups, lr=1.0, momentum=0.0, weight_decay=0.0)  # the state dict brings the groups' options back
    fresh.load_state_dict(saved)
    assert fresh.param_groups[1]["lars_exclude"] and fresh.param_groups[0]["momentum"] == 0.9
    for lr, gs in zip(lrs[2:], grads[2:], strict=True):
        set_lr(fresh, lr)
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        fresh.step()
    for a, b in zip(ps, full, strict=True):
        assert torch.equal(a.detach(), b.detach())


def test_lars_with_grad_scaler() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(OptimConfig(optimizer="lars", exclude_bias_norm=True), list(model.parameters()))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(8, 4)).pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    for b, p in zip(before, model.parameters(), strict=True):
        assert not torch.equal(b, p.detach()) and torch.isfinite(p).all()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4, 2), torch.nn.LayerNorm(2))


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_exclude_bias_norm_no_weight_decay_on_1d(optimizer: str) -> None:
    lr, wd = 0.1, 0.01
    model = _model()
    params = list(model.parameters())
    opt = build_optimizer(OptimConfig(optimizer=optimizer, lr=lr, momentum=0.9, weight_decay=wd,
                                      exclude_bias_norm=True), params)
    assert len(opt.param_groups) == 2
    with torch.no_grad():
        for p in params:
            p.add_(1.0)  # no zero parameter (the BatchNorm bias starts at 0)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for b, p in zip(before, params, strict=True):
        if p.ndim <= 1:
            assert torch.equal(p.detach(), b)
        else:
            torch.testing.assert_close(p.detach(), b * (1 - lr * wd))
    set_lr(opt, 0.05)
    assert all(g["lr"] == 0.05 for g in opt.param_groups)


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_without_exclusion_1d_decay_too(optimizer: str) -> None:
    lr, wd = 0.1, 0.01
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    opt = build_optimizer(OptimConfig(optimizer=optimizer, lr=lr, weight_decay=wd), params)
    assert len(opt.param_groups) == 1
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in params:
        torch.testing.assert_close(p.detach(), torch.full_like(p, 1 - lr * wd))


def test_default_is_one_sgd_group_like_torch() -> None:
    o = OptimConfig()
    assert (o.optimizer, o.exclude_bias_norm, o.clip_grad) == ("sgd", False, None)
    a, b = _model(), _model()
    opt = build_optimizer(o, list(a.parameters()))
    ref = torch.optim.SGD(list(b.parameters()), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    assert type(opt) is torch.optim.SGD and len(opt.param_groups) == 1
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == \
        {k: v for k, v in ref.param_groups[0].items() if k != "params"}
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            g = torch.randn(pa.shape, generator=gen)
            pa.grad, pb.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_build_lars_options() -> None:
    o = OptimConfig(optimizer="lars", lars_eta=0.001, lars_clip=False, weight_decay=1e-6)
    opt = build_optimizer(o, list(_model().parameters()))
    assert isinstance(opt, LARS) and len(opt.param_groups) == 1
    g = opt.param_groups[0]
    assert (g["eta"], g["clip_lr"], g["weight_decay"], g["lars_exclude"]) == (0.001, False, 1e-6, False)


def test_checks() -> None:
    check_fields(OptimConfig())
    check_fields(OptimConfig(optimizer="sgd", lars_eta=0.5, lars_clip=False))  # unused with sgd: not an error
    with pytest.raises(ValueError, match="--lars-eta must be > 0, got 0"):
        check_fields(OptimConfig(lars_eta=0))
    with pytest.raises(ValueError, match="--optimizer"):
        check_fields(OptimConfig(optimizer="adam"))
    with pytest.raises(ValueError, match="--clip-grad"):
        check_fields(OptimConfig(clip_grad=-1.0))
    check_fields(OptimConfig(clip_grad=1.0))
    with pytest.raises(ValueError, match="--milestones"):
        check_fields(OptimConfig(milestones=(1,), factors=()))


def test_clip_gradients() -> None:
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([[0.0, 4.0], [0.0, 0.0]])  # global norm 5
    clip_gradients(OptimConfig(), params)
    assert params[0].grad[0] == 3.0 and params[1].grad[0, 1] == 4.0
    clip_gradients(OptimConfig(clip_grad=10.0), params)
    assert params[0].grad[0] == 3.0
    clip_gradients(OptimConfig(clip_grad=1.0), params)
    total = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params))
    assert total == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(params[0].grad, torch.tensor([0.6, 0.0, 0.0]), rtol=1e-5, atol=1e-6)


def test_cosine_epoch_is_torchs_cosine_annealing_stepped_once_an_epoch() -> None:
    from isif.training.optim import OptimConfig, lr_at

    o = OptimConfig(lr=0.06, schedule="cosine-epoch", warmup_epochs=0.0)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.06)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3)
    for epoch in range(3):
        for t in (epoch, epoch + 0.5, epoch + 0.99):
            assert lr_at(o, 3, t) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()
    per_step = OptimConfig(lr=0.06, schedule="cosine", warmup_epochs=0.0)
    assert lr_at(per_step, 3, 0.5) < lr_at(o, 3, 0.5) == 0.06
