"""Low-memory exact inference of a V1 VRWKV backbone (``VRWKV.set_low_memory``): the features of very large images
(8192² and 16384² px, i.e. 262,144 and 1,048,576 tokens for VRWKV-T) in one pass, without tiling approximations.

Only four ``[B, T, C]`` buffers live through the blocks (the residual stream, k, v, r); everything else is made per
token chunk or per channel group and freed at once:

* per-token work (norms, shift and mix, projections, gate, FFN) runs on chunks of whole grid rows, each read with
  ``shift_pixel`` extra rows on both sides so that the Q-Shift (or 1-D token shift) of the chunk sees its true
  neighbours; the [chunk, hidden] FFN activations are the largest temporaries;
* the Bi-WKV, which needs every token, runs on groups of channels (it is independent per channel) and writes its
  result over k;
* the patch embedding runs on strips of image rows (patches do not overlap).

Every value is computed by the same layer code as the normal forward (``SpatialMix.token_mix/wkv/gate_output`` and
its key/value/receptance Linears, ``ChannelMix.token_mix/mlp``), so results agree up to float rounding of differently
blocked matmuls.
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
from torch import nn

from vrwkv.layers import ChannelMix, SpatialMix, q_shift, token_shift
from vrwkv.ops.wkv.api import fused_cpu_applies
from vrwkv.ops.wkv.fused_cpu import TOKEN_UNIT


def check_low_memory_support(model: nn.Module) -> None:
    """Raise a ValueError if ``model`` has parts the low-memory path does not implement."""
    if getattr(model, "num_suffix_tokens", 0) or getattr(model, "num_prefix_tokens", 0):
        raise ValueError("low-memory inference supports models without extra (cls) tokens")
    for i, blk in enumerate(model.layers):
        if type(blk.att) is not SpatialMix or type(blk.ffn) is not ChannelMix:
            raise ValueError(f"low-memory inference supports the V1 SpatialMix/ChannelMix mixers only (block {i} has "
                             f"{type(blk.att).__name__}/{type(blk.ffn).__name__})")
        for mixer in (blk.att, blk.ffn):
            _halo_rows(mixer)  # raises for a shift it does not know


def _halo_rows(mixer: nn.Module) -> int:
    """Grid rows a chunk must read on each side for ``mixer``'s shift to see every neighbour it uses."""
    shift = mixer.shift
    if shift is None:
        return 0
    if isinstance(shift, partial) and shift.func in (q_shift, token_shift):
        return int(shift.keywords.get("shift_pixel", 1))  # token_shift needs fewer (s tokens before): s rows suffice
    raise ValueError(f"low-memory inference does not know the shift {shift!r} of {type(mixer).__name__}")


def _row_chunks(H: int, rows: int) -> Iterator[tuple[int, int]]:
    for h0 in range(0, H, rows):
        yield h0, min(H, h0 + rows)


@torch.no_grad()
def low_memory_forward_features(model: nn.Module, images: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """``model.forward_features(images)`` (final-normed tokens ``[B, T, C]``) with bounded temporaries.

    Args:
        model: a V1 :class:`~vrwkv.models.VRWKV` in eval mode.
        images: ``[B, in_chans, h, w]``.
        chunk_tokens: tokens per chunk of per-token work (whole grid rows, at least one row); the Bi-WKV channel
            groups hold about as many elements as one chunk.
    """
    if model.training:
        raise ValueError("low-memory inference is an inference path: call model.eval() first")
    if images.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
    B = images.shape[0]
    H, W = model.patch_embed.feat_size((images.shape[-2], images.shape[-1]))
    T, C = H * W, model.embed_dim
    rows = max(1, chunk_tokens // W)
    x = _embed(model, images, (H, W), rows)  # [B, T, C], the residual stream, updated in place
    k, v, r = (torch.empty_like(x) for _ in range(3))
    group = max(1, min(C, chunk_tokens * C // (B * T)))  # WKV channels per call
    if fused_cpu_applies(x):
        # the fused numba kernels' work units are 16 adjacent channels: a thread per unit, no part-empty vector lanes
        group = min(C, max(group, TOKEN_UNIT * torch.get_num_threads()))
    for blk in model.layers:
        _block(blk, x, (H, W), rows, group, k, v, r)
    del k, v, r
    for h0, h1 in _row_chunks(H, rows):
        tokens = x[:, h0 * W : h1 * W]
        tokens.copy_(model.ln1(tokens))
    return x


def _embed(model: nn.Module, images: torch.Tensor, hw: tuple[int, int], rows: int) -> torch.Tensor:
    """Patch embedding plus position embedding, strip by strip of patch rows, into one ``[B, T, C]`` tensor."""
    H, W = hw
    p = model.patch_embed.patch_size
    pos = model.pos_embed_for(hw)  # [1, T, C]
    x = None
    for h0, h1 in _row_chunks(H, rows):
        strip, _ = model.patch_embed(images[:, :, h0 * p : h1 * p])  # [B, (h1 - h0) * W, C]
        if x is None:
            x = strip.new_empty(images.shape[0], H * W, strip.shape[-1])
        torch.add(strip, pos[:, h0 * W : h1 * W], out=x[:, h0 * W : h1 * W])
    return model.drop_after_pos(x)  # identity in eval


def _block(
    blk: nn.Module, x: torch.Tensor, hw: tuple[int, int], rows: int, group: int,
    k: torch.Tensor, v: torch.Tensor, r: torch.Tensor,
) -> None:
    """One block in place on the residual stream ``x`` ``[B, T, C]``, with ``k``, ``v``, ``r`` as work buffers."""
    H, W = hw
    T, C = H * W, x.shape[-1]
    att, ffn = blk.att, blk.ffn
    if blk.ln0 is not None:
        for h0, h1 in _row_chunks(H, rows):
            x[:, h0 * W : h1 * W] = blk.ln0(x[:, h0 * W : h1 * W])

    # spatial mix 1/3: k, v, r of each chunk of rows (read with the halo rows its shift needs)
    pre_norm = blk.ln1 if not blk.post_norm else None
    halo = _halo_rows(att)
    for h0, h1 in _row_chunks(H, rows):
        a, b = max(0, h0 - halo), min(H, h1 + halo)
        t = x[:, a * W : b * W]
        xkvr = att.token_mix(pre_norm(t) if pre_norm is not None else t, (b - a, W))
        inputs = xkvr[:, :, (h0 - a) * W : (h1 - a) * W].unbind(0)  # xk, xv, xr of the chunk's own rows
        for buf, linear, inp in zip((k, v, r), (att.key, att.value, att.receptance), inputs):
            _linear_into(buf[:, h0 * W : h1 * W], linear, inp)
    # 2/3: the WKV of every token, a group of channels at a time, written over k
    for c0 in range(0, C, group):
        cs = slice(c0, min(C, c0 + group))
        k[..., cs] = att.wkv(k[..., cs].contiguous(), v[..., cs].contiguous(), T, cs)
    # 3/3: gate, output projection and residual per chunk (x is no longer read by the spatial mix)
    for h0, h1 in _row_chunks(H, rows):
        sl = slice(h0 * W, h1 * W)
        branch = att.gate_output(r[:, sl], k[:, sl])  # the gate runs in place in r
        branch = blk.ln1(branch) if blk.post_norm else branch
        _add_residual(x[:, sl], branch, blk.gamma1)

    # channel mix: the branch of every chunk goes to v (free now); x keeps its values until all chunks have read
    # their halo rows
    halo = _halo_rows(ffn)
    for h0, h1 in _row_chunks(H, rows):
        a, b = max(0, h0 - halo), min(H, h1 + halo)
        t = x[:, a * W : b * W]
        xkr = ffn.token_mix(blk.ln2(t) if not blk.post_norm else t, (b - a, W))
        branch = ffn.mlp(xkr[:, :, (h0 - a) * W : (h1 - a) * W])
        v[:, h0 * W : h1 * W] = blk.ln2(branch) if blk.post_norm else branch
    _add_residual(x, v, blk.gamma2)


def _linear_into(out: torch.Tensor, linear: nn.Linear, x: torch.Tensor) -> None:
    """``out[...] = linear(x)``, computed straight into ``out`` (no temporary) when that is possible (batch 1)."""
    if x.shape[0] == 1 and linear.bias is None and out.is_contiguous():
        torch.mm(x[0], linear.weight.t(), out=out[0])
    else:
        out.copy_(linear(x))


def _add_residual(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor | None) -> None:
    """``x += gamma * branch`` in place (as ``Block.residual`` without autograd)."""
    if gamma is None:
        x.add_(branch)
    else:
        x.addcmul_(branch, gamma)
