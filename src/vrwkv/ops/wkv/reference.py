"""Float64 references for Bi-WKV: slow, obviously-correct restatements used as the correctness gate.

* :func:`naive_paper_bi_wkv` -- the paper formula as a direct O(T^2) weighted average (log-sum-exp stabilised).
* :func:`naive_causal_wkv` -- the original uni-directional RWKV (the paper's ablation of Bi-WKV), O(T^2).
* :func:`naive_official_bi_wkv` -- a line-by-line port of the official CUDA forward kernel
  (``cuda_new/bi_wkv_kernel.cu``): 32 token chunks ("lanes"), per-lane partial sums, the cross-lane exchange,
  then the sequential per-token recurrence with running-max rescaling and ``EPS`` added to the rescaled
  denominator, exactly where the kernel adds it. Loops over lanes and tokens; vectorised over (B, C).

Both compute in float64 whatever the input dtype and return float64. See README.md for the math.
"""
from __future__ import annotations

import math

import torch

#: The kernel's "minus infinity" for empty running maxima.
MIN_VALUE = -1e38
#: ``#define EPS 1e-6`` of the kernel, added to the max-rescaled denominator.
KERNEL_EPS = 1e-6
#: Number of token chunks ("lanes" of a warp) of the official kernel.
KERNEL_CHUNKS = 32


def naive_paper_bi_wkv(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Paper formula, O(T^2): ``y_t = sum_i a_ti v_i / sum_i a_ti`` with
    ``a_ti = exp(-(|t-i|-1) w + k_i)`` for i != t and ``exp(u + k_t)`` for i = t.

    Args:
        k, v: [B, T, C]. w, u: [C], already divided by T.
    Returns:
        [B, T, C] float64.
    """
    k, v, w, u = (x.detach().double() for x in (k, v, w, u))
    B, T, C = k.shape
    idx = torch.arange(T, dtype=torch.float64, device=k.device)
    y = torch.empty_like(k)
    for t in range(T):
        dist = (idx - t).abs()[None, :, None]  # [1, T, 1]
        expo = -(dist - 1) * w + k  # [B, T, C]
        expo[:, t] = u + k[:, t]
        m = expo.max(dim=1, keepdim=True).values
        a = torch.exp(expo - m)
        y[:, t] = (a * v).sum(1) / a.sum(1)
    return y


def naive_causal_wkv(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Original (uni-directional) RWKV with the paper's weights, O(T^2): token t averages tokens i <= t with
    ``a_ti = exp(-(t-i-1) w + k_i)`` for i < t and ``exp(u + k_t)`` for i = t. Shapes as :func:`naive_paper_bi_wkv`."""
    k, v, w, u = (x.detach().double() for x in (k, v, w, u))
    B, T, C = k.shape
    idx = torch.arange(T, dtype=torch.float64, device=k.device)
    y = torch.empty_like(k)
    for t in range(T):
        expo = -(t - idx[: t + 1, None] - 1) * w + k[:, : t + 1]  # [B, t+1, C]
        expo[:, t] = u + k[:, t]
        a = torch.exp(expo - expo.amax(dim=1, keepdim=True))
        y[:, t] = (a * v[:, : t + 1]).sum(1) / a.sum(1)
    return y


def _add(o: torch.Tensor, a: torch.Tensor, expo: torch.Tensor, val: torch.Tensor, sign: float = 1.0):
    """Running-max accumulation ``(a e^o) + sign * val e^expo`` -> new (o, a), as the kernel does it."""
    o_new = torch.maximum(o, expo)
    return o_new, a * torch.exp(o - o_new) + sign * val * torch.exp(expo - o_new)


def naive_official_bi_wkv(
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    chunks: int = KERNEL_CHUNKS,
    eps: float = KERNEL_EPS,
) -> torch.Tensor:
    """Port of the official Bi-WKV CUDA forward kernel (what official checkpoints were trained with).

    Args:
        k, v: [B, T, C]. w, u: [C], already divided by T.
        chunks: token chunks (32 in every current kernel; 16 in two old copies).
        eps: value added to the max-rescaled denominator (1e-6; 0 for the old detection/segmentation copies).
    Returns:
        [B, T, C] float64.
    """
    k, v, w, u = (x.detach().double() for x in (k, v, w, u))
    B, T, C = k.shape
    Lc = math.ceil(T / chunks)  # tokens per lane; lane j owns [j*Lc, j*Lc + Lc) ∩ [0, T)
    lanes = [(s, min(s + Lc, T)) for s in range(0, T, Lc)]
    neg = torch.full((B, C), MIN_VALUE, dtype=torch.float64, device=k.device)
    zero = torch.zeros((B, C), dtype=torch.float64, device=k.device)

    # Phase 1: per-lane partials. Right-looking (c, d): sum_i e^{k_i - w (i - s)} [v_i | 1];
    # left-looking (a, b): sum_i e^{k_i - w (e - i)} [v_i | 1], relative to the first token after the chunk.
    part = []
    for s, e in lanes:
        oc, c, d = neg, zero, zero
        oa, a, b = neg, zero, zero
        for i in range(s, e):
            ex = k[:, i] - w * (i - s)
            oc2, c = _add(oc, c, ex, v[:, i])
            _, d = _add(oc, d, ex, torch.ones_like(ex))
            oc = oc2
            ex = k[:, i] - w * (e - i)
            oa2, a = _add(oa, a, ex, v[:, i])
            _, b = _add(oa, b, ex, torch.ones_like(ex))
            oa = oa2
        part.append((oc, c, d, oa, a, b))

    y = torch.empty_like(k)
    for j, (s, e) in enumerate(lanes):
        # Phase 2: left state A, B at s from lanes i < j; right state C, D from lanes i >= j (own chunk included),
        # then the chunk-start token's own term is subtracted (its exponent stays in the running max).
        oA, A, Bs = neg, zero, zero
        for i in range(j):
            oa, a, b = part[i][3:]
            ex = oa - w * (j - i - 1) * Lc
            oA2, A = _add(oA, A, ex, a)
            _, Bs = _add(oA, Bs, ex, b)
            oA = oA2
        oC, Cs, D = neg, zero, zero
        for i in range(j, len(lanes)):
            oc, c, d = part[i][:3]
            ex = oc - w * (i - j) * Lc
            oC2, Cs = _add(oC, Cs, ex, c)
            _, D = _add(oC, D, ex, d)
            oC = oC2
        oC2, Cs = _add(oC, Cs, k[:, s], v[:, s], sign=-1.0)
        _, D = _add(oC, D, k[:, s], torch.ones_like(D), sign=-1.0)
        oC = oC2

        # Phase 3: sequential over the lane's tokens.
        for t in range(s, e):
            ku = u + k[:, t]
            m = torch.maximum(torch.maximum(oC, ku), oA)
            e1, e2, e3 = torch.exp(oC - m), torch.exp(oA - m), torch.exp(ku - m)
            y[:, t] = (Cs * e1 + A * e2 + e3 * v[:, t]) / (D * e1 + Bs * e2 + e3 + eps)
            # left state takes token t: A <- e^{-w} A + e^{k_t} v_t
            oA2, A = _add(oA - w, A, k[:, t], v[:, t])
            _, Bs = _add(oA - w, Bs, k[:, t], torch.ones_like(Bs))
            oA = oA2
            # right state drops token t+1: C <- e^{w} C - e^{k_{t+1} + w} v_{t+1}
            if t + 1 < e:
                ex = k[:, t + 1] + w
                oC2, Cs = _add(oC + w, Cs, ex, v[:, t + 1], sign=-1.0)
                _, D = _add(oC + w, D, ex, torch.ones_like(D), sign=-1.0)
                oC = oC2
    return y


def reference_bi_wkv(k, v, w, u, semantics: str = "paper") -> torch.Tensor:
    """Dispatch to the float64 reference of ``semantics`` ("paper", "official" or "causal")."""
    if semantics == "paper":
        return naive_paper_bi_wkv(k, v, w, u)
    if semantics == "official":
        return naive_official_bi_wkv(k, v, w, u)
    if semantics == "causal":
        return naive_causal_wkv(k, v, w, u)
    raise ValueError(f"semantics must be 'paper', 'official' or 'causal', got {semantics!r}")
