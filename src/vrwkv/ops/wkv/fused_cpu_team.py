"""The fused CPU kernels run on PyTorch's own OpenMP thread team (imported only when the fused CPU scan first runs:
importing this module loads numba).

Why: after each parallel op (a matmul, say) PyTorch's OpenMP workers keep spinning on their cores for a while,
waiting for the next parallel region. A second pool of our own then competes with them: at T = 4,096 the forward took
6.3 ms right after a matmul on two cores against 3.6 ms alone. Run as an OpenMP parallel region of the runtime PyTorch
loaded (``GOMP_parallel``, which GNU libgomp and LLVM/Intel's libomp both export), the pieces go to exactly the threads
that were spinning.

How: a numba ``cfunc`` per (kernel, dtype) is the region's body; it reads the kernel's arrays and scalars from a
small int64 control block (addresses, shapes, scalars; the float ``eps`` through a float64 view of its slot), takes
pieces of rows in turn (an atomic counter in the block: a thread slowed by other work on its core takes fewer), and
adds its count of out-of-range rows to the block's result slot (atomically). The bodies call only numba code, so
numba caches them on disk: a new process loads them. numba alone would key that cache on this file, not on the
kernels the bodies call (after a change to ``fused_cpu_kernels.py`` the team ran the kernels cached with the bodies:
its float64 results differed from one thread's); :mod:`vrwkv.ops._numba_cache` keys it on every kernel source.
"""
from __future__ import annotations

import ctypes
import os

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from vrwkv.ops._numba_cache import key_cache_on_all_kernel_sources
from vrwkv.ops.wkv.fused_cpu import BACKWARD, FORWARD, TOKENS
from vrwkv.ops.wkv.fused_cpu_kernels import (BACKWARD_SCRATCH, rows_backward_kernel_with, rows_kernel_with,
                                             rows_scratch, tokens_kernel)

key_cache_on_all_kernel_sources()  # cached machine code invalidated by a change to any kernel source

#: Control block layout (int64 slots): C, B, T, chunk, eps (float64 bits), official, units (rows, channel units),
#: units per piece, the next piece's first unit (taken by atomic adds), then the array addresses.
_C, _B, _T, _CHUNK, _EPS, _OFFICIAL, _UNITS, _STEP, _NEXT, _ARRAYS = range(10)
_MAX_ARRAYS = 9
_RESULTS = _ARRAYS + _MAX_ARRAYS  # rows out of range, summed by the threads (atomic adds)
_SIZE = _RESULTS + 1
_MAX_THREADS = 256


def openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime PyTorch loaded in this process (libgomp, libomp or libiomp5), or None (not found: another
    platform, or a PyTorch built without OpenMP)."""
    import torch

    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if line.rstrip().endswith(".so") or ".so." in line}
    except OSError:
        return None
    for path in sorted(paths):
        name = os.path.basename(path)
        if name.startswith(("libgomp", "libomp", "libiomp5")):
            lib = ctypes.CDLL(path)  # already loaded: the same handle, nothing new is loaded
            if all(hasattr(lib, f) for f in ("GOMP_parallel", "omp_get_thread_num")):
                return lib
    return None


@intrinsic
def _address_as_pointer(typingctx, address):
    """An int64 address as a void pointer (numba's carray then views it as an array)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

    return types.voidptr(address), codegen


@intrinsic
def _fetch_add(typingctx, array, index, value):
    """``array[index] += value`` atomically; returns the old value (the threads take pieces in turn this way)."""
    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        pointer = builder.gep(arr.data, [args[1]])
        return builder.atomic_rmw("add", pointer, args[2], "monotonic")

    return types.int64(array, index, types.int64), codegen


class Team:
    """Runs the kernels (channel-major forward and backward, token-major forward) as OpenMP parallel regions of
    ``runtime``."""

    def __init__(self, runtime: ctypes.CDLL):
        self._parallel = runtime.GOMP_parallel
        self._parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        self._parallel.restype = None

    def run(self, kind: str, args: tuple, units: int, threads: int, lanes: int, step: int) -> int:
        """The kernel of ``kind`` (:data:`FORWARD` ``rows_kernel``, :data:`BACKWARD` ``rows_backward_kernel``,
        :data:`TOKENS` ``tokens_kernel``) over ``units`` rows (channel units) on ``threads`` OpenMP threads in pieces
        of ``step`` units taken in turn, for the same ``args`` as the kernel minus the range (r0, r1) and ``lanes``
        (4 or 8 rows per vector); returns the rows out of range."""
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        k, w = arrays[0], arrays[2]
        threads = min(threads, _MAX_THREADS, units)
        control = np.zeros(_SIZE, dtype=np.int64)
        chunk, eps, official = (a for a in args if not isinstance(a, np.ndarray))
        if kind == TOKENS:
            B, T, C = k.shape
        else:
            C, B, T = k.shape
        control[[_C, _B, _T, _CHUNK, _OFFICIAL, _UNITS, _STEP]] = (C, B, T, chunk, int(official), units, step)
        control.view(np.float64)[_EPS] = eps
        for i, a in enumerate(arrays):
            if not a.flags.c_contiguous:
                raise ValueError("fused CPU kernels take C-contiguous arrays")
            if a.dtype != (np.float64 if a.ndim == 1 else k.dtype):
                raise ValueError(f"fused CPU kernels: array {i} has dtype {a.dtype}")
            control[_ARRAYS + i] = a.ctypes.data
        assert w.shape == (C,) and len(arrays) <= _MAX_ARRAYS
        body = _body(kind, k.dtype.name, lanes)
        self._parallel(body.address, control.ctypes.data, threads, 0)  # (ctypes releases the GIL meanwhile)
        return int(control[_RESULTS])


# ---- The parallel regions' bodies, ``void(int64 *control)``: module-level cfuncs that call nothing but numba code
# (no ctypes function pointers), so numba caches them on disk like the kernels: a new process loads them instead of
# compiling them (~0.4 s and ~16 MB of compiler memory per body otherwise).
def _next_piece(control):
    units = control[_UNITS]
    start = _fetch_add(control, _NEXT, control[_STEP])
    return min(start, units), min(start + control[_STEP], units)


def _rows3(control, i, dtype):
    shape = (control[_C], control[_B], control[_T])  # channel-major [C, B, T]
    return numba.carray(_address_as_pointer(control[_ARRAYS + i]), shape, dtype)


def _tokens3(control, i, dtype):
    shape = (control[_B], control[_T], control[_C])  # token-major [B, T, C]
    return numba.carray(_address_as_pointer(control[_ARRAYS + i]), shape, dtype)


def _array1(control, i, n):
    return numba.carray(_address_as_pointer(control[_ARRAYS + i]), (n,), np.float64)


def _forward(data, array3, dtype, rows, lanes):
    """The forward's pieces: the channel-major rows (``rows``, ``lanes`` per vector) in one scratch per thread, or
    token-major units."""
    control, eps = numba.carray(data, (_SIZE,), np.int64), numba.carray(data, (_SIZE,), np.float64)[_EPS]
    C, unsafe = control[_C], 0
    k, v, w, u, y = (array3(control, 0, dtype), array3(control, 1, dtype), _array1(control, 2, C),
                     _array1(control, 3, C), array3(control, 4, dtype))
    # the rows kernel's scratch, once per thread (allocated per piece, it was fresh pages every time)
    scratch = rows_scratch(control[_T] if rows else 0, 0, lanes)
    r0, r1 = _next_piece(control)
    while r0 < r1:
        if rows:
            unsafe += rows_kernel_with(k, v, w, u, y, control[_CHUNK], eps, control[_OFFICIAL] != 0, r0, r1, scratch,
                                       lanes)
        else:
            unsafe += tokens_kernel(k, v, w, u, y, control[_CHUNK], eps, control[_OFFICIAL] != 0, r0, r1, lanes)
        r0, r1 = _next_piece(control)
    _fetch_add(control, _RESULTS, unsafe)


def _backward(data, dtype, lanes):
    control, eps = numba.carray(data, (_SIZE,), np.int64), numba.carray(data, (_SIZE,), np.float64)[_EPS]
    C, rows, unsafe = control[_C], control[_C] * control[_B], 0
    k, v, w, u, gy = (_rows3(control, 0, dtype), _rows3(control, 1, dtype), _array1(control, 2, C),
                      _array1(control, 3, C), _rows3(control, 4, dtype))
    dk, dv, dw_rows, du_rows = (_rows3(control, 5, dtype), _rows3(control, 6, dtype), _array1(control, 7, rows),
                                _array1(control, 8, rows))
    scratch = np.empty((BACKWARD_SCRATCH, control[_T] + 1, len(lanes)))  # one per thread (see _forward)
    r0, r1 = _next_piece(control)
    while r0 < r1:
        unsafe += rows_backward_kernel_with(k, v, w, u, gy, control[_CHUNK], eps, control[_OFFICIAL] != 0, dk, dv,
                                            dw_rows, du_rows, r0, r1, scratch, lanes)
        r0, r1 = _next_piece(control)
    _fetch_add(control, _RESULTS, unsafe)


_next_piece, _rows3, _tokens3, _array1, _forward, _backward = (
    numba.njit(nogil=True, cache=True, inline="always")(f)
    for f in (_next_piece, _rows3, _tokens3, _array1, _forward, _backward))


def _make_body(kind: str, dtype_name: str, lanes: int):
    """The region body ``body(data)`` of ``kind`` for ``dtype_name`` arrays and ``lanes`` rows per vector. numba
    caches each on disk by its code and its closure's values (the dtype and the lanes tuple)."""
    dtype, group = np.dtype(dtype_name).type, (0,) * lanes
    if kind == FORWARD:
        def body(data):
            _forward(data, _rows3, dtype, True, group)
    elif kind == TOKENS:
        def body(data):
            _forward(data, _tokens3, dtype, False, group)
    else:
        def body(data):
            _backward(data, dtype, group)
    return body


_compiled = {}


def _body(kind: str, dtype: str, lanes: int):
    """The cfunc of ``kind``, ``dtype`` and ``lanes``: compiled at its first use in a process, or loaded from numba's
    cache."""
    cfunc = _compiled.get((kind, dtype, lanes))
    if cfunc is None:
        cfunc = _compiled[kind, dtype, lanes] = numba.cfunc(types.void(types.voidptr), nopython=True, cache=True)(
            _make_body(kind, dtype, lanes))
    return cfunc
