"""The networks a method owns on top of the backbone: projectors and predictors, MLPs as each paper gives them.

``mlp(sizes, bn_last=False)``: Linear layers between the widths in ``sizes``, each hidden one followed by
BatchNorm1d and ReLU (SimCLR, MoCo v2, BYOL, SimSiam, Barlow Twins, VICReg all use this shape; they differ in widths,
depth and whether the output is batch-normalised). The heads run on the gathered global batch (the loop gathers
the backbone features before the objective), so their BatchNorm sees the whole batch on any number of processes:
what SyncBatchNorm would give, by construction.
"""

from __future__ import annotations

from torch import nn


def mlp(sizes: list[int] | tuple[int, ...], bn_last: bool = False, bias_last: bool = True, bn: bool = True,
        act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear(sizes[0], sizes[1]) [-> BN -> act -> Linear ...]; the last layer bare, or batch-normalised
    (without affine parameters, as SimSiam's projector and Barlow Twins' standardisation) with ``bn_last``.
    ``bn`` False: no BatchNorm after the hidden layers, which then keep their bias (MoCo v2's projector)."""
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least an input and an output width, got {sizes}")
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers += [nn.Linear(a, b, bias=not bn), *([nn.BatchNorm1d(b)] if bn else []), act()]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=bias_last and not bn_last))
    if bn_last:
        layers.append(nn.BatchNorm1d(sizes[-1], affine=False))
    return nn.Sequential(*layers)
