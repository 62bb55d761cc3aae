"""Chunked bidirectional WKV6 in pure PyTorch: intra-chunk pairwise weights plus inter-chunk state passing.

The sequence is cut into chunks of ``chunk_size`` tokens (the last one zero-padded). Inside a chunk every token pair
(t, s) gets its decay weight from the sum of the log-decays strictly between them, so every exponent is <= 0 and
nothing overflows however strong the decay (the factorised form exp(cum_t) * exp(-cum_s) would). The two directions
share those pairwise weights: the weight of a pair is symmetric in (t, s). Across chunks, one N x N state per head and
direction carries the sum of the other chunks' k v^T, decayed to the chunk boundary; a Python loop runs over the
T / chunk_size chunks (elementwise work only), everything else is batched matmuls. See README.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: Default tokens per chunk: the pairwise tensor is [B, H, T, chunk_size, N], the loop has T / chunk_size steps.
CHUNK_SIZE = 16


def _segment_masks(L: int, dtype: torch.dtype, device: torch.device):
    """0/1 matrices that turn per-step log-decays [..., L(m), N] into segment sums by a matmul.

    Returns ``between`` [L(t) * L(s), L(m)] (s < m < t), ``before`` [L(t), L(m)] (m < t), ``after`` (m > t).
    A masked matmul adds terms of one sign only, so each sum is accurate to a few eps of *its own* size, and its
    gradient is the sum over the pairs that straddle m. Differences of prefix sums (cum_t - cum_s) would instead lose
    eps * |cum| after a few strong decays, and their gradient would cancel O(1) terms to get a tiny one.
    """
    i = torch.arange(L, device=device)
    t, s, m = i[:, None, None], i[None, :, None], i[None, None, :]
    between = ((s < m) & (m < t)).reshape(L * L, L)
    return between.to(dtype), (i[None, :] < i[:, None]).to(dtype), (i[None, :] > i[:, None]).to(dtype)


def chunk_bi_wkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    num_heads: int,
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """Bidirectional WKV6, chunked. Inputs are assumed validated (see :func:`vrwkv.ops.bi_wkv6`); any head size works.

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

    # Chunk-local sums of the log-decay: over s < m < t (pair), m < t (before), m > t (after), the whole chunk (total).
    between, before, after = _segment_masks(L, dtype, r.device)
    pair = (between @ log_decay).view(B, H, n_chunks, L, L, N)  # [B, H, nC, L(t), L(s), N]
    log_before, log_after = before @ log_decay, after @ log_decay  # [B, H, nC, L, N]
    log_total = log_decay.sum(dim=-2, keepdim=True)  # [B, H, nC, 1, N]

    # Intra-chunk. The weight of a pair is symmetric in (t, s), so the strictly lower triangle serves both directions:
    # the upper scores are the lower ones with r and k exchanged, transposed. The diagonal gets the bonus u instead.
    # On and above the diagonal `between` has empty rows, so pair = 0 there: exp stays finite and the scores are
    # masked afterwards (on [L, L], not on the [L, L, N] weights).
    weight = torch.exp(pair)  # [B, H, nC, L(t), L(s), N]
    below = torch.tril(torch.ones(L, L, dtype=dtype, device=r.device), diagonal=-1)  # s < t
    # batched matrix-vector products over j: [L(s), N] @ [N, 1] for every t (no transposed copy of the weights)
    lower = ((weight * k[..., None, :, :]) @ r[..., :, :, None]).squeeze(-1) * below  # sum_j r_t W_ts k_s
    upper = ((weight * r[..., None, :, :]) @ k[..., :, :, None]).squeeze(-1) * below  # sum_j k_t W_ts r_s
    self_term = (r * u * k).sum(-1)  # [B, H, nC, L]
    y = (lower + upper.transpose(-2, -1) + torch.diag_embed(self_term)) @ v  # [B, H, nC, L, N]

    # Inter-chunk. Left state of chunk c: sum over s in earlier chunks of exp(sum_{m=s+1}^{start_c - 1}) k_s v_s^T,
    # read by query t with exp(before[t]); right state: sum over later chunks of exp(sum_{m=end_c+1}^{s-1}) k_s v_s^T,
    # read with exp(after[t]). A chunk writes into the left state with exp(after) and into the right one with
    # exp(before); crossing a whole chunk multiplies a state by exp(total).
    gain_before, gain_after = torch.exp(log_before), torch.exp(log_after)
    write_left = (k * gain_after).transpose(-2, -1) @ v  # [B, H, nC, N, N]
    write_right = (k * gain_before).transpose(-2, -1) @ v
    chunk_decay = torch.exp(log_total).transpose(-2, -1)  # [B, H, nC, N, 1]

    # Both scans as one left-to-right recurrence: the right-state scan runs on the chunk-reversed sequence.
    writes = torch.stack([write_left, write_right.flip(2)])  # [2, B, H, nC, N, N]
    decays = torch.stack([chunk_decay, chunk_decay.flip(2)])  # [2, B, H, nC, N, 1]
    # unbind once: indexing writes[:, :, :, c] in the loop would make each backward step scatter into a full-size zero
    writes, decays = writes.unbind(3), decays.unbind(3)
    states = [torch.zeros_like(writes[0])]  # state before chunk 0: [2, B, H, N, N]
    for c in range(n_chunks - 1):
        states.append(decays[c] * states[-1] + writes[c])
    states = torch.stack(states, dim=3)  # [2, B, H, nC, N, N]
    y = y + (r * gain_before) @ states[0] + (r * gain_after) @ states[1].flip(2)

    y = y.permute(0, 2, 3, 1, 4).reshape(B, n_chunks * L, C)[:, :T]  # [B, T, C]
    return y.to(in_dtype)
