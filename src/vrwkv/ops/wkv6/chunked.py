"""Chunked bidirectional WKV6 in pure PyTorch: intra-chunk pairwise weights plus inter-chunk state passing.

The sequence is cut into chunks of ``chunk_size`` tokens (the last one zero-padded). Inside a chunk every token pair
(t, s) gets its decay weight from a pairwise difference of chunk-local cumulative log-decays, so every exponent is
<= 0 and nothing overflows however strong the decay (the factorised form exp(cum_t) * exp(-cum_s) would). The two
directions share that pairwise tensor: the weight of the pair is symmetric in (t, s). Across chunks, one N x N state
per head and direction carries the sum of the other chunks' k v^T, decayed to the chunk boundary; a Python loop runs
over the T / chunk_size chunks (elementwise work only), everything else is batched matmuls. See README.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: Default tokens per chunk: the pairwise tensor is [B, H, T, chunk_size, N], the loop has T / chunk_size steps.
CHUNK_SIZE = 16


def _shift_right(x: torch.Tensor) -> torch.Tensor:
    """Shift along the token axis (-2) by one, filling with zero: inclusive -> exclusive prefix sums."""
    return F.pad(x[..., :-1, :], (0, 0, 1, 0))


def _cumsum_hi_lo(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative sum along the token axis (-2) as an unevaluated sum ``hi + lo``.

    ``hi`` is the plain cumsum; ``lo`` accumulates its rounding errors, found exactly with Knuth's TwoSum, so
    ``(hi_t - hi_s) + (lo_t - lo_s)`` has an error of order eps * |difference| instead of eps * |hi| (which is large
    after a few strong decays). ``lo`` is zero in exact arithmetic, hence it carries no gradient.
    """
    hi = x.cumsum(dim=-2)
    with torch.no_grad():
        prev = _shift_right(hi)
        total = prev + x
        x_part = total - prev
        err = (prev - (total - x_part)) + (x - x_part)  # prev + x == total + err exactly
        err = err + (total - hi)  # the scan may round differently from `total`; that difference is exact (Sterbenz)
        lo = err.cumsum(dim=-2)
    return hi, lo


def chunk_bi_wkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    num_heads: int,
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """Bidirectional WKV6, chunked. Inputs are assumed validated (see :func:`vrwkv.ops.bi_wkv6`).

    Args:
        r, k, v: [B, T, C] receptance, key, value.
        w: [B, T, C] raw decay; the per-step decay is ``exp(-exp(w))``.
        u: [H, N] or [C] bonus on the self term.
        num_heads: H; the head size is N = C / H.
        chunk_size: tokens per chunk.
    Returns:
        [B, T, C] in the input dtype; computed in float32 for half/bfloat16 inputs, else in the input dtype.
    """
    B, T, C = r.shape
    H, N, L = num_heads, C // num_heads, chunk_size
    n_chunks = -(-T // L)
    pad = n_chunks * L - T
    in_dtype, dtype = r.dtype, torch.promote_types(r.dtype, torch.float32)

    def chunks(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x.to(dtype), (0, 0, 0, pad))  # padded tokens have k = v = 0 and log-decay 0: they add nothing
        return x.view(B, n_chunks, L, H, N).permute(0, 3, 1, 2, 4)  # [B, H, nC, L, N]

    r, k, v = chunks(r), chunks(k), chunks(v)
    log_decay = chunks(-torch.exp(w.to(dtype)))  # [B, H, nC, L, N], <= 0
    u = u.to(dtype).reshape(1, H, 1, 1, N)

    # Chunk-local sums of the log-decay over m <= t (incl), m < t (excl), m > t (to_end) and the whole chunk (total).
    # Kept as hi + lo pairs so that their differences are accurate even when strong decays make the sums large.
    incl_hi, incl_lo = _cumsum_hi_lo(log_decay)
    excl_hi, excl_lo = _shift_right(incl_hi), _shift_right(incl_lo)
    total_hi, total_lo = incl_hi[..., -1:, :], incl_lo[..., -1:, :]  # [B, H, nC, 1, N]
    excl = excl_hi + excl_lo
    to_end = (total_hi - incl_hi) + (total_lo - incl_lo)

    # Intra-chunk. For s < t the pair's exponent is sum_{m=s+1}^{t-1} = excl[t] - incl[s] <= 0. For s > t it is the
    # same expression with t and s swapped, so the lower-triangular weights serve both directions (the upper scores
    # are the lower ones with r and k exchanged, transposed); the diagonal gets the bonus u instead.
    idx = torch.arange(L, device=r.device)
    upper_or_diag = (idx[:, None] <= idx[None, :])[:, :, None]  # [L(t), L(s), 1]
    pair = (excl_hi[..., :, None, :] - incl_hi[..., None, :, :]) + (excl_lo[..., :, None, :] - incl_lo[..., None, :, :])
    weight = torch.exp(pair.masked_fill(upper_or_diag, float("-inf")))  # masked before exp: pair > 0 there
    lower = torch.einsum("bhctj,bhctsj->bhcts", r, weight * k[..., None, :, :])  # [B, H, nC, L, L]
    upper = torch.einsum("bhctj,bhctsj->bhcst", k, weight * r[..., None, :, :])
    self_term = (r * u * k).sum(-1)  # [B, H, nC, L]
    scores = lower + upper + torch.diag_embed(self_term)
    y = scores @ v  # [B, H, nC, L, N]

    # Inter-chunk. Left state of chunk c: sum over s in earlier chunks of exp(sum_{m=s+1}^{start_c - 1}) k_s v_s^T,
    # read by query t with exp(excl[t]); right state: sum over later chunks of exp(sum_{m=end_c+1}^{s-1}) k_s v_s^T,
    # read with exp(to_end[t]). A chunk writes into the left state with exp(to_end) and into the right one with exp(excl).
    gain_excl, gain_to_end = torch.exp(excl), torch.exp(to_end)
    write_left = (k * gain_to_end).transpose(-2, -1) @ v  # [B, H, nC, N, N]
    write_right = (k * gain_excl).transpose(-2, -1) @ v
    chunk_decay = torch.exp(total_hi + total_lo).transpose(-2, -1)  # [B, H, nC, N, 1]

    # Both scans as one left-to-right recurrence: the right-state scan runs on the chunk-reversed sequence.
    writes = torch.stack([write_left, write_right.flip(2)])  # [2, B, H, nC, N, N]
    decays = torch.stack([chunk_decay, chunk_decay.flip(2)])  # [2, B, H, nC, N, 1]
    # unbind once: indexing writes[:, :, :, c] in the loop would make each backward step scatter into a full-size zero
    writes, decays = writes.unbind(3), decays.unbind(3)
    states = [torch.zeros_like(writes[0])]  # state before chunk 0: [2, B, H, N, N]
    for c in range(n_chunks - 1):
        states.append(decays[c] * states[-1] + writes[c])
    states = torch.stack(states, dim=3)  # [2, B, H, nC, N, N]
    y = y + (r * gain_excl) @ states[0] + (r * gain_to_end) @ states[1].flip(2)

    y = y.permute(0, 2, 3, 1, 4).reshape(B, n_chunks * L, C)[:, :T]  # [B, T, C]
    return y.to(in_dtype)
