"""Bi-WKV as fused scans per (channel, batch) row on the CPU, forward and backward, JIT-compiled by numba (opt-in).

The block-matrix path (``blocked.py``) runs the op as ~10 PyTorch passes plus small GEMMs: fine on a GPU, but on a
CPU each pass goes through memory. Here every row of channel-major ``[C, B, T]`` storage (the layout the model's
channel-major projections produce) is handled in one go, in float64 registers, with sweeps over the row that stay
in the core's cache. The forward's three:

1. ``X_t = e^{k_t - K}`` (K: the row's largest key) by a branch-free exponential that the compiler vectorises;
2. right to left, the decayed sums of the tokens to the right, ``R_t = sum_{j > t} e^{-(j - t) w} X_j [v_j | 1]``;
3. left to right, the sums to the left and the output
   (``G_t = sum_{j < t} e^{-(t - j) w} X_j``; the official function's own-chunk sums ``H``, ``O`` below)::

       paper:     y_t = (e^w (G_t + R_t) + e^u X_t v_t) / (e^w (G'_t + R'_t) + e^u X_t)
       official:  num_t = G_t + R_t + (e^w - 1)(H_t - O_t) + e^u X_t v_t, den'_t = (1 + eps) den_t + eps X_t

   with ``H_t = sum_{s <= j < t} e^{-(t - j) w} X_j`` and ``O_t = sum_{s < j <= t} e^{(t - j) w} X_j`` over the
   kernel chunk [s, s + kc) of t (the same function as ``blocked.py``; ``ops/wkv/README.md`` derives it).

Numerics: in float64 with one shift per row, every term lies within ``e^{±600}`` when the row's key range plus
``|w|·T + |u|`` is at most :data:`MAX_ROW_RANGE` (every trained model by far); rows beyond it are reported and the
caller runs the block path instead. Accuracy is that of float64 sums, then one rounding to float32.

Rows of at least :data:`ROWS_BLOCKED_FROM` tokens go by blocks of :data:`ROW_BLOCK` (``rows_blocked_kernel_with``):
the whole-row sweeps' float64 scratch (32 bytes per token and row) would leave the cache, so a first pass
takes each block's key range and its sums in its own frame, a scan over the blocks the carries from the right, and a
second pass the sweeps block by block (k, v read twice, y written once, an exponential computed twice): at 262,144
tokens 0.64x the time, 3.2x the bandwidth floor.

Token-major inputs (C-contiguous ``[B, T, C]``, e.g. from Linears) without autograd run the same sweeps on eight
adjacent channels of a batch element at once (``tokens_kernel``: one vector load of k, v and one store of y per
token, y token-major; faster than the rows by ~25 % at T = 4,096, and it spares the caller the channel-major
projections, slower matmuls on CPU), in blocks of :data:`TOKEN_BLOCK` tokens: a first pass takes each block's
key range and right sums, a scan over the blocks the carries from the right, a second pass the sweeps block by
block in scratch that stays in cache (k, v read twice, y written once, whatever T).

The backward (:class:`_FusedBiWKV`) recomputes the forward's sums and runs the transposed ones (``ops/wkv/README.md``);
autograd keeps only k and v. Under autograd every layout takes the channel-major rows.

Why opt-in (:func:`use_numba`): the numba runtime (LLVM) adds ~120 MB to the process, and the first call in a process
takes ~3 s (loading numba and the kernels; they compile once, then numba caches them on disk). Rows are split over
``torch.get_num_threads()`` threads: PyTorch's own OpenMP team (:mod:`.fused_cpu_team`), or a pool of our own.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
import threading
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch

from vrwkv.ops._cpu_pool import ProcessThreadPool
from vrwkv.ops._profiling import named_range

#: Largest (key range of a row) + |w|·T + |u| the float64 scan takes: terms stay within e^{±600} (float64: e^{±708}).
MAX_ROW_RANGE = 600.0

_enabled: bool | None = None  # None: from the environment variable VRWKV_NUMBA
_kernels = None
_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def numba_available() -> bool:
    """Whether numba is installed (``pip install "vrwkv[numba]"``). Looked up once per process: the module search
    took ~80 µs, and the layers ask on every call."""
    return importlib.util.find_spec("numba") is not None


def use_numba(enabled: bool = True) -> None:
    """Run the Bi-WKV on CPU tensors with the fused numba scans (forward and backward), or stop (``enabled=False``).

    Costs ~120 MB of process memory for the numba runtime, and ~3 s at the first call in a process. Also set by the
    environment variable ``VRWKV_NUMBA=1`` (this call overrides it). Raises ImportError if numba is not installed.
    """
    global _enabled
    if enabled and not numba_available():
        raise ImportError('the fused CPU scan needs numba: pip install "vrwkv[numba]"')
    _enabled = bool(enabled)


@contextmanager
def numba_scans(enabled: bool = True):
    """:func:`use_numba` ``(enabled)`` inside a ``with`` block; the setting before it (or the environment's) after."""
    global _enabled
    was = _enabled
    use_numba(enabled)
    try:
        yield
    finally:
        _enabled = was


def numba_enabled() -> bool:
    """Whether :func:`use_numba` (or ``VRWKV_NUMBA=1``) asked for the fused CPU scan and numba is installed."""
    wanted = _enabled if _enabled is not None else os.environ.get("VRWKV_NUMBA", "0") not in ("", "0")
    return wanted and numba_available()


def fused_cpu_bi_wkv(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, semantics: str,
                     chunks: int, eps: float, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Bi-WKV by the fused scans. k, v: [B, T, C] float32 (or float64) on the CPU; w, u: [C] (divided by T).
    Differentiable: the backward is a fused scan too (:class:`_FusedBiWKV`, it keeps k and v only).

    Layouts: without autograd, k and v both C-contiguous (token-major, e.g. from Linears) run the token-major kernel
    (eight adjacent channels per vector, :func:`~vrwkv.ops.wkv.fused_cpu_kernels.tokens_kernel`) and y is C-contiguous
    [B, T, C]; otherwise the rows of channel-major [C, B, T] storage run (a transposed view of it is read as is,
    other layouts are copied once) and y is a [B, T, C] view of [C, B, T] storage (see :func:`token_major_inputs`).

    Returns y of k's dtype, or None when a row's exponents do not fit :data:`MAX_ROW_RANGE` (or a key is infinite):
    the caller then takes another path. ``out`` ([B, T, C] of k's dtype, sharing no memory with the
    inputs, no autograd): the token-major kernel writes y into it and returns it, the channel-major one when it is a
    view of [C, B, T] storage; otherwise it is left alone.
    """
    try:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (k, v, w, u)):
            return _FusedBiWKV.apply(k, v, w, u, semantics, chunks, eps)
        if token_major_inputs(k, v):
            return _forward_tokens(k, v, w, u, semantics, chunks, eps, out)
        return _forward(k, v, w, u, semantics, chunks, eps, out)[0]
    except _OutOfRange:
        return None


def token_major_inputs(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`fused_cpu_bi_wkv` runs its token-major kernel for k, v (without autograd): both C-contiguous
    [B, T, C] (a single token or channel counts as channel-major: its storage is both)."""
    return k.is_contiguous() and v.is_contiguous() and not (k.permute(2, 0, 1).is_contiguous()
                                                            and v.permute(2, 0, 1).is_contiguous())


class _OutOfRange(Exception):
    """A row's exponents exceed what the float64 scans hold."""


def _forward_tokens(k, v, w, u, semantics: str, chunks: int, eps: float, out: torch.Tensor | None) -> torch.Tensor:
    """y [B, T, C] (C-contiguous: ``out`` if it is) from C-contiguous k, v by the token-major kernel."""
    B, T, C = k.shape
    wd, ud = (x.detach().to(torch.float64).contiguous() for x in (w, u))
    chunk = math.ceil(T / chunks) if semantics == "official" else T
    y = out if out is not None and out.is_contiguous() else torch.empty(B, T, C, dtype=k.dtype)
    args = (k.detach().numpy(), v.detach().numpy(), wd.numpy(), ud.numpy(), y.numpy(), chunk, float(eps),
            semantics == "official")
    with named_range("vrwkv::fused_bi_wkv"):
        unsafe = run_kernel(TOKENS, args, B * -(-C // TOKEN_UNIT))
    if unsafe:
        raise _OutOfRange
    return y


def _forward(k, v, w, u, semantics: str, chunks: int, eps: float, out: torch.Tensor | None = None):
    """y as a [B, T, C] view of [C, B, T] storage (``out``'s if it is one), and the kernels' inputs."""
    B, T, C = k.shape
    kc, vc = (x.detach().permute(2, 0, 1).contiguous() for x in (k, v))  # [C, B, T]: no copy if channel-major
    wd, ud = (x.detach().to(torch.float64).contiguous() for x in (w, u))
    chunk = math.ceil(T / chunks) if semantics == "official" else T
    channel_major_out = out is not None and out.permute(2, 0, 1).is_contiguous()
    y = out.permute(2, 0, 1) if channel_major_out else torch.empty(C, B, T, dtype=k.dtype)
    inputs = (kc.numpy(), vc.numpy(), wd.numpy(), ud.numpy())
    with named_range("vrwkv::fused_bi_wkv"):
        unsafe = run_kernel(FORWARD, (*inputs, y.numpy(), chunk, float(eps), semantics == "official"), C * B)
    if unsafe:
        raise _OutOfRange
    return (out if channel_major_out else y.permute(1, 2, 0)), (kc, vc, wd, ud, chunk)


class _FusedBiWKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, w, u, semantics, chunks, eps):
        y, (kc, vc, wd, ud, chunk) = _forward(k, v, w, u, semantics, chunks, eps)
        ctx.save_for_backward(kc, vc, wd, ud)
        ctx.chunk, ctx.eps, ctx.official, ctx.w_dtype, ctx.u_dtype = chunk, eps, semantics == "official", w.dtype, u.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        kc, vc, wd, ud = ctx.saved_tensors
        C, B, T = kc.shape
        gyc = gy.permute(2, 0, 1).contiguous()  # [C, B, T]: no copy if the gradient comes channel-major
        dk, dv = torch.empty_like(kc), torch.empty_like(vc)
        dw_rows, du_rows = (torch.empty(C * B, dtype=torch.float64) for _ in range(2))
        args = (kc.numpy(), vc.numpy(), wd.numpy(), ud.numpy(), gyc.numpy(), ctx.chunk, float(ctx.eps), ctx.official,
                dk.numpy(), dv.numpy(), dw_rows.numpy(), du_rows.numpy())
        with named_range("vrwkv::fused_bi_wkv_backward"):
            run_kernel(BACKWARD, args, C * B)  # (the forward checked every row's range)
        dw, du = dw_rows.view(C, B).sum(1), du_rows.view(C, B).sum(1)
        return (dk.permute(1, 2, 0), dv.permute(1, 2, 0), dw.to(ctx.w_dtype), du.to(ctx.u_dtype), None, None, None)


#: The kernels of :func:`run_kernel`: channel-major forward (``rows_kernel``) and backward (``rows_backward_kernel``),
#: token-major forward (``tokens_kernel``, its units are :data:`TOKEN_UNIT` channels of a batch element).
FORWARD, BACKWARD, TOKENS = "forward", "backward", "tokens"
#: Adjacent channels per vector of the token-major kernel, and per unit (a cache line of float32: two threads writing
#: the two halves of a line at once made the kernel 1.7x slower on two threads).
TOKEN_LANES, TOKEN_UNIT = 8, 16
#: Tokens per block of the token-major kernel: its four [block, 8] float64 scratch arrays (32 KB) and the block's
#: lines of k, v, y stay in L1/L2 between the block's sweeps (64 tokens measured ~5 % slower: per-block overheads).
TOKEN_BLOCK = 128
#: Rows of at least this many tokens take the channel-major forward by blocks of ROW_BLOCK tokens
#: (``rows_blocked_kernel_with``: its scratch stays in L1/L2, for a second exponential per token); shorter rows the
#: whole-row sweeps (``rows_kernel``, float64 scratch [4, T, lanes]: 32 bytes per token and row).
ROWS_BLOCKED_FROM, ROW_BLOCK = 32768, 128
#: The token-major kernel keeps its first pass's exponentials of this many first tokens for the second ([2, 4096, 8]
#: float64, 512 KB: in L2); the second pass computes the others again (kept in L3 they measured slower).
TOKEN_KEEP = 4096


#: Lanes per vector of the kernels (rows of the channel-major ones): None for the host's choice (:func:`row_lanes`),
#: or 4 or 8.
rows_per_vector: int | None = None


def row_lanes(kind: str = FORWARD) -> int:
    """Rows the channel-major kernels of ``kind`` run in lockstep, one per float64 lane (for :data:`TOKENS`: lanes
    per part of the token-major kernel's left-to-right sweep): the host's choice (:func:`lanes_for`), or
    :data:`rows_per_vector` if set."""
    if rows_per_vector is not None:
        if rows_per_vector not in (4, 8):
            raise ValueError(f"rows_per_vector must be 4 or 8, got {rows_per_vector!r}")
        return rows_per_vector
    return _host_row_lanes(kind == TOKENS)


def lanes_for(cpu_name: str, avx512: bool, token_major: bool = False) -> int:
    """Lanes per vector for code compiled for ``cpu_name`` (LLVM's name, e.g. "znver5", "sapphirerapids") with or
    without AVX-512: 8 (one 512-bit register) for the token-major sweep with AVX-512 and for the channel-major rows
    on AMD cores with AVX-512; else 4 (one 256-bit register).

    Measured (``benchmarks/NOTES.md``, sessions 14 and 16; one thread, C = 192): on a Zen 5 core eight rows took
    0.65-0.85x the time of four, the token-major sweep 0.73-0.8x. On an Intel Xeon with AVX-512 eight rows were no
    faster forward (±5 %) and up to 1.4x slower forward + backward (262,144 tokens); its token-major sweep took
    0.93-0.97x. Compiled for AVX2 (16 registers: eight lanes take two each) eight rows were 1.2-1.4x slower on the
    Xeon, the token-major sweep spilled on a Zen 3. Zen 4 (AVX-512 on 256-bit units) is unmeasured; it takes eight as
    Zen 5."""
    return 8 if avx512 and (token_major or cpu_name.startswith("znver")) else 4


@functools.cache
def _host_row_lanes(token_major: bool) -> int:
    import numba
    from llvmlite import binding

    if numba.config.CPU_NAME:  # numba compiles for a named CPU (e.g. "generic" for portable caches), not this host
        return lanes_for(numba.config.CPU_NAME, "+avx512f" in (numba.config.CPU_FEATURES or ""), token_major)
    return lanes_for(binding.get_host_cpu_name(), binding.get_host_cpu_features().get("avx512f", False), token_major)


def run_kernel(kind: str, args: tuple, rows: int) -> int:
    """The kernel of ``kind`` (:data:`FORWARD`, :data:`BACKWARD`, :data:`TOKENS`), ``kernel(*args, r0, r1, lanes)``
    (``lanes``: :func:`row_lanes` zeros), over its units (rows, channel units) 0..rows on ``torch.get_num_threads()``
    threads; returns the rows out of range (summed over the pieces).

    Threads: PyTorch's own OpenMP team where its runtime is found (:mod:`.fused_cpu_team`: no second pool competing
    with its spinning workers), otherwise the caller and a pool of our own (the kernels release the GIL).
    """
    kernels = _compiled_kernels()
    lanes = row_lanes(kind)
    lane_zeros = (0,) * lanes  # the kernels' ``lanes`` argument: its length is the vector width
    group = 1 if kind == TOKENS else lanes  # units in lockstep (a token-major unit holds its lanes itself)
    n = max(1, min(torch.get_num_threads(), -(-rows // group)))
    if n == 1:
        return getattr(kernels, kind)(*args, 0, rows, lane_zeros)
    # small pieces taken in turn by the threads: a thread slowed by other work on its core (e.g. PyTorch's OpenMP
    # workers still spinning after the previous op) takes fewer pieces; whole groups of rows
    step = piece_size(rows, n, group)
    if kernels.team is not None and use_openmp_team:
        return kernels.team.run(kind, args, rows, n, lanes, step)
    pieces = iter(range(0, rows, step))
    take = threading.Lock()

    def work() -> int:
        kernel = _piece_kernel(kernels, kind, args, lane_zeros)  # (the rows kernels' scratch once per thread)
        unsafe_rows = 0
        while True:
            with take:
                start = next(pieces, None)
            if start is None:
                return unsafe_rows
            unsafe_rows += kernel(*args, start, min(start + step, rows))

    futures = [_thread_pool(n - 1).submit(work) for _ in range(n - 1)]
    return work() + sum(f.result() for f in futures)


def piece_size(units: int, threads: int, lanes: int) -> int:
    """Units per piece taken by a thread: about eight pieces per thread, a whole number of groups of ``lanes`` rows
    (a piece's last group would otherwise run with spare lanes)."""
    step = max(1, units // (8 * threads))
    return -(-step // lanes) * lanes


def _piece_kernel(kernels: _Kernels, kind: str, args: tuple, lanes: tuple[int, ...]):
    """``kernel(*args, r0, r1)`` of ``kind`` for one thread's pieces, with the kernels' ``lanes`` argument: the rows
    kernels with one scratch for all of them (allocated per piece, it was fresh pages every time: 8 MB at 65,536
    tokens), as in the team."""
    if kind == TOKENS:
        return lambda *a: kernels.tokens(*a, lanes)
    T = args[0].shape[2]  # k: [C, B, T]
    if kind == FORWARD:
        scratch = kernels.forward_scratch(T, 0, lanes)
        return lambda *a: kernels.forward_with(*a, scratch, lanes)
    scratch = np.empty((kernels.backward_scratch, T + 1, len(lanes)))
    return lambda *a: kernels.backward_with(*a, scratch, lanes)


#: Run the kernels on PyTorch's OpenMP team when its runtime is found (False: always our own thread pool).
use_openmp_team = True


_thread_pool = ProcessThreadPool("vrwkv-wkv").get


class _Kernels(NamedTuple):
    forward: object
    backward: object
    tokens: object
    forward_with: object  # the rows kernels in the caller's float64 scratch: forward_scratch(T, 0, lanes) ...
    backward_with: object  # ... and [backward_scratch, T + 1, lanes]
    forward_scratch: object
    backward_scratch: int
    team: object  # fused_cpu_team.Team, or None without a known OpenMP runtime


def _compiled_kernels() -> _Kernels:
    """The numba kernels and the OpenMP team runner, made at the first call (numba caches the kernels on disk)."""
    global _kernels
    with _lock:
        if _kernels is None:
            from vrwkv.ops.wkv import fused_cpu_kernels as k
            from vrwkv.ops.wkv.fused_cpu_team import Team, openmp_runtime

            runtime = openmp_runtime()
            _kernels = _Kernels(k.rows_kernel, k.rows_backward_kernel, k.tokens_kernel, k.rows_kernel_with,
                                k.rows_backward_kernel_with, k.rows_scratch, k.BACKWARD_SCRATCH,
                                Team(runtime) if runtime is not None else None)
        return _kernels
