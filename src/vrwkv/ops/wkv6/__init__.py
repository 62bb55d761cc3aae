"""Bidirectional WKV6 (VRWKV6 attention). Public entry point: :func:`bi_wkv6`."""
from vrwkv.ops.wkv6.api import bi_wkv6

__all__ = ["bi_wkv6"]
