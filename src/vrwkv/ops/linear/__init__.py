"""The layers' matrix products on the CPU: :func:`linear` is ``F.linear`` (same float32 math), through oneDNN
where oneDNN is the faster library.

Why: PyTorch's CPU ``torch.mm`` / ``F.linear`` call the BLAS it was built with (MKL for the x86 wheels). On AMD CPUs
MKL takes a path without AVX-512: on an AMD EPYC (AVX-512) one core reached 80-95 GFLOP/s in float32 through
``torch.mm`` and 190-213 GFLOP/s through oneDNN's matmul, which PyTorch ships too (``torch.ops.mkldnn``), for every
shape of VRWKV-T (``[196 .. 16384, 192] x [192, 768]``, ``[.., 768] x [768, 192]``, ``[.., 192] x [192, 192]``) and
for a 2048³ product. On Intel CPUs MKL runs its own AVX-512 kernels and is the faster of the two (VRWKV-T's products
through MKL 0.85-0.96x the time of oneDNN's, ``ops/linear/README.md``). The results equal ``torch.mm``'s to float32
accuracy (both sum over the inner dimension with FMAs), so the choice only changes the speed.

When: on CPU float32 tensors (with autograd through :class:`_Linear`, whose backward products are chosen the same
way), not under CPU autocast (its dtype policy is ``F.linear``'s), not while tracing, scripting or compiling (plain
ops there), not under a dispatch mode (``torch.utils.flop_counter.FlopCounterMode`` counts ``aten::mm``, not oneDNN's
op) or a ``torch.func`` transform (no batching rule), where PyTorch has oneDNN, and by the setting
(:func:`use_onednn`, else the environment variable ``VRWKV_ONEDNN``):

- ``None`` / unset / ``auto`` (the default): where it was measured faster than MKL (:func:`onednn_is_faster`): not
  on Intel CPUs with PyTorch's MKL; with AVX-512 (AMD) every product; without AVX-512 contiguous inputs and products
  of at least :data:`SMALL_PRODUCT_FLOPS` only;
- ``True`` / ``1``: every product it can compute (for A/B measurements);
- ``False`` / ``0``: none.

Everywhere else it is ``F.linear`` itself.

In inference a oneDNN product can carry its activation as a post-op (one pass over the output less, no separate
operator): ``linear(..., activation="relu" | "sigmoid")``. Through ``F.linear``, or with autograd, it is the plain
ops in sequence (the activation in place in the product's buffer without autograd).
"""
from __future__ import annotations

import functools
import os
import platform
from contextlib import contextmanager

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "activate", "linear", "mm", "onednn_enabled", "onednn_is_faster", "onednn_linears",
           "product_takes_buffer", "use_onednn"]

_UNSET = object()
_setting: object = _UNSET  # use_onednn's argument (True, False, None: auto); unset: the environment variable

#: On CPUs without AVX-512, products of fewer FLOPs (``2 M N K``) take ``F.linear``: there oneDNN's AVX2 kernels are
#: no faster than MKL's and its call costs ~30 µs more (``ops/linear/README.md``). So do products whose input is not
#: contiguous (a transposed view: the weight gradient ``grad^T @ x``, channel-major gates): oneDNN's op copies it
#: first, MKL reads it in place (the weight gradients of VRWKV-T's training step 2.9x / 1.8x / 1.5x faster). With
#: AVX-512 on an AMD CPU, oneDNN is ~2x MKL at every size and takes every product; on Intel CPUs none.
SMALL_PRODUCT_FLOPS = 2**26

#: The activations :func:`linear` can apply to its result (fused into oneDNN's product as a post-op).
ACTIVATIONS: tuple[str, ...] = ("relu", "sigmoid")

#: Fuse the activation into oneDNN's op (False: a separate op after it; for A/B measurements).
fuse_post_ops = True


def use_onednn(enabled: bool | None = True) -> None:
    """Route :func:`linear` through oneDNN for every product it can compute (``True``), for none (``False``: always
    ``F.linear``), or where it is faster than the BLAS (``None``, the default: :func:`onednn_is_faster`). Overrides
    the environment variable ``VRWKV_ONEDNN`` (``1``, ``0``, ``auto``)."""
    global _setting
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"use_onednn: enabled must be True, False or None (auto), got {enabled!r}")
    _setting = enabled


@contextmanager
def onednn_linears(enabled: bool | None = True):
    """:func:`use_onednn` ``(enabled)`` inside a ``with`` block; the setting before it (or the environment's) after."""
    global _setting
    was = _setting
    use_onednn(enabled)
    try:
        yield
    finally:
        _setting = was


def _mode() -> bool | None:
    """The setting: True (every product), False (none), None (auto)."""
    if _setting is not _UNSET:
        return _setting  # type: ignore[return-value]
    value = os.environ.get("VRWKV_ONEDNN", "auto").strip().lower()
    if value in ("", "0", "false", "off", "no"):
        return False
    if value in ("1", "true", "on", "yes"):
        return True
    if value != "auto":
        raise ValueError(f"VRWKV_ONEDNN must be 1, 0 or auto, got {os.environ['VRWKV_ONEDNN']!r}")
    return None


def onednn_enabled() -> bool:
    """Whether :func:`linear` may use oneDNN: not switched off, and PyTorch has it. (In the default mode it still
    takes a product only where :func:`onednn_is_faster`.)"""
    return _mode() is not False and _onednn_available()


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x [..., K]``, ``weight [N, K]`` -> ``[..., N]``; any strides. With
    ``activation`` (one of :data:`ACTIVATIONS`), ``relu`` or ``sigmoid`` of it: without autograd in the same
    oneDNN op (a post-op on the output tile while it is in cache; oneDNN's sigmoid is within 1 ulp of torch's).

    ``linear(weight, rows)`` with ``rows [M, K]`` is the channel-major product ``weight @ rows^T`` ``[N, M]``.
    Differentiable: with autograd the backward's two products run through oneDNN as well (:class:`_Linear`).

    ``into``: a buffer for the result (contiguous, ``[M, N]`` for ``x [M, K]``, x's dtype and device) that the product
    is written into when it runs as ``torch.mm`` on the CPU (2-D x, no bias, no autograd or autocast: the same bits
    as ``F.linear``); oneDNN's op makes its own output. Use the returned tensor either way.
    """
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"linear: activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    if not _takes_onednn(x, weight, bias):
        if into is not None and _mm_into_applies(x, weight, bias, into):
            return activate(torch.mm(x, weight.t(), out=into), activation)
        return activate(F.linear(x, weight, bias), activation)
    if _records_grad(x, weight, bias):
        return activate(_Linear.apply(x, weight, bias), activation)
    if activation is not None and not fuse_post_ops:
        return activate(_onednn(x, weight, bias), activation)
    return _onednn(x, weight, bias, activation or "none")


def product_takes_buffer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``linear(x, weight, bias, into=buffer)`` writes its product into a fitting ``buffer`` (``[M, N]``,
    contiguous, x's dtype and device): on the CPU through ``torch.mm``, not oneDNN (see :func:`linear`)."""
    return _mm_takes(x, weight, bias) and not _takes_onednn(x, weight, bias)


def _mm_takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if bias is not None or x.dim() != 2 or x.device.type != "cpu" or _records_grad(x, weight):
        return False
    if torch.is_autocast_enabled("cpu") or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return x.dtype == weight.dtype


def _mm_into_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, into: torch.Tensor) -> bool:
    """Whether ``torch.mm(x, weight.t(), out=into)`` computes :func:`linear` (``into`` of :func:`linear`)."""
    return (_mm_takes(x, weight, bias) and into.device == x.device and into.dtype == x.dtype
            and into.is_contiguous() and into.shape == (x.shape[0], weight.shape[0]) and not _records_grad(into))


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.mm(a, b)`` for ``a [M, K]``, ``b [K, N]`` by :func:`linear` (``linear(a, b^T)``)."""
    return linear(a, b.t())


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, attr: str = "none") -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], "")


def _records_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def activate(y: torch.Tensor, activation: str | None, in_place: bool = True) -> torch.Tensor:
    """``activation(y)`` (None, or one of :data:`ACTIVATIONS`): in place in ``y``'s buffer if ``in_place`` (``y`` a
    product just made) unless autograd records or a tracer runs (a traced graph would keep the write, not the new
    value)."""
    if activation is None:
        return y
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} or None, got {activation!r}")
    if not in_place or _records_grad(y) or torch.jit.is_tracing():
        return torch.relu(y) if activation == "relu" else torch.sigmoid(y)
    return y.relu_() if activation == "relu" else y.sigmoid_()


class _Linear(torch.autograd.Function):
    """``F.linear`` with oneDNN products in the forward and the backward (``grad @ W``, ``grad^T @ x``). A backward
    that itself records a graph (``create_graph=True``) runs through :func:`linear`'s ``F.linear`` path instead."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad
        rows = grad.reshape(-1, grad.shape[-1])  # [M, N]
        d_x = linear(grad, weight.t()) if needs_x else None  # grad @ W: [..., K]
        d_w = linear(rows.t(), x.reshape(-1, x.shape[-1]).t()) if needs_w else None  # grad^T @ x: [N, K]
        d_b = rows.sum(0) if needs_b and ctx.has_bias else None
        return d_x, d_w, d_b


def _takes_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether oneDNN computes ``linear(x, weight, bias)``: CPU float32, outside the cases that need aten ops."""
    mode = _mode()
    if mode is False or (mode is None and _blas_is_intel_mkl_on_intel()):
        return False  # (first: the common answer on Intel CPUs in ~1 µs; this runs for every product of a forward)
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False  # (before the shape tests below: they would be recorded as constants)
    if torch._C._len_torch_dispatch_stack() > 0:
        return False  # a dispatch mode sees aten ops only (FLOP counters, fake tensors): F.linear's aten::mm
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if x.dim() < 2 or weight.dim() != 2 or x.numel() == 0 or weight.numel() == 0:
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return False  # torch.func transforms (vmap, grad, ...): oneDNN's op has no batching rule
    if torch.is_autocast_enabled("cpu") or not _onednn_available():
        return False
    return mode is True or onednn_is_faster(x, weight)


def onednn_is_faster(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN computes the CPU float32 product ``x @ weight^T`` faster than PyTorch's BLAS here, by the
    measurements of ``ops/linear/README.md``: on Intel CPUs MKL is faster (its AVX-512 kernels; 0.85-0.96x the time
    of VRWKV-T with oneDNN's products, inference and training); elsewhere with AVX-512 (AMD) oneDNN is ~2x MKL at
    every size; without AVX-512 it wins on contiguous inputs of large products only."""
    if _blas_is_intel_mkl_on_intel():
        return False
    if _has_avx512():
        return True
    # (a non-contiguous x: oneDNN's op copies it, MKL reads a transposed one in place)
    return 2 * x.numel() * weight.shape[0] >= SMALL_PRODUCT_FLOPS and x.is_contiguous()


@functools.lru_cache(maxsize=None)
def _has_avx512() -> bool:
    """Whether PyTorch runs AVX-512 kernels on this CPU (its dispatch capability)."""
    return "AVX512" in torch.backends.cpu.get_cpu_capability()


@functools.lru_cache(maxsize=None)
def _blas_is_intel_mkl_on_intel() -> bool:
    """Whether PyTorch's CPU products run MKL on an Intel CPU (where MKL takes its fastest kernels)."""
    return torch.backends.mkl.is_available() and _cpu_vendor() == "GenuineIntel"


@functools.lru_cache(maxsize=None)
def _cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...), or ``""`` where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:  # Linux
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    processor = platform.processor()  # Windows: "Intel64 Family 6 Model 85 Stepping 7, GenuineIntel"
    return next((v for v in ("GenuineIntel", "AuthenticAMD") if v in processor), "")
