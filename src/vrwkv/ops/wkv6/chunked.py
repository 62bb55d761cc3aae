"""Chunked bidirectional WKV6 in pure PyTorch: intra-chunk scores plus inter-chunk state passing.

The sequence is cut into chunks of ``chunk_size`` tokens (the last one zero-padded), each chunk into sub-chunks of
``sub_size`` tokens. Inside a sub-chunk every token pair (t, s) gets its decay weight from the sum of the log-decays
strictly between them; across sub-chunks of a chunk that sum splits at the sub-chunk boundaries into three parts, so a
block of scores is a matmul of decay-scaled queries and keys. Every exponent is <= 0, so nothing overflows however
strong the decay (the factorised form exp(cum_t) * exp(-cum_s) would). The two directions share the weights: the
weight of a pair is symmetric in (t, s). Across chunks, one N x N state per head and direction carries the sum of the
other chunks' k v^T, decayed to the chunk boundary; a Python loop runs over the T / chunk_size chunks (elementwise work
only), everything else is batched matmuls. See README.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vrwkv.ops._numerics import exp_le0

#: Default tokens per chunk: the Python loop over chunks has T / chunk_size steps.
CHUNK_SIZE = 16
#: Default tokens per sub-chunk: the pairwise weights are [B, H, T, sub_size, N].
SUB_SIZE = 4


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


def _intra_chunk_scores(
    r: torch.Tensor, k: torch.Tensor, u: torch.Tensor, log_decay: torch.Tensor, sub_size: int
) -> torch.Tensor:
    """Scores of the token pairs inside each chunk: ``y_intra = scores @ v``.

    ``scores[t, s] = sum_j r_t[j] exp(sum_{min(s,t)<m<max(s,t)} a_m[j]) k_s[j]`` for s != t, and
    ``sum_j r_t[j] u[j] k_t[j]`` on the diagonal. Inside a sub-chunk of ``sub_size`` tokens the weights are built
    pairwise; across sub-chunks j < i the exponent splits at the sub-chunk boundaries into three sums <= 0 (the rest of
    sub-chunk j after s, the sub-chunks strictly between, the start of sub-chunk i before t), so a block of scores is
    one matmul of decay-scaled queries and keys.

    Args:
        r, k, log_decay: [..., L, N]; u: broadcastable to [..., 1, N]; sub_size: divides L.
    Returns:
        [..., L, L].
    """
    *lead, L, N = r.shape
    S, n = sub_size, L // sub_size
    r, k, log_decay = (x.unflatten(-2, (n, S)) for x in (r, k, log_decay))  # [..., n, S, N]
    between, before, after = _segment_masks(S, r.dtype, r.device)

    # Within a sub-chunk. The weight of a pair is symmetric in (t, s), so the strictly lower triangle serves both
    # directions: the upper scores are the lower ones with r and k exchanged, transposed. On and above the diagonal
    # `between` has empty rows, so the exponent is 0 there: exp stays finite and the [S, S] scores are masked instead.
    weight = exp_le0((between @ log_decay).unflatten(-2, (S, S)))  # [..., n, S(t), S(s), N]
    below = torch.tril(torch.ones(S, S, dtype=r.dtype, device=r.device), diagonal=-1)  # s < t
    # batched matrix-vector products over j: [S(s), N] @ [N, 1] for every t (no transposed copy of the weights)
    lower = ((weight * k[..., None, :, :]) @ r[..., :, :, None]).squeeze(-1) * below  # sum_j r_t W_ts k_s
    upper = ((weight * r[..., None, :, :]) @ k[..., :, :, None]).squeeze(-1) * below  # sum_j k_t W_ts r_s
    self_term = (r * u[..., None, :, :] * k).sum(-1)  # [..., n, S]
    within = lower + upper.transpose(-2, -1) + torch.diag_embed(self_term)  # [..., n, S, S]
    if n == 1:
        return within.squeeze(-3)

    # Across sub-chunks j < i: exp(after[s]) * gap[i, j] * exp(before[t]), gap = exp(sum over sub-chunks j < l < i).
    gap_sums, _, _ = _segment_masks(n, r.dtype, r.device)
    gap = exp_le0((gap_sums @ log_decay.sum(dim=-2)).unflatten(-2, (n, n)))  # [..., n(i), n(j), N]
    queries = torch.stack([r, k]) * exp_le0(before @ log_decay)  # [2, ..., n, S, N]: lower, then r/k exchanged
    keys = torch.stack([k, r]) * exp_le0(after @ log_decay)
    rows = [queries.new_zeros(*queries.shape[:-3], S, L)]  # sub-chunk row 0 has no earlier sub-chunk
    for i in range(1, n):  # row i: its queries against the keys of sub-chunks j < i, scaled by gap[i, j]
        scaled = (gap[..., i, :i, None, :] * keys[..., :i, :, :]).flatten(-3, -2)  # [2, ..., i * S, N]
        rows.append(F.pad(queries[..., i, :, :] @ scaled.transpose(-2, -1), (0, L - i * S)))  # [2, ..., S, L]
    lower, upper = torch.cat(rows, dim=-2).unbind(0)  # [..., L(t), L(s)]
    eye = torch.eye(n, dtype=r.dtype, device=r.device)[:, None, :, None]
    within = (within[..., :, :, None, :] * eye).flatten(-4, -3).flatten(-2, -1)  # blocks on the diagonal: [..., L, L]
    return lower + upper.transpose(-2, -1) + within


def chunk_bi_wkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    num_heads: int,
    chunk_size: int = CHUNK_SIZE,
    sub_size: int = SUB_SIZE,
) -> torch.Tensor:
    """Bidirectional WKV6, chunked. Inputs are assumed validated (see :func:`vrwkv.ops.bi_wkv6`); any head size works.

    Args:
        r, k, v: [B, T, C] receptance, key, value.
        w: [B, T, C] raw decay; the per-step decay is ``exp(-exp(w))``.
        u: [H, N] or [C] bonus on the self term.
        num_heads: H; the head size is N = C / H.
        chunk_size: tokens per chunk.
        sub_size: tokens per sub-chunk (pairwise weights inside); the whole chunk if it does not divide chunk_size.
    Returns:
        [B, T, C] in the input dtype; computed in float32 for half/bfloat16 inputs, else in the input dtype.
    """
    B, T, C = r.shape
    H, N, L = num_heads, C // num_heads, chunk_size
    if L % sub_size:  # also when sub_size > L
        sub_size = L  # pairwise weights over the whole chunk
    n_chunks = -(-T // L)
    pad = n_chunks * L - T
    in_dtype, dtype = r.dtype, torch.promote_types(r.dtype, torch.float32)

    def chunks(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x.to(dtype), (0, 0, 0, pad))  # padded tokens have k = v = 0 and log-decay 0: they add nothing
        return x.view(B, n_chunks, L, H, N).permute(0, 3, 1, 2, 4)  # [B, H, nC, L, N]

    r, k, v = chunks(r), chunks(k), chunks(v)
    log_decay = chunks(-torch.exp(w.to(dtype)))  # [B, H, nC, L, N], <= 0
    u = u.to(dtype).reshape(1, H, 1, 1, N)

    scores = _intra_chunk_scores(r, k, u, log_decay, sub_size)  # [B, H, nC, L(t), L(s)]
    y = scores @ v  # [B, H, nC, L, N]

    # Chunk-local sums of the log-decay over m < t (before), m > t (after) and the whole chunk (total).
    _, before, after = _segment_masks(L, dtype, r.device)
    log_before, log_after = before @ log_decay, after @ log_decay  # [B, H, nC, L, N]
    log_total = log_decay.sum(dim=-2, keepdim=True)  # [B, H, nC, 1, N]

    # Inter-chunk. Left state of chunk c: sum over s in earlier chunks of exp(sum_{m=s+1}^{start_c - 1}) k_s v_s^T,
    # read by query t with exp(before[t]); right state: sum over later chunks of exp(sum_{m=end_c+1}^{s-1}) k_s v_s^T,
    # read with exp(after[t]). A chunk writes into the left state with exp(after) and into the right one with
    # exp(before); crossing a whole chunk multiplies a state by exp(total).
    gain_before, gain_after = exp_le0(log_before), exp_le0(log_after)
    write_left = (k * gain_after).transpose(-2, -1) @ v  # [B, H, nC, N, N]
    write_right = (k * gain_before).transpose(-2, -1) @ v
    chunk_decay = exp_le0(log_total).transpose(-2, -1)  # [B, H, nC, N, 1]

    # The two scans over chunks (elementwise work only). unbind once: indexing write_left[:, :, c] in the loop would
    # make each backward step scatter into a full-size zero tensor.
    write_left, write_right, chunk_decay = write_left.unbind(2), write_right.unbind(2), chunk_decay.unbind(2)
    left = [torch.zeros_like(write_left[0])]  # state before chunk 0: [B, H, N, N]
    right = [torch.zeros_like(write_right[0])]  # state after the last chunk
    for c in range(n_chunks - 1):
        left.append(chunk_decay[c] * left[-1] + write_left[c])
        right.append(chunk_decay[-1 - c] * right[-1] + write_right[-1 - c])
    left, right = torch.stack(left, dim=2), torch.stack(right[::-1], dim=2)  # [B, H, nC, N, N]
    y = y + (r * gain_before) @ left + (r * gain_after) @ right

    y = y.permute(0, 2, 3, 1, 4).reshape(B, n_chunks * L, C)[:, :T]  # [B, T, C]
    return y.to(in_dtype)
