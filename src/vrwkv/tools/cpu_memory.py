"""Keep freed memory in the process on Linux/glibc, so that a model's temporaries reuse pages instead of faulting in
fresh ones on every forward (opt-in; affects the whole process).

glibc's malloc serves blocks above a threshold (adaptive, at most 32 MB) by ``mmap`` and unmaps them on free, and
returns the top of its heap to the kernel when more than twice that is free. A network's activations are such blocks:
VRWKV-T at 2048 px (16,384 tokens) allocates ~2.7 GB of temporaries per forward and, depending on the heap's history,
faults in between ~2,000 and ~320,000 fresh 4 KiB pages per forward (each zeroed and mapped by the kernel; unmapping
also flushes the other cores' TLBs): in the worst case measured, 2.6-3.3 s instead of 2.0 s on two cores
(``benchmarks/NOTES.md``). With freed memory kept there are none; the process's peak memory is what its peak of live
tensors needs, but it does not shrink after the peak.

The same from the shell, for any program: ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1099511627776``
(what ``vrwkv bench --malloc-keep`` sets), or a caching allocator such as jemalloc or tcmalloc via ``LD_PRELOAD``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["KEEP_FREED_MEMORY_ENV", "keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
#: Blocks below this come from the heap (larger ones, rare, are still mapped and returned on free).
MMAP_THRESHOLD = 1 << 30
#: Free memory at the top of the heap above this is returned to the kernel: in effect never (mallopt takes an int;
#: the environment variable below takes any size).
TRIM_THRESHOLD = 2**31 - 1
#: The same settings as environment variables, for a process started afterwards (``vrwkv bench --malloc-keep``).
KEEP_FREED_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory in this process: blocks below 1 GiB come from its heap and the heap is
    not trimmed. Call it once, before the work (it applies to allocations and frees made afterwards).

    Returns:
        True if applied; False where malloc is not glibc's (macOS, Windows, musl: nothing to do there with this
        function; their allocators have other settings).
    """
    if platform.system() != "Linux":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        raise RuntimeError("glibc rejected the malloc settings (mallopt returned 0)")
    return True
