"""The layers' matrix products on the CPU through oneDNN: :func:`linear` is ``F.linear`` (same float32 math), faster.

Why: PyTorch's CPU ``torch.mm`` / ``F.linear`` call the BLAS it was built with (MKL for the x86 wheels). On AMD CPUs
MKL takes a path without AVX-512: on this machine's AMD EPYC one core reached 80-95 GFLOP/s in float32 through
``torch.mm`` and 190-213 GFLOP/s through oneDNN's matmul, which PyTorch ships too (``torch.ops.mkldnn``), for every
shape of VRWKV-T (``[196 .. 16384, 192] x [192, 768]``, ``[.., 768] x [768, 192]``, ``[.., 192] x [192, 192]``) and
for a 2048³ product (``ops/linear/README.md``). The results equal ``torch.mm``'s here (both sum over the inner
dimension with FMAs), so the op only changes the speed.

When: on CPU float32 tensors (with autograd through :class:`_Linear`, whose backward products are oneDNN's too), not
under CPU autocast (its dtype policy is ``F.linear``'s), not while tracing, scripting or compiling (plain ops there),
not under a dispatch mode (``torch.utils.flop_counter.FlopCounterMode`` counts ``aten::mm``, not oneDNN's op) or a
``torch.func`` transform (no batching rule), on CPUs without AVX-512 for contiguous inputs and products of at least
:data:`SMALL_PRODUCT_FLOPS` only, and while enabled (:func:`use_onednn`; on by default where PyTorch has oneDNN;
``VRWKV_ONEDNN=0`` turns it off). Everywhere else it is ``F.linear`` itself.

In inference the product can carry its activation, as a oneDNN post-op (one pass over the output less, and no
separate operator): ``linear(..., activation="relu" | "sigmoid")``. Without oneDNN, or with autograd, it is the
plain ops in sequence.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "activate", "linear", "mm", "onednn_enabled", "onednn_linears", "use_onednn"]

_enabled: bool | None = None  # None: from the environment variable VRWKV_ONEDNN (default on)

#: On CPUs without AVX-512, products of fewer FLOPs (``2 M N K``) take ``F.linear``: there oneDNN's AVX2 kernels are
#: no faster than MKL's and its call costs ~30 µs more (``ops/linear/README.md``). So do products whose input is not
#: contiguous (a transposed view: the weight gradient ``grad^T @ x``, channel-major gates): oneDNN's op copies it
#: first, MKL reads it in place (the weight gradients of VRWKV-T's training step 2.9x / 1.8x / 1.5x faster). With
#: AVX-512, oneDNN is ~2x MKL on AMD CPUs at every size, and takes every product.
SMALL_PRODUCT_FLOPS = 2**26

#: The activations :func:`linear` can apply to its result (fused into oneDNN's product as a post-op).
ACTIVATIONS: tuple[str, ...] = ("relu", "sigmoid")

#: Fuse the activation into oneDNN's op (False: a separate op after it; for A/B measurements).
fuse_post_ops = True


def use_onednn(enabled: bool = True) -> None:
    """Route :func:`linear` through oneDNN where it applies (see the module docstring), or not (``enabled=False``:
    always ``F.linear``). Overrides the environment variable ``VRWKV_ONEDNN``."""
    global _enabled
    _enabled = bool(enabled)


@contextmanager
def onednn_linears(enabled: bool = True):
    """:func:`use_onednn` ``(enabled)`` inside a ``with`` block; the setting before it (or the environment's) after."""
    global _enabled
    was = _enabled
    use_onednn(enabled)
    try:
        yield
    finally:
        _enabled = was


def onednn_enabled() -> bool:
    """Whether :func:`linear` may use oneDNN: asked for (default yes) and PyTorch has it."""
    wanted = _enabled if _enabled is not None else os.environ.get("VRWKV_ONEDNN", "1") not in ("", "0")
    return wanted and _onednn_available()


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x [..., K]``, ``weight [N, K]`` -> ``[..., N]``; any strides. With
    ``activation`` (one of :data:`ACTIVATIONS`), ``relu`` or ``sigmoid`` of it: without autograd in the same
    oneDNN op (a post-op on the output tile while it is in cache; oneDNN's sigmoid is within 1 ulp of torch's).

    ``linear(weight, rows)`` with ``rows [M, K]`` is the channel-major product ``weight @ rows^T`` ``[N, M]``.
    Differentiable: with autograd the backward's two products run through oneDNN as well (:class:`_Linear`).
    """
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"linear: activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    if not _takes_onednn(x, weight, bias):
        return activate(F.linear(x, weight, bias), activation)
    if _records_grad(x, weight, bias):
        return activate(_Linear.apply(x, weight, bias), activation)
    if activation is not None and not fuse_post_ops:
        return activate(_onednn(x, weight, bias), activation)
    return _onednn(x, weight, bias, activation or "none")


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
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False  # (checked first: the shape tests below would be recorded as constants)
    if torch._C._len_torch_dispatch_stack() > 0:
        return False  # a dispatch mode sees aten ops only (FLOP counters, fake tensors): F.linear's aten::mm
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if x.dim() < 2 or weight.dim() != 2 or x.numel() == 0 or weight.numel() == 0:
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return False  # torch.func transforms (vmap, grad, ...): oneDNN's op has no batching rule
    if not _has_avx512() and (2 * x.numel() * weight.shape[0] < SMALL_PRODUCT_FLOPS or not x.is_contiguous()):
        return False  # (a non-contiguous x: oneDNN's op copies it, MKL reads a transposed one in place)
    return not torch.is_autocast_enabled("cpu") and onednn_enabled()


@functools.lru_cache(maxsize=None)
def _has_avx512() -> bool:
    """Whether PyTorch runs AVX-512 kernels on this CPU (its dispatch capability)."""
    return "AVX512" in torch.backends.cpu.get_cpu_capability()
