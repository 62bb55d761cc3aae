"""Numerical helpers shared by the ops."""
from __future__ import annotations

import torch


def exp_le0(x: torch.Tensor) -> torch.Tensor:
    """exp of arguments <= 0, floored at e^-87 (about the smallest normal float32).

    Below that, CPU ``exp`` takes a slow path 10-35x slower (denormals), and the terms are negligible anyway: every
    caller compares them with a term of exponent 0, multiplies them by 0, or adds them to sums of order >= 1e-30.
    """
    return torch.exp(x.clamp(min=-87.0))
