"""Shift-and-mix of the RWKV mixers, ``lerp(shift(x), x, mu)`` for several ``mu``, with a lean training graph.

``x * mu + shift(x) * (1 - mu)`` (spec §1.4-1.5) through autograd keeps ``shift(x)`` and ``x`` for the lerp's backward
and, when Linears consume the mixes, the stacked mixes ``[n, B, T, C]`` for their weight gradients: ``n + 2`` token
tensors. The mixes are one pass from ``x``, so the functions here keep only ``x`` and recompute ``shift(x)`` (and the
mixes) in the backward; matmuls are never recomputed. Without autograd they are the plain formula, or, for the plain
Q-Shift on the CPU with numba enabled (:func:`vrwkv.ops.use_numba`), the fused kernel of :mod:`vrwkv.ops.shift_mix`,
which writes each mix straight from x (no ``shift(x)`` tensor), bit-identical.

The shift can be any differentiable function of ``x`` (the Q-Shift, the 1-D token shift, MAE's shift of the visible
tokens, ...): its transpose in the backward is autograd's vector-Jacobian product of the recomputed shift.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from vrwkv.layers.q_shift import q_shift_parameters
from vrwkv.ops.linear import linear, mm
from vrwkv.ops.shift_mix import fused_applies, fused_q_shift_lerp

#: ``shift(x [B, T, C], hw) -> [B, T, C]``; ``hw`` is passed through (the patch grid, or whatever the shift takes)
ShiftFn = Callable[[torch.Tensor, object], torch.Tensor]


def shift_mix(x: torch.Tensor, hw: tuple[int, int], shift: ShiftFn, mix: torch.Tensor) -> torch.Tensor:
    """``torch.lerp(shift(x, hw), x, mix)``: the mixes ``[n, B, T, C]`` for ``mix`` ``[n, 1, 1, C]``.

    When autograd records, only ``x`` is kept for the backward (``shift(x)`` is recomputed there): one ``[B, T, C]``
    tensor less than autograd through the lerp.

    Args:
        x: tokens ``[B, T, C]``.
        hw: the patch grid ``(H, W)``.
        shift: the token shift, ``shift(x, hw) -> [B, T, C]`` (e.g. from :func:`vrwkv.layers.make_shift`).
        mix: the mix weights ``mu``, ``[n, 1, 1, C]``.

    Returns:
        ``[n, B, T, C]``.
    """
    _check(x, mix)
    if torch.is_grad_enabled() and (x.requires_grad or mix.requires_grad):
        return _ShiftMix.apply(x, mix, hw, shift)
    mix_into = fused_mixer(x, hw, shift, mix)
    if mix_into is None:
        return torch.lerp(shift(x, hw), x, mix)
    mixes = x.new_empty((mix.shape[0], *x.shape))  # [n, B, T, C]
    for i in range(mix.shape[0]):
        mix_into(i, mixes[i])
    return mixes


def shift_mix_linear(
    x: torch.Tensor,
    hw: tuple[int, int],
    shift: ShiftFn,
    mix: torch.Tensor,
    weights: Sequence[torch.Tensor],
    channel_major: bool = False,
    mix_buffer: torch.Tensor | None = None,
    outputs: Sequence[torch.Tensor] | None = None,
    norm: tuple[torch.Tensor | None, torch.Tensor | None, float] | None = None,
) -> tuple[torch.Tensor, ...]:
    """The bias-free projections ``F.linear(m_i, weights[i])`` of the mixes ``m = shift_mix(x, hw, shift, mix)``
    (of ``layer_norm(x)`` with ``norm``).

    When autograd records, only ``x`` (and the weights) are kept for the backward: the mixes are recomputed there for
    the weight gradients. Autograd through :func:`shift_mix` and the Linears keeps ``x`` and the ``n`` mixes.

    Args:
        x: tokens ``[B, T, C]``.
        hw: the patch grid ``(H, W)``.
        shift: the token shift, ``shift(x, hw) -> [B, T, C]`` (e.g. from :func:`vrwkv.layers.make_shift`).
        mix: the mix weights ``mu``, ``[n, 1, 1, C]``.
        weights: ``n`` Linear weights ``[out_i, C]``.
        channel_major: return ``weights[i] @ m_i^T`` over all ``B * T`` tokens, ``[out_i, B, T]`` (for consumers that
            work channel-major, such as the Bi-WKV), instead of token-major.
        mix_buffer: without autograd, the ``[B, T, C]`` tensor (like ``x``) each mix is written into in turn before
            its projection (a fresh one if None); the caller may reuse it afterwards.
        outputs: without autograd, buffers ``[B, T, out_i]`` (``[out_i, B, T]`` if ``channel_major``) the products
            may be written into (``into`` of :func:`vrwkv.ops.linear.linear`); use the returned tensors.
        norm: ``(weight, bias, eps)`` of a LayerNorm over C that x goes through first. With autograd the function
            keeps x and the norm's statistics, not the normalised tokens too (the norm is recomputed in the
            backward): one ``[B, T, C]`` less than the norm run as a module before it.

    Returns:
        ``n`` tensors ``[B, T, out_i]`` (``[out_i, B, T]`` if ``channel_major``).
    """
    _check(x, mix)
    if len(weights) != mix.shape[0]:
        raise ValueError(f"shift_mix_linear: {mix.shape[0]} mixes but {len(weights)} weights")
    for w in weights:
        if w.dim() != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"shift_mix_linear: weights must be [out, {x.shape[-1]}], got {list(w.shape)}")
    norm_weight, norm_bias, eps = norm if norm is not None else (None, None, None)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, mix, norm_weight, norm_bias, *weights)):
        return _ShiftMixLinear.apply(x, mix, norm_weight, norm_bias, eps, hw, shift, channel_major, *weights)
    if norm is not None:
        x = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    if torch.jit.is_tracing() or torch.compiler.is_compiling():  # (tracing for export loses writes into buffers)
        return project_mixes(torch.lerp(shift(x, hw), x, mix), weights, channel_major)
    mix_into = fused_mixer(x, hw, shift, mix) or lerp_mixer(x, shift(x, hw), mix)
    if mix_buffer is None:
        mix_buffer = torch.empty_like(x)
    elif mix_buffer.shape != x.shape or mix_buffer.dtype != x.dtype or not mix_buffer.is_contiguous():
        raise ValueError(f"shift_mix_linear: mix_buffer must be contiguous {list(x.shape)} {x.dtype} like x, got "
                         f"{list(mix_buffer.shape)} {mix_buffer.dtype}")
    if outputs is not None and len(outputs) != len(weights):
        raise ValueError(f"shift_mix_linear: {len(weights)} weights but {len(outputs)} outputs")
    return _project_each(mix_into, mix_buffer, weights, channel_major, outputs)


def norm_parameters(norm: torch.nn.LayerNorm | None) -> tuple[torch.Tensor | None, torch.Tensor | None, float] | None:
    """``norm=`` of :func:`shift_mix_linear` for a LayerNorm module over the last dimension (None for None)."""
    if norm is None:
        return None
    if len(norm.normalized_shape) != 1:
        raise ValueError(f"shift_mix_linear: the norm must be over the channels only, got {norm.normalized_shape}")
    return norm.weight, norm.bias, norm.eps


#: ``mix_into(i, out, tokens=None)``: mix i written into ``out`` (all tokens, or the token rows ``tokens = (t0, t1)``
#: of the ``B * T``) and returned
MixInto = Callable[..., torch.Tensor]


def fused_mixer(x: torch.Tensor, hw: tuple[int, int], shift: ShiftFn, mus: Sequence[torch.Tensor]) -> MixInto | None:
    """When the fused shift-and-mix kernel takes them (``shift`` the plain Q-Shift, numba enabled, CPU float32 or
    float64, no autograd: :func:`vrwkv.ops.shift_mix.fused_applies`), a function writing the mix
    ``lerp(shift(x), x, mus[i])`` into a buffer straight from ``x``; otherwise None.

    None when tracing or compiling (the kernel is invisible to them): there the mixers keep plain ops.
    """
    parameters = q_shift_parameters(shift)
    if parameters is None or not all(fused_applies(x, mu) for mu in mus):
        return None
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None

    def mix_into(i, out, tokens=None):
        return fused_q_shift_lerp(x, hw, mus[i], *parameters, tokens=tokens, out=out)
    return mix_into


def lerp_mixer(x: torch.Tensor, shifted: torch.Tensor, mus: Sequence[torch.Tensor]) -> MixInto:
    """The plain mixer: ``torch.lerp(shifted, x, mus[i], out=out)`` (on the token rows ``tokens`` if given)."""
    B, T, C = x.shape
    x_rows, shifted_rows = x.reshape(B * T, C), shifted.reshape(B * T, C)

    def mix_into(i, out, tokens=None):
        if tokens is None:
            return torch.lerp(shifted, x, mus[i], out=out)
        rows = slice(*tokens)
        return torch.lerp(shifted_rows[rows], x_rows[rows], mus[i], out=out)
    return mix_into


def project_mixes(mixes: torch.Tensor, weights: Sequence[torch.Tensor], channel_major: bool) -> tuple[torch.Tensor, ...]:
    """``F.linear(m_i, w_i)`` ``[B, T, out_i]``, or ``w_i @ m_i^T`` ``[out_i, B, T]``, for the mixes ``[n, B, T, C]``."""
    return tuple(_project_one(m, w, channel_major) for m, w in zip(mixes.unbind(0), weights))


def _project_one(mixed: torch.Tensor, weight: torch.Tensor, channel_major: bool,
                 into: torch.Tensor | None = None) -> torch.Tensor:
    """One mix ``[B, T, C]`` projected: ``[B, T, out]``, or channel-major ``weight @ mixed^T`` ``[out, B, T]``;
    into ``into`` of that shape where the product takes it."""
    B, T, C = mixed.shape
    if not channel_major:
        if into is None:
            return linear(mixed, weight)
        return linear(mixed.reshape(B * T, C), weight, into=into.view(B * T, -1)).view(B, T, -1)
    into = None if into is None else into.view(-1, B * T)
    return linear(weight, mixed.reshape(B * T, C), into=into).view(-1, B, T)  # weight @ mixed^T


def _project_each(mix_into: MixInto, mixed: torch.Tensor, weights: Sequence[torch.Tensor],
                  channel_major: bool, outputs: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """:func:`project_mixes` without the stacked mixes: each mix is written into one reused ``[B, T, C]`` buffer and
    projected at once. The same passes, a third of the memory, and no ``[n, B, T, C]`` allocation: above glibc's mmap
    threshold (32 MB: 2048 px for VRWKV-T) every such allocation is fresh pages from the kernel, page-faulted on first
    write (the stacked lerp took 19.5 ms instead of 3.6 ms at 2048 px)."""
    out = []
    for i, w in enumerate(weights):
        out.append(_project_one(mix_into(i, mixed), w, channel_major, None if outputs is None else outputs[i]))
    return tuple(out)


def _check(x: torch.Tensor, mix: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"shift_mix: x must be [B, T, C], got {list(x.shape)}")
    if mix.dim() != 4 or mix.shape[1:3] != (1, 1) or mix.shape[3] != x.shape[2]:
        raise ValueError(f"shift_mix: mix must be [n, 1, 1, {x.shape[2]}], got {list(mix.shape)}")


def _shift_with_transpose(
    shift: ShiftFn, x: torch.Tensor, hw: tuple[int, int]
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``shift(x, hw)`` recomputed, and its transpose applied to a gradient (the vector-Jacobian product)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_()
        shifted = shift(leaf, hw)
    return shifted.detach(), lambda grad: torch.autograd.grad(shifted, leaf, grad)[0]


def _mix_backward(
    x: torch.Tensor, mix: torch.Tensor, grad: torch.Tensor, hw: tuple[int, int], shift: ShiftFn, needs_x: bool,
    needs_mix: bool, shifted_and_transpose: tuple | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``lerp(shift(x), x, mix)`` ``[n, B, T, C]`` for the output gradient ``grad``: ``x`` gets
    ``sum_i mu_i g_i`` directly and ``shift^T(sum_i (1 - mu_i) g_i)`` through the shift, ``mu_i`` gets
    ``sum_{B, T} (x - shift(x)) g_i``."""
    shifted, transpose = shifted_and_transpose or _shift_with_transpose(shift, x, hw)
    grad_x = grad_mix = None
    if needs_mix:
        grad_mix = (grad * (x - shifted)).sum((1, 2), keepdim=True)  # [n, 1, 1, C]
    if needs_x:
        direct = (grad * mix).sum(0)  # [B, T, C]
        grad_x = transpose(grad.sum(0).sub_(direct)).add_(direct)
    return grad_x, grad_mix


class _ShiftMix(torch.autograd.Function):
    """:func:`shift_mix`, keeping ``x`` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mix: torch.Tensor, hw: tuple[int, int], shift: ShiftFn) -> torch.Tensor:
        ctx.save_for_backward(x, mix)
        ctx.hw, ctx.shift = hw, shift
        return torch.lerp(shift(x, hw), x, mix)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, mix = ctx.saved_tensors
        needs_x, needs_mix = ctx.needs_input_grad[:2]
        return (*_mix_backward(x, mix, grad, ctx.hw, ctx.shift, needs_x, needs_mix), None, None)


class _ShiftMixLinear(torch.autograd.Function):
    """:func:`shift_mix_linear`, keeping ``x`` and the weights only (and the norm's parameters and statistics, with a
    norm); the backward recomputes the normalised tokens and the mixes (one shift and one lerp pass) for the weight
    gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mix: torch.Tensor, norm_weight: torch.Tensor | None,
                norm_bias: torch.Tensor | None, eps: float | None, hw: tuple[int, int], shift: ShiftFn,
                channel_major: bool, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.hw, ctx.shift, ctx.channel_major, ctx.eps = hw, shift, channel_major, eps
        normed, mean, rstd = (x, None, None) if eps is None else torch.native_layer_norm(
            x, (x.shape[-1],), norm_weight, norm_bias, eps)
        ctx.save_for_backward(x, mix, mean, rstd, norm_weight, norm_bias, *weights)
        return project_mixes(torch.lerp(shift(normed, hw), normed, mix), weights, channel_major)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        needs_x, needs_mix, needs_norm_weight, needs_norm_bias, _, _, _, _, *needs_w = ctx.needs_input_grad
        x, mix, mean, rstd, norm_weight, norm_bias, *weights = ctx.saved_tensors
        if ctx.eps is None:
            grad_x, grad_mix, grad_w = _shift_mix_linear_backward(ctx, grads, x, mix, weights, needs_x, needs_mix,
                                                                  needs_w)
            return (grad_x, grad_mix, None, None, None, None, None, None, *grad_w)
        C = x.shape[-1]
        normed = torch.native_layer_norm(x, (C,), norm_weight, norm_bias, ctx.eps)[0]  # as in the forward
        needs_normed = needs_x or needs_norm_weight or needs_norm_bias
        grad_normed, grad_mix, grad_w = _shift_mix_linear_backward(ctx, grads, normed, mix, weights, needs_normed,
                                                                   needs_mix, needs_w)
        del normed
        grad_x = grad_norm_weight = grad_norm_bias = None
        if needs_normed:
            grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
                grad_normed, x, (C,), mean, rstd, norm_weight, norm_bias,
                [needs_x, needs_norm_weight, needs_norm_bias])
        return (grad_x, grad_mix, grad_norm_weight, grad_norm_bias, None, None, None, None, *grad_w)


def _shift_mix_linear_backward(ctx, grads, x, mix, weights, needs_x, needs_mix, needs_w):
    """The gradients of x (the tokens shifted and mixed: the normalised ones with a norm), mix and the weights of
    :class:`_ShiftMixLinear`, given its output gradients ``grads`` and ``ctx`` (hw, shift, channel_major)."""
    # The outputs' dtype is the forward's matmul precision (autocast's, if it was on): the backward matmuls run
    # in it, as autograd through autocast's casts and F.linear would.
    dtype, C = grads[0].dtype, x.shape[-1]
    # token-major [B * T, out_i] (a transposed view of the channel-major [out_i, B * T])
    grads = [g.reshape(g.shape[0], -1).t() if ctx.channel_major else g.reshape(-1, g.shape[-1]) for g in grads]
    shifted, transpose = _shift_with_transpose(ctx.shift, x, ctx.hw)
    grad_w = [None] * len(weights)
    if any(needs_w):
        mixes = torch.lerp(shifted, x, mix).to(dtype)  # [n, B, T, C], as in the forward
        for i, (g, needed) in enumerate(zip(grads, needs_w)):
            if needed:  # sum over tokens of g_i^T m_i
                grad_w[i] = mm(g.t(), mixes[i].view(-1, C)).to(weights[i].dtype)  # [out_i, C]
        del mixes
    grad_x = grad_mix = None
    if needs_x or needs_mix:
        grad_mixes = x.new_empty((len(weights), *x.shape), dtype=dtype)  # [n, B, T, C]
        for i, (g, w) in enumerate(zip(grads, weights)):
            grad_mixes[i].view(-1, C).copy_(mm(g, w.to(dtype)))  # (oneDNN writes no out=)
        grad_x, grad_mix = _mix_backward(x, mix, grad_mixes.to(x.dtype), ctx.hw, ctx.shift, needs_x, needs_mix,
                                         (shifted, transpose))
    return grad_x, grad_mix, grad_w
