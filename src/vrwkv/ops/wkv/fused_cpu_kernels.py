"""The numba kernels of :mod:`vrwkv.ops.wkv.fused_cpu` (imported only when the fused CPU scan first runs: importing
this module loads numba)."""
import math

import numba
import numpy as np

from vrwkv.ops.wkv.fused_cpu import MAX_ROW_RANGE

_LOG2E, _LN2_HI, _LN2_LO = 1.4426950408889634, 0.6931471803691238, 1.9082149292705877e-10
# Taylor coefficients 1/n! of e^r on |r| <= ln2 / 2: degree 11 is below float64 rounding (~2e-16 relative)
(_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7, _C8, _C9, _C10, _C11) = (1.0 / math.factorial(i) for i in range(12))
_fast = numba.njit(fastmath={"contract"}, nogil=True, cache=True)


@_fast
def _exp_shifted(kr, shift, out, bits):
    """out[t] = e^{kr[t] - shift} for kr - shift in [-700, 0]: 2^m e^r with m = round((kr - shift) log2 e), the
    power of two built in the exponent bits. No calls and no branches: the loops vectorise."""
    for t in range(kr.shape[0]):
        z = np.float64(kr[t]) - shift
        m = math.floor(z * _LOG2E + 0.5)
        r = (z - m * _LN2_HI) - m * _LN2_LO
        out[t] = _C0 + r * (_C1 + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * (_C6 + r * (_C7 + r * (
            _C8 + r * (_C9 + r * (_C10 + r * _C11))))))))))
        bits[t] = (np.int64(m) + 1023) << 52
    scale = bits.view(np.float64)
    for t in range(kr.shape[0]):
        out[t] *= scale[t]


@_fast
def rows_kernel(k, v, w, u, y, chunk, eps, official, r0, r1):
    """Rows r0..r1 of the flattened (channel, batch) grid; returns how many rows were out of range (left
    unwritten)."""
    B, T = k.shape[1], k.shape[2]
    x = np.empty(T)
    right_num = np.empty(T)
    right_den = np.empty(T)
    bits = np.empty(T, np.int64)
    unsafe = 0
    for row in range(r0, r1):
        c, b = row // B, row % B
        kr, vr, yr = k[c, b], v[c, b], y[c, b]
        hi, lo = -np.inf, np.inf
        for t in range(T):
            hi = max(hi, np.float64(kr[t]))
            lo = min(lo, np.float64(kr[t]))
        wc, uc = w[c], u[c]
        if not (hi - lo + abs(wc) * T + abs(uc) <= MAX_ROW_RANGE):  # (also false for an infinite key)
            unsafe += 1
            continue
        _exp_shifted(kr, hi, x, bits)
        decay, bonus = math.exp(-wc), math.exp(uc)
        num = den = 0.0
        for t in range(T - 1, -1, -1):  # R_t, then R_{t-1} = e^{-w} (R_t + X_t)
            right_num[t], right_den[t] = num, den
            num = decay * (num + x[t] * vr[t])
            den = decay * (den + x[t])
        if not official:
            grow = math.exp(wc)
            num = den = 0.0
            for t in range(T):  # G_t, then G_{t+1} = e^{-w} (G_t + X_t)
                xv = x[t] * vr[t]
                yr[t] = (grow * (num + right_num[t]) + bonus * xv) / (grow * (den + right_den[t]) + bonus * x[t])
                num = decay * (num + xv)
                den = decay * (den + x[t])
            continue
        grow, own = math.exp(wc), math.expm1(wc)  # e^w, e^w - 1
        num = den = h_num = h_den = o_num = o_den = 0.0
        for t in range(T):
            xv = x[t] * vr[t]
            if t % chunk == 0:  # a kernel chunk starts: H and O restart (O excludes the chunk's first token)
                h_num = h_den = o_num = o_den = 0.0
            else:
                o_num = grow * o_num + xv
                o_den = grow * o_den + x[t]
            n_t = num + right_num[t] + own * (h_num - o_num) + bonus * xv
            d_t = den + right_den[t] + own * (h_den - o_den) + bonus * x[t]
            yr[t] = n_t / ((1.0 + eps) * d_t + eps * x[t])
            num = decay * (num + xv)
            den = decay * (den + x[t])
            h_num = decay * (h_num + xv)
            h_den = decay * (h_den + x[t])
    return unsafe

