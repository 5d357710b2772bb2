"""The successors' losses in isif against lightly's independent implementations (``lightly.loss``), same tensors.

Values and gradients (``torch.autograd.grad``, float64 leaves) agree to 1e-10 of their size, after the stated factor
where conventions differ (BYOL: isif's official sum of mean(2 - 2 cos) is 4 + 4x lightly's). A second implementation
by others checks what our own equations cannot: normalisation, masking, averaging, stop-gradients, queue, centre."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

lightly_loss = pytest.importorskip("lightly.loss", reason="lightly is not installed (pip install -e '.[test]')")

from isif.objectives.barlow_twins import barlow_twins_loss  # noqa: E402
from isif.objectives.byol import byol_loss  # noqa: E402
from isif.objectives.dino import DINO, dino_loss  # noqa: E402
from isif.objectives.moco import MoCo, moco_loss  # noqa: E402
from isif.objectives.simclr import nt_xent  # noqa: E402
from isif.objectives.simsiam import simsiam_loss  # noqa: E402
from isif.objectives.vicreg import vicreg_loss  # noqa: E402

SEEDS = (0, 1, 2)
RTOL = 1e-10
B, D = 12, 16


def leaves(seed: int, *shapes: tuple[int, ...], scale: float = 1.0, grad: bool = True) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(s, generator=g, dtype=torch.float64)).requires_grad_(grad) for s in shapes]


def close(ours: torch.Tensor | tuple, theirs: torch.Tensor | tuple, what: str = "") -> None:
    """max |ours - theirs| <= RTOL * max |theirs|, tensor by tensor."""
    ours, theirs = (ours,) if torch.is_tensor(ours) else ours, (theirs,) if torch.is_tensor(theirs) else theirs
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float64, (what, a.shape, b.shape, a.dtype, b.dtype)
        err, size = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= RTOL * size, f"{what}: max |diff| {err:.3e} against max |lightly| {size:.3e}"


def grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


@contextlib.contextmanager
def float64_default():
    """lightly's DINOLoss builds its teacher temperature with ``torch.tensor(float)``, i.e. in the default dtype: under
    float32 it divides float64 logits by float32(tau_t) (0.04 -> 0.0399999991), 3e-9 to 8e-9 off in the gradients. With
    float64 as the default it computes in float64 throughout, as isif does here."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# SimCLR ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [0.5, 0.1])
@pytest.mark.parametrize("seed", SEEDS)
def test_nt_xent_equals_lightly_ntxent(seed, tau):
    a, b = leaves(seed, (B, D), (B, D))
    ours = nt_xent(torch.cat([a, b]), tau)
    theirs = lightly_loss.NTXentLoss(temperature=tau)(a, b)
    close(ours, theirs, "value")
    close(grads(ours, [a, b]), grads(theirs, [a, b]), "gradient")


# MoCo -----------------------------------------------------------------------------------------------------------------

def lightly_moco(tau: float, queue: torch.Tensor):
    """NTXentLoss with a memory bank holding ``queue`` (K, d): lightly stores it as (K, d) rows, hands the loss its
    pre-update copy, then writes the batch's normalised keys at its pointer (only when out0 requires grad)."""
    fn = lightly_loss.NTXentLoss(temperature=tau, memory_bank_size=tuple(queue.shape)).double()
    fn.memory_bank.bank.copy_(queue)
    assert int(fn.memory_bank.bank_ptr) == 0
    return fn


@pytest.mark.parametrize("seed", SEEDS)
def test_moco_loss_equals_lightly_ntxent_with_a_memory_bank(seed):
    k_neg, tau = 32, 0.2
    (q,) = leaves(seed, (B, D))
    k, queue = leaves(seed + 100, (B, D), (k_neg, D), grad=False)
    queue = F.normalize(queue, dim=1)
    fn = lightly_moco(tau, queue)
    ours = moco_loss(F.normalize(q, dim=1), F.normalize(k, dim=1), queue, tau)
    theirs = fn(q, k)
    close(ours, theirs, "value")
    close(grads(ours, [q]), grads(theirs, [q]), "gradient w.r.t. q")
    # lightly enqueued the normalised keys in the first B slots, as isif's ring does from pointer 0
    close(fn.memory_bank.bank[:B], F.normalize(k, dim=1), "bank")
    close(fn.memory_bank.bank[B:], queue[B:], "bank")


@pytest.mark.parametrize("seed", SEEDS)
def test_symmetric_moco_equals_lightly_cifar10_benchmark(seed):
    """lightly's CIFAR-10 benchmark: 0.5 * (criterion(q0, k1) + criterion(q1, k0)), the bank updated with k1 between
    the two calls; isif's pure loss with the queue enqueued the same way."""
    k_neg, tau = 36, 0.1
    q0, q1 = leaves(seed, (B, D), (B, D))
    k0, k1, queue = leaves(seed + 100, (B, D), (B, D), (k_neg, D), grad=False)
    queue = F.normalize(queue, dim=1)
    fn = lightly_moco(tau, queue)
    theirs = 0.5 * (fn(q0, k1) + fn(q1, k0))

    n = lambda x: F.normalize(x, dim=1)  # noqa: E731
    queue1 = queue.clone()
    queue1[:B] = n(k1)  # the first call's keys, at the ring's pointer 0
    ours = 0.5 * (moco_loss(n(q0), n(k1), queue, tau) + moco_loss(n(q1), n(k0), queue1, tau))
    close(ours, theirs, "value")
    close(grads(ours, [q0, q1]), grads(theirs, [q0, q1]), "gradient w.r.t. q")
    queue2 = queue1.clone()
    queue2[B:2 * B] = n(k0)
    close(fn.memory_bank.bank, queue2, "bank after both calls")


@pytest.mark.parametrize("seed", SEEDS)
def test_moco_module_and_its_queue_follow_lightly_over_steps(seed):
    """isif's MoCo with the paper's asymmetric loss (loss, then enqueue) against one lightly call on the same
    projections, over enough steps for the ring to wrap (K a multiple of B, as the official code requires): same
    loss, gradient, queue and pointer every step."""
    feats, k_neg, tau = 10, 2 * B, 0.2
    torch.manual_seed(seed)
    moco = MoCo(nn.Linear(feats, feats), feats, num_instances=100, seed=seed, temperature=tau, queue=k_neg,
                proj_hidden=8, proj_dim=D, symmetric=False).double().train()
    fn = lightly_moco(tau, moco.queue.clone())
    for step in range(3):
        h, target = leaves(1000 * seed + step, (2 * B, feats), (B, feats))
        target.requires_grad_(False)
        ours = moco(h, target=target)
        with torch.no_grad():
            keys = moco.target.head(target)
        theirs = fn(moco.projector(h[:B]), keys)
        close(ours, theirs, f"value, step {step}")
        close(grads(ours, [h]), grads(theirs, [h]), f"gradient, step {step}")
        close(moco.queue, fn.memory_bank.bank, f"queue after step {step}")
        assert int(moco.ptr) == int(fn.memory_bank.bank_ptr)


@pytest.mark.parametrize("seed", SEEDS)
def test_moco_with_lightly_queue_order_follows_lightly_cifar10_benchmark_over_steps(seed):
    """``queue_update='term'``: the symmetric loss as lightly's benchmark computes it (two NTXentLoss calls on one
    memory bank, view 1's keys enqueued between them), over steps that wrap the ring: same loss, gradient, queue."""
    feats, tau = 10, 0.1
    torch.manual_seed(seed)
    moco = MoCo(nn.Linear(feats, feats), feats, num_instances=100, seed=seed, temperature=tau, queue=4 * B,
                proj_hidden=8, proj_dim=D, queue_update="term").double().train()
    fn = lightly_moco(tau, moco.queue.clone())
    for step in range(3):
        h, target = leaves(1000 * seed + step, (2 * B, feats), (2 * B, feats))
        target.requires_grad_(False)
        ours = moco(h, target=target)
        with torch.no_grad():
            k0, k1 = moco.target.head(target).chunk(2)
        theirs = 0.5 * (fn(moco.projector(h[:B]), k1) + fn(moco.projector(h[B:]), k0))
        close(ours, theirs, f"value, step {step}")
        close(grads(ours, [h]), grads(theirs, [h]), f"gradient, step {step}")
        close(moco.queue, fn.memory_bank.bank, f"queue after step {step}")
        assert int(moco.ptr) == int(fn.memory_bank.bank_ptr)


def test_split_batchnorm_per_view_equals_lightly_split_batchnorm_on_each_view():
    """isif normalises both views in one pass (``views=2``); lightly's benchmark passes each view apart through its
    SplitBatchNorm: the same outputs and gradients (the running statistics differ: lightly updates them twice)."""
    from lightly.models.batchnorm import SplitBatchNorm

    from isif.objectives.moco import split_batchnorm

    ours = nn.Sequential(nn.BatchNorm2d(3)).double()
    split_batchnorm(ours, 4, views=2)
    theirs = SplitBatchNorm(3, 4).double()
    with torch.no_grad():
        for bn in (ours[0], theirs):
            bn.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
            bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    (x,) = leaves(7, (16, 3, 2, 2), scale=3.0)
    y = ours(x)
    ref = torch.cat([theirs(x[:8]), theirs(x[8:])])
    close(y, ref, "output")
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    close(grads((y * w).sum(), [x]), grads((ref * w).sum(), [x]), "gradient")


# BYOL and SimSiam -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_byol_loss_is_4_plus_4_times_lightly_symmetric_negative_cosine(seed):
    """isif: sum over the two orderings of mean(2 - 2 cos) (BYOL's official form); lightly's benchmark:
    0.5 * (NCS(p1, t2) + NCS(p2, t1)), NCS = mean(-cos). So isif = 4 + 4 * lightly, gradients 4x."""
    p1, p2, t1, t2 = leaves(seed, (B, D), (B, D), (B, D), (B, D))
    ncs = lightly_loss.NegativeCosineSimilarity()
    ours = byol_loss(p1, p2, t1, t2)
    theirs = 0.5 * (ncs(p1, t2.detach()) + ncs(p2, t1.detach()))
    close(ours, 4 + 4 * theirs, "value")
    g = torch.autograd.grad(ours, [p1, p2, t1, t2], allow_unused=True)
    close(g[:2], tuple(4 * x for x in grads(theirs, [p1, p2])), "gradient w.r.t. p")
    assert g[2] is None and g[3] is None, "a gradient reached the target's projections"


@pytest.mark.parametrize("seed", SEEDS)
def test_simsiam_loss_equals_lightly_symmetric_negative_cosine(seed):
    p1, p2, z1, z2 = leaves(seed, (B, D), (B, D), (B, D), (B, D))
    ncs = lightly_loss.NegativeCosineSimilarity()
    ours = simsiam_loss(p1, p2, z1, z2)
    theirs = 0.5 * (ncs(p1, z2.detach()) + ncs(p2, z1.detach()))
    close(ours, theirs, "value")
    g = torch.autograd.grad(ours, [p1, p2, z1, z2], allow_unused=True)
    close(g[:2], grads(theirs, [p1, p2]), "gradient w.r.t. p")
    assert g[2] is None and g[3] is None, "a gradient reached z through the stop-gradient"


# Barlow Twins and VICReg ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lam", [0.0051, 0.5])
@pytest.mark.parametrize("seed", SEEDS)
def test_barlow_twins_loss_equals_lightly(seed, lam):
    z1, z2 = leaves(seed, (B, D), (B, D), scale=3.0)
    ours = barlow_twins_loss(z1, z2, lam)
    theirs = lightly_loss.BarlowTwinsLoss(lambda_param=lam)(z1, z2)
    close(ours, theirs, "value")
    close(grads(ours, [z1, z2]), grads(theirs, [z1, z2]), "gradient")


@pytest.mark.parametrize("scale", [0.5, 1.0])
@pytest.mark.parametrize("seed", SEEDS)
def test_vicreg_loss_equals_lightly(seed, scale):
    """lightly (and the official code) average the two views' variance terms; at scale 0.5 every column's std is
    under gamma = 1, so the variance terms are large and a sum would show."""
    z1, z2 = leaves(seed, (B, D), (B, D), scale=scale)
    ours = vicreg_loss(z1, z2, 25.0, 25.0, 1.0)
    theirs = lightly_loss.VICRegLoss()(z1, z2)
    close(ours, theirs, "value")
    close(grads(ours, [z1, z2]), grads(theirs, [z1, z2]), "gradient")


# DINO -----------------------------------------------------------------------------------------------------------------

def lightly_dino(k: int, tau_s: float, tau_t: float, center: torch.Tensor, momentum: float = 0.9):
    """DINOLoss at a constant teacher temperature (warm-up start = end = tau_t), its (1, 1, K) centre set."""
    with float64_default():
        fn = lightly_loss.DINOLoss(output_dim=k, warmup_teacher_temp=tau_t, teacher_temp=tau_t, student_temp=tau_s,
                                   center_momentum=momentum)
    fn.center.copy_(center.view(1, 1, k))
    return fn


@pytest.mark.parametrize("views", [2, 4])
@pytest.mark.parametrize("seed", SEEDS)
def test_dino_loss_equals_lightly(seed, views):
    k, tau_s, tau_t = 24, 0.1, 0.04
    (student,) = leaves(seed, (views * B, k), scale=2.0)
    teacher, center = leaves(seed + 100, (2 * B, k), (k,), grad=False)
    center = 0.3 * center
    ours = dino_loss(student, teacher, center, tau_s, tau_t, views)
    fn = lightly_dino(k, tau_s, tau_t, center)
    with float64_default():
        theirs = fn(list(teacher.chunk(2)), list(student.chunk(views)))
    close(ours, theirs, "value")
    close(grads(ours, [student]), grads(theirs, [student]), "gradient w.r.t. the student logits")


@pytest.mark.parametrize("views", [2, 4])
def test_dino_module_centre_follows_lightly_over_steps(views):
    """isif's DINO (loss, then c <- m c + (1 - m) mean of the teacher's global logits) against lightly's DINOLoss,
    which updates its own centre after each call: same loss, gradient and centre at every step."""
    feats, k, tau_s, tau_t, m = 10, 24, 0.1, 0.05, 0.9
    torch.manual_seed(views)
    dino = DINO(nn.Linear(feats, feats), feats, total_steps=10, temperature=tau_s, teacher_temp=tau_t,
                teacher_temp_start=tau_t, center_momentum=m, prototypes=k, proj_hidden=16, proj_dim=8,
                local_crops=views - 2).double().train()
    fn = lightly_dino(k, tau_s, tau_t, dino.center.clone(), momentum=m)
    for step in range(3):
        h, target = leaves(100 * views + step, (views * B, feats), (2 * B, feats))
        target.requires_grad_(False)
        ours = dino(h, target=target)
        with torch.no_grad():
            teacher = dino.target.head(target)
        with float64_default():
            theirs = fn(list(teacher.chunk(2)), list(dino.head(h).chunk(views)))
        close(ours, theirs, f"value, step {step}")
        close(grads(ours, [h]), grads(theirs, [h]), f"gradient, step {step}")
        close(dino.center, fn.center.view(k), f"centre after step {step}")
