"""Names for our ops in torch.profiler traces (the fused kernels are not torch operators)."""
from __future__ import annotations

import contextlib

import torch


def named_range(name: str) -> contextlib.AbstractContextManager:
    """A ``torch.profiler.record_function(name)`` range while a profiler runs, else nothing: the range costs ~5 µs
    per call, and inside a graph being compiled it is left out."""
    if not torch.compiler.is_compiling() and torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()
