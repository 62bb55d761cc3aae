"""Bi-WKV by chunked, rescaled prefix sums: O(T·C) time and memory, exact, autograd-able, any device.

Every sum of the op is a decayed prefix sum ``sum_{j<t} e^{mu_j - (t-j) w} g_j`` (the right-looking sums are the
same on the reversed sequence). :func:`decayed_prefix` computes it in linear space, in blocks of L tokens:

* inside a block, ``e^{mu_j + p_j w - m_b}`` with the block maximum ``m_b`` (all factors <= 1), then a cumsum;
* across blocks, a carried state ``e^{sigma} h`` rescaled to the running maximum at every block (as the official
  kernel and flash-attention do), so nothing overflows whatever the keys;
* each result is returned as ``(rho, h)``: the sum equals ``e^{rho} h`` where rho is the exponent of the sum's largest
  term (a running max), so ``h`` is of order 1 and every query can be rebased on its own largest piece before the
  pieces are added (a small query never underflows because another token is huge; an empty sum never looks large).

Terms that underflow inside a block are below e^-87 of the block maximum, which every query of the sequence sees with
weight >= e^{-2 L |w|}; the block length keeps ``L |w| <= 30``, so what is dropped is < e^-27 of any denominator.

The official kernel's function (32 token chunks, |t-i| across chunk boundaries, the spurious own-chunk term, EPS) is
assembled from the same primitive: see README.md for the derivation of each piece.
"""
from __future__ import annotations

import math

import torch

from vrwkv.ops.wkv.reference import KERNEL_CHUNKS, KERNEL_EPS

# A finite "minus infinity": exp() of it is exactly 0 and differences of two of them stay finite (no NaN in backward).
_NEG = -1e30
# The largest decay exponent a block may span (see the module docstring).
_MAX_BLOCK_DECAY = 30.0


def block_length(T: int, w_absmax: float, preferred: int) -> int:
    """Tokens per block: ``preferred`` (clipped to [1, T]) unless that lets the decay span more than
    ``_MAX_BLOCK_DECAY`` inside a block (``L·max|w| <= 30``)."""
    L = max(1, min(T, preferred))
    if w_absmax > 0:
        L = max(1, min(L, int(_MAX_BLOCK_DECAY / w_absmax)))
    return L


def _pad(mu: torch.Tensor, g: torch.Tensor, Tp: int):
    """Append absent tokens (log-scale _NEG, mantissa 0) up to length Tp."""
    S, B, T, C = g.shape
    if Tp == T:
        return mu, g
    return (torch.cat([mu, mu.new_full((B, Tp - T, C), _NEG)], 1),
            torch.cat([g, g.new_zeros((S, B, Tp - T, C))], 2))


def decayed_prefix(mu: torch.Tensor, g: torch.Tensor, w: torch.Tensor, block: int, inclusive: bool = False,
                   carry: bool = True):
    """``sum_{j<t} e^{mu_j - (t-j) w} g_j`` (``j <= t`` if inclusive), split into two pieces ``(rho, h)``, each
    meaning ``e^{rho} h``:

    * the intra-block piece: terms of t's own block of ``block`` tokens;
    * the carry piece: terms of all earlier blocks (omitted if ``carry=False``: the sum then restarts at every block).

    ``rho`` is the exponent of the piece's largest term (a running max), so ``h`` is of order 1 and an empty piece has
    ``rho ~ _NEG``.

    Args:
        mu: log-scales [B, T, C] (``_NEG`` marks absent tokens).
        g: mantissas [S, B, T, C] (S stacked quantities sharing mu, e.g. numerator and denominator).
        w: decay per step [C] (any sign).
        block: block length L (see :func:`block_length`).
    Returns:
        list of pieces ``(rho [B, T, C], h [S, B, T, C])``.
    """
    S, B, T, C = g.shape
    L = block
    N = math.ceil(T / L)
    mu, g = _pad(mu, g, N * L)
    pw = torch.arange(L, device=mu.device, dtype=mu.dtype)[:, None] * w  # [L, C]
    a = mu.view(B, N, L, C) + pw  # [B, N, L, C] exponent relative to the block start
    with torch.no_grad():  # references only: every e^{+m} is matched by an e^{-m}, so they carry no gradient
        m = a.amax(2)  # [B, N, C]
        cm = torch.cummax(a, 2).values  # [B, N, L, C] largest term so far
        if not inclusive:
            cm = _exclusive(cm, 2)
        # terms were summed at the block max m >= cm; the clamp only matters for sums that underflowed there
        intra_scale = torch.exp(torch.clamp(m[:, :, None] - cm, max=80.0))
    terms = torch.exp(a - m[:, :, None]) * g.view(S, B, N, L, C)  # [S, B, N, L, C]
    csum = terms.cumsum(3)
    intra = csum if inclusive else torch.cat([torch.zeros_like(csum[:, :, :, :1]), csum[:, :, :, :-1]], 3)
    pieces = [(cm - pw, intra * intra_scale)]
    if carry:
        # state entering block b: sum_{j < s_b} e^{mu_j - (s_b - j) w} g_j = e^{sigma_b} h_b, sigma_b its largest term
        Lw = L * w
        sigma = mu.new_full((B, C), _NEG)
        h = g.new_zeros((S, B, C))
        sigmas, hs = [sigma], [h]
        for b in range(N - 1):
            with torch.no_grad():
                r = torch.maximum(sigma, m[:, b])
            h = h * torch.exp(sigma - r) + csum[:, :, b, -1] * torch.exp(m[:, b] - r)
            sigma = r - Lw
            sigmas.append(sigma)
            hs.append(h)
        sigma_in = torch.stack(sigmas, 1)[:, :, None] - pw  # [B, N, L, C]
        h_in = torch.stack(hs, 2)[:, :, :, None].expand(S, B, N, L, C)
        pieces.append((sigma_in, h_in))
    return [(rho.reshape(B, N * L, C)[:, :T], h.reshape(S, B, N * L, C)[:, :, :T]) for rho, h in pieces]


def _reverse_prefix(mu, g, w, block):
    """``sum_{j>t} e^{mu_j - (j-t) w} g_j``: the exclusive prefix of the reversed sequence (pieces as decayed_prefix)."""
    return [(rho.flip(1), h.flip(2)) for rho, h in decayed_prefix(mu.flip(1), g.flip(2), w, block)]


def _combine(pieces, den_extra_log: torch.Tensor | None = None, den_extra_scale: float = 0.0) -> torch.Tensor:
    """``y = num / den`` from pieces ``(rho [B, T, C], h [2, B, T, C], factor)``; rebased on each query's largest rho.

    ``den_extra_scale · e^{den_extra_log}`` is added to the denominator only (the kernel's EPS term).
    """
    with torch.no_grad():
        ref = torch.stack([rho for rho, _, _ in pieces]).amax(0)
        if den_extra_log is not None:
            ref = torch.maximum(ref, den_extra_log)
    total = 0
    for rho, h, factor in pieces:
        term = h * torch.exp(rho - ref)
        total = total + (term if factor is None else term * factor)
    num, den = total[0], total[1]
    if den_extra_log is not None:
        den = den + den_extra_scale * torch.exp(den_extra_log - ref)
    return num / den


def _paper(k, g, w, u, block):
    # the paper's exponent is -(distance - 1) w: one factor e^{w} on both sides
    sides = decayed_prefix(k, g, w, block) + _reverse_prefix(k, g, w, block)
    return _combine([(rho + w, h, None) for rho, h in sides] + [(k + u, g, None)])


def _causal(k, g, w, u, block):
    # original (uni-directional) RWKV: only the left side, exponent -(distance - 1) w
    return _combine([(rho + w, h, None) for rho, h in decayed_prefix(k, g, w, block)] + [(k + u, g, None)])


def _official(k, g, w, u, chunks, eps):
    """The official kernel's function: spec §2.3 closed form, plus its EPS. See README.md."""
    S, B, T, C = g.shape
    Lc = math.ceil(T / chunks)  # tokens per kernel chunk; chunk starts are multiples of Lc
    k, g = _pad(k, g, math.ceil(T / Lc) * Lc)  # absent tokens at the end, like the kernel's empty lane slots
    # blocks = the kernel's chunks. Left: the carry piece is the far part (j < s, exponent -(t-j) w) and the intra
    # piece the near part (s <= j < t), whose exponent is -(t-j-1) w as in the paper.
    near, far = decayed_prefix(k, g, w, Lc)
    # spurious own-chunk term (s < j <= t): (1 - e^w) e^{k_j + (t-j) w}, restarted at every chunk start
    k_no_start = k.clone()
    k_no_start[:, ::Lc] = _NEG
    (spur,) = decayed_prefix(k_no_start, g, -w, Lc, inclusive=True, carry=False)
    # right (all j > t, any chunk): e^{k_j - (j-t) w}  (distance, not distance - 1)
    right = _reverse_prefix(k, g, w, Lc)
    pieces = [(far[0], far[1], None), (near[0] + w, near[1], None), (spur[0], spur[1], -torch.expm1(w))]
    pieces += [(rho, h, None) for rho, h in right] + [(k + u, g, None)]
    y = _combine(pieces, den_extra_log=_kernel_running_max(k, w, u, Lc), den_extra_scale=eps)
    return y[:, :T]


def _exclusive(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Shift by one along ``dim``, ``_NEG`` first: a max over j <= t becomes a max over j < t."""
    first = torch.full_like(x.narrow(dim, 0, 1), _NEG)
    return torch.cat([first, x.narrow(dim, 0, x.shape[dim] - 1)], dim)


@torch.no_grad()
def _kernel_running_max(k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, Lc: int) -> torch.Tensor:
    """The kernel's running max ``m_t = max(o_right, u + k_t, o_left)`` (its EPS enters as ``EPS·e^{m_t}``).

    k: [B, Tp, C] padded to whole chunks of Lc tokens. Returns [B, Tp, C].
    """
    B, Tp, C = k.shape
    n = Tp // Lc
    tw = torch.arange(Tp, device=k.device, dtype=k.dtype)[:, None] * w  # [Tp, C]
    pw = tw[:Lc]  # [Lc, C]
    kc = k.view(B, n, Lc, C)
    # o_left: max exponent of the left terms (far: k_j - (t-j) w for j < s; near: k_j - (t-j-1) w for s <= j < t)
    far = torch.cummax(k + tw, 1).values.view(B, n, Lc, C)[:, :, -1]
    far = _exclusive(far, 1)[:, :, None] - tw.view(n, Lc, C)
    near = _exclusive(torch.cummax(kc + pw, 2).values, 2) - (pw - w)
    # o_right: max_{j >= s} k_j - (j-s) w at the chunk start (the start token stays in it after being subtracted),
    # then o <- max(o + w, k_{t+1} + w) at every step of the chunk.
    start = (torch.cummax((k - tw).flip(1), 1).values.flip(1) + tw).view(B, n, Lc, C)[:, :, :1]
    later = torch.cat([kc.new_full((B, n, 1, C), _NEG), kc[:, :, 1:]], 2) - pw
    right = torch.maximum(start + pw, torch.cummax(later, 2).values + pw + w)
    return torch.maximum(torch.maximum(far, near), torch.maximum(right, kc + u)).reshape(B, Tp, C)


def chunked_bi_wkv(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, semantics: str = "paper",
                   chunks: int = KERNEL_CHUNKS, eps: float = KERNEL_EPS) -> torch.Tensor:
    """Bi-WKV by chunked rescaled prefix sums. Inputs/outputs as :func:`vrwkv.ops.bi_wkv`; computes in the inputs'
    dtype (the caller upcasts half precision). ``semantics`` is "paper", "official" or "causal" (the original
    uni-directional RWKV with the paper's weights); ``chunks``/``eps`` only apply to "official"."""
    g = torch.stack([v, torch.ones_like(v)])  # [2, B, T, C]: numerator and denominator share every exponent
    # y is invariant to a per-sequence shift of k (numerator, denominator and the EPS term all scale by it); centring
    # the largest key at 0 keeps the log-scales small, where float32 rounds them finely
    k = k - k.detach().amax(1, keepdim=True)
    if semantics == "official":
        return _official(k, g, w, u, chunks, eps)
    T = k.shape[1]
    # about 32 blocks, like the kernel's chunks: the carry loop stays short and the cumsums long
    block = block_length(T, w.detach().abs().max().item(), preferred=math.ceil(T / KERNEL_CHUNKS))
    return (_causal if semantics == "causal" else _paper)(k, g, w, u, block)
