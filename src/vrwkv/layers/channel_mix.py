"""Channel mix: the FFN of a VRWKV block (official ``VRWKV_ChannelMix``, spec §1.5)."""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from vrwkv.layers.linear import Linear, calls_hooks, linear_activated
from vrwkv.layers.q_shift import make_shift
from vrwkv.layers.rwkv_init import channel_ramp, check_init_mode, depth_ratios
from vrwkv.layers.shift_mix import fused_mixer, lerp_mixer, norm_parameters, shift_mix_linear
from vrwkv.layers.workspace import BLOCK_LARGEST, room, scratch
from vrwkv.ops.linear import linear, mm, product_takes_buffer


#: Tokens per chunk of the inference forward (:meth:`ChannelMix._inference_in_token_chunks`): a [2048, 4·192]
#: hidden chunk of VRWKV-T is 6 MB, reused from the heap, and 2048-row matmuls run at full speed.
INFERENCE_CHUNK_TOKENS = 2048


class ChannelMix(nn.Module):
    """Shift-mix, then ``sigmoid(receptance(xr)) * value(relu(key(xk))^2)``.

    Parameter names follow the official checkpoints: ``spatial_mix_k|r`` [1, 1, C] (absent without a shift),
    ``key`` (hidden x C), optional ``key_norm`` LayerNorm(hidden), ``receptance`` (C x C), ``value`` (C x hidden).

    Args:
        embed_dim: channels C.
        layer_id: index of the block (for the fancy init).
        depth: number of blocks (for the fancy init).
        hidden_rate: hidden width = ``hidden_rate * embed_dim``.
        shift_mode: ``"q_shift"``, ``"q_shift_multihead"``, ``"token_shift"`` or ``"none"``.
        shift_pixel: neighbour distance of the shift (0 disables it).
        channel_gamma: fraction of channels per Q-Shift direction.
        init_mode: ``"fancy"``, ``"local"`` or ``"global"``.
        key_norm: LayerNorm on the squared-ReLU hidden activations.
        shift_head_size: head width for ``shift_mode="q_shift_multihead"`` (VRWKV6).
        num_suffix_tokens: tokens after the patch tokens that the shift passes through (VRWKV6's cls token).
    """

    def __init__(
        self,
        embed_dim: int,
        layer_id: int,
        depth: int,
        hidden_rate: int = 4,
        shift_mode: str = "q_shift",
        shift_pixel: int = 1,
        channel_gamma: float = 0.25,
        init_mode: str = "fancy",
        key_norm: bool = False,
        shift_head_size: int = 64,
        num_suffix_tokens: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        check_init_mode(init_mode)
        depth_ratios(layer_id, depth)  # validates layer_id
        self.layer_id, self.depth, self.init_mode = layer_id, depth, init_mode
        self.shift = make_shift(shift_mode, shift_pixel, channel_gamma, shift_head_size, num_suffix_tokens)
        hidden = hidden_rate * embed_dim
        if self.shift is not None:
            self.spatial_mix_k = nn.Parameter(torch.empty(1, 1, embed_dim, **dd))
            self.spatial_mix_r = nn.Parameter(torch.empty(1, 1, embed_dim, **dd))
        self.key = Linear(embed_dim, hidden, bias=False, **dd)
        self.key_norm = nn.LayerNorm(hidden, **dd) if key_norm else None
        self.receptance = Linear(embed_dim, embed_dim, bias=False, **dd)
        self.value = Linear(hidden, embed_dim, bias=False, **dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the mix parameters by ``init_mode`` (spec §1.7); Linears keep their init."""
        if self.shift is None:
            return
        if self.init_mode == "fancy":
            _, r1 = depth_ratios(self.layer_id, self.depth)
            x = channel_ramp(self.spatial_mix_k)
            self.spatial_mix_k.copy_(x**r1)
            self.spatial_mix_r.copy_(x**r1)
        else:
            value = 1.0 if self.init_mode == "local" else 0.5
            self.spatial_mix_k.fill_(value)
            self.spatial_mix_r.fill_(value)

    #: :meth:`forward` takes the LayerNorm of its input (``norm=``), fused into its shift-mix projections.
    fuses_input_norm = True

    def forward(self, x: torch.Tensor, hw: tuple[int, int], norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """Args: x ``[B, T, C]`` tokens, hw the patch grid (H, W); ``norm``: a LayerNorm over C that x goes through
        first (with autograd inside the shift-mix projections, which keep x and not the normalised tokens too).
        Returns ``[B, T, C]``.

        With autograd on, the graph keeps 7 token tensors' worth for the backward instead of 14 (in units of
        ``[B, T, C]``; hidden tensors count ``hidden_rate``): ``x`` (the mixes are recomputed from it), ``relu(k)``
        (``relu(k)^2`` is recomputed from it) and the gate's ``sigmoid(r)`` and ``value(.)``.
        """
        if not torch.is_grad_enabled():
            if torch.jit.is_tracing() or torch.compiler.is_compiling():  # (tracing loses writes into buffers)
                return self.mlp(self.token_mix(x if norm is None else norm(x), hw))
            return self._inference_in_token_chunks(x, hw, norm=norm)
        if norm is not None and self.shift is None:
            x, norm = norm(x), None
        if self.shift is None:
            k, r = self.key(x), self.receptance(x)  # both keep the same x
        else:
            mix = torch.stack([self.spatial_mix_k, self.spatial_mix_r])  # [2, 1, 1, C]
            k, r = shift_mix_linear(x, hw, self.shift, mix, (self.key.weight, self.receptance.weight),
                                    norm=norm_parameters(norm))
        if self.key_norm is None:
            v = squared_relu_linear(k, self.value.weight)
        else:
            v = self.value(self.key_norm(squared_relu(k)))
        return torch.sigmoid(r) * v

    # The forward in two stages, so that a caller can run the MLP on token chunks (low-memory inference).
    def token_mix(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Shift and mix: ``[B, T, C]`` -> the inputs of key and receptance stacked, ``[2, B, T, C]``: one
        ``torch.lerp(shift(x), x, mu)`` (= ``x * mu + shift(x) * (1 - mu)``) for both mu. Without a shift: ``x``
        expanded (no copy)."""
        if self.shift is None:
            return x.expand(2, *x.shape)
        mix = torch.stack([self.spatial_mix_k, self.spatial_mix_r])  # [2, 1, 1, C]
        return torch.lerp(self.shift(x, hw), x, mix)  # [2, B, T, C]

    def mlp(self, xkr: torch.Tensor) -> torch.Tensor:
        """``sigmoid(receptance(xr)) * value(key_norm(relu(key(xk))^2))`` for ``xkr = [xk, xr]`` ``[2, B, T, C]``.

        Without autograd the ReLU is fused into the key's product where oneDNN computes it (a post-op,
        :func:`vrwkv.layers.linear.linear_activated`; else in place in its output) and the other activations run in place in the matmul outputs
        (no extra [B, T, hidden] buffer).
        """
        xk, xr = xkr.unbind(0)
        grad = torch.is_grad_enabled()
        k = squared_relu(self.key(xk)) if grad else linear_activated(self.key, xk, "relu").square_()  # [B, T, hidden]
        if self.key_norm is not None:
            k = self.key_norm(k)
        r = self.receptance(xr)
        return torch.sigmoid(r) * self.value(k) if grad else self.value(k).mul_(r.sigmoid_())

    def add_to(self, residual: torch.Tensor, x: torch.Tensor, hw: tuple[int, int],
               gamma: torch.Tensor | None = None, norm: nn.Module | None = None) -> torch.Tensor:
        """``residual += self(x, hw)`` (``self(norm(x), hw)`` with ``norm``; times ``gamma`` if given), in place,
        without autograd: each token chunk's output rows are added as they are made (no ``[B, T, C]`` output tensor:
        at high resolution fewer fresh pages from the kernel per block). The same arithmetic as
        ``residual.add_(self(x, hw))``. Returns ``residual``.

        With ``norm`` (a module over the channels), ``norm(x)`` is made here and freed once the last chunk's mixes
        are made: one ``[B, T, C]`` less at the products than if the caller held it; ``x`` may then be
        ``residual`` itself."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in (residual, x, *self.parameters())):
            raise RuntimeError("ChannelMix.add_to writes in place: use it without autograd (torch.no_grad())")
        if residual.shape != x.shape:
            raise ValueError(f"add_to: residual {list(residual.shape)} and x {list(x.shape)} must match")
        if norm is None and residual.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            raise ValueError("add_to: x shares memory with residual, which is written while x is read: pass a copy, "
                             "or the norm that makes one (norm=)")
        self._inference_in_token_chunks(x, hw, residual, gamma, norm)
        return residual

    def _inference_in_token_chunks(self, x: torch.Tensor, hw: tuple[int, int], residual: torch.Tensor | None = None,
                                   gamma: torch.Tensor | None = None, norm: nn.Module | None = None) -> torch.Tensor:
        """The forward without autograd, over chunks of ``INFERENCE_CHUNK_TOKENS`` tokens (of all B·T): the mixes,
        the hidden activations and the gate live per chunk only. With ``residual``: its rows get each chunk's output
        (times ``gamma``) added instead (:meth:`add_to`).

        The same arithmetic per token as :meth:`mlp` (the ReLU fused into the key's product as there); the
        matmuls keep their efficiency (thousands of rows per chunk). The hidden ``[B, T, hidden]`` tensor is never
        allocated: at 2048 px (16,384 tokens) it is 50 MB, above glibc's mmap threshold, i.e. fresh kernel pages
        page-faulted on every forward.

        Where the key's product takes a buffer, its output and the mix rows go into the block buffer shared by a
        model's blocks (:data:`vrwkv.layers.workspace.BLOCK_LARGEST`), unless hooks may keep them; when adding into
        ``residual``, the value and gate rows too if they fit in it as it is (in fewer rows per chunk than
        ``INFERENCE_CHUNK_TOKENS`` where that makes them fit).

        ``norm``: a module x goes through first. Its output, and the plain mixer's ``shift(x)``, are dropped once the
        last chunk's mixes are made, before its products (the block's peak).
        """
        if norm is not None:
            x = norm(x)
        B, T, C = x.shape
        rows = x.reshape(B * T, C)
        mix_into = None
        if self.shift is not None:  # the fused kernel mixes each chunk straight from x; else from shift(x) once
            mus = (self.spatial_mix_k[0, 0], self.spatial_mix_r[0, 0])
            mix_into = fused_mixer(x, hw, self.shift, mus) or lerp_mixer(x, self.shift(x, hw), mus)
        out = None if residual is None else residual.view(B * T, -1)
        rows_per_chunk = min(INFERENCE_CHUNK_TOKENS, B * T)
        shared = not any(calls_hooks(m) for m in (self.key, self.value, self.receptance))
        hidden = values = gates = None
        if shared and product_takes_buffer(rows, self.key.weight, self.key.bias):
            # one buffer: the hidden activations [n, hidden] and the mix rows [n, C] (alive together), and when
            # adding into the residual, the value and gate rows [n, C] too if they fit without growing it (at high
            # resolution, or with many images, the spatial mix sized it larger; their output never leaves this
            # method): in fewer rows per chunk if that is what makes them fit
            per_row = [self.key.weight.shape[0], C]
            per_row_extra = [self.value.weight.shape[0], self.receptance.weight.shape[0]]
            space = room(BLOCK_LARGEST, rows)
            fit = space // sum(per_row + per_row_extra)  # rows with their value and gate rows
            if residual is not None and fit >= 1 and rows_per_chunk * sum(per_row) <= space:
                rows_per_chunk = min(rows_per_chunk, fit)
                per_row += per_row_extra
            sizes = [rows_per_chunk * n for n in per_row]
            pieces = scratch(BLOCK_LARGEST, (sum(sizes),), rows).split(sizes)
            hidden, mixed = (p.view(rows_per_chunk, -1) for p in pieces[:2])
            if len(pieces) == 4:
                values, gates = (p.view(rows_per_chunk, -1) for p in pieces[2:])
        else:
            mixed = rows.new_empty(rows_per_chunk, C)
        for start in range(0, B * T, rows_per_chunk):
            chunk = slice(start, min(start + rows_per_chunk, B * T))
            x_c, buf, tokens = rows[chunk], mixed[: chunk.stop - chunk.start], (chunk.start, chunk.stop)
            xk = x_c if mix_into is None else mix_into(0, buf, tokens)
            into = None if hidden is None else hidden[: chunk.stop - chunk.start]
            k = linear_activated(self.key, xk, "relu", into=into).square_()  # [n, hidden]
            if self.key_norm is not None:
                k = self.key_norm(k)
            xr = x_c if mix_into is None else mix_into(1, buf, tokens)
            if chunk.stop == B * T and mix_into is not None:  # the mixes are made: only they read x and shift(x)
                x = rows = x_c = mix_into = None
            if values is None:
                value = self.value(k)  # (through the modules: autocast, hooks and FLOP counters see them)
                gate = self.receptance(xr).sigmoid_()  # [n, C]
            else:  # (the same products, into the buffer)
                n = chunk.stop - chunk.start
                value = linear_activated(self.value, k, None, into=values[:n])
                gate = linear_activated(self.receptance, xr, "sigmoid", into=gates[:n])
            if residual is not None:
                branch = value.mul_(gate)
                out[chunk].add_(branch) if gamma is None else out[chunk].addcmul_(branch, gamma)
                continue
            if chunk.stop - chunk.start == B * T:  # one chunk: the gate in the value's buffer
                return value.mul_(gate).view(B, T, -1)
            if out is None:  # (in the matmuls' dtype: autocast's, if on)
                out = value.new_empty(B * T, value.shape[1])
            torch.mul(value, gate, out=out[chunk])  # the gate written straight into its rows of the output
        return out.view(B, T, -1)

    def extra_repr(self) -> str:
        return f"layer_id={self.layer_id}"


class _SquaredReLU(torch.autograd.Function):
    """``relu(x)^2`` in two passes forward and two backward (``2 relu(x) g``), keeping one [*, hidden] tensor for
    backward; autograd through ``square(relu(x))`` takes four passes backward (pow backward, threshold backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(x)
        ctx.save_for_backward(s)
        return s * s

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (s,) = ctx.saved_tensors
        return (s + s).mul_(grad)


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """``relu(x) ** 2`` (the channel mix activation), differentiable, with a cheaper backward than autograd's."""
    return _SquaredReLU.apply(x)


class _SquaredReLULinear(torch.autograd.Function):
    """``F.linear(relu(x)^2, weight)`` keeping ``relu(x)`` (and the weight) for the backward: ``relu(x)^2`` is
    recomputed from it (one pass) for the weight gradient, so the [*, hidden] input of the matmul is not kept too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        s = torch.relu(x)
        ctx.save_for_backward(s, weight)
        return linear(s * s, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        s, weight = ctx.saved_tensors
        # the forward's matmul precision (autocast's, if it was on) is the output's dtype
        dtype, hidden = grad.dtype, s.shape[-1]
        grad = grad.reshape(-1, grad.shape[-1])  # [N, out]
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            squared = torch.square(s.view(-1, hidden)).to(dtype)  # [N, hidden], as in the forward
            grad_w = mm(grad.t(), squared).to(weight.dtype)  # [out, hidden]
            del squared
        if ctx.needs_input_grad[0]:
            # d relu(x)^2 / dx = 2 relu(x): the factor 2 goes into the (small) weight, exactly (a power of two)
            grad_x = mm(grad, (weight * 2).to(dtype)).view(s.shape).to(s.dtype).mul_(s)
        return grad_x, grad_w


def squared_relu_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(relu(x) ** 2, weight)`` (the channel mix value projection of its activation), keeping only
    ``relu(x)`` for the backward where autograd keeps ``relu(x)`` and ``relu(x)^2``.

    Args:
        x: key outputs ``[*, hidden]``.
        weight: ``[out, hidden]``.

    Returns:
        ``[*, out]``.
    """
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"squared_relu_linear: weight must be [out, {x.shape[-1]}], got {list(weight.shape)}")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _SquaredReLULinear.apply(x, weight)
    return linear(torch.relu(x).square_(), weight)
