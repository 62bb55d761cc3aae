"""The fused CPU kernels on PyTorch's OpenMP team (``ops/wkv/fused_cpu_team.py``) against the same kernels on one
thread and on our own thread pool: every row is computed by the same code, so results are bit-identical."""
import pytest
import torch

from vrwkv.ops import bi_wkv
from vrwkv.ops.wkv import fused_cpu
from wkv_cases import random_inputs


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_pytorchs_openmp_runtime_is_found():
    from vrwkv.ops.wkv.fused_cpu_team import openmp_runtime

    if "OpenMP" in torch.__config__.parallel_info():
        assert openmp_runtime() is not None  # Linux wheels load libgomp (torch/lib)
    assert fused_cpu._compiled_kernels().team is not None or openmp_runtime() is None


def _forward_and_backward(k, v, w, u, semantics):
    leaves = [t.clone().requires_grad_() for t in (k, v, w, u)]
    y = bi_wkv(*leaves, semantics)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
    y.backward(grad)
    return [y.detach(), *(t.grad for t in leaves)]


def _run(mode, k, v, w, u, semantics, monkeypatch):
    monkeypatch.setattr(fused_cpu, "use_openmp_team", mode == "team")
    before = torch.get_num_threads()
    torch.set_num_threads(1 if mode == "one" else 2)
    try:
        return _forward_and_backward(k, v, w, u, semantics)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("semantics", ["paper", "official"])
@pytest.mark.parametrize("B, T, C", [(3, 97, 5), (1, 300, 16), (2, 2, 1)])
def test_team_results_equal_one_thread_and_the_pool(fused_cpu_scan, monkeypatch, dtype, semantics, B, T, C):
    """... and with four or eight rows per vector (each lane does its row's arithmetic, whatever the width)."""
    k, v, w, u = (x.to(dtype) for x in random_inputs(B, T, C, seed=B * T + C))
    one = _run("one", k, v, w, u, semantics, monkeypatch)
    for lanes in (4, 8):
        monkeypatch.setattr(fused_cpu, "rows_per_vector", lanes)
        for mode in ("one", "team", "pool"):
            for a, b in zip(one, _run(mode, k, v, w, u, semantics, monkeypatch)):
                assert torch.equal(a, b)


def test_team_reports_rows_out_of_range(fused_cpu_scan, two_threads, monkeypatch):
    """A row beyond the float64 range is counted by the thread that meets it: no fused result (bi_wkv falls back)."""
    monkeypatch.setattr(fused_cpu, "use_openmp_team", True)
    k, v, w, u = (x.float() for x in random_inputs(1, 50, 40, seed=2))
    k[0, 10, 37] = 650.0  # a row near the end: taken by whichever thread gets the last piece
    assert fused_cpu.fused_cpu_bi_wkv(k, v, w, u, "official", 16, 1e-8) is None
    k[0, 10, 37] = 0.0
    assert fused_cpu.fused_cpu_bi_wkv(k, v, w, u, "official", 16, 1e-8) is not None


def test_the_bodies_come_from_numbas_disk_cache(fused_cpu_scan):
    """A second process loads every parallel-region body (kind x dtype x rows per vector: closures told apart by
    their values) from numba's disk cache instead of compiling it."""
    import subprocess
    import sys

    from vrwkv.ops.wkv import fused_cpu_team

    if fused_cpu._compiled_kernels().team is None:
        pytest.skip("no OpenMP runtime found in this PyTorch: no parallel-region bodies")
    keys = [(kind, dtype, lanes) for kind in (fused_cpu.FORWARD, fused_cpu.TOKENS, fused_cpu.BACKWARD)
            for dtype in ("float32", "float64") for lanes in (4, 8)]
    for key in keys:  # (this process compiled or loaded them)
        fused_cpu_team._body(*key)
    code = ("from vrwkv.ops.wkv import fused_cpu_team as t\n"
            f"print(*(t._body(*key).cache_hits for key in {keys!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["1"] * len(keys)
