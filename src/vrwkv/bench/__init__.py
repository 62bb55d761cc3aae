"""Benchmarks: VRWKV vs timm's ViT/DeiT (time, memory, FLOPs) and the Bi-WKV op vs its bandwidth floor.

Every measurement runs in a fresh subprocess (``python -m vrwkv.bench.measure SPEC``) so that its peak memory is its
own and one model's allocator state cannot slow another. ``vrwkv bench`` drives it; see :mod:`vrwkv.bench.runner`.
"""
