"""Bi-WKV as block matrix products: few passes over memory, the heavy lifting in one batched GEMM.

Every weight of Bi-WKV is an exponential of a token distance (plus the key), so inside a block of L tokens the op is
a fixed ``[L, L]`` matrix per channel applied to ``X = e^{k}`` and ``X v``, and everything outside a block reaches it
through two numbers per block and channel: the decayed sums of all tokens to its left and to its right ("carries").

Layout: channel-major ``[B, C, N, L]`` (N blocks of L tokens, tokens innermost), so that for every (batch, channel)
the blocks are the rows of a contiguous ``[2N, L]`` matrix (``X`` and ``X v`` stacked) and the op is

    out = [X | carries] @ A_aug^T      A_aug = [A | left profile | right profile]   ([L, L + 2] per channel)

one ``matmul`` for the whole op, preceded by a small one for the block summaries that the carries are made of.

Numerics (float32, any k):

* ``X = e^{k - m_n}`` with the block maximum ``m_n``: every factor <= 1, the block's largest token is exactly 1;
* carries are combined across blocks in float64 (they are ~2/L of the data): exponents of token positions times w
  up to |w| T and key maxima of other blocks fit easily;
* each block works in the frame ``phi_n = max(m_n, log|carries| - D)``: the carries fed to the GEMM are at most
  ``e^D``. When ``phi_n > m_n`` the block's own terms are over-weighted by ``e^{phi_n - m_n}``, but they are then
  below ``L e^{2 S - D}`` of the carries' contribution to every row (S: the largest decay exponent spanned inside a
  block), i.e. far below float32 rounding with ``S <= 15``, ``D = 60`` (and ``e^{D + S}·L`` cannot overflow);
* y = num / den is invariant to a per-row factor, so no other rescaling is needed.

The block length depends on T alone (no data-dependent control flow; torch.compile/export trace through) and keeps
``L |w| <= S = 15`` for ``|spatial_decay| = |w| T <= 200`` (when T >= 14); the public entry point falls back to the
chunked scan where this bound does not hold (:func:`blocked_supports`; also for ``|u| > 60``).

The official kernel's function (spec §2.3; README.md) is the paper's structure with 32 kernel chunks: inside a
chunk ``e^{-(t-j-1)w}`` to the left plus the own-chunk term ``(1 - e^w) e^{(t-j)w}`` (for chunk start < j <= t),
``e^{-|t-j| w}`` across chunks. If a kernel chunk fits in a block, blocks hold whole chunks and ``A`` encodes the
structure; otherwise blocks subdivide the chunks (each chunk padded to a whole number of blocks) and the chunk-local
sums enter through the carries. The kernel's ``EPS·e^{m_t}`` (m_t: its running max of the exponents, which
includes k_t itself) is taken as ``EPS·(den_t + e^{k_t})``, folded into the GEMM: the two differ by about EPS = 1e-6
relative on y (~1e-8 on model outputs; the exact running max costs log2(T) passes and is kept in ``chunked.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vrwkv.ops.wkv.reference import KERNEL_CHUNKS, KERNEL_EPS

#: Largest decay exponent L·|w| spanned inside a block for |spatial_decay| <= MAX_ABS_DECAY (see the docstring).
MAX_BLOCK_SPAN = 15.0
#: The |spatial_decay| = |w|·T up to which block lengths keep L·|w| <= MAX_BLOCK_SPAN.
MAX_ABS_DECAY = 200.0
#: The largest |u| (= |spatial_first| / T) for which e^u in the block matrix stays far from float32 overflow.
MAX_ABS_FIRST = 60.0
#: Largest block: the block GEMM costs ~4 L flops per element, kept small next to the model's projections.
MAX_BLOCK = 32
# Carries fed to the GEMM are at most e^_FRAME_MARGIN (see the docstring).
_FRAME_MARGIN = 60.0


@dataclass(frozen=True)
class BlockPlan:
    """How T tokens are laid out in blocks (a function of T and the semantics only).

    Attributes:
        L: tokens per block. N: blocks.
        kc: kernel-chunk length of the official function (None for the paper formula).
        per_chunk: blocks per kernel chunk when chunks are subdivided (0 when blocks hold whole chunks).
        padded: padded length before the reshape to [N, L] (chunks padded to whole blocks when subdivided).
    """

    T: int
    L: int
    N: int
    kc: int | None
    per_chunk: int

    def block_starts(self) -> list[int]:
        """Real position of each block's first token."""
        if self.per_chunk:
            r = self.per_chunk
            return [(n // r) * self.kc + (n % r) * self.L for n in range(self.N)]
        return [n * self.L for n in range(self.N)]


def plan_blocks(T: int, semantics: str, chunks: int = KERNEL_CHUNKS) -> BlockPlan:
    """Choose the block layout for T tokens."""
    cap = max(1, min(MAX_BLOCK, int(MAX_BLOCK_SPAN * T / MAX_ABS_DECAY)))
    if semantics == "paper":
        L = min(cap, T)
        return BlockPlan(T, L, math.ceil(T / L), None, 0)
    kc = math.ceil(T / chunks)  # the kernel's chunk length; chunk starts are multiples of it
    n_chunks = math.ceil(T / kc)
    if kc <= cap:  # whole kernel chunks per block
        q = min(cap // kc, n_chunks)
        return BlockPlan(T, q * kc, math.ceil(n_chunks / q), kc, 0)
    r = math.ceil(kc / cap)  # blocks per kernel chunk
    return BlockPlan(T, math.ceil(kc / r), n_chunks * r, kc, r)


def blocked_supports(T: int, semantics: str, max_abs_w: float, max_abs_u: float, chunks: int = KERNEL_CHUNKS) -> bool:
    """Whether :func:`blocked_bi_wkv` is exact for these decay/bonus magnitudes (w, u already divided by T): the
    decay spanned by a block must stay <= MAX_BLOCK_SPAN (always true for |w|·T <= 200 unless T is so small that
    blocks cannot be shorter than one token) and e^u far from overflow."""
    return max_abs_w * plan_blocks(T, semantics, chunks).L <= MAX_BLOCK_SPAN and max_abs_u <= MAX_ABS_FIRST


def _pad_last(x: torch.Tensor, extra: int, fill: float) -> torch.Tensor:
    """Append ``extra`` entries of ``fill`` to the last dim (no copy when there is nothing to append)."""
    return F.pad(x, (0, extra), value=fill) if extra else x


def _to_blocks(x: torch.Tensor, plan: BlockPlan, fill: float) -> torch.Tensor:
    """[B, C, T] -> [B, C, N, L], padding with ``fill`` (at the end, or at the end of every kernel chunk)."""
    B, C, T = x.shape
    if plan.per_chunk:
        n_chunks = plan.N // plan.per_chunk
        x = _pad_last(x, n_chunks * plan.kc - T, fill).reshape(B, C, n_chunks, plan.kc)
        x = _pad_last(x, plan.per_chunk * plan.L - plan.kc, fill)
    else:
        x = _pad_last(x, plan.N * plan.L - T, fill)
    return x.reshape(B, C, plan.N, plan.L)


def _from_blocks(y: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """[..., N, L] -> [..., T] (drops the padding; a view). Slices only where there is padding: autograd's backward
    of a slice zero-fills the whole input even when the slice is all of it."""
    lead = y.shape[:-2]
    if plan.per_chunk:
        n_chunks = plan.N // plan.per_chunk
        y = y.reshape(*lead, n_chunks, plan.per_chunk * plan.L)
        if plan.per_chunk * plan.L != plan.kc:
            y = y[..., : plan.kc]
    y = y.reshape(*lead, -1)
    return y[..., : plan.T] if y.shape[-1] != plan.T else y


def _block_matrix(w: torch.Tensor, u: torch.Tensor, plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A^T [C, L, L], profiles [C, 2, L])``: entry [q, p] of A^T weighs key q for query p inside a block; the
    profiles weigh the left/right carries for query p. Built in the dtype of w (autograd through w and u)."""
    L = plan.L
    p = torch.arange(L, device=w.device, dtype=w.dtype)
    q = p[:, None]  # key index as rows: entries [q, p]
    dist = p[None, :] - q  # t - j: > 0 when the key is to the left
    wc = w[:, None, None]
    left = torch.exp(-(dist - 1) * wc)  # e^{-(t-j-1) w}
    right = torch.exp((dist + 1) * wc)  # e^{-(j-t-1) w}
    if plan.kc is None:  # paper
        A = torch.where(dist > 0, left, right)
        left_profile, right_profile = torch.exp(-(p - 1) * w[:, None]), torch.exp((p + 1) * w[:, None])
    else:
        dist_across = torch.exp(-dist.abs() * wc)  # e^{-|t-j| w} across kernel chunks
        spurious = -torch.expm1(wc) * torch.exp(dist * wc)  # (1 - e^w) e^{(t-j) w}
        if plan.per_chunk:  # the block lies inside one chunk, not at its start: the start is fixed in the carries
            same_chunk = torch.ones(L, L, dtype=torch.bool, device=w.device)
            after_start = torch.ones(L, 1, dtype=torch.bool, device=w.device)  # key j > chunk start
        else:
            chunk = torch.div(torch.arange(L, device=w.device), plan.kc, rounding_mode="floor")
            same_chunk = chunk[:, None] == chunk[None, :]
            after_start = (torch.arange(L, device=w.device) % plan.kc != 0)[:, None]
        A = torch.where(same_chunk & (dist > 0), left, dist_across)
        A = A + torch.where(same_chunk & (dist >= 0) & after_start, spurious, 0.0)
        left_profile, right_profile = torch.exp(-p * w[:, None]), torch.exp(p * w[:, None])
    A = torch.where(dist == 0, torch.exp(u)[:, None, None], 0.0) + torch.where(dist == 0, 0.0, A)
    if plan.kc is not None:  # the own-chunk term includes j = t (after the chunk start)
        own = -torch.expm1(w)[:, None] * torch.ones(L, device=w.device, dtype=w.dtype)
        if not plan.per_chunk:
            own = own * (torch.arange(L, device=w.device) % plan.kc != 0)
        A = A + torch.diag_embed(own)
    return A, torch.stack([left_profile, right_profile], 1)


def _summary_matrix(w: torch.Tensor, L: int) -> torch.Tensor:
    """[C, L, 2]: a block's sums ``sum_q e^{q w} X_q`` (seen from its left edge by later blocks, up to the distance)
    and ``sum_q e^{-q w} X_q`` (seen by earlier blocks)."""
    q = torch.arange(L, device=w.device, dtype=w.dtype)[None, :, None]
    return torch.exp(torch.cat([q, -q], 2) * w[:, None, None])


def _gemm_matrices(w: torch.Tensor, u: torch.Tensor, plan: BlockPlan, eps: float | None):
    """The right-hand sides of the op's two products, stacked for (den, num):

    * ``[C, 2, L + 2, L]``: the block matrix with the two carry profiles as extra rows (the main GEMM);
    * ``[C, 2, 2, L]``: the two block summaries, transposed (the summary GEMM runs as ``S^T X^T``, which BLAS does
      several times faster than ``X S`` with its two-column output).

    ``eps`` (official semantics) folds the kernel's EPS term into the denominator: ``(1 + eps)·den + eps·e^{k_t}``.
    """
    A, profiles = _block_matrix(w, u, plan)
    rhs = torch.cat([A, profiles], 1)  # [C, L + 2, L]
    if eps is None:
        rhs_den = rhs
    else:
        rhs_den = rhs * (1 + eps) + eps * torch.eye(plan.L + 2, plan.L, dtype=A.dtype, device=A.device)
    summaries_t = _summary_matrix(w, plan.L).transpose(1, 2)  # [C, 2, L]
    return torch.stack([rhs_den, rhs], 1), torch.stack([summaries_t, summaries_t], 1)


# Inference-time cache of the GEMM matrices (CPU): they depend on w and u only, which do not change between the
# forward passes of a model in eval. Keyed on their values (a model passes ``decay / T``, a fresh tensor each call):
# comparing 2C numbers costs microseconds, rebuilding the matrices a few passes over [C, L, L].
_MATRIX_CACHE: dict = {}
_MATRIX_CACHE_ENTRIES = 64  # per (plan, eps, dtype): several models x depth


def _cached_gemm_matrices(w: torch.Tensor, u: torch.Tensor, plan: BlockPlan, eps: float | None):
    if w.device.type != "cpu":  # comparing values would synchronise an accelerator; rebuilding is cheap there
        return _gemm_matrices(w, u, plan, eps)
    entries = _MATRIX_CACHE.setdefault((plan, eps, w.dtype), [])
    for cached_w, cached_u, matrices in entries:
        if torch.equal(cached_w, w) and torch.equal(cached_u, u):
            return matrices
    matrices = _gemm_matrices(w, u, plan, eps)
    if len(entries) >= _MATRIX_CACHE_ENTRIES:
        entries.pop(0)
    entries.append((w.clone(), u.clone(), matrices))
    return matrices


def _excl_cumsum(x: torch.Tensor, dim: int, reverse: bool = False) -> torch.Tensor:
    """Exclusive cumulative sum along ``dim`` (from the end if ``reverse``)."""
    if reverse:
        return _excl_cumsum(x.flip(dim), dim).flip(dim)
    c = x.cumsum(dim)
    return torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c.narrow(dim, 0, c.shape[dim] - 1)], dim)


def _carries(sums, m, k_start, v_start, w, plan: BlockPlan):
    """Left/right carries entering every block, in float64, relative to ``e^{M}`` (M: the sequence's largest key).

    Args:
        sums: [C, 2, B, N, 2] block summaries at each block's own max (dim 1: den/num; last: left/right sums).
        m: [C, 1, B, N] block maxima minus M. k_start, v_start: [C, 1, B, N] key (minus M) and value at each block's
            kernel-chunk start (only used when chunks are subdivided). w: [C].
    Returns:
        (left, right, log_magnitude): [C, 2, B, N], [C, 2, B, N], [C, 1, B, N].
    """
    f64 = torch.float64
    starts = torch.tensor(plan.block_starts(), dtype=f64, device=w.device)  # [N]
    wd = w.to(f64)[:, None, None, None]  # [C, 1, 1, 1]
    pos = (starts - plan.T / 2) * wd  # [C, 1, 1, N]; centred: |position · w| <= |w| T / 2
    e_pos, e_neg = torch.exp(pos), torch.exp(-pos)
    scaled = sums.to(f64) * torch.exp(m.to(f64))[..., None]  # [C, 2, B, N, 2], relative to e^M
    from_left = scaled[..., 0] * e_pos  # e^{P w} sum_q e^{q w} X
    from_right = scaled[..., 1] * e_neg
    left = _excl_cumsum(from_left, 3) * e_neg
    right = _excl_cumsum(from_right, 3, reverse=True) * e_pos
    if plan.per_chunk:
        r = plan.per_chunk
        by_chunk = (*left.shape[:3], plan.N // r, r)
        # chunk-local sums of the earlier blocks of the same kernel chunk: near-left (weight e^{w} more than the
        # distance rule) and the own-chunk term, which excludes the chunk start token
        near = _excl_cumsum(from_left.view(by_chunk), 4).view(left.shape) * e_neg
        own = _excl_cumsum(from_right.view(by_chunk), 4).view(left.shape) * e_pos
        chunk_start = torch.div(starts, plan.kc, rounding_mode="floor") * plan.kc  # [N]
        x_start = torch.exp(k_start.to(f64) + (starts - chunk_start) * wd)  # [C, 1, B, N]
        start_term = torch.cat([x_start, x_start * v_start.to(f64)], 1)  # [C, 2, B, N]
        left = left + torch.expm1(wd) * near
        right = right - torch.expm1(wd) * (own - start_term)
    with torch.no_grad():
        magnitude = left[:, :1].abs() + right[:, :1].abs()
        log_magnitude = torch.log(magnitude + torch.finfo(f64).tiny)
    return left, right, log_magnitude


def blocked_bi_wkv(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, semantics: str = "paper",
                   chunks: int = KERNEL_CHUNKS, eps: float = KERNEL_EPS) -> torch.Tensor:
    """Bi-WKV by block matrix products. k, v: [B, T, C] (any strides; a transposed view of channel-major [B, C, T]
    storage is read without a layout change); w, u: [C]. ``semantics``: "paper" or "official".

    Returns a [B, T, C] view of channel-major storage ([B, C, T] without gradients, [C, B, T] with): models that
    consume it channel-major (e.g. a weight-first output projection) avoid a layout change. Exact to float32
    rounding where :func:`blocked_supports`.
    """
    B, T, C = k.shape
    if T == 1:  # a single token averages itself; the kernel adds EPS·e^{max(k, u + k)} to e^{u + k}
        return v / (1 + eps * torch.exp((-u).clamp(min=0))) if semantics == "official" else v.clone()
    plan = plan_blocks(T, semantics, chunks)
    L, N = plan.L, plan.N
    kT, vT = k.transpose(1, 2), v.transpose(1, 2)  # [B, C, T] views
    kb, vb = _to_blocks(kT, plan, float("-inf")), _to_blocks(vT, plan, 0.0)  # [B, C, N, L]
    with torch.no_grad():  # frames only: y is invariant to them
        if kb.stride(3) == 1:
            m = kb.amax(3, keepdim=True)  # [B, C, N, 1]
        else:  # reduce in the storage order of a [B, T, C] input (C innermost): ~25x faster than across strides
            m = kb.permute(0, 2, 3, 1).amax(2).permute(0, 2, 1)[..., None]
        m = torch.where(torch.isfinite(m), m, 0.0)  # all-padding blocks
        M = m.amax(2, keepdim=True)  # [B, C, 1, 1]
    # The GEMM operand [C, 2 (den, num), B, N, L + 2 (tokens, carries)]: per (channel, den/num) one contiguous
    # [B·N, L + 2] matrix, so the products are bmm over 2C matrices with no broadcasting copies. Autograd needs the
    # stacked blocks intact after the summary GEMM: with gradients (or when tracing for export) the operand is
    # built by concatenation; without, X, X v and the carries are written straight into one buffer.
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (k, v, w, u))
    in_place = not (grad or torch.jit.is_tracing())
    if in_place:
        operand = kb.new_empty(C, 2, B, N, L + 2)
        as_bc = operand.permute(2, 0, 1, 3, 4)  # [B, C, 2, N, L + 2] view
        # exp on a contiguous copy: on the operand's rows of L within L + 2 it vectorises poorly (4x slower at L = 14)
        x = torch.sub(kb, m, out=kb.new_empty(B, C, N, L)).exp_()
        as_bc[:, :, 0, :, :L] = x
        torch.mul(x, vb, out=as_bc[:, :, 1, :, :L])
        del x, as_bc  # free the copy before the GEMM's output exists (peak memory)
        stacked = operand[..., :L]
    else:
        x = torch.exp(kb - m)
        stacked = torch.stack([x, x * vb]).permute(2, 0, 1, 3, 4)  # [C, 2, B, N, L] view
    del kb, vb  # padded copies when T is not a whole number of blocks
    eps_den = eps if semantics == "official" else None
    cache = in_place and not torch.compiler.is_compiling()
    rhs, summaries_t = (_cached_gemm_matrices if cache else _gemm_matrices)(w, u, plan, eps_den)
    sums = torch.matmul(summaries_t, stacked.reshape(C, 2, B * N, L).transpose(2, 3))  # [C, 2, 2, B·N]
    sums = sums.view(C, 2, 2, B, N).permute(0, 1, 3, 4, 2)  # [C, 2, B, N, 2]
    m_rel = (m - M)[..., 0].permute(1, 0, 2)[:, None]  # [C, 1, B, N]
    if plan.per_chunk:
        starts = torch.tensor([(s // plan.kc) * plan.kc for s in plan.block_starts()], device=k.device)
        starts = starts.clamp(max=T - 1)  # all-padding blocks at the very end read any token (their sums are 0)
        # gathered along dim 1 of the [B, T, C] tensors (whole rows when C is innermost)
        k_start = (k[:, starts] - M[:, None, :, 0, 0]).permute(2, 0, 1)[:, None]  # [C, 1, B, N]
        v_start = v[:, starts].permute(2, 0, 1)[:, None]
    else:
        k_start = v_start = None
    left, right, log_mag = _carries(sums, m_rel, k_start, v_start, w, plan)
    with torch.no_grad():
        frame = torch.maximum(m_rel.to(torch.float64), log_mag - _FRAME_MARGIN)  # [C, 1, B, N]
        to_frame = torch.exp(-frame)
    left, right = (left * to_frame).to(k.dtype), (right * to_frame).to(k.dtype)
    if in_place:
        operand[..., L], operand[..., L + 1] = left, right
    else:
        operand = torch.cat([stacked, left[..., None], right[..., None]], -1)
    out = torch.matmul(operand.view(C, 2, B * N, L + 2), rhs)  # [C, 2, B·N, L]
    del operand, stacked  # (without autograd nothing else holds them: freed before y is allocated)
    out = _from_blocks(out.view(C, 2, B, N, L), plan)  # [C, 2, B, T]
    den, num = out.unbind(1)  # (unbind's backward is one stack; two selects would zero-fill `out` twice)
    if not in_place:
        return (num / den).permute(1, 2, 0)  # [B, T, C] view of [C, B, T]
    y = k.new_empty(B, C, T)
    torch.div(num, den, out=y.permute(1, 0, 2))
    return y.transpose(1, 2)  # [B, T, C] view of [B, C, T]
