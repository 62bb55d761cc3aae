"""The numba kernels of :mod:`vrwkv.ops.wkv.fused_cpu` (imported only when the fused CPU scan first runs: importing
this module loads numba)."""
import math
import operator

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.imputils import lower_builtin
from numba.core.typing.templates import AbstractTemplate, infer_global, signature
from numba.extending import intrinsic, models, overload, register_model

from vrwkv.ops._numba_cache import key_cache_on_all_kernel_sources
from vrwkv.ops.wkv.fused_cpu import MAX_ROW_RANGE, ROW_BLOCK, ROWS_BLOCKED_FROM, TOKEN_BLOCK, TOKEN_KEEP

key_cache_on_all_kernel_sources()  # cached machine code invalidated by a change to any kernel source

_LOG2E, _LN2_HI, _LN2_LO = 1.4426950408889634, 0.6931471803691238, 1.9082149292705877e-10
# Taylor coefficients 1/n! of e^r on |r| <= ln2 / 2: degree 11, ~1e-14 relative ((ln2/2)^12/12! = 3e-15)
(_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7, _C8, _C9, _C10, _C11) = (1.0 / math.factorial(i) for i in range(12))
_ROUND = 6755399441055744.0  # 1.5·2^52: adding it rounds a float64 of magnitude < 2^51 to an integer
# error_model="numpy": IEEE division (no zero test before each division)
_fast = numba.njit(fastmath={"contract"}, nogil=True, cache=True, error_model="numpy")


# ---- Float64 lanes in one AVX2 register (LLVM <4 x double>) or one AVX-512 register (<8 x double>), for the
# scans' rows in lockstep (a group of rows is a tuple of row indices, one per lane). numba
# does not vectorise a scan across rows itself: an inner loop over the rows keeps their state in memory (and the
# arrays may alias), and it does not pack scalar code (its SLP vectoriser is off). Arithmetic on f64x4 values (and
# numbers, broadcast) compiles to single vector instructions, contracted to FMAs like the scalar code; typed and
# lowered directly (as @overload functions they took ~1.5 s more to compile). The same type with eight lanes,
# f64x8 (one AVX-512 register, or two AVX2 ones), for the token-major kernel, and for the rows on AVX-512.
_V4 = ir.VectorType(ir.DoubleType(), 4)


class _F64x4(types.Type):
    """float64 lanes in one LLVM vector: f64x4 (4 lanes), f64x8 (8)."""

    def __init__(self, lanes: int = 4):
        self.lanes = lanes
        super().__init__(name=f"f64x{lanes}")


f64x4, f64x8 = _F64x4(4), _F64x4(8)


@register_model(_F64x4)
class _F64x4Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(ir.DoubleType(), fe_type.lanes))


def _is_number(ty):
    return isinstance(ty, (types.Float, types.Integer))


def _as_vector(context, builder, ty, value, lanes=4):
    if isinstance(ty, _F64x4):
        return value
    vector = ir.VectorType(ir.DoubleType(), lanes)
    scalar = builder.insert_element(ir.Constant(vector, ir.Undefined), context.cast(builder, value, ty, types.float64),
                                    ir.IntType(32)(0))
    broadcast = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    return builder.shuffle_vector(scalar, ir.Constant(vector, ir.Undefined), broadcast)


def _operands(a, b):
    vectors = {t for t in (a, b) if isinstance(t, _F64x4)}
    return len(vectors) == 1 and all(isinstance(t, _F64x4) or _is_number(t) for t in (a, b))


class _Arithmetic(AbstractTemplate):
    def generic(self, args, kws):
        if len(args) == 2 and not kws and _operands(*args):
            return signature(next(t for t in args if isinstance(t, _F64x4)), *args)


def _define_operator(operators, instruction):
    def lower(context, builder, sig, args):
        lanes = sig.return_type.lanes
        x, y = (_as_vector(context, builder, t, value, lanes) for t, value in zip(sig.args, args))
        return getattr(builder, instruction)(x, y, flags=("contract",))
    for op in operators:
        infer_global(op)(type("_Arithmetic_" + op.__name__, (_Arithmetic,), {"key": op}))
        for pair in ((_F64x4, _F64x4), (_F64x4, types.Number), (types.Number, _F64x4)):
            lower_builtin(op, *pair)(lower)


for _operators, _instruction in (((operator.add, operator.iadd), "fadd"), ((operator.sub, operator.isub), "fsub"),
                                 ((operator.mul, operator.imul), "fmul"),
                                 ((operator.truediv, operator.itruediv), "fdiv")):
    _define_operator(_operators, _instruction)


@infer_global(operator.neg)
class _Negation(AbstractTemplate):
    def generic(self, args, kws):
        if len(args) == 1 and not kws and isinstance(args[0], _F64x4):
            return signature(args[0], *args)


@lower_builtin(operator.neg, _F64x4)
def _negate(context, builder, sig, args):
    return builder.fneg(args[0])


def _select(predicate):
    @intrinsic
    def apply(typingctx, a, b):
        if isinstance(a, _F64x4) and a == b:
            def codegen(context, builder, sig, args):
                return builder.select(builder.fcmp_ordered(predicate, args[0], args[1]), args[0], args[1])
            return a(a, b), codegen
    return apply


vmax, vmin = _select(">"), _select("<")  # a if a > b (a < b) else b: b where a is NaN (vmaxpd, vminpd)


@intrinsic
def vec4(typingctx, a, b, c, d):
    """The vector (a, b, c, d) of four numbers."""
    if all(_is_number(t) for t in (a, b, c, d)):
        def codegen(context, builder, sig, args):
            out = ir.Constant(_V4, ir.Undefined)
            for i, (t, value) in enumerate(zip(sig.args, args)):
                out = builder.insert_element(out, context.cast(builder, value, t, types.float64), ir.IntType(32)(i))
            return out
        return f64x4(a, b, c, d), codegen


@intrinsic
def lane(typingctx, x, i):
    """Element i of the vector x."""
    if isinstance(x, _F64x4) and isinstance(i, types.Integer):
        def codegen(context, builder, sig, args):
            return builder.extract_element(args[0], context.cast(builder, args[1], sig.args[1], types.int32))
        return types.float64(x, i), codegen


def _is_matrix(a, dtype=None):
    return (isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" and isinstance(a.dtype, types.Float)
            and dtype in (None, a.dtype))


def _pointer(context, builder, sig, args, row, column=None, lanes=4):
    """Pointer to a[row, column] (a = args[0]; row, column: positions in args, column None: 0) as a pointer to a
    vector of ``lanes`` of a's dtype."""
    array_type, array = sig.args[0], context.make_array(sig.args[0])(context, builder, args[0])
    index = [ir.Constant(ir.IntType(64), 0) if n is None else context.cast(builder, args[n], sig.args[n], types.intp)
             for n in (row, column)]
    ptr = cgutils.get_item_pointer2(context, builder, array.data, cgutils.unpack_tuple(builder, array.shape),
                                    cgutils.unpack_tuple(builder, array.strides), array_type.layout, index,
                                    wraparound=False, boundscheck=False)
    return builder.bitcast(ptr, ir.VectorType(context.get_data_type(array_type.dtype), lanes).as_pointer())


@intrinsic
def load_run(typingctx, a, r, t):
    """a[r, t..t+3] (a: a float [rows, n] array) as float64."""
    if _is_matrix(a) and isinstance(r, types.Integer) and isinstance(t, types.Integer):
        def codegen(context, builder, sig, args):
            run = builder.load(_pointer(context, builder, sig, args, 1, 2), align=sig.args[0].dtype.bitwidth // 8)
            return run if run.type == _V4 else builder.fpext(run, _V4)
        return f64x4(a, r, t), codegen


def _transpose(builder, rows):
    """The 4x4 transpose of four 4-vectors (pairs of rows interleaved, then 128-bit halves exchanged)."""
    def shuffle(a, b, mask):
        return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), 4), mask))
    t0, t1 = shuffle(rows[0], rows[1], [0, 4, 2, 6]), shuffle(rows[0], rows[1], [1, 5, 3, 7])
    t2, t3 = shuffle(rows[2], rows[3], [0, 4, 2, 6]), shuffle(rows[2], rows[3], [1, 5, 3, 7])
    return [shuffle(t0, t2, [0, 1, 4, 5]), shuffle(t1, t3, [0, 1, 4, 5]), shuffle(t0, t2, [2, 3, 6, 7]),
            shuffle(t1, t3, [2, 3, 6, 7])]


def _is_group(group):
    """A group of rows run in lockstep: a tuple of row indices, one per lane (4: f64x4 vectors, 8: f64x8)."""
    return isinstance(group, types.UniTuple) and isinstance(group.dtype, types.Integer) and group.count in (4, 8)


def _vector(lanes: int):
    return ir.VectorType(ir.DoubleType(), lanes)


def _element_pointer(context, builder, array_type, array_value, index):
    """Pointer to array[index...] (index: LLVM integers)."""
    array = context.make_array(array_type)(context, builder, array_value)
    return cgutils.get_item_pointer2(context, builder, array.data, cgutils.unpack_tuple(builder, array.shape),
                                     cgutils.unpack_tuple(builder, array.strides), array_type.layout, index,
                                     wraparound=False, boundscheck=False)


def _as_index(context, builder, ty, value):
    return context.cast(builder, value, ty, types.intp)


def _pack(context, builder, ty, values):
    """The values (of the scalar type ty) as float64 lanes of one vector."""
    out = ir.Constant(_vector(len(values)), ir.Undefined)
    for i, value in enumerate(values):
        out = builder.insert_element(out, context.cast(builder, value, ty, types.float64), ir.IntType(32)(i))
    return out


@intrinsic
def pick(typingctx, a, first, n, group):
    """The lanes of a group of n rows (1 <= n <= lanes of ``group``) from a 1-D array: a[first], ..., a[first + n - 1],
    then a[first + n - 1] again in the spare lanes: a tuple like ``group`` for an integer array (the rows), float64
    lanes for a float one (e.g. the rows' largest keys)."""
    if (isinstance(a, types.Array) and a.ndim == 1 and isinstance(first, types.Integer) and isinstance(n, types.Integer)
            and _is_group(group)):
        lanes, integer = group.count, isinstance(a.dtype, types.Integer)

        def codegen(context, builder, sig, args):
            start = _as_index(context, builder, sig.args[1], args[1])
            last = builder.sub(builder.add(start, _as_index(context, builder, sig.args[2], args[2])),
                               ir.Constant(start.type, 1))
            values = []
            for i in range(lanes):
                index = builder.add(start, ir.Constant(start.type, i))
                index = builder.select(builder.icmp_signed("<", index, last), index, last)
                values.append(builder.load(_element_pointer(context, builder, sig.args[0], args[0], [index])))
            if integer:
                values = [context.cast(builder, x, sig.args[0].dtype, sig.return_type.dtype) for x in values]
                return context.make_tuple(builder, sig.return_type, values)
            return _pack(context, builder, sig.args[0].dtype, values)
        result = types.UniTuple(group.dtype, lanes) if integer else _F64x4(lanes)
        return result(a, first, n, group), codegen


@intrinsic
def per_row(typingctx, a, group, B):
    """Lanes a[row // B] for the rows of the group (a: a channel's parameter, rows of the [C·B, T] grid)."""
    if isinstance(a, types.Array) and a.ndim == 1 and _is_group(group) and isinstance(B, types.Integer):
        def codegen(context, builder, sig, args):
            batch = _as_index(context, builder, sig.args[2], args[2])
            rows = cgutils.unpack_tuple(builder, args[1])
            values = [builder.load(_element_pointer(context, builder, sig.args[0], args[0], [
                builder.sdiv(_as_index(context, builder, sig.args[1].dtype, row), batch)])) for row in rows]
            return _pack(context, builder, sig.args[0].dtype, values)
        return _F64x4(group.count)(a, group, B), codegen


@intrinsic
def splat(typingctx, x, group):
    """Lanes all equal to the number x, one per row of the group."""
    if _is_number(x) and _is_group(group):
        def codegen(context, builder, sig, args):
            return _as_vector(context, builder, sig.args[0], args[0], sig.args[1].count)
        return _F64x4(group.count)(x, group), codegen


@intrinsic
def gather(typingctx, a, group, t):
    """Lanes a[row, t] for the rows of the group (a: a float [rows, n] array)."""
    if _is_matrix(a) and _is_group(group) and isinstance(t, types.Integer):
        def codegen(context, builder, sig, args):
            column = _as_index(context, builder, sig.args[2], args[2])
            values = [builder.load(_element_pointer(context, builder, sig.args[0], args[0], [
                _as_index(context, builder, sig.args[1].dtype, row), column]))
                for row in cgutils.unpack_tuple(builder, args[1])]
            return _pack(context, builder, sig.args[0].dtype, values)
        return _F64x4(group.count)(a, group, t), codegen


@intrinsic
def scatter(typingctx, a, group, t, y):
    """a[row, t] = the row's lane of y (rounded to a's dtype), the inverse of :func:`gather` (rows repeated in spare
    lanes get the same value again)."""
    if _is_matrix(a) and _is_group(group) and isinstance(t, types.Integer) and y == _F64x4(group.count):
        def codegen(context, builder, sig, args):
            column = _as_index(context, builder, sig.args[2], args[2])
            for i, row in enumerate(cgutils.unpack_tuple(builder, args[1])):
                value = context.cast(builder, builder.extract_element(args[3], ir.IntType(32)(i)), types.float64,
                                     sig.args[0].dtype)
                builder.store(value, _element_pointer(context, builder, sig.args[0], args[0], [
                    _as_index(context, builder, sig.args[1].dtype, row), column]))
            return context.get_dummy_value()
        return types.none(a, group, t, y), codegen


def _join(builder, low, high):
    """Two 4-vectors as one 8-vector."""
    return builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(ir.IntType(32), 8), list(range(8))))


def _split(builder, x):
    """An 8-vector as its two 4-vectors (lanes 0..3, 4..7)."""
    return [builder.shuffle_vector(x, ir.Constant(x.type, ir.Undefined),
                                   ir.Constant(ir.VectorType(ir.IntType(32), 4), list(range(first, first + 4))))
            for first in (0, 4)]


@intrinsic
def load_block(typingctx, a, group, t):
    """a[rows of the group, t..t+3] transposed (a: a float [rows, n] array): four vectors, the j-th the lanes
    a[row, t+j], as float64. Four loads of four tokens per 4x4 transpose (two transposes for eight rows)."""
    if _is_matrix(a) and _is_group(group) and isinstance(t, types.Integer):
        lanes = group.count

        def codegen(context, builder, sig, args):
            array_type, align = sig.args[0], sig.args[0].dtype.bitwidth // 8
            column = _as_index(context, builder, sig.args[2], args[2])
            element = context.get_data_type(array_type.dtype)
            runs = [builder.load(builder.bitcast(_element_pointer(context, builder, array_type, args[0], [
                _as_index(context, builder, sig.args[1].dtype, row), column]), ir.VectorType(element, 4).as_pointer()),
                align=align) for row in cgutils.unpack_tuple(builder, args[1])]
            quads = [_transpose(builder, runs[i:i + 4]) for i in range(0, lanes, 4)]
            columns = quads[0] if lanes == 4 else [_join(builder, low, high) for low, high in zip(*quads)]
            wide = _vector(lanes)
            columns = [c if c.type == wide else builder.fpext(c, wide) for c in columns]
            return context.make_tuple(builder, sig.return_type, columns)
        return types.UniTuple(_F64x4(lanes), 4)(a, group, t), codegen


@intrinsic
def store_block(typingctx, a, group, t, y0, y1, y2, y3):
    """The inverse of :func:`load_block`: a[row i of the group, t+j] = lane i of y_j (rounded to a's dtype)."""
    if _is_matrix(a) and _is_group(group) and all(y == _F64x4(group.count) for y in (y0, y1, y2, y3)):
        lanes = group.count

        def codegen(context, builder, sig, args):
            array_type, align = sig.args[0], sig.args[0].dtype.bitwidth // 8
            element = context.get_data_type(array_type.dtype)
            column = _as_index(context, builder, sig.args[2], args[2])
            columns = list(args[3:])
            if lanes == 8:  # rows 0..3 from the low halves, 4..7 from the high ones
                halves = [_split(builder, c) for c in columns]
                runs = _transpose(builder, [h[0] for h in halves]) + _transpose(builder, [h[1] for h in halves])
            else:
                runs = _transpose(builder, columns)
            for run, row in zip(runs, cgutils.unpack_tuple(builder, args[1])):
                run = run if element == ir.DoubleType() else builder.fptrunc(run, ir.VectorType(element, 4))
                pointer = _element_pointer(context, builder, array_type, args[0], [
                    _as_index(context, builder, sig.args[1].dtype, row), column])
                builder.store(run, builder.bitcast(pointer, ir.VectorType(element, 4).as_pointer()), align=align)
            return context.get_dummy_value()
        return types.none(a, group, t, y0, y1, y2, y3), codegen


def _prefetch(builder, pointer, write: bool):
    """Prefetch the cache line at ``pointer`` into L1 (``write``: for writing). Any address: a prefetch never faults,
    past an array's end it only loads a line that is not needed."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    prefetch = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                              "llvm.prefetch.p0")
    builder.call(prefetch, [builder.bitcast(pointer, i8p), i32(int(write)), i32(3), i32(1)])


@intrinsic
def prefetch_rows(typingctx, a, group, t, write):
    """Prefetch the lines of a[row, t] for the rows of the group (``write``: a literal bool; see :func:`_prefetch`)."""
    if _is_matrix(a) and _is_group(group) and isinstance(t, types.Integer) and isinstance(write, types.BooleanLiteral):
        def codegen(context, builder, sig, args):
            column = _as_index(context, builder, sig.args[2], args[2])
            for row in cgutils.unpack_tuple(builder, args[1]):
                _prefetch(builder, _element_pointer(context, builder, sig.args[0], args[0], [
                    _as_index(context, builder, sig.args[1].dtype, row), column]), sig.args[3].literal_value)
            return context.get_dummy_value()
        return types.none(a, group, t, write), codegen


@intrinsic
def prefetch_at(typingctx, a, r, c, write):
    """Prefetch the line of a[r, c] (``write``: a literal bool; see :func:`_prefetch`)."""
    if (_is_matrix(a) and isinstance(r, types.Integer) and isinstance(c, types.Integer)
            and isinstance(write, types.BooleanLiteral)):
        def codegen(context, builder, sig, args):
            _prefetch(builder, _pointer(context, builder, sig, args, 1, 2), sig.args[3].literal_value)
            return context.get_dummy_value()
        return types.none(a, r, c, write), codegen


@intrinsic
def load_lanes(typingctx, a, t, group):
    """Row t of a float64 [n, lanes] array (one lane per row of the group)."""
    if _is_matrix(a, types.float64) and isinstance(t, types.Integer) and _is_group(group):
        def codegen(context, builder, sig, args):
            return builder.load(_pointer(context, builder, sig, args, 1, lanes=sig.args[2].count), align=8)
        return _F64x4(group.count)(a, t, group), codegen


@intrinsic
def store_lanes(typingctx, a, t, x):
    """Row t of a float64 [n, lanes] array = x."""
    if _is_matrix(a, types.float64) and isinstance(t, types.Integer) and isinstance(x, _F64x4):
        def codegen(context, builder, sig, args):
            builder.store(args[2], _pointer(context, builder, sig, args, 1, lanes=sig.args[2].lanes), align=8)
            return context.get_dummy_value()
        return types.none(a, t, x), codegen


def _lanes_map(function):
    @intrinsic
    def apply(typingctx, x):
        if isinstance(x, _F64x4):
            def codegen(context, builder, sig, args):
                scalar = context.get_function(function, types.float64(types.float64))
                values = [scalar(builder, [builder.extract_element(args[0], ir.IntType(32)(i))])
                          for i in range(sig.args[0].lanes)]
                return _pack(context, builder, types.float64, values)
            return x(x), codegen
    return apply


# e^x, e^x - 1 lane by lane by the library functions (for the parameters w, u: once per group of rows)
lanes_exp, lanes_expm1 = _lanes_map(math.exp), _lanes_map(math.expm1)


@intrinsic
def _exponent_to_scale(typingctx, big):
    """2^m from big = m + 1.5·2^52 (the integer m in the low mantissa bits, see :func:`_exp4`): integer adds and
    shifts (AVX2 has no packed double-to-int64 conversion)."""
    if isinstance(big, _F64x4):
        def codegen(context, builder, sig, args):
            n = sig.args[0].lanes
            i64 = ir.VectorType(ir.IntType(64), n)
            bits = builder.add(builder.bitcast(args[0], i64), ir.Constant(i64, [1023] * n))
            return builder.bitcast(builder.shl(bits, ir.Constant(i64, [52] * n)), ir.VectorType(ir.DoubleType(), n))
        return big(big), codegen


# (inlined by numba; it reference-counts array arguments and prunes that only in straight-line code: no helper with
# arrays inside the sweeps with branches, where it cost two calls per token)
_inline = numba.njit(fastmath={"contract"}, nogil=True, cache=True, error_model="numpy", inline="always")


@_inline
def _exp4(z):
    """e^z for the lanes z in [-700, 700]: 2^m e^r with m = round(z log2 e), no calls and no branches. The rounding adds
    1.5·2^52, which leaves m in the low mantissa bits."""
    big = z * _LOG2E + _ROUND
    m = big - _ROUND
    r = (z - m * _LN2_HI) - m * _LN2_LO
    return (_C0 + r * (_C1 + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * (_C6 + r * (_C7 + r * (
        _C8 + r * (_C9 + r * (_C10 + r * _C11))))))))))) * _exponent_to_scale(big)


@_inline
def _exp4_float32(z):
    """:func:`_exp4` to ~5e-9 relative (degree 7: (ln2/2)^8/8! = 5.2e-9), for float32 inputs and outputs: a sixth of
    a float32 half-ulp (3e-8) per term of the weighted sums, y unchanged at float32 precision; 0.84x the kernels'
    time (four FMAs fewer on the chain of each exponential)."""
    big = z * _LOG2E + _ROUND
    m = big - _ROUND
    r = (z - m * _LN2_HI) - m * _LN2_LO
    return (_C0 + r * (_C1 + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * (_C6 + r * _C7))))))) * _exponent_to_scale(
        big)


def exp_like(z, like):
    """e^z (f64x4 or f64x8 lanes) to the precision of the scalar ``like``'s type: float32 inputs take
    :func:`_exp4_float32`, float64 ones :func:`_exp4` (resolved when numba types the kernel; ``like`` is a scalar,
    not an array, so that no reference counting enters the loops)."""
    raise NotImplementedError("exp_like runs inside numba kernels only")


@overload(exp_like, inline="always", jit_options={"fastmath": {"contract"}, "error_model": "numpy"})
def _exp_like(z, like):
    if isinstance(like, types.Float) and like.bitwidth == 32:
        return lambda z, like: _exp4_float32(z)
    return lambda z, like: _exp4(z)


@_inline
def _inputs(x, p, g, t, shifted_key, value, grad, like):
    """X_t, P_t, g_t into the rows t of x, p, g (the exponential to the precision of ``like``: :func:`exp_like`)."""
    xt = exp_like(shifted_key, like)
    store_lanes(x, t, xt)
    store_lanes(p, t, xt * value)
    store_lanes(g, t, grad)


@_fast
def _row_shift(k2, w, u, B, row):
    """Whether the row (of k2: [C·B, T]) is in range (key range + |w|·T + |u| at most MAX_ROW_RANGE, false for an
    infinite key), and its largest key."""
    T = k2.shape[1]
    high = vec4(-np.inf, -np.inf, -np.inf, -np.inf)
    low = -high
    for t in range(0, T - 3, 4):  # (NaN keys are skipped, as by max and min: they propagate to the outputs)
        run = load_run(k2, row, t)
        high, low = vmax(run, high), vmin(run, low)
    hi = max(max(lane(high, 0), lane(high, 1)), max(lane(high, 2), lane(high, 3)))
    lo = min(min(lane(low, 0), lane(low, 1)), min(lane(low, 2), lane(low, 3)))
    for t in range(T // 4 * 4, T):
        hi = max(hi, np.float64(k2[row, t]))
        lo = min(lo, np.float64(k2[row, t]))
    return hi - lo + abs(w[row // B]) * T + abs(u[row // B]) <= MAX_ROW_RANGE, hi


@_inline
def _right_step(x, p, right_p, right_x, t, num, den, decay, shifted_key, value, like):
    """X_t, P_t and the right sums R_t (num, den) into the rows t of x, p, right_p, right_x; returns R_{t-1}."""
    xt = exp_like(shifted_key, like)
    pt = xt * value
    store_lanes(x, t, xt)
    store_lanes(p, t, pt)
    store_lanes(right_p, t, num)
    store_lanes(right_x, t, den)
    return decay * num + decay * pt, decay * den + decay * xt


@_inline
def _paper_step(num, den, x, p, right_p, right_x, i, group, decay, grow, bonus):
    """y_t of the paper formula from the left sums G_t (num, den) and the rows i of the scratch (X_t, P_t, the right
    sums); returns it and G_{t+1}."""
    xt, pt = load_lanes(x, i, group), load_lanes(p, i, group)
    yt = ((grow * (num + load_lanes(right_p, i, group)) + bonus * pt)
          / (grow * (den + load_lanes(right_x, i, group)) + bonus * xt))
    return yt, decay * num + decay * pt, decay * den + decay * xt


@_inline
def _store_block_of(a, group, t, rows, i):
    """a[rows of the group, t..t+3] = the rows i..i+3 of the float64 [n, lanes] array ``rows`` (:func:`store_block`)."""
    store_block(a, group, t, load_lanes(rows, i, group), load_lanes(rows, i + 1, group), load_lanes(rows, i + 2, group),
                load_lanes(rows, i + 3, group))


@_fast
def _forward_rows(k2, v2, y2, w, u, B, rows, shift, n, chunk, eps, official, x, p, right_p, right_x, lanes):
    """y of the n (1 to lanes) rows of the array rows (in range; shift: their largest keys) into y2, the rows in
    lockstep, one per lane of f64x4 or f64x8 vectors (as many as the tuple ``lanes`` has; fewer rows: the last one
    repeats in the spare lanes); x, p, right_p, right_x: [T, lanes] float64 scratch."""
    T = k2.shape[1]
    like = k2[0, 0]  # (its type sets the exponentials' precision: exp_like)
    group = pick(rows, 0, n, lanes)
    wv = per_row(w, group, B)
    decay, grow = lanes_exp(-wv), lanes_exp(wv)
    bonus = lanes_exp(per_row(u, group, B))
    hi = pick(shift, 0, n, lanes)
    whole = T // 4 * 4  # the tokens of whole blocks of four (transposed in and out as 4x4 blocks)
    # right to left: X, P (the exponential fills the FP pipes that the latency of the sums' chains leaves idle), R
    num = den = splat(0.0, group)
    for t in range(T - 1, whole - 1, -1):
        num, den = _right_step(x, p, right_p, right_x, t, num, den, decay, gather(k2, group, t) - hi,
                               gather(v2, group, t), like)
    for t in range(whole - 4, -1, -4):
        keys, values = load_block(k2, group, t), load_block(v2, group, t)
        # (constant indices: the tuples stay in registers)
        num, den = _right_step(x, p, right_p, right_x, t + 3, num, den, decay, keys[3] - hi, values[3], like)
        num, den = _right_step(x, p, right_p, right_x, t + 2, num, den, decay, keys[2] - hi, values[2], like)
        num, den = _right_step(x, p, right_p, right_x, t + 1, num, den, decay, keys[1] - hi, values[1], like)
        num, den = _right_step(x, p, right_p, right_x, t, num, den, decay, keys[0] - hi, values[0], like)
    num = den = splat(0.0, group)
    if not official:  # left to right: G_t, then G_{t+1} = e^{-w} (G_t + P_t); y transposed out block by block
        for t in range(0, whole, 4):
            y0, num, den = _paper_step(num, den, x, p, right_p, right_x, t, group, decay, grow, bonus)
            y1, num, den = _paper_step(num, den, x, p, right_p, right_x, t + 1, group, decay, grow, bonus)
            y2_, num, den = _paper_step(num, den, x, p, right_p, right_x, t + 2, group, decay, grow, bonus)
            y3, num, den = _paper_step(num, den, x, p, right_p, right_x, t + 3, group, decay, grow, bonus)
            store_block(y2, group, t, y0, y1, y2_, y3)
        for t in range(whole, T):
            yt, num, den = _paper_step(num, den, x, p, right_p, right_x, t, group, decay, grow, bonus)
            scatter(y2, group, t, yt)
        return
    own = lanes_expm1(wv)  # e^w - 1
    eps1 = 1.0 + eps
    for s in range(0, T, chunk):  # a kernel chunk [s, e): H and O restart (O excludes the chunk's first token); y -> R
        xt, pt = load_lanes(x, s, group), load_lanes(p, s, group)
        store_lanes(right_p, s, (num + load_lanes(right_p, s, group) + bonus * pt)
                    / (eps1 * (den + load_lanes(right_x, s, group) + bonus * xt) + eps * xt))
        h_num, h_den = decay * pt, decay * xt
        o_num = o_den = splat(0.0, group)
        num = decay * num + decay * pt
        den = decay * den + decay * xt
        for t in range(s + 1, min(s + chunk, T)):
            xt, pt = load_lanes(x, t, group), load_lanes(p, t, group)
            o_num = grow * o_num + pt
            o_den = grow * o_den + xt
            n_t = num + load_lanes(right_p, t, group) + own * (h_num - o_num) + bonus * pt
            d_t = den + load_lanes(right_x, t, group) + own * (h_den - o_den) + bonus * xt
            store_lanes(right_p, t, n_t / (eps1 * d_t + eps * xt))
            num = decay * num + decay * pt
            den = decay * den + decay * xt
            h_num = decay * h_num + decay * pt
            h_den = decay * h_den + decay * xt
    for t in range(0, whole, 4):
        _store_block_of(y2, group, t, right_p, t)
    for t in range(whole, T):
        scatter(y2, group, t, load_lanes(right_p, t, group))


@_fast
def rows_kernel(k, v, w, u, y, chunk, eps, official, r0, r1, lanes):
    """Bi-WKV of rows r0..r1 of the flattened (channel, batch) grid (k, v, y: C-contiguous [C, B, T]; w, u: float64
    [C]); returns how many rows were out of range (left unwritten). Per row X = e^{k - K} (K: the row's largest key),
    P = X v, right to left the right sums R, left to right the left sums and y (:func:`_forward_rows`: rows in
    lockstep, one per lane, as in :func:`rows_backward_kernel`; ``lanes``: a tuple of 4 or 8 ints, its length the
    vector width, :func:`~vrwkv.ops.wkv.fused_cpu.row_lanes`). Every recurrence is written
    ``S = e^{-w} S + e^{-w} z``: one FMA on the dependency chain."""
    return rows_kernel_with(k, v, w, u, y, chunk, eps, official, r0, r1, rows_scratch(k.shape[2], 0, lanes), lanes)


@_fast
def rows_kernel_with(k, v, w, u, y, chunk, eps, official, r0, r1, scratch, lanes):
    """:func:`rows_kernel` in the caller's float64 scratch ``[4, T, lanes]`` (X, P, R num, R den). A thread taking many
    pieces of rows allocates it once: per piece, 8 MB at T = 65,536 were fresh pages every time (glibc trims them)."""
    B, T = k.shape[1], k.shape[2]
    if T >= ROWS_BLOCKED_FROM:
        return rows_blocked_kernel_with(k, v, w, u, y, chunk, eps, official, r0, r1, scratch, ROW_BLOCK, lanes)
    k2, v2, y2 = k.reshape(-1, T), v.reshape(-1, T), y.reshape(-1, T)
    x, p, right_p, right_x = scratch[0], scratch[1], scratch[2], scratch[3]
    rows, shift = np.empty(len(lanes), np.int64), np.empty(len(lanes))
    n = unsafe = 0
    for row in range(r0, r1):  # each group of rows in range runs right after their check, their keys still in cache
        in_range, hi = _row_shift(k2, w, u, B, row)
        if in_range:
            rows[n], shift[n] = row, hi
            n += 1
        else:
            unsafe += 1
        if n == len(lanes) or (n > 0 and row == r1 - 1):
            _forward_rows(k2, v2, y2, w, u, B, rows, shift, n, chunk, eps, official, x, p, right_p, right_x, lanes)
            n = 0
    return unsafe


@_fast
def rows_scratch(T, block, lanes):
    """The float64 scratch of the rows forward for rows of T tokens: with ``block`` = 0 that of
    :func:`rows_kernel_with` (below ROWS_BLOCKED_FROM tokens ``[4, T, lanes]``: X, P, R num, R den of a whole row),
    otherwise that of :func:`rows_blocked_kernel_with` by blocks of ``block`` tokens (``[4, block + blocks + 8,
    lanes]``: a block's sweeps, then the per-block sums and the state between blocks)."""
    if block == 0:
        if T < ROWS_BLOCKED_FROM:
            return np.empty((4, T, len(lanes)))
        block = ROW_BLOCK
    return np.empty((4, block + (T + block - 1) // block + 8, len(lanes)))


@_fast
def _rows_block_summary(k2, v2, group, s, e, decay, like):
    """Pass A of the blocked rows forward for the tokens s..e of a group of rows (lanes), right to left: the block's
    frame m (the keys of its last token), the lanes' largest and smallest keys, and the block's sums
    Σ_{s <= j < e} e^{-(j-s) w} e^{k_j - m} [v_j | 1] (:func:`_block_summary` of the token-major kernel, the rows
    by 4x4 transposes)."""
    m = gather(k2, group, e - 1)
    high, low = splat(-np.inf, group), splat(np.inf, group)
    num = den = splat(0.0, group)
    whole = s + (e - s) // 4 * 4
    for t in range(e - 1, whole - 1, -1):  # (NaN keys are skipped by max and min: they propagate to the outputs)
        key = gather(k2, group, t)
        high, low = vmax(key, high), vmin(key, low)
        xt = exp_like(key - m, like)
        num = decay * num + xt * gather(v2, group, t)
        den = decay * den + xt
    for t in range(whole - 4, s - 1, -4):
        if t % 16 == 0:  # the next block's lines (to the left), one per row and array
            prefetch_rows(k2, group, t - (e - s), False)
            prefetch_rows(v2, group, t - (e - s), False)
        keys, values = load_block(k2, group, t), load_block(v2, group, t)
        high = vmax(vmax(keys[0], keys[1]), vmax(vmax(keys[2], keys[3]), high))
        low = vmin(vmin(keys[0], keys[1]), vmin(vmin(keys[2], keys[3]), low))
        x3, x2, x1, x0 = (exp_like(keys[3] - m, like), exp_like(keys[2] - m, like), exp_like(keys[1] - m, like),
                          exp_like(keys[0] - m, like))
        num = decay * (decay * (decay * (decay * num + x3 * values[3]) + x2 * values[2]) + x1 * values[1]) + x0 * values[0]
        den = decay * (decay * (decay * (decay * den + x3) + x2) + x1) + x0
    return m, high, low, num, den


@_fast
def _rows_block_forward(k2, v2, y2, group, s, e, hi, decay, grow, own, bonus, carry_p, carry_x, scratch, at, chunk,
                        eps, official):
    """Pass B of the blocked rows forward for the tokens s..e of a group of rows: right to left X = e^{k - K} (hi: the
    rows' largest keys K), P = X v and the right sums R from R_{e-1} = (carry_p, carry_x) into the rows 0..e-s of
    the scratch's X, P, R num, R den; left to right the left sums (entering and leaving through the rows at..at+5
    of scratch[3]; the official function's H, O restarted at every kernel chunk, which may start or end inside the
    block) and y, kept in R num's rows, then transposed out. The arithmetic of :func:`_forward_rows`, lane by lane,
    but for the order in which R is summed."""
    x, p, right_p, right_x, state = scratch[0], scratch[1], scratch[2], scratch[3], scratch[3]
    like = k2[0, s]  # (its type sets the exponentials' precision: exp_like)
    whole = s + (e - s) // 4 * 4
    num, den = carry_p, carry_x
    for t in range(e - 1, whole - 1, -1):
        num, den = _right_step(x, p, right_p, right_x, t - s, num, den, decay, gather(k2, group, t) - hi,
                               gather(v2, group, t), like)
    for t in range(whole - 4, s - 1, -4):
        if t % 16 == 0:  # the next block's lines (to the right), one per row and array
            prefetch_rows(k2, group, t + (e - s), False)
            prefetch_rows(v2, group, t + (e - s), False)
            prefetch_rows(y2, group, t + (e - s), True)
        keys, values = load_block(k2, group, t), load_block(v2, group, t)
        i = t - s
        num, den = _right_step(x, p, right_p, right_x, i + 3, num, den, decay, keys[3] - hi, values[3], like)
        num, den = _right_step(x, p, right_p, right_x, i + 2, num, den, decay, keys[2] - hi, values[2], like)
        num, den = _right_step(x, p, right_p, right_x, i + 1, num, den, decay, keys[1] - hi, values[1], like)
        num, den = _right_step(x, p, right_p, right_x, i, num, den, decay, keys[0] - hi, values[0], like)
    num, den = load_lanes(state, at, group), load_lanes(state, at + 1, group)
    if not official:  # G_{t+1} = e^{-w} (G_t + P_t), and y
        for i in range(e - s):
            yt, num, den = _paper_step(num, den, x, p, right_p, right_x, i, group, decay, grow, bonus)
            store_lanes(right_p, i, yt)
        store_lanes(state, at, num)
        store_lanes(state, at + 1, den)
    else:
        h_num, h_den, o_num, o_den = (load_lanes(state, at + 2, group), load_lanes(state, at + 3, group),
                                      load_lanes(state, at + 4, group), load_lanes(state, at + 5, group))
        eps1 = 1.0 + eps
        x_bonus = eps1 * bonus + eps  # (1 + eps) e^u + eps: the weight of X_t in D'_t
        t = s
        while t < e:  # the pieces of kernel chunks [c, c + chunk) in the block: H and O restart (O excludes c)
            stop = min(e, (t // chunk + 1) * chunk)
            if t % chunk == 0:
                i = t - s
                xt, pt = load_lanes(x, i, group), load_lanes(p, i, group)
                store_lanes(right_p, i, (num + load_lanes(right_p, i, group) + bonus * pt)
                            / (eps1 * (den + load_lanes(right_x, i, group)) + x_bonus * xt))
                h_num, h_den = decay * pt, decay * xt
                o_num = o_den = splat(0.0, group)
                num = decay * num + decay * pt
                den = decay * den + decay * xt
                t += 1
            for t in range(t, stop):
                i = t - s
                xt, pt = load_lanes(x, i, group), load_lanes(p, i, group)
                o_num = grow * o_num + pt
                o_den = grow * o_den + xt
                n_t = num + load_lanes(right_p, i, group) + own * (h_num - o_num) + bonus * pt
                d_t = eps1 * (den + load_lanes(right_x, i, group) + own * (h_den - o_den)) + x_bonus * xt
                store_lanes(right_p, i, n_t / d_t)
                num = decay * num + decay * pt
                den = decay * den + decay * xt
                h_num = decay * h_num + decay * pt
                h_den = decay * h_den + decay * xt
            t = stop
        for j, sums in enumerate((num, den, h_num, h_den, o_num, o_den)):
            store_lanes(state, at + j, sums)
    for t in range(s, whole, 4):
        _store_block_of(y2, group, t, right_p, t - s)
    for t in range(whole, e):
        scatter(y2, group, t, load_lanes(right_p, t - s, group))


@_fast
def _rows_blocked_group(k2, v2, y2, w, u, B, rows, n, chunk, eps, official, scratch, block, lanes):
    """y of the n (1 to lanes) rows of the array rows in lockstep by blocks of ``block`` tokens, unless one of them
    is out of range: then nothing is written and the count of those rows is returned (0: written)."""
    T = k2.shape[1]
    L, blocks = block, (T + block - 1) // block
    group = pick(rows, 0, n, lanes)
    wv = per_row(w, group, B)
    decay, grow, own = lanes_exp(-wv), lanes_exp(wv), lanes_expm1(wv)
    bonus = lanes_exp(per_row(u, group, B))
    decay_block = lanes_exp(wv * -float(min(L, T)))  # e^{-L w} across a whole block (within e^600 for rows in range)
    like = k2[0, 0]  # (its type sets the exponentials' precision: exp_like)
    # per block (the rows L + b of the scratch's first three arrays): the frame, then e^{frame - K}; its sums, then
    # the carries from the right; rows L + blocks.. of the fourth: the left sums between blocks, the key range
    frames, sums_p, sums_x, state = scratch[0], scratch[1], scratch[2], scratch[3]
    at = L + blocks
    high, low = splat(-np.inf, group), splat(np.inf, group)
    for b in range(blocks - 1, -1, -1):  # pass A, right to left
        m, block_high, block_low, num, den = _rows_block_summary(k2, v2, group, b * L, min(b * L + L, T), decay,
                                                                 like)
        high, low = vmax(block_high, high), vmin(block_low, low)
        store_lanes(frames, L + b, m)
        store_lanes(sums_p, L + b, num)
        store_lanes(sums_x, L + b, den)
    store_lanes(state, at + 6, high - low)
    bad = 0
    for i in range(n):  # the range check of _row_shift (NaN keys skipped; an infinite key: out of range)
        row = rows[i]
        if not (state[at + 6, i] + abs(w[row // B]) * T + abs(u[row // B]) <= MAX_ROW_RANGE):
            bad += 1
    if bad:
        return bad
    carry_p = carry_x = splat(0.0, group)
    for b in range(blocks - 1, -1, -1):  # T_b = e^{m_b - K} S_b + e^{-L w} T_{b+1}; R_{e_b - 1} = e^{-w} T_{b+1}
        scale = _exp4(load_lanes(frames, L + b, group) - high)
        block_p, block_x = load_lanes(sums_p, L + b, group), load_lanes(sums_x, L + b, group)
        store_lanes(sums_p, L + b, decay * carry_p)
        store_lanes(sums_x, L + b, decay * carry_x)
        carry_p = decay_block * carry_p + scale * block_p
        carry_x = decay_block * carry_x + scale * block_x
    for j in range(6):
        store_lanes(state, at + j, splat(0.0, group))
    for b in range(blocks):  # pass B, left to right
        _rows_block_forward(k2, v2, y2, group, b * L, min(b * L + L, T), high, decay, grow, own, bonus,
                            load_lanes(sums_p, L + b, group), load_lanes(sums_x, L + b, group), scratch, at, chunk, eps,
                            official)
    return 0


@_fast
def rows_blocked_kernel_with(k, v, w, u, y, chunk, eps, official, r0, r1, scratch, block, lanes):
    """:func:`rows_kernel` by blocks of ``block`` tokens (a multiple of 4), for long rows: scratch
    (:func:`rows_scratch`) in L1/L2 whatever T, at the price of a second exponential per token. Pass A takes each
    block's key range and its sums in its own frame (right to left, ``len(lanes)`` rows at a time), a scan over the
    blocks puts them in the frame of the rows' largest keys and gives the carries entering each block from the
    right, pass B runs the rows kernel's sweeps block by block: k, v read twice, y written once (the token-major
    kernel's scheme, :func:`tokens_kernel`). A group of rows with one out of range is run again without it."""
    B, T = k.shape[1], k.shape[2]
    k2, v2, y2 = k.reshape(-1, T), v.reshape(-1, T), y.reshape(-1, T)
    rows, kept = np.empty(len(lanes), np.int64), np.empty(len(lanes), np.int64)
    unsafe = 0
    for g in range(r0, r1, len(lanes)):
        n = min(len(lanes), r1 - g)
        for i in range(n):
            rows[i] = g + i
        if _rows_blocked_group(k2, v2, y2, w, u, B, rows, n, chunk, eps, official, scratch, block, lanes) == 0:
            continue
        for i in range(n):  # a row out of range in the group: each row again alone (rare: no trained model has any)
            kept[0] = rows[i]
            if _rows_blocked_group(k2, v2, y2, w, u, B, kept, 1, chunk, eps, official, scratch, block, lanes) != 0:
                unsafe += 1
    return unsafe


@_fast
def rows_blocked_kernel(k, v, w, u, y, chunk, eps, official, r0, r1, block, lanes):
    """:func:`rows_blocked_kernel_with` in scratch of its own."""
    return rows_blocked_kernel_with(k, v, w, u, y, chunk, eps, official, r0, r1,
                                    rows_scratch(k.shape[2], block, lanes), block, lanes)


#: float64 [T + 1, 4] arrays of the backward's scratch
BACKWARD_SCRATCH = 7


@_fast
def rows_backward_kernel(k, v, w, u, gy, chunk, eps, official, dk, dv, dw_rows, du_rows, r0, r1, lanes):
    """Backward of :func:`rows_kernel` for rows r0..r1 (same arguments as it, gy: the gradient of y, [C, B, T]):
    writes dk, dv ([C, B, T], the dtype of k) and the per-row partials dw_rows[row], du_rows[row] (float64 [C·B],
    row = c·B + b: the caller sums them over b). Returns how many rows were out of range (left unwritten: the
    caller then takes another path). The arrays k, v, gy, dk, dv are C-contiguous.

    With X_j = e^{k_j - K} (K is a constant for the gradients: y does not depend on it), P_j = X_j v_j and α_{tj}
    the weight of token j in query t's sums, y_t = N_t / D'_t, N_t = Σ_j α_{tj} P_j, D'_t = (1 + ε) Σ_j α_{tj} X_j
    + ε X_t (paper: ε = 0). With a_t = g_t / D'_t and b_t = -a_t y_t, the transposed sums dP_j = Σ_t α_{tj} a_t,
    dX_j = Σ_t α_{tj} (1 + ε) b_t + ε b_j give dk = P dP + X dX, dv = X dP. du = e^u Σ_t (a_t P_t + (1 + ε) b_t X_t);
    dw = Σ_{t,j} ∂α_{tj}/∂w (a_t P_j + (1 + ε) b_t X_j) needs first moments Σ d e^{-d w}· over the distances d
    (M1_{t+1} = e^{-w} M1_t + M_{t+1} when M_{t+1} = e^{-w} (M_t + z_t)). Sweeps: X, P (transposed in from the
    rows); right to left the forward's right sums R and their moments R1; left to right y, a, b, the left halves of
    dP, dX, and the pairs of each query with the keys to its right (a_t R1_t); right to left the right halves of dP,
    dX, dk, dv, and transposed the pairs of each key with the queries to its right (P_j times the moments of the right
    sums of a); dk, dv transposed out. Splitting the moments between the sweeps keeps each sweep's state in registers.

    Rows run in lockstep, one per lane of f64x4 or f64x8 vectors (``lanes``: a tuple of 4 or 8 ints; a last group
    of fewer rows repeats its last row in the spare lanes): each lane's arithmetic is that of a float64 scan of its
    row, the lanes fill the SIMD width."""
    return rows_backward_kernel_with(k, v, w, u, gy, chunk, eps, official, dk, dv, dw_rows, du_rows, r0, r1,
                                     np.empty((BACKWARD_SCRATCH, k.shape[2] + 1, len(lanes))), lanes)


@_fast
def rows_backward_kernel_with(k, v, w, u, gy, chunk, eps, official, dk, dv, dw_rows, du_rows, r0, r1, scratch,
                              lanes):
    """:func:`rows_backward_kernel` in the caller's float64 scratch ``[BACKWARD_SCRATCH, T + 1, lanes]`` (allocated
    once by a thread taking many pieces, as :func:`rows_kernel_with`)."""
    B, T = k.shape[1], k.shape[2]
    k2, v2, g2, dk2, dv2 = k.reshape(-1, T), v.reshape(-1, T), gy.reshape(-1, T), dk.reshape(-1, T), dv.reshape(-1, T)
    like = k2[0, 0]  # (its type sets the exponentials' precision: exp_like)
    rows = np.empty(r1 - r0, np.int64)  # the rows in range, and their largest keys
    shift = np.empty(r1 - r0)
    n = unsafe = 0
    for row in range(r0, r1):
        in_range, hi = _row_shift(k2, w, u, B, row)
        if not in_range:
            unsafe += 1
            continue
        rows[n], shift[n] = row, hi
        n += 1
    zero = splat(0.0, lanes)
    # [T + 1, lanes] scratch, one lane per row (row T: zeros, read ahead by the left-to-right sweeps)
    x, p = scratch[0], scratch[1]
    right_p = scratch[2]  # the forward's right sums R_t, then a_t
    right_x = scratch[3]  # R'_t, then (1 + eps) b_t
    moment_p = scratch[4]  # R1_t, then the terms of dX_t known left to right, then dk
    moment_x = scratch[5]  # R1'_t
    left_p = scratch[6]  # g_t, then the terms of dP_t known left to right, then dv
    for a in (x, p, right_x, moment_p, moment_x):
        store_lanes(a, T, zero)
    whole = T // 4 * 4  # the tokens of whole blocks of four (transposed in and out as 4x4 blocks)
    for first in range(0, n, len(lanes)):
        size = min(len(lanes), n - first)
        group = pick(rows, first, size, lanes)
        wv = per_row(w, group, B)
        decay, grow, own = lanes_exp(-wv), lanes_exp(wv), lanes_expm1(wv)
        bonus = lanes_exp(per_row(u, group, B))
        hi = pick(shift, first, size, lanes)
        for t in range(0, whole, 4):
            keys, values = load_block(k2, group, t), load_block(v2, group, t)
            grads = load_block(g2, group, t)
            # (constant indices: the tuples stay in registers)
            _inputs(x, p, left_p, t, keys[0] - hi, values[0], grads[0], like)
            _inputs(x, p, left_p, t + 1, keys[1] - hi, values[1], grads[1], like)
            _inputs(x, p, left_p, t + 2, keys[2] - hi, values[2], grads[2], like)
            _inputs(x, p, left_p, t + 3, keys[3] - hi, values[3], grads[3], like)
        for t in range(whole, T):
            _inputs(x, p, left_p, t, gather(k2, group, t) - hi, gather(v2, group, t),
                    gather(g2, group, t), like)
        # The sums are updated as S = e^{-w} (S + z) where that measured faster: with a group of rows per vector the
        # sweeps are bound by throughput, not by their chains' latency, and an add and a multiply load the FP pipes less
        # than a multiply and an FMA.
        num = den = num1 = den1 = zero
        for t in range(T - 1, -1, -1):  # R_t, R1_t, then R_{t-1} = e^{-w} (R_t + P_t), R1_{t-1} = e^{-w} R1_t + R_{t-1}
            store_lanes(right_p, t, num)
            store_lanes(right_x, t, den)
            store_lanes(moment_p, t, num1)
            store_lanes(moment_x, t, den1)
            num = decay * (num + load_lanes(p, t, group))
            den = decay * (den + load_lanes(x, t, group))
            num1 = decay * num1 + num
            den1 = decay * den1 + den
        # left to right: G (the forward's left sums), A (the same of a, (1 + eps) b). The division for the next
        # token is issued one iteration ahead: the operations waiting for it would otherwise fill the scheduler.
        num = den = sa = sb = zero
        du = dw_t = zero  # Σ_t (a_t P_t + (1 + eps) b_t X_t); the dw terms
        if not official:
            # α_{tj} = e^{-(|t-j| - 1) w} (j != t), e^u (j = t): ∂α/∂w = -(d - 1) e^{-(d - 1) w} at distance d, the
            # moments of one token further (R1_{t+1} is Σ_{j>t} (j-t-1) e^{-(j-t-1) w} P_j): no cancellation
            r_next = 1.0 / (grow * load_lanes(right_x, 0, group) + bonus * load_lanes(x, 0, group))
            for t in range(T):
                xt, pt, r_t = load_lanes(x, t, group), load_lanes(p, t, group), r_next
                n_t = grow * (num + load_lanes(right_p, t, group)) + bonus * pt
                num = decay * (num + pt)
                den = decay * (den + xt)
                r_next = 1.0 / (grow * (den + load_lanes(right_x, t + 1, group)) + bonus * load_lanes(x, t + 1, group))
                a_t = load_lanes(left_p, t, group) * r_t
                b_t = (a_t * r_t) * -n_t
                dw_t -= a_t * load_lanes(moment_p, t + 1, group) + b_t * load_lanes(moment_x, t + 1, group)
                du += a_t * pt + b_t * xt
                store_lanes(left_p, t, grow * sa + bonus * a_t)
                store_lanes(moment_p, t, grow * sb + bonus * b_t)
                store_lanes(right_p, t, a_t)
                store_lanes(right_x, t, b_t)
                sa = decay * (sa + a_t)
                sb = decay * (sb + b_t)
            # right to left: A_t, A1_{t+1} (A1_t = Σ_{j>t} (j-t) e^{-(j-t) w} a_j, again one token further)
            sa = sb = sa1 = sb1 = zero
            for t in range(T - 1, -1, -1):
                xt, pt = load_lanes(x, t, group), load_lanes(p, t, group)
                dw_t -= pt * sa1 + xt * sb1
                sa1 = decay * sa1 + sa
                sb1 = decay * sb1 + sb
                dp_t = load_lanes(left_p, t, group) + grow * sa
                store_lanes(left_p, t, xt * dp_t)  # dv
                store_lanes(moment_p, t, pt * dp_t + xt * (load_lanes(moment_p, t, group) + grow * sb))  # dk
                sa = decay * (sa + load_lanes(right_p, t, group))
                sb = decay * (sb + load_lanes(right_x, t, group))
        else:
            # official: α_{tj} = e^{-|t-j| w} (j != t) + (e^w - 1) e^{-(t-j) w} [s <= j < t] (H)
            # - (e^w - 1) e^{(t-j) w} [s < j <= t] (O) + e^u [j = t], s the chunk start of t. ∂/∂w of the H, O terms:
            # e^w e^{∓(t-j) w} ∓ (t - j)(e^w - 1) e^{∓(t-j) w}, i.e. e^w (H - O) here and the moments H1, O1
            # transposed in the next sweep
            eps1 = 1.0 + eps
            x_bonus = eps1 * bonus + eps  # D'_t = (1 + eps)(G' + R' + (e^w - 1)(H' - O')) + x_bonus X_t
            b_bonus = bonus + eps / eps1  # the weight of (1 + eps) b_t in dX_t
            for s in range(0, T, chunk):
                h_num = h_den = o_num = o_den = zero  # O_s = 0: O excludes s
                r_next = 1.0 / (eps1 * (den + load_lanes(right_x, s, group)) + x_bonus * load_lanes(x, s, group))
                for t in range(s, min(s + chunk, T)):
                    xt, pt, r_t = load_lanes(x, t, group), load_lanes(p, t, group), r_next
                    hmo_num, hmo_den = h_num - o_num, h_den - o_den
                    n_t = num + load_lanes(right_p, t, group) + own * hmo_num + bonus * pt
                    o_num = grow * o_num + load_lanes(p, t + 1, group)  # O_{t+1} = e^w O_t + P_{t+1}
                    o_den = grow * o_den + load_lanes(x, t + 1, group)
                    num = decay * (num + pt)
                    den = decay * (den + xt)
                    h_num = decay * (h_num + pt)
                    h_den = decay * (h_den + xt)
                    r_next = 1.0 / (eps1 * (den + load_lanes(right_x, t + 1, group) + own * (h_den - o_den))
                                    + x_bonus * load_lanes(x, t + 1, group))
                    a_t = load_lanes(left_p, t, group) * r_t
                    b_t = (a_t * r_t) * (n_t * -eps1)  # (1 + eps) b_t
                    dw_t += (a_t * (grow * hmo_num - load_lanes(moment_p, t, group))
                             + b_t * (grow * hmo_den - load_lanes(moment_x, t, group)))
                    du += a_t * pt + b_t * xt
                    store_lanes(left_p, t, sa + bonus * a_t)
                    store_lanes(moment_p, t, sb + b_bonus * b_t)
                    store_lanes(right_p, t, a_t)
                    store_lanes(right_x, t, b_t)
                    sa = decay * (sa + a_t)
                    sb = decay * (sb + b_t)
            # right to left, transposed: a token j gets H from the later queries of its chunk, O from itself and the
            # later queries of its chunk unless j is the chunk start; the moments of these sums and of the right sums
            # (in the FMA form with e^{-w} a_t shared: this sweep is short of registers, the other form measured slower)
            sa = sb = sa1 = sb1 = zero
            for s in range((T - 1) // chunk * chunk, -1, -chunk):
                ha = hb = ha1 = hb1 = oa = ob = oa1 = ob1 = zero
                for t in range(min(s + chunk, T) - 1, s - 1, -1):
                    a_t, b_t = load_lanes(right_p, t, group), load_lanes(right_x, t, group)
                    oa1 = grow * oa1 + grow * oa  # O1_t = e^w (O1_{t+1} + O_{t+1}), then O_t = e^w O_{t+1} + a_t
                    ob1 = grow * ob1 + grow * ob
                    oa = grow * oa + a_t
                    ob = grow * ob + b_t
                    sa1 = decay * sa1 + sa
                    sb1 = decay * sb1 + sb
                    ha1 = decay * ha1 + ha
                    hb1 = decay * hb1 + hb
                    keep = 1.0 if t > s else 0.0
                    xt, pt = load_lanes(x, t, group), load_lanes(p, t, group)
                    dw_t -= pt * (sa1 + own * (ha1 + keep * oa1)) + xt * (sb1 + own * (hb1 + keep * ob1))
                    dp_t = load_lanes(left_p, t, group) + sa + own * (ha - keep * oa)
                    store_lanes(left_p, t, xt * dp_t)  # dv
                    dk_t = pt * dp_t + xt * (load_lanes(moment_p, t, group) + sb + own * (hb - keep * ob))
                    store_lanes(moment_p, t, dk_t)
                    da, db = decay * a_t, decay * b_t
                    sa = decay * sa + da
                    sb = decay * sb + db
                    ha = decay * ha + da
                    hb = decay * hb + db
        for t in range(0, whole, 4):
            _store_block_of(dv2, group, t, left_p, t)
            _store_block_of(dk2, group, t, moment_p, t)
        for t in range(whole, T):
            scatter(dv2, group, t, load_lanes(left_p, t, group))
            scatter(dk2, group, t, load_lanes(moment_p, t, group))
        du = bonus * du
        for i in range(size):
            dw_rows[rows[first + i]], du_rows[rows[first + i]] = lane(dw_t, i), lane(du, i)
    return unsafe


# ---- Token-major forward: k, v, y as C-contiguous [B, T, C]. The lanes are TOKEN_LANES (8) adjacent channels of
# one batch element, contiguous in memory at every token: one load of eight keys (values) per token and one store of
# eight outputs, no transposes, in f64x8 vectors (one AVX-512 register; two AVX2 ones: two chains per sweep). Eight
# float32 channels are half a cache line: a unit of the kernel is a line's 16 channels, its two groups in turn. The
# arithmetic of each lane is that of rows_kernel's for its (channel, batch) row.
@intrinsic
def splat8(typingctx, x):
    """The f64x8 vector of eight x."""
    if _is_number(x):
        def codegen(context, builder, sig, args):
            return _as_vector(context, builder, sig.args[0], args[0], 8)
        return f64x8(x), codegen


@intrinsic
def load8(typingctx, a, t):
    """Row t of a float64 [n, 8] array."""
    if _is_matrix(a, types.float64) and isinstance(t, types.Integer):
        def codegen(context, builder, sig, args):
            return builder.load(_pointer(context, builder, sig, args, 1, lanes=8), align=8)
        return f64x8(a, t), codegen


@intrinsic
def load_run8(typingctx, a, r, t):
    """a[r, t..t+7] (a: a float [rows, n] array) as float64."""
    if _is_matrix(a) and isinstance(r, types.Integer) and isinstance(t, types.Integer):
        def codegen(context, builder, sig, args):
            run = builder.load(_pointer(context, builder, sig, args, 1, 2, lanes=8),
                               align=sig.args[0].dtype.bitwidth // 8)
            wide = ir.VectorType(ir.DoubleType(), 8)
            return run if run.type == wide else builder.fpext(run, wide)
        return f64x8(a, r, t), codegen


@intrinsic
def store_run(typingctx, a, r, t, x):
    """a[r, t..t+lanes-1] = x (f64x4 or f64x8) rounded to a's dtype (a: a float [rows, n] array)."""
    if _is_matrix(a) and isinstance(r, types.Integer) and isinstance(t, types.Integer) and isinstance(x, _F64x4):
        def codegen(context, builder, sig, args):
            lanes = sig.args[3].lanes
            element, align = context.get_data_type(sig.args[0].dtype), sig.args[0].dtype.bitwidth // 8
            run = args[3] if element == ir.DoubleType() else builder.fptrunc(args[3], ir.VectorType(element, lanes))
            builder.store(run, _pointer(context, builder, sig, args, 1, 2, lanes=lanes), align=align)
            return context.get_dummy_value()
        return types.none(a, r, t, x), codegen


@intrinsic
def store_parts(typingctx, a, i, stride, x, part):
    """The lanes of x (f64x8) in parts of the width of ``part`` (a group: 4 or 8 lanes): part h into row
    h·stride + i of the float64 [n, width] array a (eight lanes in one row, or lanes 0..3 in row i and 4..7 in row
    stride + i)."""
    if (_is_matrix(a, types.float64) and isinstance(i, types.Integer) and isinstance(stride, types.Integer)
            and x == f64x8 and _is_group(part)):
        width = part.count

        def codegen(context, builder, sig, args):
            row = _as_index(context, builder, sig.args[1], args[1])
            step = _as_index(context, builder, sig.args[2], args[2])
            pieces = [args[3]] if width == 8 else _split(builder, args[3])
            for h, piece in enumerate(pieces):
                index = builder.add(row, builder.mul(step, ir.Constant(step.type, h)))
                pointer = _element_pointer(context, builder, sig.args[0], args[0], [index, ir.Constant(step.type, 0)])
                builder.store(piece, builder.bitcast(pointer, _vector(width).as_pointer()), align=8)
            return context.get_dummy_value()
        return types.none(a, i, stride, x, part), codegen


@_fast
def _block_summary(k2, v2, base, col, s, e, decay, keep, kept):
    """Pass A of the token-major forward for the tokens s..e of a block (rows base + s.. of k2, v2 ([B·T, C] or a
    group's [T, 8] copy), lanes = columns col..col+7), in one sweep right to left: the block's frame m (the keys of
    its last token), the lanes' largest and smallest keys, and the block's sums Σ_{s <= j < e} e^{-(j-s) w}
    e^{k_j - m} [v_j | 1]; with ``keep``, the e^{k_j - m} into the rows keep + j of kept. For a row in range
    every |k_j - m| and the decay across the block stay within MAX_ROW_RANGE: the terms fit float64 (up to e^600)
    without a sweep for the block's largest key first."""
    m = load_run8(k2, base + e - 1, col)
    like = k2[base + s, col]  # (its type sets the exponentials' precision: exp_like)
    high, low = m, m
    num = den = splat8(0.0)
    for t in range(e - 1, s - 1, -1):
        prefetch_at(k2, base + t - (e - s), col, False)  # the next block's lines (to the left)
        prefetch_at(v2, base + t - (e - s), col, False)
        key = load_run8(k2, base + t, col)
        high, low = vmax(key, high), vmin(key, low)  # (NaN keys are skipped, as by max and min: they propagate)
        xt = exp_like(key - m, like)
        if keep >= 0:
            store_lanes(kept, keep + t, xt)
        num = decay * num + xt * load_run8(v2, base + t, col)
        den = decay * den + xt
    return m, high, low, num, den


@_fast
def _block_forward(k2, v2, y2, base, col, s, e, params, halves, g, hi, carry_p, carry_x, state, chunk, eps, official,
                   x, p, right_p, right_x, keep, kept, scale, part):
    """Pass B of the token-major forward for the tokens s..e of a block, lane group g, its eight lanes in H parts of
    n = 8 / H (``part``: a group of n lanes; H = 1 with AVX-512's 32 registers, 2 with AVX2's 16, where eight lanes'
    sums of the official function would spill) (params: its rows e^{-w} at 5g and e^{-L w} at 5g + 4; halves: the
    rows e^{-w}, e^w, e^w - 1, e^u of its lanes nh..nh+n-1 at H(5g + i) + h; hi: its largest keys K): right to
    left X = e^{k - K}, P = X v and the right sums R into the [H block, n] scratch x, p, right_p, right_x (lanes
    nh..nh+n-1 of token s + i in row h·block + i), starting from R_{e-1} = (carry_p, carry_x) (the tokens after the
    block); then left to right, part by part, the left sums (the official function's H, O restarted at every kernel
    chunk, which may start or end inside the block) and y. The left sums enter and leave through the rows
    H(6g + i) + h of state. With ``keep``, X is pass A's e^{k - m} (rows keep + t of kept) times scale = e^{m - K}
    instead of a second exponential. The arithmetic of :func:`_forward_rows`, lane by lane, but for the order in
    which R is summed."""
    L = TOKEN_BLOCK
    decay = load8(params, 5 * g)
    like = k2[base + s, col]  # (its type sets the exponentials' precision: exp_like)
    num, den = carry_p, carry_x
    for t in range(e - 1, s - 1, -1):
        prefetch_at(k2, base + t + (e - s), col, False)  # the next block's lines (to the right)
        prefetch_at(v2, base + t + (e - s), col, False)
        prefetch_at(y2, base + t + (e - s), col, True)
        if keep >= 0:
            xt = load8(kept, keep + t) * scale
        else:
            xt = exp_like(load_run8(k2, base + t, col) - hi, like)
        pt = xt * load_run8(v2, base + t, col)
        i = t - s
        store_parts(x, i, L, xt, part)
        store_parts(p, i, L, pt, part)
        store_parts(right_p, i, L, num, part)
        store_parts(right_x, i, L, den, part)
        num = decay * num + decay * pt
        den = decay * den + decay * xt
    eps1 = 1.0 + eps
    n = len(part)
    H = 8 // n
    for h in range(H):
        row, q = 5 * H * g + h, 6 * H * g + h  # (the rows of the part's parameters and left sums)
        decay, grow, own, bonus = (load_lanes(halves, row, part), load_lanes(halves, row + H, part),
                                   load_lanes(halves, row + 2 * H, part), load_lanes(halves, row + 3 * H, part))
        num, den = load_lanes(state, q, part), load_lanes(state, q + H, part)
        if not official:  # G_{t+1} = e^{-w} (G_t + P_t), and y
            for t in range(s, e):
                i = h * L + t - s
                xt, pt = load_lanes(x, i, part), load_lanes(p, i, part)
                n_t = grow * (num + load_lanes(right_p, i, part)) + bonus * pt
                d_t = grow * (den + load_lanes(right_x, i, part)) + bonus * xt
                num = decay * num + decay * pt
                den = decay * den + decay * xt
                store_run(y2, base + t, col + n * h, n_t / d_t)
            store_lanes(state, q, num)
            store_lanes(state, q + H, den)
            continue
        h_num, h_den, o_num, o_den = (load_lanes(state, q + 2 * H, part), load_lanes(state, q + 3 * H, part),
                                      load_lanes(state, q + 4 * H, part), load_lanes(state, q + 5 * H, part))
        x_bonus = eps1 * bonus + eps  # (1 + eps) e^u + eps: the weight of X_t in D'_t
        t = s
        while t < e:  # the pieces of kernel chunks [c, c + chunk) in the block: H and O restart (O excludes c)
            stop = min(e, (t // chunk + 1) * chunk)
            if t % chunk == 0:
                i = h * L + t - s
                xt, pt = load_lanes(x, i, part), load_lanes(p, i, part)
                n_t = num + load_lanes(right_p, i, part) + bonus * pt
                d_t = eps1 * (den + load_lanes(right_x, i, part)) + x_bonus * xt
                store_run(y2, base + t, col + n * h, n_t / d_t)
                h_num, h_den = decay * pt, decay * xt
                o_num = o_den = splat(0.0, part)
                num = decay * num + decay * pt
                den = decay * den + decay * xt
                t += 1
            for t in range(t, stop):
                i = h * L + t - s
                xt, pt = load_lanes(x, i, part), load_lanes(p, i, part)
                o_num = grow * o_num + pt
                o_den = grow * o_den + xt
                n_t = num + load_lanes(right_p, i, part) + own * (h_num - o_num) + bonus * pt
                d_t = eps1 * (den + load_lanes(right_x, i, part) + own * (h_den - o_den)) + x_bonus * xt
                store_run(y2, base + t, col + n * h, n_t / d_t)
                num = decay * num + decay * pt
                den = decay * den + decay * xt
                h_num = decay * h_num + decay * pt
                h_den = decay * h_den + decay * xt
            t = stop
        for i, sums in enumerate((num, den, h_num, h_den, o_num, o_den)):
            store_lanes(state, q + H * i, sums)


@_fast
def tokens_kernel(k, v, w, u, y, chunk, eps, official, g0, g1, part):
    """Bi-WKV of the units g0..g1 of token-major k, v, y (C-contiguous [B, T, C]; w, u: float64 [C]): unit b·U + j
    (U = ceil(C / 16)) is the channels 16j..16j+15 of batch element b, a cache line of float32, as two lane groups of
    eight (units of a whole line: two threads never write halves of one line at the same time). A last group of a C
    not a multiple of 8 has fewer channels: they are copied into [T, 8] scratch (the last one repeated in the spare
    lanes), computed there and copied out. Returns how many (channel, batch) rows were out of range: their whole
    group is left unwritten (the caller then takes another path).

    The tokens go in blocks of TOKEN_BLOCK, both groups of the unit block by block (each line of k, v, y comes from
    memory once per pass): pass A (:func:`_block_summary`) takes each block's key range and its right sums in its own
    frame; a scan over the blocks puts them in the frame of the row's largest key K (e^{m_b - K}, m_b the block's
    frame) and sums the carries R_{e-1} entering each block from the right; pass B (:func:`_block_forward`) runs
    the sweeps of :func:`rows_kernel` block by block, in [block, 8] scratch that stays in L1/L2 (its left-to-right
    sweep in parts of ``part``'s width, 4 or 8 lanes: [2 block, 4] for parts of 4). Pass A's
    exponentials of the first TOKEN_KEEP tokens are kept for pass B. Lane by lane the same arithmetic as the rows
    but for the order of the right sums."""
    B, T, C = k.shape
    units = (C + 15) // 16
    k2, v2, y2 = k.reshape(-1, C), v.reshape(-1, C), y.reshape(-1, C)
    L = TOKEN_BLOCK
    blocks = (T + L - 1) // L
    n, H = len(part), 8 // len(part)  # lanes per part, parts per group of eight lanes
    x, p, right_p, right_x = np.empty((H * L, n)), np.empty((H * L, n)), np.empty((H * L, n)), np.empty((H * L, n))
    params, state = np.empty((10, 8)), np.empty((12 * H, n))
    halves = params.reshape(10 * H, n)  # the rows of params in parts: lanes nh..nh+n-1 of row r in row H r + h
    high, low = np.empty((2, 8)), np.empty((2, 8))
    # per (group, block): the block's frame, then e^{frame - K}; its sums, then the carries from the right
    block_frame, sum_p, sum_x = np.empty((2 * blocks, 8)), np.empty((2 * blocks, 8)), np.empty((2 * blocks, 8))
    channels, skip = np.empty((2, 8), np.int64), np.zeros(2, np.bool_)
    # pass A's exponentials of the first W tokens ([2W, 8]: L2-sized), kept for pass B (the others: computed again)
    W = min(T, TOKEN_KEEP)
    kept = np.empty((2 * W, 8))
    # [T, 8] copies of the columns of a last group (in one of the units g0..g1 if C is not a multiple of 8)
    copies = T if C % 8 != 0 and g1 > g0 and (g0 // units < (g1 - 1) // units or (g1 - 1) % units == units - 1) else 0
    tk, tv, ty = np.empty((copies, 8), k.dtype), np.empty((copies, 8), k.dtype), np.empty((copies, 8), k.dtype)
    unsafe = 0
    for unit in range(g0, g1):
        b, first = unit // units, unit % units * 16
        groups = (min(first + 16, C) - first + 7) // 8
        tail = first + 8 * groups > C  # the last group has fewer than eight channels: it runs on the copies
        for g in range(groups):
            c0 = first + 8 * g
            last = min(c0 + 7, C - 1)
            for i in range(8):
                c = min(c0 + i, last)
                channels[g, i] = c
                params[5 * g, i], params[5 * g + 1, i] = math.exp(-w[c]), math.exp(w[c])
                params[5 * g + 2, i], params[5 * g + 3, i] = math.expm1(w[c]), math.exp(u[c])
                # e^{-L w} across a whole block (at most T tokens: within e^600 for a row in range)
                params[5 * g + 4, i] = math.exp(-min(L, T) * w[c])
            store_lanes(high, g, splat8(-np.inf))
            store_lanes(low, g, splat8(np.inf))
        if tail:
            c0 = first + 8 * (groups - 1)
            for t in range(T):
                for i in range(8):
                    c = channels[groups - 1, i]
                    tk[t, i], tv[t, i] = k2[b * T + t, c], v2[b * T + t, c]
        for blk in range(blocks - 1, -1, -1):  # pass A (right to left: the kept blocks last, still in cache for B)
            s, e = blk * L, min(blk * L + L, T)
            keep = -1 if e > W else 0  # (a negative keep: computed again)
            for g in range(groups):
                on_copy = tail and g == groups - 1
                kg, vg = (tk, tv) if on_copy else (k2, v2)
                base, col = (0, 0) if on_copy else (b * T, first + 8 * g)
                m, hi, lo, num, den = _block_summary(kg, vg, base, col, s, e, load8(params, 5 * g),
                                                     keep if keep < 0 else g * W, kept)
                store_lanes(high, g, vmax(hi, load8(high, g)))
                store_lanes(low, g, vmin(lo, load8(low, g)))
                store_lanes(block_frame, g * blocks + blk, m)
                store_lanes(sum_p, g * blocks + blk, num)
                store_lanes(sum_x, g * blocks + blk, den)
        for g in range(groups):  # the range check, the carries
            bad, prev = 0, -1
            for i in range(8):
                c = channels[g, i]  # (a channel repeated in spare lanes counts once)
                if c != prev and not (high[g, i] - low[g, i] + abs(w[c]) * T + abs(u[c]) <= MAX_ROW_RANGE):
                    bad += 1
                prev = c
            unsafe += bad
            skip[g] = bad > 0
            hi, decay, decay_block = load8(high, g), load8(params, 5 * g), load8(params, 5 * g + 4)
            carry_p = carry_x = splat8(0.0)
            for blk in range(blocks - 1, -1, -1):  # T_b = e^{m_b - K} S_b + e^{-L w} T_{b+1}; R_{e_b - 1} = e^{-w} T_{b+1}
                r = g * blocks + blk
                scale = _exp4(load8(block_frame, r) - hi)
                block_p, block_x = load8(sum_p, r), load8(sum_x, r)
                store_lanes(block_frame, r, scale)  # (pass B's factor for the kept exponentials)
                store_lanes(sum_p, r, decay * carry_p)
                store_lanes(sum_x, r, decay * carry_x)
                carry_p = decay_block * carry_p + scale * block_p
                carry_x = decay_block * carry_x + scale * block_x
            for i in range(6 * H * g, 6 * H * (g + 1)):
                store_lanes(state, i, splat(0.0, part))
        for blk in range(blocks):  # pass B
            s, e = blk * L, min(blk * L + L, T)
            keep = -1 if e > W else 0
            for g in range(groups):
                if skip[g]:
                    continue
                on_copy = tail and g == groups - 1
                kg, vg, yg = (tk, tv, ty) if on_copy else (k2, v2, y2)
                base, col = (0, 0) if on_copy else (b * T, first + 8 * g)
                r = g * blocks + blk
                _block_forward(kg, vg, yg, base, col, s, e, params, halves, g, load8(high, g), load8(sum_p, r),
                               load8(sum_x, r), state, chunk, eps, official, x, p, right_p, right_x,
                               keep if keep < 0 else g * W, kept, load8(block_frame, r), part)
        if tail and not skip[groups - 1]:
            c0 = first + 8 * (groups - 1)
            for t in range(T):
                for c in range(c0, C):
                    y2[b * T + t, c] = ty[t, c - c0]
    return unsafe
