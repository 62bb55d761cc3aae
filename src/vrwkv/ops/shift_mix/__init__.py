"""Q-Shift and the fused shift-and-mix ``lerp(q_shift(x), x, mu)`` (see README.md). Public entry points:
:func:`q_shift`, :func:`q_shift_lerp` (the definition), :func:`fused_q_shift_lerp` and :func:`fused_applies` (the
numba kernel, inference on the CPU)."""
from vrwkv.ops.shift_mix.fused_cpu import fused_applies, fused_q_shift_lerp
from vrwkv.ops.shift_mix.q_shift import q_shift
from vrwkv.ops.shift_mix.reference import q_shift_lerp

__all__ = ["fused_applies", "fused_q_shift_lerp", "q_shift", "q_shift_lerp"]
