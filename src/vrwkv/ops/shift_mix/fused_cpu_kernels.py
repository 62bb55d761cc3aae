"""The numba kernel of :mod:`vrwkv.ops.shift_mix.fused_cpu`: ``lerp(q_shift(x), x, mu)`` written straight from x
(imported only when the fused path first runs: importing this module loads numba).

The parallel region's body is a ``cfunc`` per dtype that reads everything from an int64 control block (shapes,
addresses) and takes pieces of grid rows by an atomic counter in the block. It calls nothing through a pointer, so
numba caches it on disk like the kernel: a new process loads both without compiling. (The cache follows this file's
source only: after editing :mod:`vrwkv.ops._simd`, delete ``__pycache__/fused_cpu_kernels*.nb[ic]``.)
"""
import numba
import numpy as np
from numba import types

from vrwkv.ops._numba_cache import key_cache_on_all_kernel_sources
from vrwkv.ops._simd import lanes, load, prefetch, store, torch_lerp
from vrwkv.ops.wkv.fused_cpu_team import _address_as_pointer, _fetch_add

key_cache_on_all_kernel_sources()  # cached machine code invalidated by a change to any kernel source

#: Control block (int64 slots): the B*T token rows of x, C, the grid H and W, the channels per quarter g, the shift
#: s, the output's token rows [T0, T1) of x, the grid rows per piece, the next piece (taken by atomic adds), then the
#: addresses of x [B*T, C], out [T1 - T0, C], mu [C] and a zero row [C].
(ROWS, C, H, W, G, SHIFT, T0, T1, STEP, NEXT, X, OUT, MU, ZERO, SIZE) = range(15)

#: Tokens ahead of the current one that the kernel prefetches, and the cache line's bytes
PREFETCH_TOKENS, CACHE_LINE = 8, 64

_inline = numba.njit(nogil=True, cache=True, inline="always")


@_inline
def _segment(x, t, src, s_row, mu, out, o, c0, c1):
    """out[o, c0:c1] = lerp(src[s_row, c0:c1], x[t, c0:c1], mu[0, c0:c1]): vectors, then a scalar tail."""
    n = lanes(x)
    c = c0
    while c + n <= c1:
        store(out, o, c, torch_lerp(load(src, s_row, c), load(x, t, c), load(mu, 0, c)))
        c += n
    while c < c1:
        out[o, c] = torch_lerp(src[s_row, c], x[t, c], mu[0, c])
        c += 1


@_inline
def mix_tokens(x, out, mu, zero, H, W, g, s, t0, p0, p1):
    """``out[t - t0] = lerp(q_shift(x)[t], x[t], mu)`` for the token rows t in [p0, p1) of x ``[B*T, C]``.

    Q-Shift (:mod:`vrwkv.ops.shift_mix.q_shift`): channels [0, g) take the token at (h, w - s), [g, 2g) at
    (h, w + s), [2g, 3g) at (h - s, w), [3g, 4g) at (h + s, w) (the zero row outside the grid), [4g, C) the token
    itself.
    """
    N, C = x.shape
    r = p0 // W
    while r * W < p1:  # grid row r (of all B*H): tokens [r W, r W + W)
        h = r % H
        up, down = h >= s, h + s < H
        for t in range(max(p0, r * W), min(p1, r * W + W)):
            w = t - r * W
            o = t - t0
            # The row below is first read here, for its last quarter only: fetch its whole tokens some tokens ahead
            # (the hardware prefetchers do not follow runs with gaps; the rest of the row is read one row later).
            ahead = t + s * W + PREFETCH_TOKENS if down else t + PREFETCH_TOKENS
            if ahead < N:
                for c in range(0, C, CACHE_LINE // x.itemsize):
                    prefetch(x, ahead, c)
            if w >= s:
                _segment(x, t, x, t - s, mu, out, o, 0, g)
            else:
                _segment(x, t, zero, 0, mu, out, o, 0, g)
            if w + s < W:
                _segment(x, t, x, t + s, mu, out, o, g, 2 * g)
            else:
                _segment(x, t, zero, 0, mu, out, o, g, 2 * g)
            if up:
                _segment(x, t, x, t - s * W, mu, out, o, 2 * g, 3 * g)
            else:
                _segment(x, t, zero, 0, mu, out, o, 2 * g, 3 * g)
            if down:
                _segment(x, t, x, t + s * W, mu, out, o, 3 * g, 4 * g)
            else:
                _segment(x, t, zero, 0, mu, out, o, 3 * g, 4 * g)
            _segment(x, t, x, t, mu, out, o, 4 * g, C)
        r += 1


@_inline
def _pieces(control, x, out, mu, zero):
    """Take pieces of ``STEP`` grid rows (of the rows that [T0, T1) touches) until none is left."""
    Wd, t0, t1, step = control[W], control[T0], control[T1], control[STEP]
    first = t0 // Wd
    rows = (t1 + Wd - 1) // Wd - first
    while True:
        k = _fetch_add(control, NEXT, step)
        if k >= rows:
            return
        p0 = max(t0, (first + k) * Wd)
        p1 = min(t1, (first + min(k + step, rows)) * Wd)
        mix_tokens(x, out, mu, zero, control[H], Wd, control[G], control[SHIFT], t0, p0, p1)


def _array(control, slot, rows, dtype):
    return numba.carray(_address_as_pointer(control[slot]), (rows, control[C]), dtype)


_array = numba.njit(nogil=True, cache=True, inline="always")(_array)
_SIGNATURE = types.void(types.voidptr)


def _body_float32(data):
    control = numba.carray(data, (SIZE,), np.int64)
    f = np.float32
    _pieces(control, _array(control, X, control[ROWS], f), _array(control, OUT, control[T1] - control[T0], f),
            _array(control, MU, 1, f), _array(control, ZERO, 1, f))


def _body_float64(data):
    control = numba.carray(data, (SIZE,), np.int64)
    f = np.float64
    _pieces(control, _array(control, X, control[ROWS], f), _array(control, OUT, control[T1] - control[T0], f),
            _array(control, MU, 1, f), _array(control, ZERO, 1, f))


_bodies = {}


def body(dtype: str):
    """The parallel region's body ``void(int64 *control)`` for ``dtype`` ("float32" or "float64"), compiled at the
    first call in a process or loaded from numba's disk cache."""
    cfunc = _bodies.get(dtype)
    if cfunc is None:
        python = {"float32": _body_float32, "float64": _body_float64}[dtype]
        cfunc = _bodies[dtype] = numba.cfunc(_SIGNATURE, nopython=True, cache=True)(python)
    return cfunc
