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
weight >= e^{-2 L |w|}; the block length keeps ``L |w| <= 30`` for ``|w| T <= 200``, so what is dropped is < e^-27 of
any denominator.

The official kernel's function (32 token chunks, |t-i| across chunk boundaries, the spurious own-chunk term, EPS) is
assembled from the same primitive: see README.md for the derivation of each piece.
"""
from __future__ import annotations

import math

import torch

from vrwkv.ops._numerics import exp_le0
from vrwkv.ops.wkv.reference import KERNEL_CHUNKS, KERNEL_EPS

# A finite "minus infinity": exp() of it is exactly 0 and differences of two of them stay finite (no NaN in backward).
_NEG = -1e30
# The largest decay exponent a block may span (see the module docstring), and the largest |spatial_decay| = |w|·T for
# which block lengths guarantee it. Larger decays still compute, with the underflow bound of the docstring loosened.
_MAX_BLOCK_DECAY = 30.0
MAX_ABS_DECAY_EXACT = 200.0


def block_length(T: int) -> int:
    """Tokens per block, a function of T alone (no data-dependent control flow: torch.compile/export trace through).

    About ``2·sqrt(T)`` (at least ``T / 32``), so the [N, N] carry matrix stays below T/4 entries per channel, and at
    most ``30 T / MAX_ABS_DECAY_EXACT``, so that the decay spans at most 30 inside a block whenever
    ``|spatial_decay| = |w|·T <= MAX_ABS_DECAY_EXACT`` (200).
    """
    preferred = max(math.ceil(T / 32), math.ceil(2 * T**0.5))
    return max(1, min(T, preferred, int(_MAX_BLOCK_DECAY * T / MAX_ABS_DECAY_EXACT)))


def _pad(mu: torch.Tensor, g: torch.Tensor, Tp: int):
    """Append absent tokens (log-scale _NEG, mantissa 0) up to length Tp."""
    S, B, T, C = g.shape
    if Tp == T:
        return mu, g
    return (torch.cat([mu, mu.new_full((B, Tp - T, C), _NEG)], 1),
            torch.cat([g, g.new_zeros((S, B, Tp - T, C))], 2))


def decayed_prefix(mu: torch.Tensor, g: torch.Tensor, w: torch.Tensor, block: int, inclusive: bool = False,
                   carry: bool = True, exact_intra: bool = False):
    """``sum_{j<t} e^{mu_j - (t-j) w} g_j`` (``j <= t`` if inclusive), split into two pieces ``(rho, h)``, each
    meaning ``e^{rho} h``:

    * the intra-block piece: terms of t's own block of ``block`` tokens;
    * the carry piece: terms of all earlier blocks (omitted if ``carry=False``: the sum then restarts at every block).

    ``rho`` is about the log of the piece's denominator (its largest term for the carry), so ``h`` is of order 1 and
    an empty piece has ``rho = _NEG``.

    Args:
        mu: log-scales [B, T, C] (``_NEG`` marks absent tokens).
        g: mantissas [S, B, T, C]: S stacked quantities sharing mu; the last one is the denominator (>= 0).
        w: decay per step [C] (any sign).
        block: block length L (see :func:`block_length`).
        exact_intra: sum inside blocks with a running-max rescaled scan instead of a cumsum at the block max: exact
            whatever the spread of mu inside a block (the cumsum loses terms more than e^87 below a LATER token of
            the block, which only a one-sided sum can need), at log2(L) passes instead of one.
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
    gb = g.view(S, B, N, L, C)
    if exact_intra:
        intra_rho, intra, block_sum = _rescaled_scan(a, gb, inclusive)
        pieces = [(intra_rho - pw, intra)]
    else:
        terms = exp_le0(a - m[:, :, None]) * gb  # [S, B, N, L, C]
        csum = terms.cumsum(3)
        block_sum = csum[:, :, :, -1]
        intra = csum if inclusive else torch.cat([torch.zeros_like(csum[:, :, :, :1]), csum[:, :, :, :-1]], 3)
        with torch.no_grad():
            # express each intra sum at its own size: terms were summed at the block max m, possibly far above them
            den = intra[-1]
            nonempty = den >= torch.finfo(den.dtype).tiny  # 1/den stays finite; smaller sums underflowed anyway
            intra_log_den = torch.where(nonempty, m[:, :, None] + torch.log(den), _NEG)
            inv_den = torch.where(nonempty, 1.0 / den, 0.0)
        pieces = [(intra_log_den - pw, intra * inv_den)]
    if carry:
        # State entering block b: sum_{b' < b} e^{m_b' - (b - b') L w} blocksum_b' (a block's total, seen from the
        # next block's start, is e^{m_b' - L w} blocksum_b'). Done as one [N, N] matrix per (batch, channel): no
        # sequential loop; N stays small because blocks are long.
        Lw = L * w
        idx = torch.arange(N, device=mu.device, dtype=mu.dtype)[:, None]  # [N, 1]
        src = m + idx * Lw  # [B, N, C] (gradient through w; m is a reference)
        expo = src[:, None] - idx[:, None] * Lw  # [B, N (target b), N (source b'), C]
        causal = torch.ones(N, N, dtype=torch.bool, device=mu.device).tril(-1)[None, :, :, None]
        expo = torch.where(causal, expo, _NEG)
        with torch.no_grad():
            sigma = expo.amax(2, keepdim=True)  # [B, N, 1, C] largest carried term
        weights = exp_le0(expo - sigma) * causal  # [B, N, N, C], <= 1 (block 0 carries nothing: all masked)
        h_in = torch.einsum("bnjc,sbjc->sbnc", weights, block_sum)  # [S, B, N, C]
        sigma_in = sigma - pw  # [B, N, L, C]
        pieces.append((sigma_in, h_in[:, :, :, None].expand(S, B, N, L, C)))
    return [(rho.reshape(B, N * L, C)[:, :T], h.reshape(S, B, N * L, C)[:, :, :T]) for rho, h in pieces]


def _rescaled_scan(a: torch.Tensor, g: torch.Tensor, inclusive: bool):
    """Prefix sums of ``e^{a_j} g_j`` along dim 2 of a [B, N, L, C] (g: [S, B, N, L, C]) as running (max, sum) pairs
    combined in log2(L) vectorised steps (Hillis-Steele; the pair merge is associative). Returns the prefix pieces
    ``(M [B, N, L, C], s [S, B, N, L, C])`` meaning ``e^M s`` and the block totals scaled to the block max."""
    # M is a detached reference throughout; s carries the gradient (e^{a - M} = 1 in value, d/da = 1)
    M = a.detach()
    s = g * torch.exp(a - M)
    L, step = a.shape[2], 1
    while step < L:
        M_prev = torch.cat([torch.full_like(M[:, :, :step], _NEG), M[:, :, :-step]], 2)
        s_prev = torch.cat([torch.zeros_like(s[:, :, :, :step]), s[:, :, :, :-step]], 3)
        with torch.no_grad():
            M_new = torch.maximum(M, M_prev)
        s = s * exp_le0(M - M_new) + s_prev * exp_le0(M_prev - M_new)
        M = M_new
        step *= 2
    block_sum = s[:, :, :, -1]  # scaled to M[:, :, -1] = the block max
    if not inclusive:
        M = torch.cat([torch.full_like(M[:, :, :1], _NEG), M[:, :, :-1]], 2)
        s = torch.cat([torch.zeros_like(s[:, :, :, :1]), s[:, :, :, :-1]], 3)
    return M, s, block_sum


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
        term = h * exp_le0(rho - ref)
        total = total + (term if factor is None else term * factor)
    num, den = total[0], total[1]
    if den_extra_log is not None:
        den = den + den_extra_scale * exp_le0(den_extra_log - ref)
    return num / den


def _paper(k, g, w, u, block):
    # the paper's exponent is -(distance - 1) w: one factor e^{w} on both sides
    sides = decayed_prefix(k, g, w, block) + _reverse_prefix(k, g, w, block)
    return _combine([(rho + w, h, None) for rho, h in sides] + [(k + u, g, None)])


def _causal(k, g, w, u, block):
    # original (uni-directional) RWKV: only the left side, exponent -(distance - 1) w
    # one-sided: a query does not see the later tokens of its block, so their size must not matter (exact_intra)
    left = decayed_prefix(k, g, w, block, exact_intra=True)
    return _combine([(rho + w, h, None) for rho, h in left] + [(k + u, g, None)])


def _official(k, g, w, u, block, chunks, eps):
    """The official kernel's function: spec §2.3 closed form, plus its EPS. See README.md."""
    S, B, T, C = g.shape
    Lc = math.ceil(T / chunks)  # tokens per kernel chunk; chunk starts are multiples of Lc
    n = math.ceil(T / Lc)
    k, g = _pad(k, g, n * Lc)  # absent tokens at the end, like the kernel's empty lane slots
    pw = torch.arange(Lc, device=k.device, dtype=k.dtype)[:, None] * w  # [Lc, C] position inside the chunk

    def at_chunk_starts(rho, h):
        # far left (earlier chunks, j < s): e^{k_j - (t-j) w} = e^{-p w} x (the exclusive prefix at the chunk start)
        rho = rho[:, ::Lc, None] - pw  # [B, n, Lc, C]
        return rho.reshape(B, n * Lc, C), h[:, :, ::Lc, None].expand(S, B, n, Lc, C).reshape(S, B, n * Lc, C)

    far = [at_chunk_starts(rho, h) for rho, h in decayed_prefix(k, g, w, block)]
    # near left (same chunk, s <= j < t): e^{k_j - (t-j-1) w}  (distance - 1, as in the paper)
    (near,) = decayed_prefix(k, g, w, Lc, carry=False)
    # spurious own-chunk term (s < j <= t): (1 - e^w) e^{k_j + (t-j) w}, restarted at every chunk start
    k_no_start = k.clone()
    k_no_start[:, ::Lc] = _NEG
    (spur,) = decayed_prefix(k_no_start, g, -w, Lc, inclusive=True, carry=False)
    # right (all j > t, any chunk): e^{k_j - (j-t) w}  (distance, not distance - 1)
    right = _reverse_prefix(k, g, w, block)
    pieces = [(rho, h, None) for rho, h in far + right]
    pieces += [(near[0] + w, near[1], None), (spur[0], spur[1], -torch.expm1(w)), (k + u, g, None)]
    y = _combine(pieces, den_extra_log=_kernel_running_max(k, w, u, Lc), den_extra_scale=eps)
    return y[:, :T]


def _exclusive(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Shift by one along ``dim``, ``_NEG`` first: a max over j <= t becomes a max over j < t."""
    first = torch.full_like(x.narrow(dim, 0, 1), _NEG)
    return torch.cat([first, x.narrow(dim, 0, x.shape[dim] - 1)], dim)


def _cummax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Inclusive running max along ``dim`` in log2(n) vectorised steps (torch.cummax is a slow scalar loop on CPU)."""
    n, step = x.shape[dim], 1
    while step < n:
        x = torch.maximum(x, torch.cat([torch.full_like(x.narrow(dim, 0, step), _NEG), x.narrow(dim, 0, n - step)], dim))
        step *= 2
    return x


@torch.no_grad()
def _kernel_running_max(k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, Lc: int) -> torch.Tensor:
    """The kernel's running max ``m_t = max(o_right, u + k_t, o_left)`` (its EPS enters as ``EPS·e^{m_t}``).

    k: [B, Tp, C] padded to whole chunks of Lc tokens. Returns [B, Tp, C].
    """
    B, Tp, C = k.shape
    n = Tp // Lc
    tw = (torch.arange(Tp, device=k.device, dtype=k.dtype)[:, None] * w).view(n, Lc, C)  # [n, Lc, C]
    pw = tw[0]  # [Lc, C]
    kc = k.view(B, n, Lc, C)
    # o_left: max exponent of the left terms (far: k_j - (t-j) w for j < s; near: k_j - (t-j-1) w for s <= j < t)
    far = _exclusive(_cummax((kc + tw).amax(2), 1), 1)[:, :, None] - tw  # chunk maxima, then over chunks
    near = _exclusive(_cummax(kc + pw, 2), 2) - (pw - w)
    # o_right: max_{j>=s} k_j - (j-s) w at the chunk start (the start token stays in it after being subtracted),
    # then o <- max(o + w, k_{t+1} + w) at every step of the chunk.
    start = _cummax((kc - tw).amax(2).flip(1), 1).flip(1)[:, :, None] + tw[:, :1]  # [B, n, 1, C]
    later = torch.cat([kc.new_full((B, n, 1, C), _NEG), kc[:, :, 1:]], 2) - pw
    right = torch.maximum(start + pw, _cummax(later, 2) + pw + w)
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
    T = k.shape[1]
    block = block_length(T)
    if semantics == "official":
        return _official(k, g, w, u, block, chunks, eps)
    return (_causal if semantics == "causal" else _paper)(k, g, w, u, block)
