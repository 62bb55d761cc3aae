"""What every op entry point does to its tensors: checks shared by all ops, then the dtype policy.

float64 stays float64 (references, gradcheck); every other dtype is computed in float32, as the official kernels do,
with autocast off inside the op, and the result is returned in the dtype of the first input.
"""
from __future__ import annotations

from typing import Callable

import torch


def check_floating_on_one_device(op: str, tensors: dict[str, torch.Tensor]) -> None:
    """Raise a clear error unless every tensor is a floating-point tensor and all are on one device."""
    if not all(t.is_floating_point() for t in tensors.values()):
        raise TypeError(f"{op} needs floating-point tensors; got " +
                        ", ".join(f"{n} {t.dtype}" for n, t in tensors.items()))
    if len({t.device for t in tensors.values()}) != 1:
        raise ValueError(f"{', '.join(tensors)} must be on one device; got " +
                         ", ".join(f"{n} {t.device}" for n, t in tensors.items()))


def compute_dtype(tensors: tuple[torch.Tensor, ...]) -> torch.dtype:
    """The dtype an op computes ``tensors`` in: float64 if any of them is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def run_in_float32(fn: Callable[..., torch.Tensor], tensors: tuple[torch.Tensor, ...], **kwargs) -> torch.Tensor:
    """``fn(*tensors, **kwargs)`` in float32 (float64 if any input is float64), autocast off, cast back. (Casts and
    the autocast context only where they change something: ~15 µs per call otherwise, as much as a small op.)"""
    compute, dtype, device = compute_dtype(tensors), tensors[0].dtype, tensors[0].device.type
    inputs = [t if t.dtype == compute else t.to(compute) for t in tensors]
    if torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            y = fn(*inputs, **kwargs)
    else:
        y = fn(*inputs, **kwargs)
    return y if y.dtype == dtype else y.to(dtype)
