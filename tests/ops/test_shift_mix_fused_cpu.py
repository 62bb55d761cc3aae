"""The fused Q-Shift-and-mix kernel (``ops/shift_mix``) against its definition ``torch.lerp(q_shift(x), x, mu)``:
bit-identical (``torch.equal``), on one and two threads, on PyTorch's OpenMP team and on our own pool, for whole
tensors and token ranges. (The mixers and the model with it: tests/layers/test_fused_shift_mix.py.)"""
import pytest
import torch

from vrwkv.ops.shift_mix import fused_cpu, fused_q_shift_lerp, q_shift, q_shift_lerp
from vrwkv.ops.wkv.fused_cpu import numba_scans


@pytest.fixture
def numba_on():
    with numba_scans(True):
        yield


@pytest.fixture(params=["one", "team", "pool"])
def threads(request, monkeypatch):
    """One thread; two on PyTorch's OpenMP team; two on our own pool (as where no OpenMP runtime is found)."""
    monkeypatch.setattr(fused_cpu, "use_openmp_team", request.param == "team")
    monkeypatch.setattr(fused_cpu, "GRAIN_SIZE", 0)  # split even the small cases
    before = torch.get_num_threads()
    torch.set_num_threads(1 if request.param == "one" else 2)
    yield request.param
    torch.set_num_threads(before)


def _mu(C, dtype, seed):
    """Both regimes of torch's lerp (|mu| < 0.5 and not), and the exact 0, 0.5, 1, -0.5 and a value > 1."""
    mu = torch.empty(C, dtype=dtype).uniform_(-0.5, 1.5, generator=torch.Generator().manual_seed(seed))
    special = torch.tensor([0.0, 0.5, 1.0, -0.5, 1.25, -0.25, 0.4999999], dtype=dtype)
    mu[: min(C, len(special))] = special[:C]
    return mu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,H,W,C,s,gamma", [
    (1, 14, 14, 192, 1, 0.25),  # VRWKV-T's channels
    (3, 7, 5, 20, 1, 0.25),  # g = 5: quarters not multiples of the vector width, scalar tails
    (1, 7, 5, 384, 2, 0.25),
    (3, 1, 1, 20, 1, 0.25),  # no neighbour at all
    (1, 5, 7, 22, 2, 0.2),  # g = 4, 6 channels passed through
    (3, 4, 9, 33, 3, 0.125),
])
def test_bit_identical_to_lerp_of_q_shift(numba_on, threads, dtype, B, H, W, C, s, gamma):
    g = torch.Generator().manual_seed(B * 1000 + H * 100 + C)
    x = torch.randn(B, H * W, C, generator=g, dtype=dtype)
    x[0, 0, :3] = torch.tensor([-0.0, 0.0, 1e-30], dtype=dtype)  # signed zeros and tiny values
    mu = _mu(C, dtype, C)
    expected = torch.lerp(q_shift(x, (H, W), s, gamma), x, mu)
    assert torch.equal(fused_q_shift_lerp(x, (H, W), mu, s, gamma), expected)
    assert torch.equal(fused_q_shift_lerp(x, (H, W), mu.view(1, 1, C), s, gamma), expected)
    assert torch.equal(q_shift_lerp(x, (H, W), mu, s, gamma), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_ranges_equal_the_full_result(numba_on, threads, dtype):
    B, H, W, C = 2, 6, 7, 40
    x = torch.randn(B, H * W, C, dtype=dtype, generator=torch.Generator().manual_seed(1))
    mu = _mu(C, dtype, 2)
    full = fused_q_shift_lerp(x, (H, W), mu).view(B * H * W, C)
    assert torch.equal(full, torch.lerp(q_shift(x, (H, W)), x, mu).view(B * H * W, C))
    buffer = torch.full((B * H * W * C,), float("nan"), dtype=dtype)
    # boundaries inside grid rows, across the images, a single token, an empty range
    for t0, t1 in [(0, 10), (10, 45), (45, 84), (3, 4), (20, 20), (0, B * H * W)]:
        out = buffer[: (t1 - t0) * C]
        part = fused_q_shift_lerp(x, (H, W), mu, tokens=(t0, t1), out=out)
        assert part.data_ptr() == out.data_ptr() and part.shape == (t1 - t0, C)
        assert torch.equal(part, full[t0:t1])


def test_rejects_bad_inputs(numba_on):
    x = torch.randn(1, 12, 8)
    with pytest.raises(ValueError, match="grid"):
        fused_q_shift_lerp(x, (3, 3), torch.rand(8))
    with pytest.raises(ValueError, match="token rows"):
        fused_q_shift_lerp(x, (3, 4), torch.rand(8), tokens=(5, 13))
    with pytest.raises(ValueError, match="out must be"):
        fused_q_shift_lerp(x, (3, 4), torch.rand(8), out=torch.empty(12, 7))
    with pytest.raises(ValueError, match="x must be"):
        fused_q_shift_lerp(torch.randn(1, 8, 12).transpose(1, 2), (3, 4), torch.rand(8))
    with pytest.raises(ValueError, match="x must be"):
        fused_q_shift_lerp(x.half(), (3, 4), torch.rand(8).half())
    with pytest.raises(ValueError, match="mu must"):
        fused_q_shift_lerp(x, (3, 4), torch.rand(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="mu must"):
        fused_q_shift_lerp(x, (3, 4), torch.rand(7))


def test_applies_only_to_cpu_float_inference_with_numba():
    x, mu = torch.randn(1, 4, 8), torch.rand(8)
    with numba_scans(False):
        assert not fused_cpu.fused_applies(x, mu)
    with numba_scans(True):
        assert fused_cpu.fused_applies(x, mu)
        assert not fused_cpu.fused_applies(x.half(), mu.half())
        assert not fused_cpu.fused_applies(x, mu.double())
        assert not fused_cpu.fused_applies(torch.randn(1, 8, 4).transpose(1, 2), mu)
        assert not fused_cpu.fused_applies(x.requires_grad_(), mu)
        with torch.no_grad():
            assert fused_cpu.fused_applies(x, mu)


def test_the_body_comes_from_numbas_disk_cache(numba_on):
    """A second process loads the cached parallel-region body instead of compiling it."""
    import subprocess
    import sys

    code = ("from vrwkv.ops.shift_mix import "
            "fused_cpu_kernels as k\nk.body('float32'); k.body('float64')\n"
            "print(k._bodies['float32'].cache_hits, k._bodies['float64'].cache_hits)")
    fused_q_shift_lerp(torch.randn(1, 4, 8), (2, 2), torch.rand(8))  # (this process compiled or loaded them)
    fused_q_shift_lerp(torch.randn(1, 4, 8, dtype=torch.float64), (2, 2), torch.rand(8, dtype=torch.float64))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["1", "1"]
