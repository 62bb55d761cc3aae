"""Bi-WKV (Vision-RWKV V1 attention). Public entry point: :func:`bi_wkv`."""
from vrwkv.ops.wkv.api import bi_wkv

__all__ = ["bi_wkv"]
