"""Public bidirectional WKV6 entry point: input checks, dtype policy, and the fast path."""
from __future__ import annotations

import torch

from vrwkv.ops._dtype import check_floating_on_one_device, run_in_float32
from vrwkv.ops.wkv6.chunked import chunk_bi_wkv6

#: Head size of the official VRWKV6 (``HEAD_SIZE = 64`` in the kernel and the model).
HEAD_SIZE = 64


def bi_wkv6(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """Bidirectional RWKV-6 attention of VRWKV6, exactly as the official CUDA kernel computes it.

    Per head (N = 64 channels), with the per-step decay ``d_t = exp(-exp(w_t))`` (one per key channel j)::

        y_t[i] = sum_j r_t[j] (u[j] k_t[j] v_t[i] + sum_{s != t} prod_{m strictly between s and t} d_m[j] k_s[j] v_s[i])

    i.e. a right-to-left sweep (state read before token t is folded in) plus a left-to-right sweep with the bonus u on
    the self term; the decays of the two end tokens of a pair are never applied, and there is no normaliser. See
    ``ops/wkv6/README.md``.

    Pure PyTorch, linear in T (chunked), any device, differentiable, numerically safe for strong decays (w up to ~+4 and
    beyond: every exponent is <= 0) and weak ones (w down to -10).

    Args:
        r (torch.Tensor): receptance ``[B, T, C]``.
        k (torch.Tensor): keys ``[B, T, C]``.
        v (torch.Tensor): values ``[B, T, C]``.
        w (torch.Tensor): raw decay ``[B, T, C]``, what the official module passes (``time_decay`` + LoRA term).
        u (torch.Tensor): bonus of the current token (``time_faaaa``), ``[H, 64]`` or ``[C]``.
        num_heads (int): H, with ``C = H * 64``.

    Returns:
        torch.Tensor: ``[B, T, C]`` in the dtype of ``r``. Half-precision inputs are computed in float32.

    Examples::

        >>> r, k, v, w = (torch.randn(2, 196, 192) for _ in range(4))
        >>> bi_wkv6(r, k, v, w, torch.randn(3, 64), num_heads=3).shape
        torch.Size([2, 196, 192])
    """
    tensors = (r, k, v, w, u)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError(f"r, k, v, w, u must be tensors; got {[type(t).__name__ for t in tensors]}")
    if r.dim() != 3 or not r.shape == k.shape == v.shape == w.shape:
        raise ValueError(
            "r, k, v, w must all be [B, T, C]; got "
            f"r {tuple(r.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, w {tuple(w.shape)}"
        )
    B, T, C = r.shape
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int; got {num_heads!r}")
    if C != num_heads * HEAD_SIZE:
        raise ValueError(f"C must be num_heads * {HEAD_SIZE} = {num_heads * HEAD_SIZE}; got C = {C}")
    if u.shape not in ((num_heads, HEAD_SIZE), (C,)):
        raise ValueError(f"u must be [num_heads, {HEAD_SIZE}] = [{num_heads}, {HEAD_SIZE}] or [C] = [{C}]; "
                         f"got {tuple(u.shape)}")
    if T == 0:
        raise ValueError("WKV6 needs at least one token (T >= 1)")
    check_floating_on_one_device("WKV6", {"r": r, "k": k, "v": v, "w": w, "u": u})
    return run_in_float32(chunk_bi_wkv6, tensors, num_heads=num_heads)
