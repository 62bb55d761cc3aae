"""``lerp(q_shift(x), x, mu)`` in one pass from x on the CPU, JIT-compiled by numba (opt-in with the fused Bi-WKV:
:func:`vrwkv.ops.use_numba`). Bit-identical to ``torch.lerp(q_shift(x, hw, s, gamma), x, mu)``.

The plain ops write ``q_shift(x)`` (a full copy of x) and read it back for every mix; the kernel reads each token's
four neighbours straight from x (they are in cache: the same row, or one grid row up or down) and writes the mix
only. Inference only (no autograd); the mixers use it when numba is enabled, for CPU float32/float64 tensors.

Threads: the token rows are cut into pieces of whole grid rows (each piece writes contiguous memory), taken in turn
by ``torch.get_num_threads()`` threads: PyTorch's own OpenMP team where its runtime is found (as the fused Bi-WKV,
:mod:`vrwkv.ops.wkv.fused_cpu_team`), otherwise the caller and a small pool of our own (the body releases the GIL).
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np
import torch

from vrwkv.ops._cpu_pool import ProcessThreadPool
from vrwkv.ops._profiling import named_range

from vrwkv.ops.shift_mix.q_shift import check_q_shift
from vrwkv.ops.wkv.fused_cpu import numba_enabled

#: Let the mixers use the kernel when numba is enabled (False: they keep Q-Shift + lerp; for A/B comparisons).
enabled = True

#: Run the kernel on PyTorch's OpenMP team when its runtime is found (False: the caller and a pool of our own).
use_openmp_team = True

#: Fewer elements than this run on one thread (PyTorch's grain size for elementwise ops).
GRAIN_SIZE = 32768

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_lock = threading.Lock()
_zeros: dict[torch.dtype, torch.Tensor] = {}
_runtime = None  # (kernels module, GOMP_parallel or None), made at the first call


def fused_applies(x: torch.Tensor, mu: torch.Tensor) -> bool:
    """Whether :func:`fused_q_shift_lerp` takes ``x`` and ``mu`` (and :data:`enabled`): numba enabled, CPU, float32
    or float64 (both the same), x contiguous ``[B, T, C]``, no autograd needed."""
    return (enabled and x.device.type == "cpu" and x.dtype in _DTYPES and mu.dtype == x.dtype
            and mu.device.type == "cpu" and x.dim() == 3 and x.is_contiguous() and mu.numel() == x.shape[-1]
            and not (torch.is_grad_enabled() and (x.requires_grad or mu.requires_grad)) and numba_enabled())


def fused_q_shift_lerp(
    x: torch.Tensor,
    hw: tuple[int, int],
    mu: torch.Tensor,
    shift_pixel: int = 1,
    channel_gamma: float = 0.25,
    tokens: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.lerp(q_shift(x, hw, shift_pixel, channel_gamma), x, mu)``, bit for bit, by the numba kernel (inputs as
    :func:`fused_applies` says; no autograd).

    Args:
        x: tokens ``[B, T, C]``, contiguous, ``T = H * W``.
        hw: the patch grid ``(H, W)``.
        mu: the mix weights, ``C`` values (e.g. ``[1, 1, C]``), x's dtype.
        shift_pixel, channel_gamma: the Q-Shift's (see :func:`vrwkv.ops.shift_mix.q_shift`).
        tokens: only the token rows ``[t0, t1)`` of the ``B * T`` rows (neighbours are still read from all of x).
        out: where to write: a contiguous tensor of x's dtype with ``(t1 - t0) * C`` elements (not overlapping x).

    Returns:
        ``[B, T, C]``, or ``[t1 - t0, C]`` if ``tokens`` is given (``out``'s storage when given).
    """
    if not (x.device.type == "cpu" and x.dtype in _DTYPES and x.dim() == 3 and x.is_contiguous()):
        raise ValueError(f"fused_q_shift_lerp: x must be a contiguous [B, T, C] float32 or float64 CPU tensor, got "
                         f"{x.dtype} {list(x.shape)} on {x.device}")
    B, T, C = x.shape
    if mu.device != x.device or mu.dtype != x.dtype or mu.numel() != C:
        raise ValueError(f"fused_q_shift_lerp: mu must have {C} values of {x.dtype} on the CPU, got {mu.numel()} "
                         f"of {mu.dtype} on {mu.device}")
    H, W = hw
    check_q_shift(T, hw, shift_pixel, channel_gamma)
    t0, t1 = (0, B * T) if tokens is None else tokens
    if not 0 <= t0 <= t1 <= B * T:
        raise ValueError(f"fused_q_shift_lerp: token rows [{t0}, {t1}) outside [0, {B * T})")
    if out is None:
        out = torch.empty(t1 - t0, C, dtype=x.dtype)
    elif out.dtype != x.dtype or out.numel() != (t1 - t0) * C or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"fused_q_shift_lerp: out must be a contiguous {x.dtype} tensor of {(t1 - t0) * C} elements")
    weights = mu if mu.is_contiguous() else mu.contiguous()  # (C values: any shape; read through its address)
    if t1 > t0 and C:
        kernels, zero = _kernels(), _zero_row(x.dtype, C)  # (referenced here until the kernel is done)
        grid_rows = (t1 + W - 1) // W - t0 // W
        threads = 1 if (t1 - t0) * C < GRAIN_SIZE else max(1, min(torch.get_num_threads(), grid_rows))
        # the control block (fused_cpu_kernels.ROWS ... ZERO)
        control = np.array([B * T, C, H, W, int(C * channel_gamma), shift_pixel, t0, t1,
                            max(1, grid_rows // (8 * threads)), 0, x.data_ptr(), out.data_ptr(), weights.data_ptr(),
                            zero.data_ptr()], dtype=np.int64)
        with named_range("vrwkv::fused_q_shift_lerp"):
            _run(kernels, _DTYPES[x.dtype], control, threads)
    return out.view(B, T, C) if tokens is None else out.view(t1 - t0, C)


def _zero_row(dtype: torch.dtype, C: int) -> torch.Tensor:
    """At least ``C`` zeros of ``dtype`` (the kernel reads them for neighbours outside the grid); kept."""
    zeros = _zeros.get(dtype)
    if zeros is None or zeros.numel() < C:
        zeros = _zeros[dtype] = torch.zeros(max(C, 1024), dtype=dtype)
    return zeros


def _run(kernels, dtype: str, control: np.ndarray, threads: int) -> None:
    """The body over all pieces of ``control`` on ``threads`` threads."""
    module, parallel = kernels
    body = module.body(dtype)
    address = control.ctypes.data
    if threads == 1:
        body.ctypes(address)
    elif parallel is not None and use_openmp_team:
        parallel(body.address, address, threads, 0)  # (ctypes releases the GIL meanwhile)
    else:  # the caller and threads - 1 pool threads take pieces in turn
        futures = [_thread_pool(threads - 1).submit(body.ctypes, address) for _ in range(threads - 1)]
        body.ctypes(address)
        for f in futures:
            f.result()


def _kernels():
    """The kernels module and ``GOMP_parallel`` of PyTorch's OpenMP runtime (None if not found), at the first call."""
    global _runtime
    with _lock:
        if _runtime is None:
            from vrwkv.ops.shift_mix import fused_cpu_kernels
            from vrwkv.ops.wkv.fused_cpu_team import openmp_runtime

            runtime = openmp_runtime()
            parallel = None
            if runtime is not None:
                parallel = runtime.GOMP_parallel
                parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                parallel.restype = None
            _runtime = (fused_cpu_kernels, parallel)
        return _runtime


_thread_pool = ProcessThreadPool("vrwkv-shift-mix").get
