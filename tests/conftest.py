"""Shared test fixtures. The device comes from TORCH_DEVICE (default cpu), as in timm's tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
DEVICE = torch.device(os.environ.get("TORCH_DEVICE", "cpu"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|, the metric of the golden fixtures' README."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


def saved_bytes(fn, params=()):
    """Bytes autograd keeps for the backward of ``fn()``, deduplicated by storage, ``params`` (e.g. a module's
    parameters) excluded; and ``fn()``'s result."""
    seen, skip = {}, {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def perturb_(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Add ``scale`` x standard-normal noise to every parameter in place (away from special init values, e.g.
    mixes of exactly 0/1 or zero-initialised weights, that could hide a wrong formula); returns the module."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


@pytest.fixture(scope="session")
def golden():
    """Load a golden fixture file (official-model outputs) by stem, cached per session."""
    cache: dict[str, dict] = {}

    def load(name: str) -> dict:
        if name not in cache:
            cache[name] = torch.load(DATA / f"{name}.pt", weights_only=True)
        return cache[name]

    return load


@pytest.fixture
def one_thread():
    """One CPU thread for the test (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``): as fast
    at tiny sizes, and no spinning against other processes sharing the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[4, 8], ids=["rows4", "rows8"])
def row_lanes(request):
    """The fused Bi-WKV kernels with four rows per vector (AVX2) and eight (AVX-512; the token-major kernel's
    left-to-right sweep in one part of eight lanes instead of two of four): the host picks one
    (``fused_cpu.row_lanes``), both run everywhere (eight as two AVX2 registers without AVX-512). Returns the
    kernels' ``lanes`` argument."""
    from vrwkv.ops.wkv import fused_cpu

    previous, fused_cpu.rows_per_vector = fused_cpu.rows_per_vector, request.param
    yield (0,) * request.param
    fused_cpu.rows_per_vector = previous


@pytest.fixture
def fused_cpu_scan():
    """Bi-WKV on CPU tensors through the fused numba scan (``vrwkv.ops.use_numba``) for the test."""
    from vrwkv.ops.wkv.fused_cpu import numba_scans

    with numba_scans():
        yield
