"""bi_wkv (the fast path) against the float64 references and the official fixtures."""
import subprocess
import sys

import pytest
import torch

from conftest import DEVICE, rel_err
from vrwkv.ops import bi_wkv, causal_wkv
from vrwkv.ops.wkv.chunked import MAX_ABS_DECAY_EXACT, block_length, chunked_bi_wkv
from vrwkv.ops.wkv.reference import naive_causal_wkv, naive_official_bi_wkv, naive_paper_bi_wkv

REFERENCES = {"paper": naive_paper_bi_wkv, "official": naive_official_bi_wkv}


def random_inputs(B, T, C, decay_scale=3.0, first_scale=3.0, k_scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, T, C, generator=g, dtype=dtype) * k_scale
    v = torch.randn(B, T, C, generator=g, dtype=dtype)
    w = torch.randn(C, generator=g, dtype=dtype) * decay_scale / T  # both signs
    u = torch.randn(C, generator=g, dtype=dtype) * first_scale / T
    return [x.to(DEVICE) for x in (k, v, w, u)]


@pytest.mark.parametrize("semantics", ["paper", "official"])
@pytest.mark.parametrize("T", [1, 2, 5, 31, 32, 33, 37, 64, 65, 100, 197])
def test_bi_wkv_matches_reference(semantics, T):
    k, v, w, u = random_inputs(2, T, 6, seed=T)
    ref = REFERENCES[semantics](k, v, w, u)
    assert rel_err(bi_wkv(k, v, w, u, semantics), ref) < 1e-12  # float64: same function
    y32 = bi_wkv(*(x.float() for x in (k, v, w, u)), semantics=semantics)
    assert y32.dtype == torch.float32
    assert rel_err(y32, ref) < 1e-5


@pytest.mark.parametrize("case", [0, 1, 2], ids=["T37", "T196", "T320"])
def test_bi_wkv_matches_official_kernel_fixture(golden, case):
    c = golden("vrwkv_t")["wkv_op_cases"][case]
    args = [c[n].to(DEVICE) for n in ("k", "v", "w_div_T", "u_div_T")]
    assert rel_err(bi_wkv(*args, semantics="official"), c["y_kernel_ts32_eps"]) < 1e-5
    assert rel_err(bi_wkv(*args, semantics="paper"), c["y_paper"]) < 1e-5
    args64 = [a.double() for a in args]
    # EPS is replicated where the kernel adds it, so float64 agrees to rounding
    assert rel_err(bi_wkv(*args64, semantics="official"), c["y_kernel_ts32_eps"]) < 1e-12
    # the 16-chunk variant of the old internimage/segmentation kernels
    assert rel_err(chunked_bi_wkv(*args64, semantics="official", chunks=16), c["y_kernel_ts16_eps"]) < 1e-12


@pytest.mark.parametrize("T", [1, 2, 3, 17, 33, 100, 197])
def test_bi_wkv_extreme_values(T):
    """|spatial_decay| and |spatial_first| up to 100 (before the division by T), k up to ±60."""
    g = torch.Generator().manual_seed(T)
    B, C = 2, 8
    k = (torch.rand(B, T, C, generator=g, dtype=torch.float64) * 2 - 1) * 60
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    decay = (torch.rand(C, generator=g, dtype=torch.float64) * 2 - 1) * 100
    first = (torch.rand(C, generator=g, dtype=torch.float64) * 2 - 1) * 100
    decay[:2] = torch.tensor([100.0, -100.0])
    first[2:4] = torch.tensor([100.0, -100.0])
    k[:, :, 4] = torch.linspace(-60, 60, T)  # a monotone ramp: the largest key sits at one end
    w, u = decay / T, first / T
    for semantics in ("paper", "official"):
        # for w > 0 the official kernel's own-chunk term can make the denominator vanish (its function is
        # ill-conditioned there, whatever the implementation), so its extremes are taken with w <= 0
        ww = w if semantics == "paper" else -w.abs()
        ref = REFERENCES[semantics](k, v, ww, u)
        y = bi_wkv(*(x.float().to(DEVICE) for x in (k, v, ww, u)), semantics=semantics)
        assert torch.isfinite(y).all()
        assert rel_err(y, ref) < 1e-4, semantics


@pytest.mark.parametrize("semantics", ["paper", "official"])
@pytest.mark.parametrize("B, T, C", [(2, 1, 3), (2, 7, 3), (1, 37, 2)])
def test_bi_wkv_gradcheck(semantics, B, T, C):
    """T = 37 has several blocks (carry matrix) and, for "official", 2-token kernel chunks (own-chunk terms)."""
    k, v, w, u = (x.requires_grad_() for x in random_inputs(B, T, C, decay_scale=2.0, first_scale=1.0, seed=T))
    # fast mode (random projections of the Jacobian) keeps the long case cheap; the short ones are checked in full
    assert torch.autograd.gradcheck(lambda *a: bi_wkv(*a, semantics=semantics), (k, v, w, u), fast_mode=T > 8)


def test_bi_wkv_gradients_finite_at_extremes():
    k, v, w, u = random_inputs(1, 50, 4, decay_scale=100.0, first_scale=100.0, k_scale=30.0, dtype=torch.float32)
    for x in (k, v, w, u):
        x.requires_grad_()
    bi_wkv(k, v, w, u, "paper").square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (k, v, w, u))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bi_wkv_half_precision_computes_in_float32(dtype):
    k, v, w, u = random_inputs(2, 50, 8, dtype=torch.float32)
    y = bi_wkv(k.to(dtype), v.to(dtype), w, u, "official")
    assert y.dtype == dtype
    ref = bi_wkv(k.to(dtype).float(), v.to(dtype).float(), w, u, "official")
    assert rel_err(y, ref) < 1e-2  # only the output rounding to half precision differs
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert torch.isfinite(bi_wkv(k, v, w, u, "paper")).all()


def test_bi_wkv_rejects_bad_input():
    k, v, w, u = random_inputs(1, 5, 4)
    with pytest.raises(ValueError, match="semantics"):
        bi_wkv(k, v, w, u, "kernel")
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        bi_wkv(k[0], v[0], w, u)
    with pytest.raises(ValueError, match=r"\[C\]"):
        bi_wkv(k, v, w[:3], u)
    with pytest.raises(TypeError, match="floating"):
        bi_wkv(k.long(), v, w, u)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_bi_wkv_out_receives_the_result(dtype):
    """out= gets y (block path in float32, chunked scans in float64, cast back for bfloat16) and is returned, on
    token-major and on transposed storage; causal_wkv takes it too."""
    k, v, w, u = random_inputs(2, 37, 6, dtype=torch.float32)
    k, v = k.to(dtype), v.to(dtype)
    expected = bi_wkv(k, v, w, u, "official")
    with torch.no_grad():
        for out in (torch.full_like(k, float("nan")), torch.full_like(k.transpose(1, 2), float("nan")).transpose(1, 2)):
            assert bi_wkv(k, v, w, u, "official", out=out) is out
            assert torch.equal(out, expected)
        out = torch.empty_like(k)
        assert causal_wkv(k, v, w, u, out=out) is out and torch.equal(out, causal_wkv(k, v, w, u))


def test_bi_wkv_rejects_a_bad_out():
    k, v, w, u = random_inputs(1, 5, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"out must be \(1, 5, 4\) torch.float32"):
        bi_wkv(k, v, w, u, out=torch.empty(1, 5, 3))
    with pytest.raises(ValueError, match="like k"):
        bi_wkv(k, v, w, u, out=torch.empty(1, 5, 4, dtype=torch.float64, device=k.device))
    with pytest.raises(ValueError, match="share memory"):
        bi_wkv(k, v, w, u, out=k)
    with pytest.raises(ValueError, match="share memory"):
        bi_wkv(k, v, w, u, out=v.view(1, 5, 4))
    with pytest.raises(RuntimeError, match="automatic differentiation"):
        bi_wkv(k.requires_grad_(), v, w, u, out=torch.empty_like(v))


def test_block_length_depends_on_T_only_and_bounds_the_decay_inside_a_block():
    for T in (1, 2, 5, 37, 196, 1000, 65536):
        L = block_length(T)
        assert 1 <= L <= T
        assert L * MAX_ABS_DECAY_EXACT / T <= 30 or L == 1  # |w| L <= 30 for |spatial_decay| <= 200
    assert block_length(196) == 28 and block_length(65536) == 2048


@pytest.mark.parametrize("T", [3, 40, 196])
def test_bi_wkv_at_the_largest_guaranteed_decay(T):
    k, v, w, u = random_inputs(2, T, 4, k_scale=20.0, seed=T)
    w = torch.tensor([1.0, -1.0, 0.5, -0.25], dtype=torch.float64) * MAX_ABS_DECAY_EXACT / T
    ref = naive_paper_bi_wkv(k, v, w, u)
    assert rel_err(bi_wkv(*(x.float() for x in (k, v, w, u)), semantics="paper"), ref) < 1e-4


@pytest.mark.slow
def test_bi_wkv_long_sequence_forward_backward_runs():
    """B=1, T=65,536, C=192 forward+backward: a T x T intermediate (17 GB in float32) could not run here.
    Run in a subprocess so its peak memory is measured alone."""
    code = """
import resource, torch
from vrwkv.ops import bi_wkv, causal_wkv
T, C = 65536, 192
k = torch.randn(1, T, C, requires_grad=True); v = torch.randn(1, T, C, requires_grad=True)
w = (torch.randn(C) * 3 / T).requires_grad_(); u = (torch.randn(C) / T).requires_grad_()
y = bi_wkv(k, v, w, u, "official")
y.square().mean().backward()
assert torch.isfinite(k.grad).all() and torch.isfinite(w.grad).all()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    peak_mb = int(out.stdout.strip().splitlines()[-1])
    assert peak_mb < 12_000, f"peak {peak_mb} MB"  # O(T·C): about 40 tensors of T·C floats, not T x T


@pytest.mark.parametrize("T", [1, 2, 33, 100])
def test_causal_wkv_matches_reference(T):
    k, v, w, u = random_inputs(2, T, 6, seed=T)
    ref = naive_causal_wkv(k, v, w, u)
    assert rel_err(causal_wkv(k, v, w, u), ref) < 1e-12
    assert rel_err(causal_wkv(*(x.float() for x in (k, v, w, u))), ref) < 1e-5
    # token 0 sees only itself, and no token sees a later one
    y = causal_wkv(k, v, w, u)
    assert rel_err(y[:, 0], v[:, 0]) < 1e-12
    if T > 1:
        assert rel_err(causal_wkv(k[:, :-1], v[:, :-1], w, u), y[:, :-1]) < 1e-12


def test_causal_wkv_gradcheck_and_extremes():
    k, v, w, u = (x.requires_grad_() for x in random_inputs(1, 9, 3, decay_scale=2.0, seed=3))
    assert torch.autograd.gradcheck(causal_wkv, (k, v, w, u))
    k, v, w, u = random_inputs(2, 40, 8, decay_scale=100.0, first_scale=100.0, k_scale=60.0, seed=4)
    y = causal_wkv(*(x.float() for x in (k, v, w, u)))
    assert torch.isfinite(y).all() and rel_err(y, naive_causal_wkv(k, v, w, u)) < 1e-4


def test_bi_wkv_out_may_be_a_disjoint_piece_of_the_inputs_buffer():
    """k, v and out as three pieces of one buffer (the layers' shared scratch): accepted where they do not overlap
    (the result equals the allocated one), rejected where out overlaps k by one element or is a strided view over v."""
    k, v, w, u = random_inputs(1, 5, 4, dtype=torch.float32)
    n = k.numel()
    buffer = torch.empty(3 * n + 1)
    kb, vb, ob = (buffer[i * n:(i + 1) * n].view(1, 5, 4) for i in range(3))
    kb.copy_(k), vb.copy_(v)
    assert bi_wkv(kb, vb, w, u, "official", out=ob) is ob
    assert torch.equal(ob, bi_wkv(k, v, w, u, "official"))
    with pytest.raises(ValueError, match="share memory"):
        bi_wkv(kb, vb, w, u, out=buffer[n - 1:2 * n - 1].view(1, 5, 4))  # its first element is k's last
    with pytest.raises(ValueError, match="share memory"):
        bi_wkv(kb, vb, w, u, out=buffer[n:3 * n].view(1, 5, 8)[..., ::2])  # spans v's elements
