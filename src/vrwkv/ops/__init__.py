"""Operators. Each op is a folder: a float64 reference, fast paths, and a README with its math.

Public entry points:
  bi_wkv(k, v, w, u, semantics="paper")      -- Vision-RWKV Bi-WKV (V1), see ops/wkv/README.md
  causal_wkv(k, v, w, u)                     -- uni-directional RWKV WKV (the paper's ablation), same folder
"""
from vrwkv.ops.wkv import bi_wkv, causal_wkv

__all__ = ["bi_wkv", "causal_wkv"]
