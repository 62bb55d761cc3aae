"""Absolute position embeddings resized to the input's patch grid (official ``resize_pos_embed``, no extra tokens)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_pos_embed(
    pos_embed: torch.Tensor,
    src_hw: tuple[int, int],
    dst_hw: tuple[int, int],
    mode: str = "bicubic",
) -> torch.Tensor:
    """Resample a ``[1, H0*W0, C]`` raster-order embedding to ``[1, H*W, C]``.

    ``F.interpolate(..., align_corners=False)`` without antialiasing, exactly as the official code (timm's
    ``resample_abs_pos_embed`` antialiases by default and computes in float32, so it is not used here:
    downsampled grids and float64 runs would differ). Returns ``pos_embed`` itself when the grids are equal.

    Args:
        pos_embed: ``[1, H0*W0, C]``.
        src_hw: its grid (H0, W0).
        dst_hw: target grid (H, W).
        mode: interpolation mode (``"bicubic"`` in the official code).
    """
    H0, W0 = src_hw
    H, W = dst_hw
    if pos_embed.ndim != 3 or pos_embed.shape[1] != H0 * W0:
        raise ValueError(f"pos_embed of shape {tuple(pos_embed.shape)} does not hold a {H0}x{W0} grid")
    if (H0, W0) == (H, W):
        return pos_embed
    C = pos_embed.shape[-1]
    dtype = pos_embed.dtype
    # CPU bicubic interpolation has no half kernels; float32/float64 are kept as they are
    grid = pos_embed.to(torch.promote_types(dtype, torch.float32)).reshape(1, H0, W0, C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(H, W), mode=mode, align_corners=False)  # [1, C, H, W]
    return grid.flatten(2).transpose(1, 2).to(dtype)  # [1, H*W, C]
