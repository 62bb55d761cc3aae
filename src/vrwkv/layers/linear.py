"""``nn.Linear`` whose products run through :func:`vrwkv.ops.linear.linear` (oneDNN on the CPU, float32)."""
from __future__ import annotations

import torch
from torch import nn

from vrwkv.ops.linear import linear


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, init, state-dict names, hooks), computed by :func:`vrwkv.ops.linear.linear`:
    oneDNN's float32 matmul on the CPU, forward and backward (2x MKL's speed on AMD CPUs; ``ops/linear/README.md``),
    ``F.linear`` itself elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
