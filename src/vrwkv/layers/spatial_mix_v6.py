"""Spatial mix of VRWKV6: the attention replacement of a V6 block (official ``VRWKV_SpatialMix_V6``, spec §4.2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vrwkv.layers.linear import Linear
from vrwkv.layers.q_shift import make_shift
from vrwkv.layers.rwkv_init import channel_ramp, depth_ratios
from vrwkv.ops import bi_wkv6
from vrwkv.ops.wkv6.api import HEAD_SIZE

#: The five data-dependent mixes of the LoRA, in the official order (the rows of ``time_maa_w2``).
MIX_BRANCHES = ("w", "k", "v", "r", "g")


class SpatialMixV6(nn.Module):
    """RWKV-6 attention over the image tokens: data-dependent token-shift mixing and decay, Bi-WKV6, gate.

    With ``d = shift(x) - x`` (Q-Shift inside each head of 64 channels):

    * ``x_b = x + d * (maa_b + m_b)`` for b in (w, k, v, r, g), where ``m = tanh((x + d * maa_x) @ W1) @ W2`` is a
      rank-32 LoRA per branch (note: unlike V1, the mix weights multiply the *shifted* difference);
    * ``r, k, v = receptance(x_r), key(x_k), value(x_v)``, ``g = silu(gate(x_g))``;
    * ``w = time_decay + tanh(x_w @ D1) @ D2`` (per token; per-step decay ``exp(-exp(w))``, no division by T);
    * ``y = GroupNorm_heads(key_norm(bi_wkv6(r, k, v, w, time_faaaa)))``, ``out = output(y * g)``.

    Parameter names follow the official checkpoints: ``time_maa_x|w|k|v|r|g`` [1, 1, C], ``time_maa_w1``
    [C, 5 * 32], ``time_maa_w2`` [5, 32, C], ``time_decay`` [1, 1, C], ``time_decay_w1`` [C, 64], ``time_decay_w2``
    [64, C], ``time_faaaa`` [H, 64], bias-free Linears ``key, value, receptance, gate, output``, optional
    ``key_norm`` (LayerNorm), ``ln_x`` (GroupNorm with one group per head, eps 1e-5).

    Args:
        embed_dim: channels C (a multiple of 64).
        layer_id: index of the block (for the fancy init).
        depth: number of blocks (for the fancy init).
        num_heads: heads H with ``C = H * 64``.
        shift_pixel: neighbour distance of the Q-Shift (0 disables it: ``d = 0``).
        channel_gamma: fraction of each head's channels per Q-Shift direction.
        key_norm: LayerNorm on the WKV output, before ``ln_x``.
        num_suffix_tokens: tokens after the patch tokens (the cls token), passed through the shift unchanged.
        mix_rank: rank of the mixing LoRA (32 in the official code).
        decay_rank: rank of the decay LoRA (64 in the official code).
        init_mode: only ``"fancy"`` (spec §4.4); the official V6 has no other.
    """

    def __init__(
        self,
        embed_dim: int,
        layer_id: int,
        depth: int,
        num_heads: int,
        shift_pixel: int = 1,
        channel_gamma: float = 0.25,
        key_norm: bool = False,
        num_suffix_tokens: int = 0,
        mix_rank: int = 32,
        decay_rank: int = 64,
        init_mode: str = "fancy",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if embed_dim != num_heads * HEAD_SIZE:
            raise ValueError(f"embed_dim must be num_heads * {HEAD_SIZE} = {num_heads * HEAD_SIZE}; got {embed_dim}")
        if init_mode != "fancy":
            raise ValueError(f"VRWKV6 supports only init_mode='fancy' (the official one), got {init_mode!r}")
        depth_ratios(layer_id, depth)  # validates layer_id
        self.layer_id, self.depth, self.num_heads = layer_id, depth, num_heads
        self.shift = make_shift("q_shift_multihead", shift_pixel, channel_gamma, HEAD_SIZE, num_suffix_tokens)

        C = embed_dim
        self.time_maa_x = nn.Parameter(torch.empty(1, 1, C, **dd))
        self.time_maa_w = nn.Parameter(torch.empty(1, 1, C, **dd))
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, C, **dd))
        self.time_maa_v = nn.Parameter(torch.empty(1, 1, C, **dd))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, C, **dd))
        self.time_maa_g = nn.Parameter(torch.empty(1, 1, C, **dd))
        self.time_maa_w1 = nn.Parameter(torch.empty(C, len(MIX_BRANCHES) * mix_rank, **dd))
        self.time_maa_w2 = nn.Parameter(torch.empty(len(MIX_BRANCHES), mix_rank, C, **dd))
        self.time_decay = nn.Parameter(torch.empty(1, 1, C, **dd))
        self.time_decay_w1 = nn.Parameter(torch.empty(C, decay_rank, **dd))
        self.time_decay_w2 = nn.Parameter(torch.empty(decay_rank, C, **dd))
        self.time_faaaa = nn.Parameter(torch.empty(num_heads, HEAD_SIZE, **dd))
        self.key = Linear(C, C, bias=False, **dd)
        self.value = Linear(C, C, bias=False, **dd)
        self.receptance = Linear(C, C, bias=False, **dd)
        self.gate = Linear(C, C, bias=False, **dd)
        self.key_norm = nn.LayerNorm(C, **dd) if key_norm else None
        self.output = Linear(C, C, bias=False, **dd)
        self.ln_x = nn.GroupNorm(num_heads, C, eps=1e-5, **dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The fancy init of spec §4.4 for the ``time_*`` parameters; Linears and ``ln_x`` keep their init."""
        r0, r1 = depth_ratios(self.layer_id, self.depth)
        x = channel_ramp(self.time_maa_x)  # c / C, [1, 1, C]
        self.time_maa_x.copy_(1 - x**r1)
        self.time_maa_w.copy_(1 - x**r1)
        self.time_maa_k.copy_(1 - x**r1)
        self.time_maa_v.copy_(1 - (x**r1 + 0.3 * r0))
        self.time_maa_r.copy_(1 - x ** (0.5 * r1))
        self.time_maa_g.copy_(1 - x ** (0.5 * r1))
        for p in (self.time_maa_w1, self.time_maa_w2, self.time_decay_w1, self.time_decay_w2):
            nn.init.uniform_(p, -1e-4, 1e-4)
        C = self.time_decay.shape[-1]
        n = torch.arange(C, device=self.time_decay.device, dtype=torch.float32) / max(C - 1, 1)  # n / (C - 1)
        self.time_decay.copy_((-6 + 5 * n ** (0.7 + 1.3 * r0)).view(1, 1, C))
        zigzag = 0.1 * (((torch.arange(C, device=n.device) + 1) % 3) - 1)  # 0, 0.1, -0.1, 0, ...
        self.time_faaaa.copy_((r0 * (1 - n) + zigzag).view(self.num_heads, HEAD_SIZE))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Args: x ``[B, T, C]`` tokens, hw the patch grid (H, W). Returns ``[B, T, C]``."""
        B, T, C = x.shape
        delta = self.shift(x, hw) - x if self.shift is not None else torch.zeros_like(x)
        lora = torch.tanh(torch.addcmul(x, delta, self.time_maa_x) @ self.time_maa_w1)  # [B, T, 5 * rank]
        lora = lora.view(B * T, len(MIX_BRANCHES), -1).transpose(0, 1)  # [5, B*T, rank]
        # maa_b + m_b for the five branches: the static part added inside the LoRA matmul (baddbmm)
        maa = torch.cat([self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g])
        mix = torch.baddbmm(maa, lora, self.time_maa_w2).view(len(MIX_BRANCHES), B, T, C)  # [5, B, T, C]
        # x + delta * (maa_b + m_b), one addcmul per branch
        xw, xk, xv, xr, xg = (torch.addcmul(x, delta, m) for m in mix.unbind(0))

        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        g = F.silu(self.gate(xg))
        w = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2  # [B, T, C], raw decay
        y = bi_wkv6(r, k, v, w, self.time_faaaa, self.num_heads)
        if self.key_norm is not None:
            y = self.key_norm(y)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)  # GroupNorm per token, one group per head
        return self.output(y * g)

    def extra_repr(self) -> str:
        return f"layer_id={self.layer_id}, num_heads={self.num_heads}"
