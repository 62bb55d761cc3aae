"""``nn.Linear`` whose product runs through :func:`vrwkv.ops.linear.linear` (oneDNN on the CPU without autograd)."""
from __future__ import annotations

import torch
from torch import nn

from vrwkv.ops.linear import linear


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, init, state-dict names, hooks), computed by :func:`vrwkv.ops.linear.linear`:
    ``F.linear`` itself with autograd, and oneDNN's float32 matmul on the CPU without it (2x MKL's speed on AMD
    CPUs; ``ops/linear/README.md``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
