"""numba's on-disk cache of our kernels, invalidated by a change to any source file of ``vrwkv.ops``.

numba keys a cached function on its own file only (modification time and size): a function that calls kernels from
another file keeps running their old machine code after that file changes (seen here: the OpenMP team bodies of
``ops/wkv/fused_cpu_team.py`` ran the previous ``tokens_kernel`` after an edit of ``fused_cpu_kernels.py``, until
their own file changed too). :func:`key_cache_on_all_kernel_sources` puts locators in front of numba's own that
stamp our functions with every ``.py`` file under ``vrwkv/ops`` instead; other packages' functions are untouched.
Imported by the kernel modules only (they load numba anyway); numba's locator list is internal, so where it is
not found this does nothing and numba's per-file keys apply.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from numba.core import caching

_OPS = Path(__file__).resolve().parent


def tree_stamp(root: Path) -> str:
    """A digest of the paths, modification times and sizes of the ``.py`` files under ``root``."""
    entries = sorted((str(p.relative_to(root)), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*.py"))
    return hashlib.sha256(repr(entries).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _ops_stamp() -> str:  # (once per process: the sources do not change under a running program)
    return tree_stamp(_OPS)


def _inside_ops(py_file: str) -> bool:
    try:
        return Path(py_file).resolve().is_relative_to(_OPS)
    except (OSError, ValueError):
        return False


def _keyed_on_ops(base: type) -> type:
    """``base`` (a numba cache locator) for our functions only, stamped with all of ``vrwkv/ops``."""

    class Locator(base):
        def get_source_stamp(self):
            return _ops_stamp()

        @classmethod
        def from_function(cls, py_func, py_file):
            return super().from_function(py_func, py_file) if _inside_ops(py_file) else None

    Locator.__name__ = Locator.__qualname__ = f"VrwkvOps{base.__name__}"
    return Locator


def key_cache_on_all_kernel_sources() -> bool:
    """Install the locators (idempotent); call before the module's ``cache=True`` functions are decorated.
    Returns whether they are installed."""
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    classes = getattr(impl, "_locator_classes", None)
    if not isinstance(classes, list):
        return False
    for base in [c for c in classes if not c.__name__.startswith("VrwkvOps")]:
        if any(c.__name__ == f"VrwkvOps{base.__name__}" for c in classes):
            continue
        if base.__name__ in ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator"):
            classes.insert(classes.index(base), _keyed_on_ops(base))  # right before the one it refines
    return True
