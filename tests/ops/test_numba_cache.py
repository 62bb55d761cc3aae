"""numba's cache of our kernels is keyed on every source file of vrwkv.ops (ops/_numba_cache.py)."""
import os

from vrwkv.ops import _numba_cache


def test_the_stamp_changes_with_any_source_file_of_the_tree(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "notes.md").write_text("not a source\n")
    before = _numba_cache.tree_stamp(tmp_path)
    assert _numba_cache.tree_stamp(tmp_path) == before
    (tmp_path / "notes.md").write_text("still not a source\n")
    assert _numba_cache.tree_stamp(tmp_path) == before
    st = os.stat(tmp_path / "sub" / "b.py")
    os.utime(tmp_path / "sub" / "b.py", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # an edit: a new mtime
    assert _numba_cache.tree_stamp(tmp_path) != before


def test_our_kernels_use_the_tree_keyed_locator_and_others_do_not():
    import numba

    from vrwkv.ops.shift_mix import fused_cpu_kernels as mix_kernels
    from vrwkv.ops.wkv import fused_cpu_kernels, fused_cpu_team  # noqa: F401  (install the locators)

    for dispatcher in (fused_cpu_kernels.rows_kernel, fused_cpu_kernels.tokens_kernel):
        locator = dispatcher._cache._impl.locator
        assert type(locator).__name__.startswith("VrwkvOps")
        assert locator.get_source_stamp() == _numba_cache.tree_stamp(_numba_cache._OPS)
    assert mix_kernels is not None
    assert _numba_cache.key_cache_on_all_kernel_sources()  # idempotent: no second set of locators
    from numba.core import caching

    names = [c.__name__ for c in caching.CacheImpl._locator_classes]
    assert len(names) == len(set(names))

    def elsewhere(x):  # a function outside vrwkv/ops keeps numba's own per-file key
        return x + 1

    assert not type(numba.njit(cache=True)(elsewhere)._cache._impl.locator).__name__.startswith("VrwkvOps")
