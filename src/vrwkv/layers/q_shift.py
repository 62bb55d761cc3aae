"""Token shifts that feed the RWKV "mix" interpolation: Q-Shift (Vision-RWKV), the 1-D RWKV token shift, or none.

All shifts take tokens ``[B, T, C]`` in raster order (``t = h * W + w``) and the patch grid ``(H, W)``, and return
a tensor of the same shape; missing neighbours are zero (no wrap-around). See spec §1.6.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Literal

import torch

from vrwkv.ops.shift_mix.q_shift import q_shift

ShiftMode = Literal["q_shift", "q_shift_multihead", "token_shift", "none"]
SHIFT_MODES: tuple[str, ...] = ("q_shift", "q_shift_multihead", "token_shift", "none")
#: ``shift(x [B, T, C], hw) -> [B, T, C]``
ShiftFn = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]


def token_shift(x: torch.Tensor, hw: tuple[int, int] | None = None, shift_pixel: int = 1) -> torch.Tensor:
    """The original 1-D RWKV token shift along the sequence: token t takes token t - s (all channels), zeros first.

    On an image this is the raster order, so the first token of a row takes the last token of the previous row
    (the official MAE encoder's ``single_shift``).

    Args:
        x: tokens ``[B, T, C]``.
        hw: unused (accepted so every shift has the same signature).
        shift_pixel: shift distance ``s`` (>= 0).

    Returns:
        ``[B, T, C]``.
    """
    if shift_pixel < 0:
        raise ValueError(f"token_shift: shift_pixel must be >= 0, got {shift_pixel}")
    T = x.shape[1]
    s = min(shift_pixel, T)
    out = torch.zeros_like(x) if torch.jit.is_tracing() else torch.empty_like(x)  # (see ops.shift_mix.q_shift)
    out[:, s:] = x[:, : T - s]
    if not torch.jit.is_tracing():
        out[:, :s] = 0
    return out


def shift_patch_tokens(
    x: torch.Tensor, hw: tuple[int, int], shift: ShiftFn, num_suffix_tokens: int
) -> torch.Tensor:
    """Apply a grid ``shift`` to the patch tokens of ``x`` and pass the ``num_suffix_tokens`` tokens that follow them
    (VRWKV6's cls token, which goes last) through unchanged: their "shifted" value is themselves.

    Args:
        x: tokens ``[B, H * W + num_suffix_tokens, C]``, patch tokens first in raster order.
        hw: the patch grid ``(H, W)``.
        shift: the shift of the patch tokens.
        num_suffix_tokens: extra tokens at the end (>= 1).

    Returns:
        ``[B, T, C]``.
    """
    patches = shift(x[:, :-num_suffix_tokens], hw)  # [B, H * W, C]
    return torch.cat([patches, x[:, -num_suffix_tokens:]], dim=1)


def q_shift_parameters(shift: ShiftFn | None) -> tuple[int, float] | None:
    """``(shift_pixel, channel_gamma)`` if ``shift`` is the plain Q-Shift that :func:`make_shift` builds for
    ``"q_shift"`` (no heads, no suffix tokens), else None: the shift the fused kernel of
    :mod:`vrwkv.ops.shift_mix` implements."""
    if not (isinstance(shift, partial) and shift.func is q_shift and not shift.args):
        return None
    keywords = dict(shift.keywords)
    shift_pixel, channel_gamma = keywords.pop("shift_pixel", 1), keywords.pop("channel_gamma", 0.25)
    if keywords.pop("head_size", None) is not None or keywords:
        return None
    return int(shift_pixel), float(channel_gamma)


def make_shift(
    shift_mode: str,
    shift_pixel: int = 1,
    channel_gamma: float = 0.25,
    head_size: int = 64,
    num_suffix_tokens: int = 0,
) -> ShiftFn | None:
    """Build the shift function of a mixer, or ``None`` when tokens are not shifted.

    ``None`` (``shift_mode="none"`` or ``shift_pixel == 0``) means the mixers use ``x`` directly and have no
    ``spatial_mix_*`` parameters, as the official code does for ``shift_pixel == 0``.

    Args:
        shift_mode: ``"q_shift"``, ``"q_shift_multihead"`` (quarters inside each head of ``head_size`` channels),
            ``"token_shift"`` or ``"none"``.
        shift_pixel: neighbour distance.
        channel_gamma: fraction of channels per Q-Shift direction (<= 1/4).
        head_size: head width for ``"q_shift_multihead"``.
        num_suffix_tokens: extra tokens after the patch tokens (VRWKV6's cls token), passed through unshifted.
    """
    if shift_mode not in SHIFT_MODES:
        raise ValueError(f"shift_mode must be one of {SHIFT_MODES}, got {shift_mode!r}")
    if shift_pixel < 0:
        raise ValueError(f"shift_pixel must be >= 0, got {shift_pixel}")
    if not 0 <= channel_gamma <= 0.25:
        raise ValueError(f"channel_gamma must be in [0, 1/4], got {channel_gamma}")
    if shift_mode == "none" or shift_pixel == 0:
        return None
    if shift_mode == "q_shift":
        shift = partial(q_shift, shift_pixel=shift_pixel, channel_gamma=channel_gamma)
    elif shift_mode == "q_shift_multihead":
        shift = partial(q_shift, shift_pixel=shift_pixel, channel_gamma=channel_gamma, head_size=head_size)
    else:
        shift = partial(token_shift, shift_pixel=shift_pixel)
    if num_suffix_tokens:
        shift = partial(shift_patch_tokens, shift=shift, num_suffix_tokens=num_suffix_tokens)
    return shift
