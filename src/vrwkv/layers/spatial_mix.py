"""Spatial mix: the attention replacement of a VRWKV block (official ``VRWKV_SpatialMix``, spec §1.4)."""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from vrwkv.layers.linear import Linear, calls_hooks
from vrwkv.layers.q_shift import make_shift
from vrwkv.layers.rwkv_init import channel_ramp, check_init_mode, depth_ratios
from vrwkv.layers.shift_mix import norm_parameters, project_mixes, shift_mix, shift_mix_linear
from vrwkv.layers.workspace import BLOCK_LARGEST, scratch, workspace_open
from vrwkv.ops import bi_wkv, causal_wkv
from vrwkv.ops.linear import linear, mm, product_takes_buffer
from vrwkv.ops.wkv.fused_cpu import numba_enabled

WkvMode = Literal["bidirectional", "causal"]
WKV_MODES: tuple[str, ...] = ("bidirectional", "causal")
WKV_SEMANTICS: tuple[str, ...] = ("official", "paper")

#: Inference with the fused numba Bi-WKV runs k, v, r token-major (:meth:`SpatialMix.token_major_inference`);
#: False: channel-major as in training (for A/B measurements).
token_major_fused_inference = True


class SpatialMix(nn.Module):
    """Shift-mix, then ``output(sigmoid(r) * WKV(k, v))`` with ``w = spatial_decay / T``, ``u = spatial_first / T``.

    Parameter names follow the official checkpoints: ``spatial_decay``, ``spatial_first`` [C],
    ``spatial_mix_k|v|r`` [1, 1, C] (absent without a shift), ``key``, ``value``, ``receptance``, ``output``
    (bias-free Linears) and the optional ``key_norm`` LayerNorm (it normalises the WKV output, despite its name).

    Args:
        embed_dim: channels C.
        layer_id: index of the block (for the fancy init).
        depth: number of blocks (for the fancy init).
        shift_mode: ``"q_shift"``, ``"q_shift_multihead"``, ``"token_shift"`` or ``"none"``.
        shift_pixel: neighbour distance of the shift (0 disables it, as ``"none"``).
        channel_gamma: fraction of channels per Q-Shift direction.
        init_mode: ``"fancy"`` (official default), ``"local"`` or ``"global"``.
        key_norm: LayerNorm on the WKV output.
        wkv_mode: ``"bidirectional"`` (Bi-WKV) or ``"causal"`` (original RWKV, ablation).
        wkv_semantics: Bi-WKV function: ``"official"`` (what the official CUDA kernel computes, reproduces the
            released checkpoints) or ``"paper"`` (the paper's formula). Ignored when ``wkv_mode="causal"``.
    """

    def __init__(
        self,
        embed_dim: int,
        layer_id: int,
        depth: int,
        shift_mode: str = "q_shift",
        shift_pixel: int = 1,
        channel_gamma: float = 0.25,
        init_mode: str = "fancy",
        key_norm: bool = False,
        wkv_mode: str = "bidirectional",
        wkv_semantics: str = "official",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        check_init_mode(init_mode)
        if wkv_mode not in WKV_MODES:
            raise ValueError(f"wkv_mode must be one of {WKV_MODES}, got {wkv_mode!r}")
        if wkv_semantics not in WKV_SEMANTICS:
            raise ValueError(f"wkv_semantics must be one of {WKV_SEMANTICS}, got {wkv_semantics!r}")
        self.layer_id, self.depth, self.init_mode = layer_id, depth, init_mode
        self.wkv_mode, self.wkv_semantics = wkv_mode, wkv_semantics
        depth_ratios(layer_id, depth)  # validates layer_id
        self.shift = make_shift(shift_mode, shift_pixel, channel_gamma)

        self.spatial_decay = nn.Parameter(torch.empty(embed_dim, **dd))
        self.spatial_first = nn.Parameter(torch.empty(embed_dim, **dd))
        if self.shift is not None:
            self.spatial_mix_k = nn.Parameter(torch.empty(1, 1, embed_dim, **dd))
            self.spatial_mix_v = nn.Parameter(torch.empty(1, 1, embed_dim, **dd))
            self.spatial_mix_r = nn.Parameter(torch.empty(1, 1, embed_dim, **dd))
        self.key = Linear(embed_dim, embed_dim, bias=False, **dd)
        self.value = Linear(embed_dim, embed_dim, bias=False, **dd)
        self.receptance = Linear(embed_dim, embed_dim, bias=False, **dd)
        self.key_norm = nn.LayerNorm(embed_dim, **dd) if key_norm else None
        self.output = Linear(embed_dim, embed_dim, bias=False, **dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the decay, bonus and mix parameters by ``init_mode`` (spec §1.7); Linears keep their init."""
        if self.init_mode == "fancy":
            r0, r1 = depth_ratios(self.layer_id, self.depth)
            C = self.spatial_decay.shape[0]
            c = torch.arange(C, device=self.spatial_decay.device, dtype=torch.float32)
            # -5 at c = 0 up to +3 at c = C - 1, steeper curve in deeper layers
            self.spatial_decay.copy_(-5 + 8 * (c / max(C - 1, 1)) ** (0.7 + 1.3 * r0))
            zigzag = 0.5 * (((c + 1) % 3) - 1)  # 0, 0.5, -0.5, 0, ...
            self.spatial_first.copy_(math.log(0.3) + zigzag)
            if self.shift is not None:
                x = channel_ramp(self.spatial_mix_k)
                self.spatial_mix_k.copy_(x**r1)
                self.spatial_mix_v.copy_(x**r1 + 0.3 * r0)
                self.spatial_mix_r.copy_(x ** (0.5 * r1))
        else:
            fill = 1.0 if self.init_mode == "local" else 0.0
            self.spatial_decay.fill_(fill)
            self.spatial_first.fill_(fill)
            if self.shift is not None:
                for p in (self.spatial_mix_k, self.spatial_mix_v, self.spatial_mix_r):
                    p.fill_(1.0 if self.init_mode == "local" else 0.5)

    #: :meth:`forward` takes the LayerNorm of its input (``norm=``), fused into its shift-mix projections.
    fuses_input_norm = True

    def forward(self, x: torch.Tensor, hw: tuple[int, int], norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """Args: x ``[B, T, C]`` tokens, hw the patch grid (H, W); ``norm``: a LayerNorm over C that x goes through
        first, inside the shift-mix projections (:func:`~vrwkv.layers.shift_mix.shift_mix_linear`): with autograd
        they keep x for the backward and not the normalised tokens too; without, the normalised tokens are freed
        before the Bi-WKV. Returns ``[B, T, C]``."""
        if norm is not None and not (self.channel_major and self.shift is not None):
            x, norm = norm(x), None
        if self.token_major_inference(x):  # the shift-and-mix Linears into the token-major fused Bi-WKV
            if self.shift is None:
                k, v, r = self.project(self.token_mix(x, hw))
            else:  # one mix buffer for the three mixes, Linears ([B, T, C] each), then the WKV's output in it
                weights = (self.key.weight, self.value.weight, self.receptance.weight)
                buffer, outputs = self._inference_buffers(x, weights)
                k, v, r = shift_mix_linear(x, hw, self.shift, self._mix(), weights, mix_buffer=buffer,
                                           outputs=outputs, norm=norm_parameters(norm))
                return self.gate_output(r, self.wkv(k, v, x.shape[1], out=buffer))
            return self.gate_output(r, self.wkv(k, v, x.shape[1]))
        if self.channel_major:
            y_into = None
            if self.shift is None:
                k, v, r = self.project_channel_major(self.token_mix(x, hw))
            else:  # shift, mix and project in one Function: autograd keeps x only, not the three mixes
                weights = (self.key.weight, self.value.weight, self.receptance.weight)
                buffer, outputs = None, None
                if workspace_open() and not torch.is_grad_enabled():  # (else y over the Bi-WKV's den: less memory)
                    buffer, outputs = self._inference_buffers(x, weights, channel_major=True)
                kvr = shift_mix_linear(x, hw, self.shift, self._mix(), weights, channel_major=True,  # [C, B, T] each
                                       mix_buffer=buffer, outputs=outputs, norm=norm_parameters(norm))
                k, v, r = (t.transpose(0, 1) for t in kvr)  # [B, C, T] views
                if outputs is not None:  # the WKV's output into the mix buffer, laid out [C, B, T] as it makes it
                    B, T, C = x.shape
                    y_into = buffer.view(C, B, T).permute(1, 2, 0)
            y = self.wkv(k.transpose(1, 2), v.transpose(1, 2), x.shape[1], out=y_into)  # [B, T, C] view of [C, B, T]
            return self.gate_output_channel_major(r, y.transpose(1, 2))
        k, v, r = self.project(self.token_mix(x, hw))
        return self.gate_output(r, self.wkv(k, v, x.shape[1]))

    def _inference_buffers(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...], channel_major: bool = False):
        """The mix/WKV buffer ``[B, T, C]`` and buffers for the k, v, r products (``[B, T, out]``, or ``[out, B, T]``
        if ``channel_major``), all pieces of the block buffer (:data:`~vrwkv.layers.workspace.BLOCK_LARGEST`): they
        are alive together anyway, so one buffer for them does not raise the peak. No product buffers (None) if hooks
        on the output Linear may keep ``r``, or where the products make their own outputs (oneDNN's): then the mix
        buffer is a tensor of its own, as a block buffer alone would stay alive through the channel mix and raise
        the peak by ``[B, T, C]`` (its chunks are smaller)."""
        B, T, C = x.shape
        if channel_major:
            takes = product_takes_buffer(weights[0], x.view(B * T, C))  # weight @ mix^T
        else:
            takes = product_takes_buffer(x.view(B * T, C), weights[0])
        if calls_hooks(self.output) or not takes:
            return x.new_empty(B, T, C), None
        sizes = [B * T * C] + [B * T * w.shape[0] for w in weights]
        pieces = scratch(BLOCK_LARGEST, (sum(sizes),), x).split(sizes)
        outputs = [piece.view((w.shape[0], B, T) if channel_major else (B, T, w.shape[0]))
                   for piece, w in zip(pieces[1:], weights)]
        return pieces[0].view(B, T, C), outputs

    @property
    def channel_major(self) -> bool:
        """Whether :meth:`forward` runs the projections and the gate channel-major (``[C, B, T]`` storage), except
        in inference with the fused numba Bi-WKV (:meth:`token_major_inference`).

        The block-matrix Bi-WKV and the fused scans' training kernels work channel-major: fed token-major k and v
        they transpose both, and their channel-major result made the gate a third transpose. Channel-major
        projections cost about what Linears do, so this path is faster with them (224 px batch 8 to 2048 px,
        inference and training; ``benchmarks/NOTES.md``). Token-major remains for ``key_norm`` (a LayerNorm over C)
        and the causal WKV (a token-major scan).
        """
        return self.wkv_mode == "bidirectional" and self.key_norm is None

    def token_major_inference(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` of ``x`` runs k, v, r token-major (Linears, ``[B, T, C]``) into the fused numba
        Bi-WKV's token-major kernel, instead of the :attr:`channel_major` path: inference (no autograd) on CPU
        float32/float64 tensors with the fused scans on (:func:`vrwkv.ops.use_numba`), the channel-major path
        otherwise applying, not tracing or compiling (the scans are opaque to graphs), and
        :data:`token_major_fused_inference`. (float64, and decays beyond the block path's range, run the chunked
        scans, themselves token-major.)

        Why: the token-major kernel reads k, v and writes y in the Linears' layout (eight adjacent channels per
        vector load and store) and is faster than the channel-major rows (1.0 vs 1.6 ms at 4,096 tokens, two
        threads); with MKL's ``torch.mm`` the token-major products were also faster (75-87 % of its peak against
        59-64 % for ``W @ X^T``). Training stays channel-major (as the fused backward is).
        """
        if not (token_major_fused_inference and self.channel_major) or torch.is_grad_enabled():
            return False
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or not numba_enabled():
            return False
        return not (torch.jit.is_tracing() or torch.compiler.is_compiling())

    # The forward in stages, so that a caller can run the per-token stages on token chunks (low-memory inference)
    # and the WKV, which needs every token, on channel groups.
    def token_mix(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Shift and mix: ``[B, T, C]`` -> the inputs of key, value, receptance stacked, ``[3, B, T, C]``.

        ``x * mu + shift(x) * (1 - mu)`` is one ``torch.lerp(shift(x), x, mu)`` for the three mu at once (one pass
        over the output; ``x - shift(x)`` is not materialised). Without a shift: ``x`` expanded (no copy).
        """
        if self.shift is None:
            return x.expand(3, *x.shape)
        return shift_mix(x, hw, self.shift, self._mix())  # [3, B, T, C]; autograd keeps x only, not shift(x) too

    def _mix(self) -> torch.Tensor:
        """The mix weights of key, value, receptance stacked: ``[3, 1, 1, C]``."""
        return torch.stack([self.spatial_mix_k, self.spatial_mix_v, self.spatial_mix_r])

    def project(self, xkvr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[3, B, T, C]`` -> key, value, receptance projections ``[B, T, C]`` each.

        (One ``bmm`` with the three weights stacked was measured: no faster than three Linears on CPU.)
        """
        xk, xv, xr = xkvr.unbind(0)  # (its backward is one stack; indexing would zero-fill [3, B, T, C] per slice)
        return self.key(xk), self.value(xv), self.receptance(xr)

    def wkv(self, k: torch.Tensor, v: torch.Tensor, num_tokens: int, channels: slice = slice(None),
            out: torch.Tensor | None = None) -> torch.Tensor:
        """The WKV of ``k``, ``v`` ``[B, T, C']`` holding all tokens and the channels ``channels`` (all by default;
        the WKV is independent per channel, so a slice gives the slice of the full result), into ``out`` if given
        (see :func:`vrwkv.ops.bi_wkv`).

        The decay and bonus are divided by ``num_tokens``: the official code divides by the *current* token count,
        so w and u change with the input resolution.
        """
        w = self.spatial_decay[channels] / num_tokens
        u = self.spatial_first[channels] / num_tokens
        if self.wkv_mode == "bidirectional":
            return bi_wkv(k, v, w, u, semantics=self.wkv_semantics, out=out)
        return causal_wkv(k, v, w, u, out=out)

    def gate_output(self, r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``output(sigmoid(r) * key_norm(y))`` for receptance ``r`` and WKV ``y`` ``[B, T, C]`` (any token subset).

        Without autograd the gate is applied in place in ``r``'s buffer (``r`` must be the caller's own tensor).
        """
        if self.key_norm is not None:
            y = self.key_norm(y)
        if torch.is_grad_enabled():
            return self.output(torch.sigmoid(r) * y)
        return self.output(r.sigmoid_().mul_(y))

    def project_channel_major(self, xkvr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[3, B, T, C]`` -> key, value, receptance projections as ``[B, C, T]`` views of ``[C, B, T]`` storage.

        ``W @ X^T`` over all B·T tokens as one ``mm`` (BLAS reads the transposed operand in place; as fast as the
        Linear), with the module's own weights. Autograd's ``mm`` backward returns the input gradient in the
        layout of the input, so gradients flow back token-major without transposes (``bmm`` would not).
        """
        weights = (self.key.weight, self.value.weight, self.receptance.weight)
        return tuple(t.transpose(0, 1) for t in project_mixes(xkvr, weights, channel_major=True))  # [B, C, T] views

    def gate_output_channel_major(self, r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``output(sigmoid(r) * y)`` -> ``[B, T, C]`` for ``r`` from :meth:`project_channel_major` and the WKV
        ``y`` as ``[B, C, T]`` (any storage with tokens innermost). Without autograd the gate runs in place in ``r``.
        """
        if torch.is_grad_enabled():
            return gated_output_channel_major(r, y, self.output.weight)
        return _project_gate(r.sigmoid_().mul_(y), self.output.weight)

    def extra_repr(self) -> str:
        return f"layer_id={self.layer_id}, wkv_mode={self.wkv_mode!r}, wkv_semantics={self.wkv_semantics!r}"


class _GatedOutputChannelMajor(torch.autograd.Function):
    """``(sigmoid(r) * y) @ W^T`` from channel-major r, y, keeping r and y (the Bi-WKV keeps y anyway) for the
    backward instead of sigmoid(r) and the gate: the gate is recomputed (two passes) for the weight gradient."""

    @staticmethod
    def forward(ctx, r: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(r, y, weight)
        return _project_gate(torch.sigmoid(r) * y, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        r, y, weight = ctx.saved_tensors
        B, C, T = r.shape
        s = torch.sigmoid(r)  # [B, C, T] view of r's layout
        g = (s * y).transpose(0, 1).reshape(C, B * T)  # [C, B·T] (a view when r is [C, B, T] storage)
        grad_rows = grad.reshape(B * T, -1)  # [B·T, C_out]
        d_weight = mm(grad_rows.t(), g.t())  # [C_out, C]
        d_g = mm(weight.t(), grad_rows.t()).view(C, B, T).transpose(0, 1)  # [B, C, T] view of [C, B, T]
        d_y = d_g * s
        d_r = d_y * y
        d_r = d_r.addcmul_(d_r, s, value=-1)  # d_g y s (1 - s)
        return d_r, d_y, d_weight


def _project_gate(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``g^T W^T`` ``[B, T, C_out]`` for the gate g ``[B, C, T]`` laid out as r (``[C, B, T]`` storage: the reshape to
    ``[C, B·T]`` is a view) and the output weight ``[C_out, C]``."""
    B, C, T = g.shape
    return linear(g.transpose(0, 1).reshape(C, B * T).t(), weight).view(B, T, -1)


def gated_output_channel_major(r: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``output(sigmoid(r) * y)`` -> ``[B, T, C_out]`` for r, y ``[B, C, T]`` (tokens innermost) and the output
    weight ``[C_out, C]``; differentiable, keeping r and y only for the backward."""
    return _GatedOutputChannelMajor.apply(r, y, weight)
