"""Devices and numeric precision: one place for autocast, the float type of fp64 runs, and memory figures."""

from __future__ import annotations

import contextlib

import torch

from .errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16", "fp64")


def autocast(device: torch.device | str, precision: str):
    """bf16/fp16: torch.autocast; fp32 and fp64: no autocast (fp64 runs keep the model in float64)."""
    device = torch.device(device)
    if precision in ("fp32", "fp64"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of the network's parameters and inputs: float64 for fp64 reference runs, else float32."""
    return torch.float64 if precision == "fp64" else torch.float32


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    return dev


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA; the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
