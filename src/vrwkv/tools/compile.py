"""``torch.compile`` of a model that falls back cleanly when the inductor cannot build CPU kernels.

On CPU the inductor backend compiles C++ kernels and needs a C++ compiler (``g++`` / ``$CXX``). Without one,
``torch.compile`` fails only at the first call, deep inside inductor; :func:`compile_model` checks up front and, if
the model is on the CPU and no compiler is found, returns the model unchanged (eager) with a warning that says why.

What to expect with our models (torch 2.14, CPU): outputs match eager to ~2e-7 relative; VRWKV and VRWKV6 trace to
one graph each (the Bi-WKV block length depends on T only). The first call compiles (about a minute on 2 cores for
the tiny test models; inductor caches the result on disk). ``vrwkv bench --compile`` measures whether it helps.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

from torch import nn

__all__ = ["compile_model", "cpp_compiler"]

_logger = logging.getLogger(__name__)


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use for CPU kernels (``$CXX`` or ``g++``), or None if it finds none."""
    try:
        from torch._inductor import cpp_builder  # private, but the only place that knows inductor's search
    except ImportError:  # pragma: no cover - torch builds without inductor
        return None
    try:
        return cpp_builder.get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or anything the search raises: no usable compiler
        return None


def compile_model(model: nn.Module, backend: str = "inductor", **kwargs: Any) -> nn.Module:
    """``torch.compile(model, backend=backend, **kwargs)``, or ``model`` itself (eager) with a warning when the
    inductor would need a C++ compiler for a CPU model and none is installed.

    Args:
        model: the module to compile; its device (from its parameters) decides whether C++ kernels are needed.
        backend: torch.compile backend.
        **kwargs: other ``torch.compile`` arguments (``mode``, ``dynamic``, ``fullgraph``, ...).

    Returns:
        the compiled module (an ``OptimizedModule`` wrapping ``model``), or ``model`` unchanged.
    """
    import torch

    param = next(model.parameters(), None)
    on_cpu = param is None or param.device.type == "cpu"
    if backend == "inductor" and on_cpu and cpp_compiler() is None:
        warnings.warn(
            "torch.compile: the inductor needs a C++ compiler for CPU kernels and none was found (set CXX or install "
            "g++); running the model eagerly",
            RuntimeWarning,
            stacklevel=2,
        )
        return model
    return torch.compile(model, backend=backend, **kwargs)
