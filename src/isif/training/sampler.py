"""The instance sampler: which instances each step trains on, in a seeded order that a resumed run repeats.

Per epoch: a permutation of the N training instances from the sampler's own
generator (its state at the start of the epoch is checkpointed, so a run that
stops mid-epoch redraws the same order), cut into ``N // B`` global batches
(the remainder is dropped, as the reference's ``drop_last``); under torchrun
each process takes its contiguous share of every global batch. With
``nn_positive`` > 0 (the paper's CUB-200 setting), the second view of an
instance is, with that probability, an augmentation of its nearest neighbour
in the initial network's feature space instead of its own image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..base.dist import SINGLE, World
from ..base.settings import PROBABILITY, setting
from ..data.types import Images, LazyImages


@dataclass
class SamplerConfig:
    nn_positive: float = setting(0.0, "probability that the positive is the image's nearest neighbour in the "
                                      "initial network's feature space (cub200 preset: 0.5)", check=PROBABILITY)


class InstanceSampler:
    """The seeded instance order, the nearest-neighbour positives and the position inside the epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, world: World = SINGLE, nn_positive: float = 0.0) -> None:
        self.n, self.batch_size, self.seed, self.world = n, batch_size, seed, world
        self.nn_positive = nn_positive
        self.steps_per_epoch = n // batch_size
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.epoch_start = self.gen.get_state()  # the generator's state when the current epoch began
        self.neighbours: torch.Tensor | None = None  # (N,) nearest neighbour of every instance

    def epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(order (N,), sources of the positives (N,) or None) of ``epoch``, the same on every call."""
        self.gen.set_state(self.epoch_start)
        perm = torch.randperm(self.n, generator=self.gen)  # (N,)
        return perm, positive_sources(self.neighbours, perm, self.nn_positive, self.seed, epoch)

    def next_epoch(self) -> None:
        """The epoch drawn last is done: the next one starts from the generator's state after its draw."""
        self.epoch_start = self.gen.get_state()

    def batch_indices(self, perm: torch.Tensor, step: int) -> torch.Tensor:
        return perm[step * self.batch_size:(step + 1) * self.batch_size]  # (B,) the global batch

    def batches(self, images: Images, perm: torch.Tensor, second: torch.Tensor | None, first: int,
                device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        return epoch_batches(images, perm, second, first, self.steps_per_epoch, self.batch_size, self.share(),
                             device)

    def share(self) -> slice:
        b = self.batch_size // self.world.size
        return slice(self.world.rank * b, (self.world.rank + 1) * b)

    def state_dict(self) -> dict:
        out = {"data_epoch_start": self.epoch_start}
        if self.neighbours is not None:
            out["neighbours"] = self.neighbours
        return out

    def load_state_dict(self, sd: dict) -> None:
        self.epoch_start = sd["data_epoch_start"]
        if sd.get("neighbours") is not None:
            self.neighbours = sd["neighbours"].cpu()


def epoch_batches(images: Images, perm: torch.Tensor, second: torch.Tensor | None, first: int, steps: int,
                  batch: int, share: slice, device: torch.device
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (x, x2 or None) for steps ``first`` .. ``steps - 1`` of an epoch: this process's share of each
    global batch ``perm[s*B:(s+1)*B]`` (and of ``second``, the sources of the positives), on ``device``.

    In-memory images are gathered on the device; streamed files are decoded
    ahead by DataLoader workers, pinned when training on a GPU.
    """
    if not isinstance(images, LazyImages):
        for s in range(first, steps):
            idx = perm[s * batch:(s + 1) * batch][share].to(device, non_blocking=True)
            x2 = None
            if second is not None:
                x2 = images[second[s * batch:(s + 1) * batch][share].to(device, non_blocking=True)]
            yield images[idx], x2
        return
    lists = []
    for s in range(first, steps):
        idx = perm[s * batch:(s + 1) * batch][share].tolist()
        if second is not None:
            idx += second[s * batch:(s + 1) * batch][share].tolist()
        lists.append(idx)
    for xb in images.batches(lists, pin=device.type == "cuda"):
        xb = xb.to(device, non_blocking=True)
        if second is None:
            yield xb, None
        else:
            half = xb.shape[0] // 2
            yield xb[:half], xb[half:]


def positive_sources(neighbours: torch.Tensor | None, perm: torch.Tensor, p: float, seed: int,
                     epoch: int) -> torch.Tensor | None:
    """For the nearest-neighbour positive: per position of ``perm``, the image whose augmentation is the
    positive: the instance itself, or with probability ``p`` its nearest neighbour. A function of
    (seed, epoch) alone, so a resumed run draws the same."""
    if neighbours is None or p <= 0:
        return None
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 17)
    swap = torch.rand(perm.shape[0], generator=g) < p
    return torch.where(swap, neighbours[perm], perm)
