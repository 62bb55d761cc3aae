"""bi_wkv6 (the chunked fast path) against its float64 references and the official fixtures."""
import subprocess
import sys

import pytest
import torch

from conftest import DEVICE, rel_err
from vrwkv.ops import bi_wkv6
from vrwkv.ops.wkv6.chunked import chunk_bi_wkv6
from vrwkv.ops.wkv6.reference import naive_quadratic_bi_wkv6, naive_recurrent_bi_wkv6

# Ranges of the raw decay w (per-step decay exp(-exp(w))): e^-e^4 ~ e^-55 per step ... e^-e^-10 ~ 1 - 4.5e-5.
DECAYS = {"strong": (2.0, 4.0), "weak": (-10.0, -8.0), "mixed": (-10.0, 4.0)}
SHAPES = [(1, 1, 1), (2, 5, 2), (2, 37, 1), (1, 63, 2), (2, 100, 1)]  # (B, T, H): odd T, batch > 1, 1 and 2 heads


def random_inputs(B, T, H, decay="mixed", seed=0, dtype=torch.float64, head_size=64):
    g = torch.Generator().manual_seed(seed)
    C = H * head_size
    r, k, v = (torch.randn(B, T, C, generator=g, dtype=dtype) for _ in range(3))
    lo, hi = DECAYS[decay]
    w = torch.rand(B, T, C, generator=g, dtype=dtype) * (hi - lo) + lo
    u = torch.randn(H, head_size, generator=g, dtype=dtype)
    return [x.to(DEVICE) for x in (r, k, v, w, u)]


@pytest.mark.parametrize("case", [0, 1], ids=["B1-T37-H1", "B2-T196-H2"])
def test_references_match_fixture(golden, case):
    c = golden("vrwkv6_t")["wkv6_op_cases"][case]
    args = (c["r"], c["k"], c["v"], c["w_raw"], c["u"], c["num_heads"])
    assert rel_err(naive_recurrent_bi_wkv6(*args), c["y"]) < 1e-12
    if case == 0:  # the O(T^2) form is slow at T=196
        assert rel_err(naive_quadratic_bi_wkv6(*args), c["y"]) < 1e-12


@pytest.mark.parametrize("decay", list(DECAYS))
def test_recurrent_reference_matches_closed_form(decay):
    r, k, v, w, u = random_inputs(2, 11, 2, decay, seed=1)
    closed_form = naive_quadratic_bi_wkv6(r, k, v, w, u, 2)
    assert rel_err(naive_recurrent_bi_wkv6(r, k, v, w, u.flatten(), 2), closed_form) < 1e-12


@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("B, T, H", SHAPES, ids=[f"B{B}-T{T}-H{H}" for B, T, H in SHAPES])
def test_bi_wkv6_matches_reference(B, T, H, decay):
    r, k, v, w, u = random_inputs(B, T, H, decay, seed=T)
    ref = naive_recurrent_bi_wkv6(r, k, v, w, u, H)
    assert rel_err(bi_wkv6(r, k, v, w, u, H), ref) < 1e-10
    y32 = bi_wkv6(*(x.float() for x in (r, k, v, w, u)), num_heads=H)
    assert y32.dtype == torch.float32
    assert rel_err(y32, ref) < 1e-5


@pytest.mark.parametrize("case", [0, 1], ids=["B1-T37-H1", "B2-T196-H2"])
def test_bi_wkv6_matches_official_fixture(golden, case):
    c = golden("vrwkv6_t")["wkv6_op_cases"][case]
    args = [c[n].to(DEVICE) for n in ("r", "k", "v", "w_raw", "u")]
    assert rel_err(bi_wkv6(*args, num_heads=c["num_heads"]), c["y"]) < 1e-5
    assert rel_err(bi_wkv6(*(a.double() for a in args), num_heads=c["num_heads"]), c["y"]) < 1e-12


def test_bi_wkv6_accurate_after_strong_decays():
    """Runs of w = 4 (e^-55 per step) followed by weak decays: the chunk-local log-decay sums reach ~-800, yet the
    pairs after the run have exponents near 0 and must keep float32 accuracy (differences of large partial sums
    would lose it without the hi + lo compensation)."""
    r, k, v, w, u = random_inputs(1, 64, 1, "weak", seed=5, dtype=torch.float32)
    for start in range(0, 64, 16):
        w[:, start:start + 14] = 4.0
    ref = naive_recurrent_bi_wkv6(r, k, v, w, u, 1)
    assert rel_err(bi_wkv6(r, k, v, w, u, 1), ref) < 1e-6


@pytest.mark.parametrize("chunk_size, sub_size", [(1, 4), (3, 4), (12, 3), (16, 16), (16, 4), (64, 8)],
                         ids=lambda x: str(x))
def test_chunk_and_sub_chunk_sizes_do_not_change_the_result(chunk_size, sub_size):
    r, k, v, w, u = random_inputs(2, 37, 1, seed=2)
    ref = naive_recurrent_bi_wkv6(r, k, v, w, u, 1)
    assert rel_err(chunk_bi_wkv6(r, k, v, w, u, 1, chunk_size=chunk_size, sub_size=sub_size), ref) < 1e-12


def test_bi_wkv6_gradcheck():
    """Full finite-difference check of the chunked path (generic in the head size: 2 heads of 4 channels keep it
    cheap; T=9 in chunks of 6 with sub-chunks of 2 crosses chunk and sub-chunk boundaries and pads the last chunk),
    then a fast-mode check of the public op at the real head size."""
    r, k, v, w, u = random_inputs(1, 9, 2, "mixed", seed=3, head_size=4)
    inputs = [x.clamp(max=1.0).requires_grad_() if x is w else x.requires_grad_() for x in (r, k, v, w, u)]
    assert torch.autograd.gradcheck(lambda *a: chunk_bi_wkv6(*a, 2, chunk_size=6, sub_size=2), inputs)
    r, k, v, w, u = random_inputs(1, 5, 1, "mixed", seed=3)
    inputs = [x.clamp(max=1.0).requires_grad_() if x is w else x.requires_grad_() for x in (r, k, v, w, u)]
    assert torch.autograd.gradcheck(lambda *a: bi_wkv6(*a, 1), inputs, fast_mode=True)


@pytest.mark.parametrize("decay", list(DECAYS))
def test_bi_wkv6_gradients_match_reference(decay):
    r, k, v, w, u = random_inputs(2, 37, 2, decay, seed=4)
    grads = {}
    for name, fn, dtype in (("ref", naive_recurrent_bi_wkv6, torch.float64), ("fast", bi_wkv6, torch.float32)):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (r, k, v, w, u)]
        y = fn(*leaves, 2)
        y.backward(torch.cos(torch.arange(y.numel(), device=y.device, dtype=y.dtype)).view_as(y))
        grads[name] = [x.grad for x in leaves]
    for label, g_fast, g_ref in zip("rkvwu", grads["fast"], grads["ref"]):
        assert rel_err(g_fast, g_ref) < 1e-5, label


def test_bi_wkv6_finite_beyond_the_decay_range():
    """w = +20 (decay exp(-4.9e8): an exponent a factorised form would overflow) and w = -30 (decay 1 - 1e-13)."""
    r, k, v, w, u = random_inputs(1, 40, 1, seed=6, dtype=torch.float32)
    w[:, ::2], w[:, 1::2] = 20.0, -30.0
    leaves = [x.requires_grad_() for x in (r, k, v, w, u)]
    y = bi_wkv6(*leaves, 1)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(x.grad).all() for x in leaves)
    assert rel_err(y, naive_recurrent_bi_wkv6(r, k, v, w, u, 1)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bi_wkv6_half_precision_computes_in_float32(dtype):
    r, k, v, w, u = (x.to(dtype) for x in random_inputs(2, 50, 1, seed=7, dtype=torch.float32))
    y = bi_wkv6(r, k, v, w, u, 1)
    assert y.dtype == dtype
    ref = bi_wkv6(r.float(), k.float(), v.float(), w.float(), u.float(), 1)
    assert rel_err(y, ref) < 1e-2  # only the output rounding to half precision differs
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert rel_err(bi_wkv6(r.float(), k.float(), v.float(), w.float(), u.float(), 1), ref) < 1e-6


def test_bi_wkv6_rejects_bad_input():
    r, k, v, w, u = random_inputs(1, 5, 2)
    with pytest.raises(ValueError, match="num_heads \\* 64"):
        bi_wkv6(r[..., :100], k[..., :100], v[..., :100], w[..., :100], u, 2)
    with pytest.raises(ValueError, match="num_heads \\* 64"):
        bi_wkv6(r, k, v, w, u, 3)
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        bi_wkv6(r, k[:, :4], v, w, u, 2)
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        bi_wkv6(r[0], k[0], v[0], w[0], u, 2)
    with pytest.raises(ValueError, match="u must be"):
        bi_wkv6(r, k, v, w, u[:, :32], 2)
    with pytest.raises(ValueError, match="num_heads"):
        bi_wkv6(r, k, v, w, u, 0)
    with pytest.raises(TypeError, match="floating"):
        bi_wkv6(r, k.long(), v, w, u, 2)
    assert rel_err(bi_wkv6(r, k, v, w, u.flatten(), 2), bi_wkv6(r, k, v, w, u, 2)) == 0  # u as [C] is accepted


@pytest.mark.slow
def test_bi_wkv6_long_sequence_forward_backward_runs():
    """B=1, T=16,384, C=192 (3 heads) forward+backward, in a subprocess so its peak memory is measured alone."""
    code = """
import resource, time, torch
from vrwkv.ops import bi_wkv6
T, C = 16384, 192
r, k, v = (torch.randn(1, T, C, requires_grad=True) for _ in range(3))
w = (torch.rand(1, T, C) * 14 - 10).requires_grad_(); u = torch.randn(3, 64, requires_grad=True)
start = time.perf_counter()
bi_wkv6(r, k, v, w, u, 3).square().mean().backward()
assert all(torch.isfinite(x.grad).all() for x in (r, k, v, w, u))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, time.perf_counter() - start)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peak_mb, seconds = out.stdout.split()
    assert int(peak_mb) < 8_000, f"peak {peak_mb} MB"  # linear in T; the T x T weights alone would be 3 GB
    assert float(seconds) < 60, f"{seconds} s"
