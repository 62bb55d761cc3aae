"""Bi-WKV as block matrix products: few passes over memory, the heavy lifting in one batched GEMM.

Every weight of Bi-WKV is an exponential of a token distance (plus the key), so inside a block of L tokens the op is
a fixed ``[L, L]`` matrix per channel applied to ``X = e^{k}`` and ``X v``, and everything outside a block reaches it
through two numbers per block and channel: the decayed sums of all tokens to its left and to its right ("carries").

Layout: channel-major ``[B, C, N, L]`` (N blocks of L tokens, tokens innermost), so that for every (batch, channel)
the blocks are the rows of a contiguous ``[2N, L]`` matrix (``X`` and ``X v`` stacked) and the op is

    out = [X, X v] @ A + [left, right] @ [left profile; right profile]      (A: [L, L] per channel)

one ``matmul`` and a rank-2 update in place, preceded by a small product for the block summaries that the carries
are made of. The backward (:class:`_BlockedBiWKV`) is the same products transposed.

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
from torch.autograd.function import once_differentiable

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
#: Elements (B·T·channels) per channel group of the forward without autograd (:func:`_forward_by_channel_groups`),
#: and the fewest channels of a group (each group costs ~40 operator calls).
GROUP_ELEMENTS = 2**19
MIN_GROUP_CHANNELS = 16


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


def _cached_per_plan(cache: dict, build, plan: BlockPlan, device: torch.device):
    """``build(plan, device)``, cached in ``cache`` per (plan, device) (made afresh under torch.compile, which traces
    it)."""
    if torch.compiler.is_compiling():
        return build(plan, device)
    key = (plan, device)
    if key not in cache:
        with torch.inference_mode(False):  # normal tensors: a later differentiable call saves them for backward
            cache[key] = build(plan, device)
    return cache[key]


_INDEX_CACHE: dict = {}


def _matrix_indices(plan: BlockPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_build_matrix_indices`, cached per (plan, device)."""
    return _cached_per_plan(_INDEX_CACHE, _build_matrix_indices, plan, device)


def _build_matrix_indices(plan: BlockPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where every entry of the op's small matrices comes from: column indices into the per-channel table of
    :func:`_gemm_matrices`. Returns ``(main [(L + 2)·L], summaries [2·L])`` (flattened).

    Entry [q, p] of the main matrix weighs key q for query p inside a block; rows L, L + 1 weigh the left/right
    carries for query p. Table columns: ``e^{d w}`` for ``d = -R..R`` at ``d + R``; then ``e^u``; then (official)
    ``e^u + (1 - e^w)``; then (official) ``e^{-(t-j-1) w} + (1 - e^w) e^{(t-j) w}`` for ``t - j = 1..L``.
    """
    L, R = plan.L, plan.L + 1
    exp_u, own_diag, own_left = 2 * R + 1, 2 * R + 2, 2 * R + 2  # own_left + (t - j) for t - j >= 1
    p = torch.arange(L)
    q = p[:, None]  # key index as rows: entries [q, p]
    dist = p[None, :] - q  # t - j: > 0 when the key is to the left
    if plan.kc is None:  # paper: e^{-(|t-j| - 1) w}, e^u on the diagonal
        main = torch.where(dist == 0, exp_u, 1 - dist.abs() + R)
        profiles = torch.stack([1 - p, p + 1])  # e^{-(p-1) w} from the left, e^{(p+1) w} from the right
    else:  # official: e^{-(t-j-1) w} to the left inside a kernel chunk, e^{-|t-j| w} elsewhere, and the own-chunk
        # term (1 - e^w) e^{(t-j) w} for chunk start < j <= t
        if plan.per_chunk:  # the block lies inside one chunk, not at its start: the start is fixed in the carries
            same_chunk = torch.ones(L, L, dtype=torch.bool)
            after_start = torch.ones(L, 1, dtype=torch.bool)  # key j > chunk start
        else:
            chunk = torch.div(p, plan.kc, rounding_mode="floor")
            same_chunk = chunk[:, None] == chunk[None, :]
            after_start = (p % plan.kc != 0)[:, None]
        main = torch.where(same_chunk & (dist > 0), torch.where(after_start, own_left + dist, 1 - dist + R),
                           -dist.abs() + R)
        main = torch.where(dist == 0, torch.where(after_start, own_diag, exp_u), main)
        profiles = torch.stack([-p, p])
    main = torch.cat([main, profiles + R])
    summaries = torch.stack([p, -p]) + R  # sum_q e^{q w} X_q (seen by later blocks), sum_q e^{-q w} X_q
    return main.flatten().to(device), summaries.flatten().to(device)


def _gemm_matrices(w: torch.Tensor, u: torch.Tensor, plan: BlockPlan, eps: float | None):
    """The right-hand sides of the op's two products, stacked for (den, num), built in the dtype of w (autograd
    through w and u) by one gather from a small per-channel table of weights (:func:`_matrix_indices`):

    * ``[C, 2, L + 2, L]``: the block matrix with the two carry profiles as extra rows (the main GEMM);
    * ``[C, 2, 2, L]``: the two block summaries, transposed (the summary GEMM runs as ``S^T X^T``, which BLAS does
      several times faster than ``X S`` with its two-column output).

    ``eps`` (official semantics) folds the kernel's EPS term into the denominator: ``(1 + eps)·den + eps·e^{k_t}``.
    """
    table, summaries_t = _gemm_table(w, u, plan, eps)
    return _gather_rhs(table, plan), summaries_t


def _gather_rhs(table: torch.Tensor, plan: BlockPlan, half: int | None = None) -> torch.Tensor:
    """The main GEMM's right-hand sides from :func:`_gemm_table`'s ``[C, 2, columns]``: ``[C, 2, L + 2, L]``, or
    for one ``half`` (0: den, 1: num) ``[C, L + 2, L]``."""
    C, L = table.shape[0], plan.L
    main = _matrix_indices(plan, table.device)[0]
    if half is None:
        return torch.gather(table, 2, main.expand(C, 2, -1)).view(C, 2, L + 2, L)
    return torch.gather(table[:, half], 1, main.expand(C, -1)).view(C, L + 2, L)


def _gemm_table(w: torch.Tensor, u: torch.Tensor, plan: BlockPlan, eps: float | None):
    """The per-channel table of weights that :func:`_gather_rhs` makes the block matrices of, ``[C, 2 (den, num),
    columns]``, and the summaries' matrices ``[C, 2, 2, L]`` (see :func:`_gemm_matrices`)."""
    C, L, R = w.shape[0], plan.L, plan.L + 1
    summaries = _matrix_indices(plan, w.device)[1]
    d = torch.arange(-R, R + 1, device=w.device, dtype=w.dtype)
    powers = torch.exp(d * w[:, None])  # [C, 2R + 1]: e^{d w}
    exp_u = torch.exp(u)[:, None]
    if plan.kc is None:
        table = torch.cat([powers, exp_u], 1)
    else:
        own = -torch.expm1(w)[:, None]  # 1 - e^w
        dist = torch.arange(1, L + 1, device=w.device)
        own_left = powers[:, R + 1 - dist] + own * powers[:, R + dist]  # e^{-(t-j-1) w} + (1 - e^w) e^{(t-j) w}
        table = torch.cat([powers, exp_u, exp_u + own, own_left], 1)
    if eps is None:
        table2 = table[:, None].expand(C, 2, table.shape[1])
    else:  # den: (1 + eps) times every weight, plus eps on the diagonal (the e^u columns)
        on_diagonal = torch.zeros(table.shape[1], device=w.device, dtype=w.dtype)
        on_diagonal[2 * R + 1: 2 * R + (2 if plan.kc is None else 3)] = eps  # the e^u columns
        table2 = torch.stack([table * (1 + eps) + on_diagonal, table], 1)  # [C, 2, columns]
    summaries_t = powers[:, summaries].view(C, 1, 2, L).expand(C, 2, 2, L)  # (one matrix for both halves)
    return table2, summaries_t


def _excl_cumsum_last(x: torch.Tensor) -> torch.Tensor:
    """Exclusive cumulative sum along the last dim."""
    return F.pad(x[..., :-1].cumsum(-1), (1, 0))


_PLAN_CACHE: dict = {}


def _plan_tensors(plan: BlockPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float64 constants of the carry scan, cached per (plan, device):

    * ``[3, N]``: each block's first real position minus T/2 (P) with the signs (+, -, +): the exponents (times w)
      that take the left / right sums of a block to the origin (rows 0, 1: ``e^{P w}``, ``e^{-P w}``) and back
      (rows 1, 2);
    * (kernel chunks subdivided) ``[chunks]``: T/2 minus each kernel chunk's start; else None.
    """
    return _cached_per_plan(_PLAN_CACHE, _build_plan_tensors, plan, device)


def _build_plan_tensors(plan: BlockPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    pos = torch.tensor(plan.block_starts(), dtype=torch.float64) - plan.T / 2
    signed = torch.stack([pos, -pos, pos]).to(device)
    if not plan.per_chunk:
        return signed, None
    chunk_starts = torch.arange(plan.N // plan.per_chunk, dtype=torch.float64) * plan.kc
    return signed, (plan.T / 2 - chunk_starts).to(device)


def _framed_carries(sums, m, k_start, v_start, w, plan: BlockPlan, dtype, in_place: bool = False):
    """Left/right carries entering every block, in every block's frame, cast to the op's dtype: [C, 2, 2, B, N]
    (dim 1: den/num; dim 2: left, right).

    The scan across blocks runs in float64 (see the module's docstring), relative to ``e^{M}`` (M: the sequence's
    largest key), at the origin T/2 (|position · w| <= |w| T / 2). The frame ``max(m, log(magnitude of the den
    carries) - margin)`` carries no gradient (y is invariant to it).

    Args:
        sums: [C, 2, 2, B, N] block summaries at each block's own max (dim 1: den/num; dim 2: left/right sums).
        m: [C, 1, B, N] block maxima minus M. k_start, v_start: [C, 1, B, chunks] key (minus M) and value at each
            kernel chunk's start (only used when chunks are subdivided). w: [C].
        in_place: the op's forward without autograd: float64 products are updated in place and freed as soon as
            they are read, results written by ``out=`` (not for autograd or graph capture: the TorchScript ONNX
            exporter rejects ``out=``).
    """
    f64 = torch.float64
    C, _, _, B, N = sums.shape
    wd = w.to(f64)
    signed, start_offsets = _plan_tensors(plan, w.device)
    exps = torch.mul(signed, wd[:, None, None]).exp_()  # [C, 3, N]: e^{P w}, e^{-P w}, e^{P w}
    to_origin, to_blocks = exps[:, None, :2, None], exps[:, None, 1:, None]  # [C, 1, 2, 1, N] each
    e_m = torch.exp(m.to(f64, memory_format=torch.contiguous_format))  # [C, 1, B, N] (m may be a permuted view)
    # every block's left / right sums at the origin, e^{m + P w} sum_q e^{q w} X_q and e^{m - P w} sum_q e^{-q w} X_q
    if in_place:  # [C, 2, 2, B, N] float64
        at = sums.to(f64).mul_(e_m[:, :, None]).mul_(to_origin)
    else:
        at = sums * e_m[:, :, None] * to_origin
    local = None
    if plan.per_chunk:
        r = plan.per_chunk
        # chunk-local sums of the earlier blocks of the same kernel chunk, both from the left: near-left (weight e^w
        # more than the distance rule) and the own-chunk term, which excludes the chunk start token
        by_chunk = (C, 2, 2, B, N // r, r)
        if in_place:
            local = torch.empty(by_chunk, dtype=f64, device=at.device)
            local[..., 0] = 0
            torch.cumsum(at.view(by_chunk)[..., :-1], -1, out=local[..., 1:])
        else:
            local = _excl_cumsum_last(at.view(by_chunk))  # [C, 2, 2, B, chunks, r]
        # the chunk start token at the origin: e^{k_start + (T/2 - chunk start) w}  [C, 1, B, chunks]
        x_start = torch.exp(k_start.to(f64) + start_offsets * wd[:, None, None, None])
        local[:, :, 1] -= torch.cat([x_start, x_start * v_start.to(f64)], 1)[..., None]
        expm1_w = torch.expm1(wd)[:, None, None, None, None]  # [C, 1, 1, 1, 1]
        signed_expm1 = torch.cat([expm1_w, -expm1_w], 2)  # left +, right - (e^w - 1) ...
        local = local.view(at.shape).mul_(signed_expm1) if in_place else local.view(at.shape) * signed_expm1
    # the sums of the blocks to the left / right (exclusive scans along N, the right one from the end), at the origin
    if in_place:  # into one new tensor, the input freed as soon as it is read (its largest float64 temporary)
        scans = torch.empty_like(at)
        scans[:, :, 0, :, 0] = 0
        torch.cumsum(at[:, :, 0, :, :-1], -1, out=scans[:, :, 0, :, 1:])
        reverse = at[:, :, 1, :, 1:].flip(-1)  # [C, 2, B, N - 1]: blocks N-1 .. 1
        del at
        scans[:, :, 1, :, :-1] = reverse.cumsum_(-1).flip(-1)
        scans[:, :, 1, :, -1] = 0
        del reverse
        if local is not None:
            scans.add_(local)
            del local
        at_blocks = scans.mul_(to_blocks)  # [C, 2, 2, B, N]: at each block's own position
    else:
        scans = torch.stack([_excl_cumsum_last(at[:, :, 0]), _excl_cumsum_last(at[:, :, 1].flip(-1)).flip(-1)], 2)
        at_blocks = (scans if local is None else scans + local) * to_blocks
    with torch.no_grad():  # e^{-frame}, without a float64 log
        den = at_blocks[:, 0].abs()  # [C, 2, B, N]
        magnitude = torch.add(den[:, 0], den[:, 1]).mul_(math.exp(-_FRAME_MARGIN))  # [C, B, N]
        del den
        to_frame = torch.maximum(e_m[:, 0], magnitude, **({"out": magnitude} if in_place else {}))
        to_frame = to_frame.clamp_(min=torch.finfo(torch.float64).tiny).reciprocal_()
    if not in_place:
        return (at_blocks * to_frame[:, None, None]).to(dtype)
    return torch.mul(at_blocks, to_frame[:, None, None], out=sums.new_empty(sums.shape, dtype=dtype))


def blocked_bi_wkv(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, semantics: str = "paper",
                   chunks: int = KERNEL_CHUNKS, eps: float = KERNEL_EPS, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bi-WKV by block matrix products. k, v: [B, T, C] (any strides; a transposed view of channel-major [B, C, T]
    storage is read without a layout change); w, u: [C]. ``semantics``: "paper" or "official".

    Returns a [B, T, C] view of channel-major [C, B, T] storage: models that consume
    it channel-major (e.g. a weight-first output projection) avoid a layout change. Without autograd, ``out`` (a
    [B, T, C] view of contiguous [C, B, T] storage, k's dtype, no memory shared with the inputs: see
    :func:`writes_out`) receives y and is returned; else ``out`` is ignored. Exact to float32 rounding where
    :func:`blocked_supports`. Differentiable: a hand-written backward (:class:`_BlockedBiWKV`) made of the same
    block products; under torch.compile or tracing, plain operations without buffer writes (autograd through them).
    """
    B, T, C = k.shape
    if T == 1:  # a single token averages itself; the kernel adds EPS·e^{max(k, u + k)} to e^{u + k}
        return v / (1 + eps * torch.exp((-u).clamp(min=0))) if semantics == "official" else v.clone()
    plan = plan_blocks(T, semantics, chunks)
    eps_den = eps if semantics == "official" else None
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (k, v, w, u))
    if torch.jit.is_tracing() or torch.compiler.is_compiling():  # graph capture: no buffer writes (the compiler fuses)
        return _traceable_forward(k, v, w, u, plan, eps_den)
    if grad:
        return _BlockedBiWKV.apply(k, v, w, u, plan, eps_den)
    if out is not None and writes_out(out, k):
        _forward_by_channel_groups(k, v, w, u, plan, eps_den, out.permute(2, 0, 1))
        return out
    return _forward_by_channel_groups(k, v, w, u, plan, eps_den)


def writes_out(out: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`blocked_bi_wkv` without autograd writes y straight into ``out``: a [B, T, C] view of contiguous
    [C, B, T] storage (its own layout) in k's dtype and device. (The caller checks that it shares no memory with the
    inputs.)"""
    return (out.shape == k.shape and out.dtype == k.dtype and out.device == k.device
            and out.permute(2, 0, 1).is_contiguous())


def _forward_by_channel_groups(k, v, w, u, plan: BlockPlan, eps_den: float | None,
                               out: torch.Tensor | None = None) -> torch.Tensor:
    """The op without autograd, over groups of channels (it is independent per channel) of about
    :data:`GROUP_ELEMENTS` elements each, into one ``y`` (``out`` [C, B, T] if given): the temporaries (``[X, X v]``,
    the GEMM output, the carries; five ``[B, T, C']``) are one group's. Returns a [B, T, C] view of [C, B, T] as
    :func:`_forward`."""
    B, T, C = k.shape
    groups = min(-(-B * T * C // GROUP_ELEMENTS), -(-C // MIN_GROUP_CHANNELS))
    if groups <= 1:
        return _forward(k, v, w, u, plan, eps_den, out=out)[0]
    per_group = -(-C // groups)  # (groups of equal size, the last one smaller)
    y = k.new_empty(C, B, T) if out is None else out
    table, summaries_t = _gemm_table(w, u, plan, eps_den)  # (once for all groups: ~20 small operators)
    for c0 in range(0, C, per_group):
        c = slice(c0, c0 + per_group)
        _forward(k[..., c], v[..., c], w[c], u[c], plan, eps_den, out=y[c], tables=(table[c], summaries_t[c]))
    return y.permute(1, 2, 0)


def _frames(kb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block maxima ``m`` [B, C, N, 1] of the blocked keys [B, C, N, L] (0 for all-padding blocks) and their maximum
    ``M`` [B, C, 1, 1]. Frames only: y is invariant to them (no gradient flows through them)."""
    B, C, N, L = kb.shape
    with torch.no_grad():
        if kb.stride(3) != 1:  # reduce in the storage order of a [B, T, C] input (C innermost): ~25x faster than
            m = kb.permute(0, 2, 3, 1).amax(2).permute(0, 2, 1)[..., None]  # across strides
        elif L % 32 and (kb.is_contiguous() or kb.transpose(0, 1).is_contiguous()):
            # channel-major storage ([C, B, N, L]): blocks of tokens in a row, a max pool over the storage's rows
            # (2-6x amax's speed for L = 14-31; over 32 tokens amax is vectorised: 3x the max pool's speed)
            rows = kb if kb.is_contiguous() else kb.transpose(0, 1)
            m = F.max_pool1d(rows.view(-1, 1, N * L), L).view(*rows.shape[:3], 1)
            m = m if rows is kb else m.transpose(0, 1)  # [B, C, N, 1]
        else:
            m = kb.amax(3, keepdim=True)
        m = m.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # all-padding blocks
        return m, m.amax(2, keepdim=True)


def _chunk_starts(k: torch.Tensor, v: torch.Tensor, M: torch.Tensor, plan: BlockPlan):
    """Key (minus M) and value of the first token of every kernel chunk, [C, 1, B, chunks] each (as
    :func:`_framed_carries` takes them; None unless kernel chunks are subdivided into blocks). A strided slice: chunk
    starts are the multiples of the chunk length."""
    if not plan.per_chunk:
        return None, None
    k_start = (k[:, :: plan.kc] - M[:, None, :, 0, 0]).permute(2, 0, 1)[:, None]  # [C, 1, B, chunks]
    return k_start, v[:, :: plan.kc].permute(2, 0, 1)[:, None]


def _block_summaries(halves, summaries_t: torch.Tensor, m: torch.Tensor, M: torch.Tensor):
    """What the carries are made of: the block summaries ``S^T [X, X v]^T`` as [C, 2, 2, B, N] (a small GEMM per
    half, in the transposed orientation BLAS runs fastest) and the block maxima relative to the sequence's,
    [C, 1, B, N]. halves: X and X v, [C, B·N, L] each (unit stride inside their matrices);
    summaries_t: [C, 2, 2, L]; m: [B, C, N, 1]; M: [B, C, 1, 1]."""
    B, C, N, _ = m.shape
    sums = torch.stack([torch.matmul(summaries_t[:, half], halves[half].transpose(1, 2)) for half in (0, 1)], 1)
    sums = sums.view(C, 2, 2, B, N)
    return sums, (m - M)[..., 0].permute(1, 0, 2)[:, None]


def _stacked_inputs(kb: torch.Tensor, vb: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``[X, X v]`` with ``X = e^{k - m}`` in the GEMM operand layout [C, 2 (den, num), B, N, L] (for every channel
    and den/num one contiguous [B·N, L] matrix, so the products are bmm over 2C matrices), from the blocked keys and
    values [B, C, N, L] and the block maxima [B, C, N, 1]: three passes, each writing contiguous runs of N·L."""
    B, C, N, L = kb.shape
    stacked = kb.new_empty(C, 2, B, N, L)
    _fill_inputs(kb, vb, m, stacked[:, 0], stacked[:, 1])
    return stacked


def _input_halves(kb: torch.Tensor, vb: torch.Tensor, m: torch.Tensor, x_into: torch.Tensor | None = None):
    """X and X v as :func:`_stacked_inputs` makes them, but each one contiguous [C, B·N, L] tensor (a product's output
    may then be written over X once nothing reads it), X in ``x_into`` (contiguous, [C, B, T] with T = N·L: y's
    buffer) if given."""
    B, C, N, L = kb.shape
    if x_into is None:
        x, xv = kb.new_empty(2, C, B, N, L).unbind(0)
    else:
        x, xv = x_into.view(C, B, N, L), kb.new_empty(C, B, N, L)
    _fill_inputs(kb, vb, m, x, xv)
    return x.view(C, B * N, L), xv.view(C, B * N, L)


def _fill_inputs(kb, vb, m, x, xv) -> None:
    """``x = e^{kb - m}``, ``xv = x vb`` into [C, B, N, L] views, from [B, C, N, L] blocked keys and values."""
    torch.sub(kb, m, out=x.transpose(0, 1)).exp_()
    torch.mul(x.transpose(0, 1), vb, out=xv.transpose(0, 1))


def _forward(k, v, w, u, plan: BlockPlan, eps_den: float | None, keep: bool = False, out: torch.Tensor | None = None,
             tables: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The op without autograd: ``out = [X, X v] @ A + carries @ profiles`` (a bmm and a rank-2 update in place for
    den, then for num, one half of the block matrices existing at a time). Den's product gets a buffer of its own,
    num's is written over X (den's was its last reader), and without ``keep`` y over den, or, with ``out`` and no
    padding, X is made in ``out`` and y over num there: the op's temporaries peak at three ``[B, T, C]`` (X, X v,
    den), two with ``out`` (X v first, den only after the carries).

    ``tables``: :func:`_gemm_table` of these channels when the caller made it for several calls.

    Returns ``(y, saved)``: y a [B, T, C] view of [C, B, T] (``out``'s storage if given: [C, B, T]); ``saved`` (when
    ``keep``) what the backward needs: ``1 / den'`` [C, B, T] and the block maxima.
    """
    B, T, C = k.shape
    L, N = plan.L, plan.N
    kb = _to_blocks(k.transpose(1, 2), plan, float("-inf"))  # [B, C, N, L]
    vb = _to_blocks(v.transpose(1, 2), plan, 0.0)
    m, M = _frames(kb)
    x_into = out if out is not None and not keep and N * L == T else None
    x, xv = _input_halves(kb, vb, m, x_into)  # [C, B·N, L] each
    del kb, vb  # padded copies when T is not a whole number of blocks
    table, summaries_t = _gemm_table(w, u, plan, eps_den) if tables is None else tables
    sums, m_rel = _block_summaries((x, xv), summaries_t, m, M)
    k_start, v_start = _chunk_starts(k, v, M, plan)
    carries = _framed_carries(sums, m_rel, k_start, v_start, w, plan, k.dtype, in_place=True).view(C, 2, 2, B * N)
    den_blocks = k.new_empty(C, B * N, L)
    for half, (operand, product) in enumerate(((x, den_blocks), (xv, x))):  # num over X: disjoint from its input X v
        rhs = _gather_rhs(table, plan, half)  # [C, L + 2, L]
        torch.matmul(operand, rhs[:, :L], out=product)
        product.baddbmm_(carries[:, half].transpose(1, 2), rhs[:, L:])  # ([C, B·N, 2]: BLAS reads it transposed)
        del rhs  # (before the next half's)
    den = _from_blocks(den_blocks.view(C, B, N, L), plan)  # [C, B, T] views (copies where padding sits inside)
    num = _from_blocks(x.view(C, B, N, L), plan)  # (in out when X was made there: y over it)
    whole = den.data_ptr() == den_blocks.data_ptr() and den.is_contiguous()  # den is all of den_blocks: [C, B, T]
    if not keep:
        # channel-major, batch inside: the layout of a channel-major projection of B·T tokens
        y = out if out is not None else den if whole else k.new_empty(C, B, T)
        torch.div(num, den, out=y)
        return y.permute(1, 2, 0), None  # [B, T, C] view of [C, B, T]
    rden = den.reciprocal_() if whole else torch.reciprocal(den)  # [C, B, T]
    y = k.new_empty(C, B, T) if out is None else out
    torch.mul(num, rden, out=y)
    return y.permute(1, 2, 0), (rden, m, M)


class _BlockedBiWKV(torch.autograd.Function):
    """Bi-WKV with a backward made of the forward's own block products, run in reverse by hand.

    The forward is ``out = [X | X v | carries] @ rhs`` per (channel, den/num) with ``X = e^{k - m}`` (frames fixed),
    ``y = num / den'``. Backward, with ``a = g / den'``:

    * ``d out = (-a y, a)``; ``d [X, X v] = d out @ A^T`` plus, through the block summaries that the carries are
      made of, ``d sums @ summaries`` (one more GEMM with 2 columns); ``d k = X (d X + v d(X v))``, ``d v = X d(X v)``;
    * ``d rhs = [X, X v, carries]^T @ d out`` and ``d summaries = d sums^T [X, X v]``, then autograd through the small
      matrices of w, u (:func:`_gemm_matrices`) and through the float64 carry scan (``[C, 2, B, N]``, 2/L of the data).

    Saved: k, v, y (the output, which the gate keeps anyway) and ``1 / den'`` (one [B, T, C]), plus the block maxima;
    X and X v (three passes), the block summaries (a GEMM with 2 rows) and the carries are recomputed instead. Autograd through the forward saves ~10 [B, T, C] tensors
    and its backward costs ~5x the forward; this one ~2-3x.
    """

    @staticmethod
    def forward(ctx, k, v, w, u, plan: BlockPlan, eps_den: float | None):
        y, (rden, m, M) = _forward(k, v, w, u, plan, eps_den, keep=True)
        ctx.plan, ctx.eps_den = plan, eps_den
        ctx.save_for_backward(k, v, w, u, y, rden, m, M)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        k, v, w, u, y, rden, m, M = ctx.saved_tensors
        plan, eps_den = ctx.plan, ctx.eps_den
        B, T, C = k.shape
        L, N = plan.L, plan.N
        # d out [C, 2, B, N, L] in the layout of the forward's GEMM output, zero at padding positions. Its den' half
        # holds +a y (= -d den'): the sign is put into the small matrices it meets (sign below).
        padded = N * L != T
        d_out = k.new_empty(C, 2, B, T) if padded else k.new_empty(C, 2, B, N, L)
        d_view = d_out if padded else _from_blocks(d_out, plan)  # [C, 2, B, T] (a view when there is no padding)
        torch.mul(grad_y.permute(2, 0, 1), rden, out=d_view[:, 1])  # a = g / den'
        torch.mul(d_view[:, 1], y.permute(2, 0, 1), out=d_view[:, 0])  # a y
        if padded:  # (_from_blocks of padded blocks is a copy: pad afterwards instead)
            d_out = _to_blocks(d_out.view(C * 2, B, T), plan, 0.0)  # [C·2, B, N, L]
        d_flat = d_out.view(C, 2, B * N, L)
        sign = torch.tensor([-1.0, 1.0], dtype=k.dtype, device=k.device)[None, :, None, None]  # [1, 2, 1, 1]

        # X and X v again, in the GEMM operand's layout [C, 2, B, N, L]
        kb = _to_blocks(k.transpose(1, 2), plan, float("-inf"))  # [B, C, N, L]
        vb = _to_blocks(v.transpose(1, 2), plan, 0.0)
        xs = _stacked_inputs(kb, vb, m)  # [C, 2, B, N, L]
        xs_flat = xs.view(C, 2, B * N, L)

        with torch.enable_grad():  # the small parts: autograd through w, u, the summaries and the carry scan
            w_, u_ = w.detach().requires_grad_(), u.detach().requires_grad_()
            rhs, summaries_t = _gemm_matrices(w_, u_, plan, eps_den)  # [C, 2, L + 2, L], [C, 2, 2, L]
            sums, m_rel = _block_summaries(xs_flat.unbind(1), summaries_t.detach(), m, M)  # as in the forward
            sums_ = sums.requires_grad_()
            k_chunk, v_chunk = _chunk_starts(k.detach(), v.detach(), M, plan)  # [C, 1, B, chunks]
            if k_chunk is not None:
                k_chunk.requires_grad_()
                v_chunk.requires_grad_()
            carries = _framed_carries(sums_, m_rel, k_chunk, v_chunk, w_, plan, k.dtype)  # [C, 2, 2, B, N]
        rhs_d = rhs.detach()
        # d carries: profiles @ d out^T (the transposed product is several times faster, see _gemm_matrices)
        d_carries = torch.matmul(rhs_d[:, :, L:], d_flat.transpose(2, 3))  # [C, 2, 2, B·N]
        d_carries[:, 0].neg_()
        carry_inputs = [t for t in (sums_, w_, k_chunk, v_chunk) if t is not None]
        d_small = torch.autograd.grad(carries, carry_inputs, d_carries.view(carries.shape), allow_unused=True)
        d_sums = d_small[0]  # [C, 2, 2, B, N]
        d_w = d_small[1] if d_small[1] is not None else torch.zeros_like(w)

        # d [X, X v] = d out @ A^T + d sums @ summaries  ([C, 2, B·N, L])
        d_stacked = torch.matmul(d_flat, (rhs_d[:, :, :L] * sign).transpose(2, 3).contiguous())
        d_sums_rows = d_sums.reshape(C * 2, 2, B * N).transpose(1, 2)  # [C·2, B·N, 2]
        d_stacked.view(C * 2, B * N, L).baddbmm_(d_sums_rows, summaries_t.detach().reshape(C * 2, 2, L))

        d_w_u = (None, None)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            carries = carries.detach().view(C, 2, 2, B * N)
            d_rhs = torch.cat([xs_flat.transpose(2, 3) @ d_flat, carries @ d_flat], 2)
            d_rhs[:, 0].neg_()
            d_summaries = d_sums.reshape(C, 2, 2, B * N) @ xs_flat  # [C, 2, 2, L]
            d_w_u = torch.autograd.grad((rhs, summaries_t), (w_, u_), (d_rhs, d_summaries))

        # d k = X (d X + v d(X v)), d v = X d(X v): in place in d_stacked ([C, 2, B, N, L] -> [dk, dv])
        d_blocks = d_stacked.view(C, 2, B, N, L)
        x_c = xs[:, 0]  # [C, B, N, L]
        d_blocks.mul_(x_c[:, None])
        d_blocks[:, 0].addcmul_(vb.transpose(0, 1), d_blocks[:, 1])
        d_kv = _from_blocks(d_blocks, plan)  # [C, 2, B, T]
        d_k, d_v = d_kv[:, 0].permute(1, 2, 0), d_kv[:, 1].permute(1, 2, 0)  # [B, T, C] views
        if k_chunk is not None:  # the chunk-start inputs of the carries
            d_k[:, :: plan.kc] += d_small[2][:, 0].permute(1, 2, 0)
            d_v[:, :: plan.kc] += d_small[3][:, 0].permute(1, 2, 0)
        return d_k, d_v, (d_w + d_w_u[0]) if d_w_u[0] is not None else d_w, d_w_u[1], None, None


def _traceable_forward(k, v, w, u, plan: BlockPlan, eps_den: float | None) -> torch.Tensor:
    """The op as plain differentiable operations without buffer writes (torch.compile with autograd, and tracing
    for export, which loses writes into buffers). Same arithmetic as :func:`_forward`."""
    B, T, C = k.shape
    L, N = plan.L, plan.N
    kb = _to_blocks(k.transpose(1, 2), plan, float("-inf"))  # [B, C, N, L]
    vb = _to_blocks(v.transpose(1, 2), plan, 0.0)
    m, M = _frames(kb)
    x = torch.exp(kb - m)
    stacked = torch.stack([x, x * vb]).permute(2, 0, 1, 3, 4)  # [C, 2, B, N, L] view
    rhs, summaries_t = _gemm_matrices(w, u, plan, eps_den)
    sums, m_rel = _block_summaries(stacked.reshape(C, 2, B * N, L).unbind(1), summaries_t, m, M)
    k_start, v_start = _chunk_starts(k, v, M, plan)
    carries = _framed_carries(sums, m_rel, k_start, v_start, w, plan, k.dtype)  # [C, 2, 2, B, N]
    operand = torch.cat([stacked, carries.permute(0, 1, 3, 4, 2)], -1)
    out = torch.matmul(operand.view(C, 2, B * N, L + 2), rhs)  # [C, 2, B·N, L]
    den, num = _from_blocks(out.view(C, 2, B, N, L), plan).unbind(1)  # [C, B, T] (unbind's backward: one stack)
    return (num / den).permute(1, 2, 0)  # [B, T, C] view of [C, B, T]
