"""Causal (uni-directional) WKV: the original RWKV attention, used by the paper's ablation of Bi-WKV.

Token t attends to tokens i <= t only, with the same ``w``, ``u`` as Bi-WKV (already divided by T)::

    y_t = (sum_{i<t} e^{-(t-i-1) w + k_i} v_i + e^{u + k_t} v_t) / (sum_{i<t} e^{-(t-i-1) w + k_i} + e^{u + k_t})

There is no dedicated op for it: :func:`causal_wkv` evaluates the sums as prefix log-sum-exps
(``torch.logcumsumexp`` along T), so it is vectorised, differentiable and stable for any sign of ``w``.
:func:`naive_causal_wkv` is the float64 O(T^2) reference it is tested against.
"""
from __future__ import annotations

import torch


def _exclusive_logcumsumexp(a: torch.Tensor) -> torch.Tensor:
    """``log sum_{i<t} exp(a_i)`` along dim 1 (``-inf`` at t = 0)."""
    head = torch.full_like(a[:, :1], float("-inf"))
    return torch.cat([head, torch.logcumsumexp(a[:, :-1], dim=1)], dim=1)


def causal_wkv(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Causal WKV over ``[B, T, C]`` keys/values.

    Args:
        k: keys ``[B, T, C]``.
        v: values ``[B, T, C]``.
        w: decay ``[C]`` (already divided by T; any sign).
        u: bonus of the current token ``[C]`` (already divided by T).

    Returns:
        ``[B, T, C]`` in the dtype of ``k`` (half/bfloat16 inputs are computed in float32).
    """
    if k.ndim != 3 or v.shape != k.shape:
        raise ValueError(f"causal_wkv: k and v must both be [B, T, C], got {tuple(k.shape)} and {tuple(v.shape)}")
    C = k.shape[-1]
    if w.shape != (C,) or u.shape != (C,):
        raise ValueError(f"causal_wkv: w and u must be [{C}], got {tuple(w.shape)} and {tuple(u.shape)}")
    out_dtype = k.dtype
    dtype = torch.promote_types(k.dtype, torch.float32)
    k, v, w, u = (x.to(dtype) for x in (k, v, w, u))
    T = k.shape[1]
    t = torch.arange(T, device=k.device, dtype=dtype)[:, None]  # [T, 1]
    # the exponent of token i seen from t > i, -(t-1-i) w + k_i, splits into (k_i + i w) - (t-1) w
    z = k + t * w  # [B, T, C]
    shift = (t - 1) * w  # [T, C]
    # v can be negative: write v = (v - c) + c with a per-channel constant c < min(v), so the numerator's
    # log-sum-exp runs over log(v - c), and y = c + num' / den. c is detached: y does not depend on it.
    with torch.no_grad():
        v_min, v_max = v.amin(dim=1, keepdim=True), v.amax(dim=1, keepdim=True)  # [B, 1, C]
        margin = 0.5 * (v_max - v_min) + 1e-3 * v.abs().amax(dim=1, keepdim=True) + torch.finfo(dtype).tiny
        c = v_min - margin
    log_v = torch.log(v - c)  # [B, T, C], finite: v - c >= margin > 0
    self_term = u + k  # [B, T, C]
    log_den = torch.logaddexp(_exclusive_logcumsumexp(z) - shift, self_term)
    log_num = torch.logaddexp(_exclusive_logcumsumexp(z + log_v) - shift, self_term + log_v)
    return (c + torch.exp(log_num - log_den)).to(out_dtype)


def naive_causal_wkv(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Float64 reference of :func:`causal_wkv`: a direct loop over query tokens (max-shifted weights).

    Args:
        k, v: ``[B, T, C]``. w, u: ``[C]``, already divided by T.

    Returns:
        ``[B, T, C]`` float64.
    """
    k, v, w, u = (x.detach().double() for x in (k, v, w, u))
    T = k.shape[1]
    y = torch.empty_like(k)
    for t in range(T):
        i = torch.arange(t + 1, dtype=torch.float64, device=k.device)[None, :, None]  # [1, t+1, 1]
        expo = -(t - i - 1) * w + k[:, : t + 1]  # [B, t+1, C]
        expo[:, t] = u + k[:, t]
        a = torch.exp(expo - expo.amax(dim=1, keepdim=True))
        y[:, t] = (a * v[:, : t + 1]).sum(1) / a.sum(1)
    return y
