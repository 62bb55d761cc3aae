"""Inputs and references shared by the Bi-WKV implementation tests (block path, fused CPU scans)."""
import torch

from vrwkv.ops.wkv.reference import KERNEL_CHUNKS, naive_official_bi_wkv, naive_paper_bi_wkv


def reference(semantics, k, v, w, u, chunks=KERNEL_CHUNKS):
    """The float64 reference of ``semantics`` (the official one: a port of the CUDA kernel with ``chunks`` lanes)."""
    if semantics == "paper":
        return naive_paper_bi_wkv(k, v, w, u)
    return naive_official_bi_wkv(k, v, w, u, chunks=chunks)


def random_inputs(B, T, C, decay=3.0, first=3.0, k_scale=3.0, seed=0):
    """float64 k, v [B, T, C] and w, u [C] (both signs, divided by T, as the model passes them)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, T, C, generator=g, dtype=torch.float64) * k_scale
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    w = torch.randn(C, generator=g, dtype=torch.float64) * decay / T
    u = torch.randn(C, generator=g, dtype=torch.float64) * first / T
    return k, v, w, u


def extreme_inputs(T, semantics):
    """|spatial_decay| = 200 (the block path's guaranteed range), keys spread over ±60 (e^120: partial sums live at
    very different scales), monotone key ramps (the largest key at either end), |u| large; float64, B = 2, C = 8."""
    g = torch.Generator().manual_seed(T)
    B, C = 2, 8
    k = (torch.rand(B, T, C, generator=g, dtype=torch.float64) * 2 - 1) * 60
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    decay = (torch.rand(C, generator=g, dtype=torch.float64) * 2 - 1) * 200
    decay[:2] = torch.tensor([200.0, -200.0])
    first = (torch.rand(C, generator=g, dtype=torch.float64) * 2 - 1) * 100
    k[:, :, 4] = torch.linspace(-60, 60, T)
    k[:, :, 5] = torch.linspace(60, -60, T)
    # for w > 0 the official function's own-chunk term can cancel its denominator (ill-conditioned, whatever the
    # implementation): its extremes are taken with w <= 0
    w = (decay if semantics == "paper" else -decay.abs()) / T
    return k, v, w, first / T
