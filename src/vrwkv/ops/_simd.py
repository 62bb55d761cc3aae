"""Explicit SIMD for numba kernels: one 512-bit vector of float32 (``f32x16``, LLVM ``<16 x float>``) or float64
(``f64x8``, ``<8 x double>``) lanes, loaded from and stored to contiguous array memory, and PyTorch's CPU ``lerp``
on such vectors (or on scalars).

Imported only by numba kernels (importing this module loads numba). numba does not vectorise loops whose loads go
through several arrays that may alias or that select between two formulas per element; code written with these
intrinsics compiles to one vector instruction per operation. Nothing is contracted or reassociated: the arithmetic is
exactly what the intrinsics say (so kernels can be bit-identical to PyTorch's).

The vector type here is separate from :data:`vrwkv.ops.wkv.fused_cpu_kernels.f64x4` (which has arithmetic
operators with FMA contraction allowed, for the scans).

numba's disk cache tracks the source of the kernel's own file only: after editing this module, delete the cached
kernels (``__pycache__/*.nbi``, ``*.nbc`` beside them) or they keep the old code.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

#: Bytes per vector: one AVX-512 register; on AVX2 machines LLVM splits each operation into two on 256-bit halves
#: (as fast as 256-bit vectors there). The shift-and-mix took 9 % less time than with 256-bit vectors on AVX-512.
VECTOR_BYTES = 64


class SimdVector(types.Type):
    """``lanes`` values of the float type ``dtype`` in one register."""

    def __init__(self, dtype: types.Float, lanes: int):
        self.dtype, self.lanes = dtype, lanes
        super().__init__(name=f"simd<{dtype}x{lanes}>")


f32x16 = SimdVector(types.float32, VECTOR_BYTES // 4)
f64x8 = SimdVector(types.float64, VECTOR_BYTES // 8)
_VECTORS = {types.float32: f32x16, types.float64: f64x8}


@register_model(SimdVector)
class _SimdVectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), fe_type.lanes))


def _c_array(a) -> bool:
    return isinstance(a, types.Array) and a.layout == "C" and a.dtype in _VECTORS


def _element_pointer(context, builder, array_type, array_value, indices):
    """Pointer to ``a[indices]`` (no bounds or wraparound checks) as a pointer to a vector of a's dtype."""
    array = context.make_array(array_type)(context, builder, array_value)
    ptr = cgutils.get_item_pointer2(context, builder, array.data, cgutils.unpack_tuple(builder, array.shape),
                                    cgutils.unpack_tuple(builder, array.strides), array_type.layout, indices,
                                    wraparound=False, boundscheck=False)
    vector = _VECTORS[array_type.dtype]
    return builder.bitcast(ptr, context.get_value_type(vector).as_pointer())


def _indices(context, builder, sig, args, first):
    return [context.cast(builder, v, t, types.intp) for v, t in zip(args[first:], sig.args[first:])]


@intrinsic
def lanes(typingctx, a):
    """The number of lanes of a vector of ``a``'s dtype (a compile-time constant): 16 for float32, 8 for float64."""
    if _c_array(a):
        def codegen(context, builder, sig, args):
            return context.get_constant(types.intp, _VECTORS[sig.args[0].dtype].lanes)
        return types.intp(a), codegen


@intrinsic
def load(typingctx, a, i, j):
    """``a[i, j : j + lanes]`` of a C-contiguous 2-D float array as a vector (unaligned; no bounds checks)."""
    if _c_array(a) and a.ndim == 2 and isinstance(i, types.Integer) and isinstance(j, types.Integer):
        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], _indices(context, builder, sig, args, 1))
            return builder.load(ptr, align=sig.args[0].dtype.bitwidth // 8)
        return _VECTORS[a.dtype](a, i, j), codegen


@intrinsic
def store(typingctx, a, i, j, x):
    """``a[i, j : j + lanes] = x`` (a: a C-contiguous 2-D float array, x: a vector of its dtype; unaligned)."""
    if (_c_array(a) and a.ndim == 2 and isinstance(i, types.Integer) and isinstance(j, types.Integer)
            and x == _VECTORS.get(a.dtype)):
        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], _indices(context, builder, sig, args[:3], 1))
            builder.store(args[3], ptr, align=sig.args[0].dtype.bitwidth // 8)
            return context.get_dummy_value()
        return types.none(a, i, j, x), codegen


def _splat(ty, value):
    return ir.Constant(ty, [value] * ty.count) if isinstance(ty, ir.VectorType) else ir.Constant(ty, value)


def _intrinsic(builder, name: str, ty, arity: int):
    """The LLVM intrinsic ``name`` overloaded on the float or float-vector type ``ty`` (e.g. ``llvm.fma.v8f32``)."""
    element = ty.element if isinstance(ty, ir.VectorType) else ty
    suffix = {ir.FloatType(): "f32", ir.DoubleType(): "f64"}[element]
    if isinstance(ty, ir.VectorType):
        suffix = f"v{ty.count}{suffix}"
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty] * arity), f"{name}.{suffix}")


@intrinsic
def torch_lerp(typingctx, start, end, weight):
    """``torch.lerp(start, end, weight)`` as PyTorch's CPU kernel computes it (ATen ``lerp_vec``; its scalar path
    gives the same bits, compiled with FMA contraction)::

        small = |weight| < 0.5
        fma(small ? weight : weight - 1, end - start, small ? start : end)

    i.e. ``start + weight (end - start)`` for small weights and ``end - (1 - weight)(end - start)`` otherwise, with
    one rounding after the multiply-add. For three vectors of one type, or three scalars of one float type.
    """
    if start == end == weight and (isinstance(start, SimdVector) or start in _VECTORS):
        def codegen(context, builder, sig, args):
            s, e, w = args
            ty = s.type
            fabs, fma = (_intrinsic(builder, name, ty, n) for name, n in (("llvm.fabs", 1), ("llvm.fma", 3)))
            small = builder.fcmp_ordered("<", builder.call(fabs, [w]), _splat(ty, 0.5))
            coeff = builder.select(small, w, builder.fsub(w, _splat(ty, 1.0)))
            base = builder.select(small, s, e)
            return builder.call(fma, [coeff, builder.fsub(e, s), base])
        return start(start, end, weight), codegen


@intrinsic
def prefetch(typingctx, a, i, j):
    """Hint the CPU to fetch the cache line of ``a[i, j]`` (a C-contiguous 2-D float array) for reading; no bounds
    checks (a prefetch never faults)."""
    if _c_array(a) and a.ndim == 2 and isinstance(i, types.Integer) and isinstance(j, types.Integer):
        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], _indices(context, builder, sig, args, 1))
            i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                "llvm.prefetch.p0i8")
            builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])  # read, keep in all caches, data
            return context.get_dummy_value()
        return types.none(a, i, j), codegen
