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
writes its count of out-of-range rows into its slot (``omp_get_thread_num``).
"""
from __future__ import annotations

import ctypes
import os

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from vrwkv.ops.wkv.fused_cpu import FORWARD, TOKENS
from vrwkv.ops.wkv.fused_cpu_kernels import rows_backward_kernel, rows_kernel, tokens_kernel

#: Control block layout (int64 slots): C, B, T, chunk, eps (float64 bits), official, units (rows, channel units),
#: units per piece, the next piece's first unit (taken by atomic adds), then the array addresses.
_C, _B, _T, _CHUNK, _EPS, _OFFICIAL, _UNITS, _STEP, _NEXT, _ARRAYS = range(10)
_MAX_ARRAYS = 9
_RESULTS = _ARRAYS + _MAX_ARRAYS  # one slot per thread from here: rows out of range
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
        thread_num = ctypes.CFUNCTYPE(ctypes.c_int)(("omp_get_thread_num", runtime))
        self._parallel = runtime.GOMP_parallel
        self._parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        self._parallel.restype = None
        self._bodies = {}
        self._thread_num = thread_num

    def run(self, kind: str, args: tuple, units: int, threads: int) -> int:
        """The kernel of ``kind`` (:data:`FORWARD` ``rows_kernel``, :data:`BACKWARD` ``rows_backward_kernel``,
        :data:`TOKENS` ``tokens_kernel``) over ``units`` rows (channel units) on ``threads`` OpenMP threads, for the
        same ``args`` as the kernel minus the range (r0, r1); returns the rows out of range."""
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        k, w = arrays[0], arrays[2]
        key = (kind, k.dtype.str)
        body = self._bodies.get(key)
        if body is None:
            body = self._bodies[key] = self._compile(kind, k.dtype.type)
        threads = min(threads, _MAX_THREADS, units)
        control = np.zeros(_RESULTS + _MAX_THREADS, dtype=np.int64)
        chunk, eps, official = (a for a in args if not isinstance(a, np.ndarray))
        if kind == TOKENS:
            B, T, C = k.shape
        else:
            C, B, T = k.shape
        # small pieces taken in turn: a thread slowed by other work on its core takes fewer
        control[[_C, _B, _T, _CHUNK, _OFFICIAL, _UNITS, _STEP]] = (
            C, B, T, chunk, int(official), units, max(1, units // (8 * threads)))
        control.view(np.float64)[_EPS] = eps
        for i, a in enumerate(arrays):
            if not a.flags.c_contiguous:
                raise ValueError("fused CPU kernels take C-contiguous arrays")
            if a.dtype != (np.float64 if a.ndim == 1 else k.dtype):
                raise ValueError(f"fused CPU kernels: array {i} has dtype {a.dtype}")
            control[_ARRAYS + i] = a.ctypes.data
        assert w.shape == (C,) and len(arrays) <= _MAX_ARRAYS
        self._parallel(body.address, control.ctypes.data, threads, 0)  # (ctypes releases the GIL meanwhile)
        return int(control[_RESULTS : _RESULTS + threads].sum())

    def _compile(self, kind: str, dtype):
        """The parallel region's body for one kernel and dtype, compiled once per process (~0.4 s; the kernels it
        calls come from numba's disk cache, but the body itself calls a ctypes function pointer, which numba does not
        cache)."""
        thread_num = self._thread_num
        f64 = np.float64

        def next_piece(control):
            units = control[_UNITS]
            start = _fetch_add(control, _NEXT, control[_STEP])
            return min(start, units), min(start + control[_STEP], units)

        def array3(control, i):
            shape = (control[_C], control[_B], control[_T])
            return numba.carray(_address_as_pointer(control[_ARRAYS + i]), shape, dtype)

        def tokens3(control, i):
            shape = (control[_B], control[_T], control[_C])
            return numba.carray(_address_as_pointer(control[_ARRAYS + i]), shape, dtype)

        def array1(control, i, n):
            return numba.carray(_address_as_pointer(control[_ARRAYS + i]), (n,), f64)

        next_piece, array3, tokens3, array1 = (numba.njit(inline="always")(f)
                                               for f in (next_piece, array3, tokens3, array1))
        signature = types.void(types.voidptr)

        if kind == TOKENS:
            @numba.cfunc(signature, nopython=True)
            def body(data):
                control = numba.carray(data, (_RESULTS + _MAX_THREADS,), np.int64)
                eps = numba.carray(data, (_RESULTS,), f64)[_EPS]
                C, unsafe = control[_C], 0
                k, v, w, u, y = (tokens3(control, 0), tokens3(control, 1), array1(control, 2, C),
                                 array1(control, 3, C), tokens3(control, 4))
                r0, r1 = next_piece(control)
                while r0 < r1:
                    unsafe += tokens_kernel(k, v, w, u, y, control[_CHUNK], eps, control[_OFFICIAL] != 0, r0, r1)
                    r0, r1 = next_piece(control)
                control[_RESULTS + thread_num()] = unsafe
        elif kind == FORWARD:
            @numba.cfunc(signature, nopython=True)
            def body(data):
                control = numba.carray(data, (_RESULTS + _MAX_THREADS,), np.int64)
                eps = numba.carray(data, (_RESULTS,), f64)[_EPS]
                C, unsafe = control[_C], 0
                k, v, w, u, y = (array3(control, 0), array3(control, 1), array1(control, 2, C), array1(control, 3, C),
                                 array3(control, 4))
                r0, r1 = next_piece(control)
                while r0 < r1:
                    unsafe += rows_kernel(k, v, w, u, y, control[_CHUNK], eps, control[_OFFICIAL] != 0, r0, r1)
                    r0, r1 = next_piece(control)
                control[_RESULTS + thread_num()] = unsafe
        else:
            @numba.cfunc(signature, nopython=True)
            def body(data):
                control = numba.carray(data, (_RESULTS + _MAX_THREADS,), np.int64)
                eps = numba.carray(data, (_RESULTS,), f64)[_EPS]
                C, rows, unsafe = control[_C], control[_C] * control[_B], 0
                k, v, w, u, gy = (array3(control, 0), array3(control, 1), array1(control, 2, C),
                                  array1(control, 3, C), array3(control, 4))
                dk, dv, dw_rows, du_rows = (array3(control, 5), array3(control, 6), array1(control, 7, rows),
                                            array1(control, 8, rows))
                r0, r1 = next_piece(control)
                while r0 < r1:
                    unsafe += rows_backward_kernel(k, v, w, u, gy, control[_CHUNK], eps, control[_OFFICIAL] != 0, dk,
                                                   dv, dw_rows, du_rows, r0, r1)
                    r0, r1 = next_piece(control)
                control[_RESULTS + thread_num()] = unsafe
        return body
