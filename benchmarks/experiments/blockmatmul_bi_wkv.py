"""Bi-WKV with the sums inside each block of L tokens as one batched matmul per channel (few passes over memory).

For blocks of L tokens (the official kernel's own chunks in ``"official"`` semantics) and each channel, a fixed
``[L + 2, L]`` matrix holds the weights between the tokens of a block (both directions and the self term, in the
chosen semantics) plus two rows giving each block's summary as seen from just after and just before it. One ``bmm``
over all blocks, numerator and denominator at once, replaces the elementwise scans of :mod:`.chunked`. Blocks talk
through an ``[N, N]`` carry matrix per (batch, channel), rebased on its largest entry as in :mod:`.chunked`.

Scales: keys are shifted by their block maximum m_n before ``exp`` (every factor <= 1) and the matrix entries are at
most ``e^{L |w|} <= e^30``. A block's own sum always contains its largest key with weight >= e^{-L|w| - max(0, -u)},
so nothing a query needs underflows when ``L |w| <= 30`` and ``u > -50`` (i.e. |spatial_first| <= 100 for T >= 2);
:func:`supports` reports when this path applies and :func:`vrwkv.ops.bi_wkv` falls back to :mod:`.chunked` otherwise.
"""
from __future__ import annotations

import math

import torch

from vrwkv.ops.wkv.chunked import _NEG, _exp_le0, _kernel_running_max  # experiment: not part of the package
from vrwkv.ops.wkv.reference import KERNEL_CHUNKS, KERNEL_EPS

_MAX_BLOCK_DECAY = 30.0
_MAX_BLOCK = 64


def block_size(T: int, semantics: str) -> int:
    """Tokens per block: the kernel's chunk for "official", about sqrt(T) (>= 16) for "paper"."""
    if semantics == "official":
        return math.ceil(T / KERNEL_CHUNKS)
    return min(T, max(16, math.ceil(T**0.5)))


def supports(T: int, w_absmax: float, u_min: float, semantics: str) -> bool:
    """Whether this path is exact for these sizes/values (else use the chunked path)."""
    L = block_size(T, semantics)
    return (semantics in ("paper", "official") and T >= 2 and L <= _MAX_BLOCK and L * w_absmax <= _MAX_BLOCK_DECAY
            and u_min > -50.0 and math.ceil(T / L) <= 128)


def _block_matrix(w: torch.Tensor, u: torch.Tensor, L: int, semantics: str) -> torch.Tensor:
    """[C, L + 2, L]: rows p < L are the weights of token q (column) for query p of the same block; row L the weight of
    q seen from the first token after the block (distance L - q); row L + 1 seen from the token before it (q + 1)."""
    p = torch.arange(L, device=w.device, dtype=w.dtype)
    d = (p[:, None] - p[None, :])  # [L, L] signed distance p - q
    wc = w[:, None, None]  # [C, 1, 1]
    if semantics == "paper":
        expo = -(d.abs() - 1) * wc  # -(|p-q| - 1) w
        D = torch.exp(expo)
        D = torch.where(d == 0, torch.exp(u)[:, None, None], D)
    else:  # official kernel, one chunk = one block (spec §2.3)
        right = torch.exp(d * wc)  # q > p: e^{-(q-p) w}
        left = torch.exp(-(d - 1) * wc) + (-torch.expm1(w))[:, None, None] * torch.exp(d * wc) * (p[None, :] > 0)
        D = torch.where(d < 0, right, left)  # q < p: e^{-(p-q-1) w} + (1 - e^w) e^{(p-q) w} [q > s]
        diag = torch.exp(u)[:, None] + (-torch.expm1(w))[:, None] * (p[None, :] > 0)  # e^u + (1 - e^w) [p > 0]
        D = torch.where(d == 0, diag[:, :, None], D)
    after = torch.exp(-(L - p) * wc[:, 0])  # [C, L]
    before = torch.exp(-(p + 1) * wc[:, 0])
    return torch.cat([D, after[:, None], before[:, None]], 1)


def _carry(m: torch.Tensor, summary: torch.Tensor, Lw: torch.Tensor, from_left: bool):
    """State entering each block from the blocks on one side, ``e^{sigma} h`` (distance from the block's edge token).

    m: [B, N, C] block maxima; summary: [S, B, N, C] block summaries at scale e^m (seen from just outside the block).
    Returns sigma [B, N, C] (detached largest exponent) and h [S, B, N, C].
    """
    N = m.shape[1]
    idx = torch.arange(N, device=m.device, dtype=m.dtype)[:, None]  # [N, 1]
    # exponent of source block n' seen from block n: m_n' - (|n - n'| - 1) L w
    dist = (idx - idx.T).abs()[None, :, :, None] - 1  # [1, N, N, 1]
    expo = m[:, None] - dist * Lw  # [B, N (target), N (source), C]
    mask = torch.ones(N, N, dtype=torch.bool, device=m.device)
    mask = (mask.tril(-1) if from_left else mask.triu(1))[None, :, :, None]
    expo = torch.where(mask, expo, _NEG)
    with torch.no_grad():
        sigma = expo.amax(2)  # [B, N, C]
    weights = _exp_le0(expo - sigma[:, :, None]) * mask
    return sigma, torch.einsum("bnjc,sbjc->sbnc", weights, summary)


def blockmatmul_bi_wkv(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, semantics: str = "paper",
                       eps: float = KERNEL_EPS) -> torch.Tensor:
    """Bi-WKV (paper or official semantics) by per-block matmuls; see the module docstring. Inputs/outputs as
    :func:`vrwkv.ops.bi_wkv`, computed in the inputs' dtype. Callers check :func:`supports` first."""
    B, T, C = k.shape
    L = block_size(T, semantics)
    N = math.ceil(T / L)
    k = k - k.detach().amax(1, keepdim=True)  # y is invariant to it; keeps scales near 0
    if N * L != T:  # absent tokens: weight 0 (and, in "official", the kernel's empty slots)
        k = torch.cat([k, k.new_full((B, N * L - T, C), _NEG)], 1)
        v = torch.cat([v, v.new_zeros((B, N * L - T, C))], 1)
    kb = k.view(B, N, L, C)
    with torch.no_grad():
        m = kb.amax(2)  # [B, N, C] block maxima
    E = _exp_le0(kb - m[:, :, None])  # [B, N, L, C]
    if N * L != T:
        E = E * (torch.arange(N * L, device=k.device) < T).view(1, N, L, 1)  # absent tokens weigh exactly 0
    X = torch.stack([E * v.view(B, N, L, C), E]).permute(4, 3, 0, 1, 2).reshape(C, L, 2 * B * N)  # [C, L, 2BN]
    Y = torch.bmm(_block_matrix(w, u, L, semantics), X).view(C, L + 2, 2, B, N)  # [C, L+2, 2, B, N]
    intra, after, before = Y[:, :L], Y[:, L], Y[:, L + 1]  # [C, L, 2, B, N], [C, 2, B, N] x2
    Lw = L * w
    # carried sums, each at the distance from the block's first (left) / last (right) token
    sig_l, h_l = _carry(m, after.permute(1, 2, 3, 0), Lw, from_left=True)
    sig_r, h_r = _carry(m, before.permute(1, 2, 3, 0), Lw, from_left=False)
    # per-position factors: left e^{-p w} (distance) / e^{-(p-1) w} (paper), right e^{-(L-1-p) w} / e^{-(L-2-p) w}
    p = torch.arange(L, device=k.device, dtype=k.dtype)[:, None]
    shift = w if semantics == "paper" else torch.zeros_like(w)
    a_l = -p * w + shift  # [L, C]
    a_r = -(L - 1 - p) * w + shift
    with torch.no_grad():
        ref = torch.maximum(torch.maximum(m, sig_l + a_l.amax(0)), sig_r + a_r.amax(0))  # [B, N, C] block reference
    # all factors <= 1; layout [C, L, 2, B, N] for the block tensors
    f_in = _exp_le0(m - ref).permute(2, 0, 1)[:, None, None]  # [C, 1, 1, B, N]
    f_l = (h_l * _exp_le0(sig_l - ref)).permute(3, 0, 1, 2)[:, None]  # [C, 1, 2, B, N]
    f_r = (h_r * _exp_le0(sig_r - ref)).permute(3, 0, 1, 2)[:, None]
    pos_l = torch.exp(a_l).T[:, :, None, None, None]  # [C, L, 1, 1, 1]
    pos_r = torch.exp(a_r).T[:, :, None, None, None]
    total = intra * f_in + f_l * pos_l + f_r * pos_r  # [C, L, 2, B, N]
    num, den = total[:, :, 0], total[:, :, 1]  # [C, L, B, N]
    if semantics == "official":
        run_max = _kernel_running_max(k, w, u, L).view(B, N, L, C).permute(3, 2, 0, 1)  # [C, L, B, N]
        den = den + eps * _exp_le0(run_max - ref.permute(2, 0, 1)[:, None])
    y = (num / den).permute(2, 3, 1, 0).reshape(B, N * L, C)
    return y[:, :T]
