"""Float64 references for the bidirectional WKV6 op: slow, obviously-correct restatements used as the correctness gate.

* :func:`naive_recurrent_bi_wkv6` -- the official CUDA kernel's two sweeps (``cuda_v6/wkv6_cuda.cu``), one token at a
  time: a right-to-left sweep reading the state *before* folding token t in, then a left-to-right sweep that adds the
  bonus ``u`` on the self term. States are N x N per head. Vectorised over (B, H).
* :func:`naive_quadratic_bi_wkv6` -- the closed form of the same function as an O(T^2) sum, to cross-check the sweeps.

Both compute in float64 whatever the input dtype, keep the autograd graph (so their gradients can be compared with a
fast path's) and return float64 [B, T, C]. See README.md for the math.
"""
from __future__ import annotations

import torch


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, C] -> float64 [B, H, T, N]."""
    B, T, C = x.shape
    return x.double().view(B, T, num_heads, C // num_heads).transpose(1, 2)


def _merge_heads(y: torch.Tensor) -> torch.Tensor:
    """[B, H, T, N] -> [B, T, C]."""
    B, H, T, N = y.shape
    return y.transpose(1, 2).reshape(B, T, H * N)


def naive_recurrent_bi_wkv6(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """The kernel's recurrence, token by token.

    Args:
        r, k, v: [B, T, C] receptance, key, value.
        w: [B, T, C] raw decay; the per-step decay is ``exp(-exp(w))``.
        u: [H, N] or [C] bonus (``time_faaaa``).
        num_heads: H; the head size is N = C / H.
    Returns:
        [B, T, C] float64.
    """
    r, k, v = (_heads(x, num_heads) for x in (r, k, v))
    decay = torch.exp(-torch.exp(_heads(w, num_heads)))  # [B, H, T, N]
    u = u.double().reshape(num_heads, -1)[None, :, :, None]  # [1, H, N, 1] (indexed by the key channel j)
    B, H, T, N = r.shape

    # Right-to-left: y_t = r_t S (S holds tokens s > t), then S <- diag(d_t) S + k_t v_t^T.
    state = r.new_zeros(B, H, N, N)  # S[j, i]: key channel j, value channel i
    right = [None] * T
    for t in reversed(range(T)):
        right[t] = (r[:, :, t, :, None] * state).sum(-2)  # [B, H, N]
        state = decay[:, :, t, :, None] * state + k[:, :, t, :, None] * v[:, :, t, None, :]

    # Left-to-right: y_t += r_t (diag(u) k_t v_t^T + S) (S holds tokens s < t), then the same update.
    state = r.new_zeros(B, H, N, N)
    out = []
    for t in range(T):
        kv = k[:, :, t, :, None] * v[:, :, t, None, :]  # [B, H, N, N]
        out.append(right[t] + (r[:, :, t, :, None] * (u * kv + state)).sum(-2))
        state = decay[:, :, t, :, None] * state + kv
    return _merge_heads(torch.stack(out, dim=2))


def naive_quadratic_bi_wkv6(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """Closed form, O(T^2 N) per head, with the log-decay ``a_m = -exp(w_m)``:
    ``y_t = sum_j r_t[j] (u[j] k_t[j] v_t + sum_{s != t} exp(sum_{m strictly between s and t} a_m[j]) k_s[j] v_s)``.

    Args and returns as :func:`naive_recurrent_bi_wkv6`.
    """
    r, k, v, w = (_heads(x, num_heads) for x in (r, k, v, w))
    u = u.double().reshape(num_heads, -1)[None, :, None, :]  # [1, H, 1, N]
    T = r.shape[2]
    cum = torch.cumsum(-torch.exp(w), dim=2)  # [B, H, T, N] inclusive log-decay sums
    cum_before = cum - (-torch.exp(w))  # sum over m < t
    # s < t: sum_{m=s+1}^{t-1} = cum_before[t] - cum[s];  s > t: sum_{m=t+1}^{s-1} = cum_before[s] - cum[t]
    left = cum_before[:, :, :, None, :] - cum[:, :, None, :, :]  # [B, H, t, s, N]
    idx = torch.arange(T, device=r.device)
    below = (idx[:, None] > idx[None, :])[None, None, :, :, None]  # s < t
    above = (idx[:, None] < idx[None, :])[None, None, :, :, None]  # s > t
    expo = torch.where(below, left, torch.where(above, left.transpose(2, 3), torch.zeros_like(left)))
    weight = torch.where(below | above, torch.exp(expo), u[:, :, None].expand_as(expo))  # [B, H, t, s, N]
    scores = torch.einsum("bhtj,bhtsj,bhsj->bhts", r, weight, k)  # [B, H, T, T]
    return _merge_heads(scores @ v)
