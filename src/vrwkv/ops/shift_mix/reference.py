"""The definition of the fused shift-and-mix: plain PyTorch ops (any device and dtype, differentiable)."""
from __future__ import annotations

import torch

from vrwkv.ops.shift_mix.q_shift import q_shift


def q_shift_lerp(
    x: torch.Tensor, hw: tuple[int, int], mu: torch.Tensor, shift_pixel: int = 1, channel_gamma: float = 0.25
) -> torch.Tensor:
    """``torch.lerp(q_shift(x, hw, shift_pixel, channel_gamma), x, mu)`` (= ``x mu + q_shift(x) (1 - mu)``).

    Args:
        x: tokens ``[B, T, C]`` in raster order, ``T = H * W``.
        hw: the patch grid ``(H, W)``.
        mu: mix weights broadcasting against ``[B, T, C]`` (e.g. ``[1, 1, C]``).
        shift_pixel, channel_gamma: the Q-Shift's.

    Returns:
        ``[B, T, C]``.
    """
    return torch.lerp(q_shift(x, hw, shift_pixel, channel_gamma), x, mu)
