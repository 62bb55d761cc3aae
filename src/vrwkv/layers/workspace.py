"""Scratch buffers that the layers' inference temporaries share across the blocks of one forward.

Why: on the CPU, PyTorch takes every tensor from the C library's ``malloc``. glibc's serves large blocks by ``mmap``
(above an adaptive threshold) and returns the top of its heap to the kernel once enough of it is free, so the
megabyte-sized temporaries a VRWKV forward makes in each block come back, depending on the heap's history, as fresh
pages that the kernel zeroes and maps one by one (VRWKV-T at 1024 px: 10-25 K page faults per forward in a fresh
process, ~1 µs each). A buffer taken again by the same *role* in the next block is faulted in once per forward
instead of once per block (``benchmarks/NOTES.md``, session 11).

The one role the layers use, :data:`BLOCK_LARGEST`, serves temporaries whose lifetimes do not overlap: the spatial
mix's mix/WKV buffer and k, v, r products, then the channel mix's hidden activations and mix rows (and its value
and gate rows, where they fit without growing the buffer). The largest of the two sizes it: at low resolution the
FFN's hidden chunk, at high resolution the spatial mix's four ``[B, T, C]`` tensors. So the buffer alive across
blocks is never more than a block needed at once: the forward's peak memory does not grow (separate buffers per
temporary raised it by the largest of them: +4.6 MB at 224 px batch 8; the spatial products without the FFN's
value and gate rows in the buffer: +3 MB at 1024 px). Where the products cannot write into a buffer (oneDNN's, on
AMD CPUs with AVX-512) the layers take none: the spatial mix's mix buffer alone, alive through the channel mix's
smaller chunks, raised the peak by one ``[B, T, C]``.

The model opens :func:`inference_workspace` around its blocks; inside, :func:`scratch` returns a view of the role's
buffer (contents undefined; the same memory for every caller of that role), outside a fresh tensor. A role's user
must be done with the buffer before the next user of the role runs, and must not hand it to code that may keep it
(module hooks): the layers check both. The buffers are per thread (two threads running a model at once get their
own) and freed when the outermost workspace closes, so nothing stays allocated between forwards.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["BLOCK_LARGEST", "inference_workspace", "room", "scratch", "workspace_open"]

#: The role of a block's largest temporaries: the spatial mix's mix/WKV buffer and k, v, r products, the channel
#: mix's hidden activations, mix, value and gate rows (their lifetimes do not overlap; see the module's docstring).
BLOCK_LARGEST = "block.largest"

_local = threading.local()


@contextmanager
def inference_workspace() -> Iterator[None]:
    """Within: :func:`scratch` buffers are shared per role in this thread; freed when the outermost one exits.
    Nested workspaces share the outer one's buffers."""
    depth = getattr(_local, "depth", 0)
    if depth == 0:
        _local.buffers = {}
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth
        if depth == 0:
            _local.buffers = None


def workspace_open() -> bool:
    """Whether an :func:`inference_workspace` is open in this thread (:func:`scratch` shares buffers)."""
    return getattr(_local, "buffers", None) is not None


def room(role: str, like: torch.Tensor) -> int:
    """The elements of ``role``'s buffer for ``like``'s dtype and device as it is now (0 outside a workspace or
    before its first use): what a caller may take without growing it."""
    buffers = getattr(_local, "buffers", None)
    buffer = None if buffers is None else buffers.get((role, like.dtype, like.device))
    return 0 if buffer is None else buffer.numel()


def scratch(role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of ``shape`` with ``like``'s dtype and device, contents undefined: within
    :func:`inference_workspace` a view of ``role``'s buffer (grown to the largest size asked for), else a new tensor.

    Args:
        role: the buffer's name; users of one role must not need it at the same time.
        shape: the tensor's shape.
        like: the dtype and device to match.
    """
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        return like.new_empty(shape)
    numel = 1
    for n in shape:
        numel *= n
    key = (role, like.dtype, like.device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffers.pop(key, None)  # (the old one freed first: its users are done with it)
        del buffer
        buffer = buffers[key] = like.new_empty(numel)
    return buffer[:numel].view(shape)
