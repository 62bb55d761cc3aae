"""The numba kernels of :mod:`vrwkv.ops.wkv.fused_cpu` (imported only when the fused CPU scan first runs: importing
this module loads numba)."""
import math

import numba
import numpy as np

from vrwkv.ops.wkv.fused_cpu import MAX_ROW_RANGE

_LOG2E, _LN2_HI, _LN2_LO = 1.4426950408889634, 0.6931471803691238, 1.9082149292705877e-10
# Taylor coefficients 1/n! of e^r on |r| <= ln2 / 2: degree 11 is below float64 rounding (~2e-16 relative)
(_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7, _C8, _C9, _C10, _C11) = (1.0 / math.factorial(i) for i in range(12))
_ROUND = 6755399441055744.0  # 1.5·2^52: adding it rounds a float64 of magnitude < 2^51 to an integer
# error_model="numpy": IEEE division (no zero test before each division)
_fast = numba.njit(fastmath={"contract"}, nogil=True, cache=True, error_model="numpy")


@_fast
def _exp_shifted(kr, shift, out, scale):
    """out[t] = e^{kr[t] - shift} for kr - shift in [-700, 0] (``scale``: float64 scratch of the same length): 2^m e^r
    with m = round((kr - shift) log2 e). The rounding adds 1.5·2^52, which leaves m in the low mantissa bits, and
    2^m is built from those bits with integer adds and shifts: no calls, no branches and no double-to-int64
    conversion (AVX2 has no packed one), so all three loops vectorise."""
    n = kr.shape[0]
    for t in range(n):
        z = np.float64(kr[t]) - shift
        big = z * _LOG2E + _ROUND
        m = big - _ROUND
        r = (z - m * _LN2_HI) - m * _LN2_LO
        out[t] = _C0 + r * (_C1 + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * (_C6 + r * (_C7 + r * (
            _C8 + r * (_C9 + r * (_C10 + r * _C11))))))))))
        scale[t] = big
    bits = scale.view(np.int64)
    for t in range(n):
        bits[t] = (bits[t] + 1023) << 52  # big's own exponent bits shift out; m + 1023 lands in the exponent field
    for t in range(n):
        out[t] *= scale[t]


@_fast
def rows_kernel(k, v, w, u, y, chunk, eps, official, r0, r1):
    """Rows r0..r1 of the flattened (channel, batch) grid; returns how many rows were out of range (left
    unwritten). Every recurrence is written ``S = e^{-w} S + e^{-w} z``: one FMA on the dependency chain (the
    product e^{-w} z does not wait for S), the chains being the cost of a sequential scan."""
    B, T = k.shape[1], k.shape[2]
    x = np.empty(T)
    p = np.empty(T)  # scratch of the exponential, then P_t = X_t v_t
    right_num = np.empty(T)
    right_den = np.empty(T)
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
        _exp_shifted(kr, hi, x, p)
        for t in range(T):
            p[t] = x[t] * np.float64(vr[t])
        decay, bonus, grow = math.exp(-wc), math.exp(uc), math.exp(wc)
        num = den = 0.0
        for t in range(T - 1, -1, -1):  # R_t, then R_{t-1} = e^{-w} (R_t + P_t)
            right_num[t], right_den[t] = num, den
            num = decay * num + decay * p[t]
            den = decay * den + decay * x[t]
        if not official:
            num = den = 0.0
            for t in range(T):  # G_t, then G_{t+1} = e^{-w} (G_t + P_t)
                yr[t] = (grow * (num + right_num[t]) + bonus * p[t]) / (grow * (den + right_den[t]) + bonus * x[t])
                num = decay * num + decay * p[t]
                den = decay * den + decay * x[t]
            continue
        own = math.expm1(wc)  # e^w - 1
        num = den = 0.0
        for s in range(0, T, chunk):  # a kernel chunk [s, e): H and O restart (O excludes the chunk's first token)
            yr[s] = (num + right_num[s] + bonus * p[s]) / ((1.0 + eps) * (den + right_den[s] + bonus * x[s]) + eps * x[s])
            h_num, h_den = decay * p[s], decay * x[s]
            o_num = o_den = 0.0
            num = decay * num + decay * p[s]
            den = decay * den + decay * x[s]
            for t in range(s + 1, min(s + chunk, T)):
                o_num = grow * o_num + p[t]
                o_den = grow * o_den + x[t]
                n_t = num + right_num[t] + own * (h_num - o_num) + bonus * p[t]
                d_t = den + right_den[t] + own * (h_den - o_den) + bonus * x[t]
                yr[t] = n_t / ((1.0 + eps) * d_t + eps * x[t])
                num = decay * num + decay * p[t]
                den = decay * den + decay * x[t]
                h_num = decay * h_num + decay * p[t]
                h_den = decay * h_den + decay * x[t]
    return unsafe


@_fast
def rows_backward_kernel(k, v, w, u, gy, chunk, eps, official, dk, dv, dw_rows, du_rows, r0, r1):
    """Backward of :func:`rows_kernel` for rows r0..r1 (same arguments as it, gy: the gradient of y, [C, B, T]):
    writes dk, dv ([C, B, T], the dtype of k) and the per-row partials dw_rows[row], du_rows[row] (float64 [C·B],
    row = c·B + b: the caller sums them over b). Returns how many rows were out of range (left unwritten: the
    caller then takes another path).

    With X_j = e^{k_j - K} (K is a constant for the gradients: y does not depend on it), P_j = X_j v_j and α_{tj}
    the weight of token j in query t's sums, y_t = N_t / D'_t, N_t = Σ_j α_{tj} P_j, D'_t = (1 + ε) Σ_j α_{tj} X_j
    + ε X_t (paper: ε = 0). With a_t = g_t / D'_t and b_t = -a_t y_t, the transposed sums dP_j = Σ_t α_{tj} a_t,
    dX_j = Σ_t α_{tj} (1 + ε) b_t + ε b_j give dk = X (v dP + dX), dv = X dP. Sweeps: X; right to left the forward's
    right sums; left to right y, a, b, the left halves of dP, dX and the w, u reductions; right to left the right
    halves, dk and dv. du = e^u Σ_t (a_t P_t + (1 + ε) b_t X_t); dw = Σ_{t,j} ∂α_{tj}/∂w (a_t P_j + (1 + ε) b_t
    X_j) needs first moments Σ (t - j) e^{-(t - j) w}·, carried next to the sums they weigh (M1_{t+1} = e^{-w} M1_t +
    M_{t+1} when M_{t+1} = e^{-w} (M_t + z_t)): left moments of P, X paired with a_t, b_t give the pairs j < t,
    left moments of a, b paired with P_j, X_j (the transposed sums) the pairs j > t."""
    B, T = k.shape[1], k.shape[2]
    x = np.empty(T)
    grad_p = np.empty(T)  # the forward's right sums R_t (num), then a_t
    grad_x = np.empty(T)  # R'_t (den), then (1 + eps) b_t
    left_p = np.empty(T)  # the terms of dP_j, dX_j known in the left-to-right sweep
    left_x = np.empty(T)
    scale = np.empty(T)  # scratch of the exponential
    unsafe = 0
    for row in range(r0, r1):
        c, b = row // B, row % B
        kr, vr, gr, dkr, dvr = k[c, b], v[c, b], gy[c, b], dk[c, b], dv[c, b]
        hi, lo = -np.inf, np.inf
        for t in range(T):
            hi = max(hi, np.float64(kr[t]))
            lo = min(lo, np.float64(kr[t]))
        wc, uc = w[c], u[c]
        if not (hi - lo + abs(wc) * T + abs(uc) <= MAX_ROW_RANGE):  # (also false for an infinite key)
            unsafe += 1
            continue
        _exp_shifted(kr, hi, x, scale)
        decay, bonus, grow, own = math.exp(-wc), math.exp(uc), math.exp(wc), math.expm1(wc)
        num = den = 0.0
        for t in range(T - 1, -1, -1):  # R_t, then R_{t-1} = e^{-w} (R_t + X_t)
            grad_p[t], grad_x[t] = num, den
            num = decay * (num + x[t] * vr[t])
            den = decay * (den + x[t])
        # left to right: G (the forward's left sums), G1 (their first moments), A, A1 (the same of a, (1+eps) b)
        num = den = num1 = den1 = sa = sb = sa1 = sb1 = 0.0
        du = moments = 0.0  # Σ_t (a_t P_t + (1 + eps) b_t X_t); the first-moment terms of dw
        if not official:  # α_{tj} = e^{-(|t-j| - 1) w} (j != t), e^u (j = t)
            # ∂α/∂w = -(d - 1) e^{-(d - 1) w} at distance d: the moments G1, A1 one token back (G1_{t-1} is
            # Σ_{j<t} (t-1-j) e^{-(t-1-j) w} P_j); no cancellation, and the neighbours (d = 1) add exact zeros
            num1_back = den1_back = sa1_back = sb1_back = 0.0
            for t in range(T):
                xv = x[t] * vr[t]
                r_t = 1.0 / (grow * (den + grad_x[t]) + bonus * x[t])  # (one division: shorter dependency chains)
                a_t = gr[t] * r_t
                b_t = -a_t * (grow * (num + grad_p[t]) + bonus * xv) * r_t
                # the query's left terms, and transposed (this key in the later queries' right terms)
                moments += a_t * num1_back + b_t * den1_back + xv * sa1_back + x[t] * sb1_back
                du += a_t * xv + b_t * x[t]
                left_p[t], left_x[t] = grow * sa + bonus * a_t, grow * sb + bonus * b_t
                grad_p[t], grad_x[t] = a_t, b_t
                num = decay * (num + xv)
                den = decay * (den + x[t])
                sa = decay * (sa + a_t)
                sb = decay * (sb + b_t)
                num1_back, den1_back, sa1_back, sb1_back = num1, den1, sa1, sb1
                num1 = decay * num1 + num
                den1 = decay * den1 + den
                sa1 = decay * sa1 + sa
                sb1 = decay * sb1 + sb
            du_rows[row] = bonus * du
            dw_rows[row] = -moments
            sa = sb = 0.0
            for t in range(T - 1, -1, -1):
                p_t = left_p[t] + grow * sa
                dvr[t] = x[t] * p_t
                dkr[t] = x[t] * (vr[t] * p_t + left_x[t] + grow * sb)
                sa = decay * (sa + grad_p[t])
                sb = decay * (sb + grad_x[t])
            continue
        # official: α_{tj} = e^{-|t-j| w} (j != t) + (e^w - 1) e^{-(t-j) w} [s <= j < t] (H)
        # - (e^w - 1) e^{(t-j) w} [s < j <= t] (O) + e^u [j = t], s the chunk start of t
        inner = inner1 = 0.0  # Σ_t [a_t (H - O)_t + (1+eps) b_t (H' - O')_t], the same with the moments H1 + O1
        for s in range(0, T, chunk):
            h_num = h_den = h1_num = h1_den = o_num = o_den = o1_num = o1_den = 0.0
            for t in range(s, min(s + chunk, T)):
                xv = x[t] * vr[t]
                # O_t = e^w O_{t-1} + P_t, O1_t = e^w (O1_{t-1} + O_{t-1}); O excludes the chunk start (a select
                # rather than a branch: ~7% faster)
                keep = 1.0 if t > s else 0.0
                o1_num = grow * (o1_num + o_num)
                o1_den = grow * (o1_den + o_den)
                o_num = grow * o_num + keep * xv
                o_den = grow * o_den + keep * x[t]
                n_t = num + grad_p[t] + own * (h_num - o_num) + bonus * xv
                r_t = 1.0 / ((1.0 + eps) * (den + grad_x[t] + own * (h_den - o_den) + bonus * x[t]) + eps * x[t])
                a_t = gr[t] * r_t
                b_t = -a_t * n_t * r_t
                bb = (1.0 + eps) * b_t  # the weight of D in D'
                moments += a_t * num1 + bb * den1 + xv * sa1 + x[t] * sb1  # ∂/∂w of e^{-|t-j| w}
                inner += a_t * (h_num - o_num) + bb * (h_den - o_den)
                inner1 += a_t * (h1_num + o1_num) + bb * (h1_den + o1_den)
                du += a_t * xv + bb * x[t]
                left_p[t], left_x[t] = sa + bonus * a_t, sb + bonus * bb + eps * b_t  # (eps X_t: D'_t only)
                grad_p[t], grad_x[t] = a_t, bb
                num = decay * (num + xv)
                den = decay * (den + x[t])
                h_num = decay * (h_num + xv)
                h_den = decay * (h_den + x[t])
                sa = decay * (sa + a_t)
                sb = decay * (sb + bb)
                num1 = decay * num1 + num
                den1 = decay * den1 + den
                h1_num = decay * h1_num + h_num
                h1_den = decay * h1_den + h_den
                sa1 = decay * sa1 + sa
                sb1 = decay * sb1 + sb
        # ∂/∂w [(e^w - 1) e^{∓(t-j) w}] = e^w e^{∓(t-j) w} ∓ (t - j)(e^w - 1) e^{∓(t-j) w}
        du_rows[row] = bonus * du
        dw_rows[row] = grow * inner - own * inner1 - moments
        # right to left, transposed: a token j gets H from the later queries of its chunk, O from itself and the
        # later queries of its chunk unless j is the chunk start
        sa = sb = 0.0
        for s in range((T - 1) // chunk * chunk, -1, -chunk):
            ha = hb = oa = ob = 0.0
            for t in range(min(s + chunk, T) - 1, s - 1, -1):
                oa = grow * oa + grad_p[t]
                ob = grow * ob + grad_x[t]
                keep = 1.0 if t > s else 0.0
                p_t = left_p[t] + sa + own * (ha - keep * oa)
                dvr[t] = x[t] * p_t
                dkr[t] = x[t] * (vr[t] * p_t + left_x[t] + sb + own * (hb - keep * ob))
                sa = decay * (sa + grad_p[t])
                sb = decay * (sb + grad_x[t])
                ha = decay * (ha + grad_p[t])
                hb = decay * (hb + grad_x[t])
    return unsafe
