"""Instance Discrimination (Wu et al., CVPR 2018): a memory bank of every instance's feature.

``NPSoftmax`` is the non-parametric softmax over the whole bank; ``NCE``
approximates it with noise-contrastive estimation. Both follow the
lemniscate reference code: one augmented view per step, temperature 0.07,
bank momentum 0.5, bank initialised uniform in [-1/sqrt(D/3), 1/sqrt(D/3)].
The bank is a buffer, so it is part of the objective's state_dict and of
every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.settings import MOMENTUM, POSITIVE, at_least, setting
from .contract import BuildContext, FromSettings, checked


@dataclass
class NPSoftmaxSettings:
    temperature: float = setting(0.07, "softmax temperature tau", check=POSITIVE)
    memory_momentum: float = setting(0.5, "memory-bank update momentum", check=MOMENTUM)


@dataclass
class NCESettings:
    temperature: float = setting(0.07, "softmax temperature tau", check=POSITIVE)
    memory_momentum: float = setting(0.5, "memory-bank update momentum", check=MOMENTUM)
    nce_noise: int = setting(4096, "noise samples per instance (at most the training-set size)", check=at_least(1))


class MemoryBank(nn.Module):
    """(N, D) features, updated as normalize(m * old + (1 - m) * new) for the batch's instances."""

    def __init__(self, num_instances: int, dim: int, momentum: float = 0.5) -> None:
        super().__init__()
        if num_instances < 1:
            raise ValueError(f"a memory bank needs num_instances >= 1, got {num_instances}")
        stdv = 1.0 / math.sqrt(dim / 3)
        self.momentum = momentum
        self.register_buffer("memory", torch.rand(num_instances, dim).mul_(2 * stdv).add_(-stdv))

    @torch.no_grad()
    def update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        """Out of place: the old bank may still be needed by this step's backward pass."""
        new = self.memory[idx] * self.momentum + z.detach().to(self.memory.dtype) * (1 - self.momentum)
        self.memory = self.memory.index_copy(0, idx, F.normalize(new, dim=1))


def _common(z: torch.Tensor, t: torch.Tensor) -> torch.dtype:
    """The dtype to compute in: at least float32, and at least the stored state's precision."""
    return torch.promote_types(torch.promote_types(z.dtype, t.dtype), torch.float32)


def _check(z: torch.Tensor, idx: torch.Tensor | None, bank: MemoryBank) -> torch.Tensor:
    if z.dim() != 2 or z.shape[1] != bank.memory.shape[1]:
        raise ValueError(f"z must be (B, {bank.memory.shape[1]}), got {tuple(z.shape)}")
    if idx is None or idx.shape != (z.shape[0],):
        raise ValueError("a memory-bank objective needs instance_idx of shape (B,)")
    return idx.to(bank.memory.device).long()


class NPSoftmax(FromSettings, nn.Module):
    """Non-parametric softmax: loss = CE(z . bank^T / tau, instance_idx); then the bank is updated.

    Shape: z (B, D) L2-normalised, instance_idx (B,) -> scalar.
    """

    views = ("augment",)

    def __init__(self, num_instances: int, dim: int = 128, temperature: float = 0.07, momentum: float = 0.5) -> None:
        self._setup(checked(NPSoftmaxSettings(temperature, momentum)), BuildContext(num_instances, dim))

    def _setup(self, s: NPSoftmaxSettings, ctx: BuildContext) -> None:
        nn.Module.__init__(self)
        self.temperature = s.temperature
        self.bank = MemoryBank(ctx.num_instances, ctx.dim, s.memory_momentum)

    def on_epoch_start(self, ctx) -> None:
        """Nothing to do per epoch: the bank is updated every step."""

    def forward(self, z: torch.Tensor, instance_idx: torch.Tensor | None = None) -> torch.Tensor:
        idx = _check(z, instance_idx, self.bank)
        dt = _common(z, self.bank.memory)
        z = z.to(dt)
        logits = z @ self.bank.memory.to(dt).t() / self.temperature  # (B, N)
        loss = F.cross_entropy(logits, idx)
        self.bank.update(z, idx)
        return loss


class NCE(FromSettings, nn.Module):
    """Noise-contrastive estimation of the instance softmax, as lemniscate's NCEAverage + NCECriterion.

    For each instance, K noise indices are drawn uniformly (P_n = 1/N) and
    P(i | v) = exp(v . m_i / tau) / Z, with Z estimated once, on the first
    batch, as N times the mean of exp(v . m / tau) over its K + 1 entries,
    then kept (it is a buffer, so checkpoints keep it). With P_n = 1/N:

        loss = -(1/B) sum_b [ log(P_pos / (P_pos + K P_n)) + sum_k log(K P_n / (P_k + K P_n)) ]

    Computed in log space (the reference adds eps = 1e-7 inside the logs;
    log space needs none). Noise is drawn from torch's global CPU generator,
    which checkpoints save, so a resumed run draws the same noise.

    Shape: z (B, D) L2-normalised, instance_idx (B,) -> scalar.
    """

    views = ("augment",)

    def __init__(self, num_instances: int, dim: int = 128, temperature: float = 0.07, momentum: float = 0.5,
                 noise: int = 4096) -> None:
        self._setup(checked(NCESettings(temperature, momentum, noise)), BuildContext(num_instances, dim))

    @classmethod
    def from_settings(cls, settings: NCESettings, ctx: BuildContext) -> NCE:
        """The registry's builder: at most one noise sample per training instance."""
        return super().from_settings(dataclasses.replace(settings, nce_noise=min(settings.nce_noise,
                                                                                  ctx.num_instances)), ctx)

    def _setup(self, s: NCESettings, ctx: BuildContext) -> None:
        nn.Module.__init__(self)
        self.temperature = s.temperature
        self.noise = s.nce_noise
        self.bank = MemoryBank(ctx.num_instances, ctx.dim, s.memory_momentum)
        self.register_buffer("log_z", torch.tensor(float("nan")))  # NaN until the first batch sets it

    def on_epoch_start(self, ctx) -> None:
        """Nothing to do per epoch: the bank is updated every step."""

    def forward(self, z: torch.Tensor, instance_idx: torch.Tensor | None = None) -> torch.Tensor:
        idx = _check(z, instance_idx, self.bank)
        n, b = self.bank.memory.shape[0], z.shape[0]
        dt = _common(z, self.bank.memory)
        z = z.to(dt)
        sample = torch.randint(0, n, (b, self.noise + 1)).to(idx.device)  # (B, K+1)
        sample[:, 0] = idx
        keys = self.bank.memory[sample].to(dt)  # (B, K+1, D)
        s = torch.bmm(keys, z.unsqueeze(2)).squeeze(2) / self.temperature  # (B, K+1)
        if torch.isnan(self.log_z):
            with torch.no_grad():  # Z = N * mean(exp(s)), fixed from now on
                self.log_z.fill_(float(torch.logsumexp(s.detach().flatten(), 0) - math.log(s.numel()) + math.log(n)))
        log_p = s - self.log_z.to(dt)  # (B, K+1) log P(i | v)
        log_kpn = math.log(self.noise / n)
        kpn = torch.tensor(log_kpn, device=z.device, dtype=dt)  # log(K * P_n)
        log_data = log_p[:, 0] - torch.logaddexp(log_p[:, 0], kpn)  # (B,)
        log_noise = log_kpn - torch.logaddexp(log_p[:, 1:], kpn)  # (B, K)
        loss = -(log_data.sum() + log_noise.sum()) / b
        self.bank.update(z, idx)
        return loss
