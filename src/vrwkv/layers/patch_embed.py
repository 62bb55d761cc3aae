"""Patch embedding: non-overlapping p x p patches -> tokens (official mmcv ``PatchEmbed`` without norm)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """``Conv2d(in_chans, embed_dim, p, stride=p)`` flattened to raster-order tokens.

    The conv is named ``projection`` as in the official checkpoints (``patch_embed.projection.*``).

    Args:
        patch_size: patch side p.
        in_chans: image channels.
        embed_dim: token channels C.
        dynamic_img_pad: zero-pad the bottom/right of inputs whose sides are not multiples of p (the official
            mmcv ``padding='corner'``). If False (default) such inputs raise a ValueError.
    """

    def __init__(
        self,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 256,
        dynamic_img_pad: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.dynamic_img_pad = dynamic_img_pad
        self.projection = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, device=device, dtype=dtype)

    def feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (H, W) for an image of ``img_size`` (h, w), with the padding rule of this module."""
        h, w = img_size
        p = self.patch_size
        if self.dynamic_img_pad:
            return -(-h // p), -(-w // p)
        if h % p or w % p:
            raise ValueError(
                f"input size {h}x{w} is not a multiple of the patch size {p}; resize/crop the image or build the "
                f"model with dynamic_img_pad=True (zero-pads the bottom/right, as the official code does)"
            )
        return h // p, w // p

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Args: x images ``[B, in_chans, h, w]``. Returns tokens ``[B, H*W, C]`` and the grid ``(H, W)``."""
        if x.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
        H, W = self.feat_size((x.shape[-2], x.shape[-1]))
        p = self.patch_size
        pad_h, pad_w = H * p - x.shape[-2], W * p - x.shape[-1]
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # 'corner': zeros at the bottom and right
        x = self.projection(x)  # [B, C, H, W]
        return x.flatten(2).transpose(1, 2), (H, W)  # [B, H*W, C]
