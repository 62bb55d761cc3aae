"""Bi-WKV (Vision-RWKV V1 attention). Public entry points: :func:`bi_wkv`, and :func:`causal_wkv` for the ablation."""
from vrwkv.ops.wkv.api import bi_wkv, causal_wkv

__all__ = ["bi_wkv", "causal_wkv"]
