"""Operators. Each op is a folder: a float64 reference, fast paths, and a README with its math.

Public entry points:
  bi_wkv(k, v, w, u, semantics="paper")      -- Vision-RWKV Bi-WKV (V1), see ops/wkv/README.md
  causal_wkv(k, v, w, u)                     -- uni-directional RWKV WKV (the paper's ablation), same folder
  bi_wkv6(r, k, v, w, u, num_heads)          -- bidirectional RWKV-6 of VRWKV6, see ops/wkv6/README.md
  linear(x, weight, bias=None)               -- F.linear, on the CPU through oneDNN where it is faster (ops/linear/README.md)
  use_onednn(enabled=True)                   -- linear() through oneDNN always (True), never (False), where faster (None: default)
  use_numba(enabled=True)                    -- opt-in fused CPU scans of bi_wkv, forward and backward (numba; ops/wkv/fused_cpu.py),
                                                and the mixers' fused Q-Shift-and-mix in inference (ops/shift_mix/README.md)
"""
from vrwkv.ops.linear import linear, use_onednn
from vrwkv.ops.wkv import bi_wkv, causal_wkv
from vrwkv.ops.wkv.fused_cpu import use_numba
from vrwkv.ops.wkv6 import bi_wkv6

__all__ = ["bi_wkv", "bi_wkv6", "causal_wkv", "linear", "use_numba", "use_onednn"]
