"""Token shifts that feed the RWKV "mix" interpolation: Q-Shift (Vision-RWKV), the 1-D RWKV token shift, or none.

All shifts take tokens ``[B, T, C]`` in raster order (``t = h * W + w``) and the patch grid ``(H, W)``, and return
a tensor of the same shape; missing neighbours are zero (no wrap-around). See spec §1.6.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Literal

import torch

ShiftMode = Literal["q_shift", "q_shift_multihead", "token_shift", "none"]
SHIFT_MODES: tuple[str, ...] = ("q_shift", "q_shift_multihead", "token_shift", "none")
#: ``shift(x [B, T, C], hw) -> [B, T, C]``
ShiftFn = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]


def q_shift(
    x: torch.Tensor,
    hw: tuple[int, int],
    shift_pixel: int = 1,
    channel_gamma: float = 0.25,
    head_size: int | None = None,
) -> torch.Tensor:
    """Quad-directional shift (Q-Shift, spec §1.6).

    With ``g = int(c * channel_gamma)`` channels per quarter (``c`` = C, or ``head_size`` per head), the output at
    grid position (h, w) takes, in channels ``[0, g)`` the input at (h, w - s) (left neighbour), ``[g, 2g)`` at
    (h, w + s) (right), ``[2g, 3g)`` at (h - s, w) (above), ``[3g, 4g)`` at (h + s, w) (below); channels
    ``[4g, c)`` are copied unchanged. ``s = shift_pixel``; neighbours outside the grid are zero.

    Args:
        x: tokens ``[B, T, C]`` in raster order, ``T = H * W``.
        hw: the patch grid ``(H, W)``.
        shift_pixel: neighbour distance ``s`` (>= 0; 0 gives a copy of ``x``).
        channel_gamma: fraction of channels per direction, at most 1/4.
        head_size: if given, channels are viewed as ``(C // head_size, head_size)`` and the quarters are cut inside
            each head (VRWKV6's ``q_shift_multihead``).

    Returns:
        ``[B, T, C]``, same dtype and device as ``x``.
    """
    B, T, C = x.shape
    H, W = hw
    if H * W != T:
        raise ValueError(f"q_shift: grid {H}x{W} does not match {T} tokens")
    if not 0 <= channel_gamma <= 0.25:
        raise ValueError(f"q_shift: channel_gamma must be in [0, 1/4], got {channel_gamma}")
    if shift_pixel < 0:
        raise ValueError(f"q_shift: shift_pixel must be >= 0, got {shift_pixel}")
    if head_size is None:
        grid = x.view(B, H, W, C)  # [B, H, W, C]
    else:
        if C % head_size:
            raise ValueError(f"q_shift: {C} channels are not a multiple of head_size {head_size}")
        grid = x.view(B, H, W, C // head_size, head_size)  # [B, H, W, heads, head_size]
    g = int(grid.shape[-1] * channel_gamma)
    if torch.is_grad_enabled() and x.requires_grad:
        out = _QShift.apply(grid, g, shift_pixel)
    else:
        out = _shift_quarters(grid, g, shift_pixel)
    return out.view(B, T, C)


#: Per quarter: the grid dim it shifts along and the sign of the shift (out[i] = in[i - sign * s]): left neighbour
#: (along W), right neighbour, above (along H), below.
_QUARTER_SHIFTS = ((2, 1), (2, -1), (1, 1), (1, -1))


def _shift_quarters(grid: torch.Tensor, g: int, shift_pixel: int, adjoint: bool = False) -> torch.Tensor:
    """Q-Shift of ``grid`` ``[B, H, W, (heads,) c]`` with ``g`` channels per quarter, or its adjoint (transpose: every
    quarter shifted the opposite way, which is the gradient).

    One slice copy per quarter into an uninitialised output (one pass over the data) and zeros only in the border
    strips without a neighbour: no zero fill of the whole tensor, no pad/cat chain.
    """
    # the TorchScript-based ONNX exporter loses in-place writes to uninitialised memory: start from zeros there
    tracing = torch.jit.is_tracing()
    out = (torch.zeros_like if tracing else torch.empty_like)(grid, memory_format=torch.contiguous_format)
    for q, (dim, sign) in enumerate(_QUARTER_SHIFTS):
        channels = slice(q * g, (q + 1) * g)
        n = grid.shape[dim]
        s = max(-n, min(n, (-sign if adjoint else sign) * shift_pixel))  # out[i] = grid[i - s] along dim
        if s >= 0:
            out[_at(dim, slice(s, n), channels)] = grid[_at(dim, slice(0, n - s), channels)]
            border = _at(dim, slice(0, s), channels)
        else:
            out[_at(dim, slice(0, n + s), channels)] = grid[_at(dim, slice(-s, n), channels)]
            border = _at(dim, slice(n + s, n), channels)
        if not tracing:
            out[border] = 0
    out[..., 4 * g :] = grid[..., 4 * g :]
    return out


def _at(dim: int, rows: slice, channels: slice) -> tuple:
    """Index of ``rows`` along grid dim 1 (H) or 2 (W) and ``channels`` along the last dim."""
    index = [slice(None)] * 3
    index[dim] = rows
    return (*index, ..., channels)


class _QShift(torch.autograd.Function):
    """Q-Shift (or its adjoint) with the other one as backward: one pass each way. (Autograd through the slice
    copies would build a zero-filled full-size gradient per quarter and add them up: about 14 passes.)"""

    @staticmethod
    def forward(ctx, grid: torch.Tensor, g: int, shift_pixel: int, adjoint: bool = False) -> torch.Tensor:
        ctx.args = (g, shift_pixel, not adjoint)
        return _shift_quarters(grid, g, shift_pixel, adjoint)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        return _QShift.apply(grad, *ctx.args), None, None, None  # linear: double backward works the same way


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
    out = torch.zeros_like(x) if torch.jit.is_tracing() else torch.empty_like(x)  # (see _shift_quarters)
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
