"""``nn.Linear`` whose products run through :func:`vrwkv.ops.linear.linear` (the faster GEMM on the CPU, float32)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

from vrwkv.ops.linear import activate, linear


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, init, state-dict names, hooks), computed by :func:`vrwkv.ops.linear.linear`:
    on the CPU in float32 oneDNN's matmul where it is the faster library (2x MKL's speed on AMD CPUs; not on Intel
    CPUs, where MKL is faster; ``ops/linear/README.md``), forward and backward, ``F.linear`` itself elsewhere.

    :func:`linear_activated` gives its output followed by an activation, fused into the product in inference.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear_activated(module: nn.Module, x: torch.Tensor, activation: str | None,
                     into: torch.Tensor | None = None) -> torch.Tensor:
    """``activation(module(x))`` for ``activation`` ``"relu"``, ``"sigmoid"`` or None: for a :class:`Linear`
    without hooks one product with the activation fused (:func:`vrwkv.ops.linear.linear`; written into ``into`` where
    that takes it), otherwise the module's call (its hooks see its own output) and the activation after it."""
    if _plain_linear(module):
        return linear(x, module.weight, module.bias, activation=activation, into=into)
    return activate(module(x), activation, in_place=False)  # (a hook may hold the module's output)


def _plain_linear(m: nn.Module) -> bool:
    """``m`` is a :class:`Linear` computing :meth:`Linear.forward` (not a subclass's) whose call runs no hooks."""
    return isinstance(m, Linear) and type(m).forward is Linear.forward and not calls_hooks(m)


def calls_hooks(m: nn.Module) -> bool:
    """Whether calling ``m`` runs hooks (the test ``nn.Module.__call__`` makes for its fast path): a hook may keep
    its output, so the output must not be written into afterwards."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or _module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)
