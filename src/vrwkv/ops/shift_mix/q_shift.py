"""Q-Shift, the quad-directional token shift of Vision-RWKV (spec §1.6): the shift the fused shift-and-mix of this
op folder is defined by (:func:`vrwkv.ops.shift_mix.reference.q_shift_lerp`). Re-exported by
:mod:`vrwkv.layers.q_shift`, which builds the mixers' shift functions from it.

Tokens ``[B, T, C]`` in raster order (``t = h * W + w``) on the patch grid ``(H, W)``; missing neighbours are zero
(no wrap-around).
"""
from __future__ import annotations

import torch


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
    check_q_shift(T, hw, shift_pixel, channel_gamma)
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


def check_q_shift(num_tokens: int, hw: tuple[int, int], shift_pixel: int, channel_gamma: float) -> None:
    """Raise a clear error unless ``hw`` holds ``num_tokens`` tokens and the shift's parameters are valid."""
    H, W = hw
    T = num_tokens
    if H * W != T:
        raise ValueError(f"q_shift: grid {H}x{W} does not match {T} tokens")
    if not 0 <= channel_gamma <= 0.25:
        raise ValueError(f"q_shift: channel_gamma must be in [0, 1/4], got {channel_gamma}")
    if shift_pixel < 0:
        raise ValueError(f"q_shift: shift_pixel must be >= 0, got {shift_pixel}")
