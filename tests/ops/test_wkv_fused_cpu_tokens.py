"""The token-major fused CPU Bi-WKV kernel (``tokens_kernel``: lanes = eight adjacent channels of [B, T, C]) against
the float64 references and the channel-major kernel, its tail groups (C not a multiple of 8), its out-of-range
fallback, and its threads (one, two on PyTorch's OpenMP team, two on our own pool)."""
import numpy as np
import pytest
import torch

from conftest import rel_err
from vrwkv.ops import bi_wkv
from vrwkv.ops.wkv import fused_cpu
from vrwkv.ops.wkv.blocked import blocked_bi_wkv
from vrwkv.ops.wkv.fused_cpu import fused_cpu_bi_wkv, token_major_inputs
from vrwkv.ops.wkv.reference import KERNEL_CHUNKS, KERNEL_EPS
from wkv_cases import random_inputs, reference

pytestmark = pytest.mark.usefixtures("one_thread", "row_lanes")

TOL64 = {"paper": 1e-12, "official": 3e-6}  # as test_wkv_fused_cpu.py (the official EPS form: ~1e-6 relative)
TOL32 = {"paper": 1e-6, "official": 4e-6}


def fused(k, v, w, u, semantics, chunks=KERNEL_CHUNKS):
    return fused_cpu_bi_wkv(k, v, w, u, semantics, chunks, KERNEL_EPS)


def channel_major(x):
    """x [B, T, C] as a view of channel-major [C, B, T] storage."""
    return x.permute(2, 0, 1).contiguous().permute(1, 2, 0)


def inputs(B, T, C, sign, seed):
    k, v, w, u = random_inputs(B, T, C, seed=seed)
    return k, v, sign * w.abs(), u


@pytest.mark.parametrize("semantics", ["paper", "official"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("B, T, C", [(1, 1, 20), (3, 7, 22), (1, 197, 20), (3, 197, 22), (1, 7, 192), (3, 197, 192),
                                     (2, 33, 5), (1, 65, 3), (2, 9, 16)])
def test_token_major_matches_the_reference_and_the_channel_major_kernel(semantics, sign, B, T, C):
    """Token-major k, v -> the token-major kernel, y C-contiguous: within the float64 reference's tolerances, and
    lane by lane the channel-major kernel's arithmetic (float64 to rounding, float32 here identical or one ulp)."""
    k, v, w, u = inputs(B, T, C, sign, seed=B * T + C)
    assert token_major_inputs(k, v) == (T > 1)
    ref = reference(semantics, k, v, w, u)
    y64, rows64 = fused(k, v, w, u, semantics), fused(channel_major(k), channel_major(v), w, u, semantics)
    assert y64.is_contiguous() and y64.dtype == torch.float64
    assert rel_err(y64, ref) < TOL64[semantics] and rel_err(y64, rows64) < 1e-14
    k32, v32, w32, u32 = (x.float() for x in (k, v, w, u))
    y32 = fused(k32, v32, w32, u32, semantics)
    rows32 = fused(channel_major(k32), channel_major(v32), w32, u32, semantics)
    assert y32.is_contiguous() and y32.dtype == torch.float32
    assert rel_err(y32, ref) < TOL32[semantics] and rel_err(y32, rows32) < 3e-7


@pytest.mark.parametrize("semantics", ["paper", "official"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("T, chunks", [(fused_cpu.TOKEN_BLOCK - 1, 32), (fused_cpu.TOKEN_BLOCK, 32),
                                       (fused_cpu.TOKEN_BLOCK + 1, 32), (2 * fused_cpu.TOKEN_BLOCK, 2),
                                       (3 * fused_cpu.TOKEN_BLOCK + 5, 2), (3 * fused_cpu.TOKEN_BLOCK + 5, 7),
                                       (2 * fused_cpu.TOKEN_BLOCK + 1, 256)])
def test_token_blocks_match_the_reference_and_the_channel_major_kernel(semantics, sign, T, chunks):
    """The kernel's blocks of TOKEN_BLOCK tokens: T shorter than a block, one block, one more token, several blocks
    with a short last one; kernel chunks longer than a block (chunks = 2: a block inside a chunk, a chunk starting
    inside a block), as long (T = 2 blocks, chunks = 2), shorter and across block ends (chunks = 7), one token
    (chunks = 256 > T); C = 20 (a tail group): the reference's tolerances, the channel-major kernel to rounding.
    Kernel chunks of 100+ tokens (chunks = 2, official): the EPS form departs from the kernel's running max by
    ~1e-3 there (the channel-major kernel and the block path alike), and for w > 0 the own-chunk terms cancel
    (an ill-conditioned function): the block path's EPS form within 1e-11, the channel-major kernel within 1e-12."""
    k, v, w, u = inputs(2, T, 20, sign, seed=T + chunks)
    y64 = fused(k, v, w, u, semantics, chunks)
    rows64 = fused(channel_major(k), channel_major(v), w, u, semantics, chunks)
    assert y64.is_contiguous()
    if semantics == "official" and chunks == 2:
        assert rel_err(y64, blocked_bi_wkv(k, v, w, u, semantics, chunks)) < 1e-11 and rel_err(y64, rows64) < 1e-12
    else:
        assert rel_err(y64, reference(semantics, k, v, w, u, chunks=chunks)) < TOL64[semantics]
        assert rel_err(y64, rows64) < 1e-14
    k32, v32, w32, u32 = (x.float() for x in (k, v, w, u))
    y32 = fused(k32, v32, w32, u32, semantics, chunks)
    assert rel_err(y32, fused(channel_major(k32), channel_major(v32), w32, u32, semantics, chunks)) < 3e-7


@pytest.mark.parametrize("semantics", ["paper", "official"])
def test_kept_and_recomputed_exponentials_agree(semantics):
    """Past TOKEN_KEEP tokens pass B computes the exponentials again instead of reusing pass A's: both kinds of
    blocks (and the one that straddles the limit, T not a multiple of the block) agree with the channel-major
    kernel; keys spread over ±30 (block frames far from the row's largest key). Over 4,000+ tokens the float64 sums
    of both kernels are ~1e-13 from the reference (paper, measured once: 2.7e-14 and 2.8e-14 here, 7e-14 and 1e-13
    with k_scale = 3; the O(T²) reference takes ~30 s), hence 3e-13 between them."""
    T = fused_cpu.TOKEN_KEEP + fused_cpu.TOKEN_BLOCK + 37
    k, v, w, u = random_inputs(1, T, 16, k_scale=10.0, seed=3)
    y64 = fused(k, v, w, u, semantics)
    rows64 = fused(channel_major(k), channel_major(v), w, u, semantics)
    assert rel_err(y64, rows64) < 3e-13
    k32, v32, w32, u32 = (x.float() for x in (k, v, w, u))
    y32 = fused(k32, v32, w32, u32, semantics)
    assert rel_err(y32, fused(channel_major(k32), channel_major(v32), w32, u32, semantics)) < 3e-7


@pytest.mark.parametrize("official", [False, True])
def test_kernel_groups_in_any_pieces_give_the_same_result(official, row_lanes):
    """Pieces of lane groups from any group (across batch elements, with and without the tail group of C = 22) give
    the groups of one call, bit for bit; a row out of range leaves its group unwritten and is counted once."""
    from vrwkv.ops.wkv.fused_cpu_kernels import tokens_kernel

    assert (fused_cpu.TOKEN_LANES, fused_cpu.TOKEN_UNIT) == (8, 16)
    k, v, w, u = (x.float() for x in random_inputs(3, 37, 22, seed=6))  # 3 x 2 units, the last of 6 channels
    w, u = w.double(), u.double()
    k[1, 4, 9] = 700.0  # (channel 9, batch 1): unit 1·2 + 0, its group 8..15
    k[2, 5, 21] = 700.0  # (channel 21, batch 2): unit 5, the tail group (channel 21 repeats in two spare lanes)
    args = (k.numpy(), v.numpy(), w.numpy(), u.numpy())
    whole, pieces = np.full(k.shape, 7.0, np.float32), np.full(k.shape, 7.0, np.float32)
    assert tokens_kernel(*args, whole, 5, 1e-6, official, 0, 6, row_lanes) == 2
    assert sum(tokens_kernel(*args, pieces, 5, 1e-6, official, g0, g1, row_lanes)
               for g0, g1 in [(0, 1), (1, 2), (2, 4), (4, 5), (5, 6)]) == 2
    assert np.array_equal(whole, pieces)
    assert (whole[1, :, 8:16] == 7.0).all() and (whole[2, :, 16:] == 7.0).all()  # the two groups left unwritten
    assert (whole[1, :, :8] != 7.0).all() and (whole[1, :, 16:] != 7.0).all() and (whole[2, :, :16] != 7.0).all()
    pieces[:] = 7.0
    assert sum(tokens_kernel(*args, pieces, 5, 1e-6, official, g0, g1, row_lanes)
               for g0, g1 in [(0, 3), (3, 6)]) == 2
    assert np.array_equal(whole, pieces)


@pytest.mark.parametrize("semantics", ["paper", "official"])
def test_out_of_range_rows_return_none_and_bi_wkv_falls_back(fused_cpu_scan, monkeypatch, semantics):
    """A row beyond the float64 range (in a full group, in the tail group, or an infinite key): no fused result on
    one thread, two on the OpenMP team or on our pool; bi_wkv runs the block path instead."""
    k, v, w, u = (x.float() for x in random_inputs(2, 50, 22, seed=2))
    for channel in (5, 21):
        bad = k.clone()
        bad[1, 10, channel] = 650.0
        for threads, team in ((1, True), (2, True), (2, False)):
            monkeypatch.setattr(fused_cpu, "use_openmp_team", team)
            torch.set_num_threads(threads)
            assert fused(bad, v, w, u, semantics) is None
        with torch.inference_mode():
            y = bi_wkv(bad, v, w, u, semantics)
        assert y.is_contiguous() or y.permute(2, 0, 1).is_contiguous()
        assert rel_err(y, blocked_bi_wkv(bad, v, w, u, semantics)) < 1e-6
        bad[1, 10, channel] = float("inf")
        assert fused(bad, v, w, u, semantics) is None
    torch.set_num_threads(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, T, C", [(3, 97, 22), (1, 300, 192), (2, 2, 1)])
def test_threads_and_team_give_the_same_result(monkeypatch, dtype, B, T, C):
    """One thread, two on PyTorch's OpenMP team, two on our own pool: the same kernel per group, bit-identical."""
    k, v, w, u = (x.to(dtype) for x in random_inputs(B, T, C, seed=B + T + C))
    results = []
    for threads, team in ((1, True), (2, True), (2, False)):
        monkeypatch.setattr(fused_cpu, "use_openmp_team", team)
        torch.set_num_threads(threads)
        results.append(fused(k, v, w, u, "official"))
    torch.set_num_threads(1)
    assert results[0] is not None and token_major_inputs(k, v) == (C > 1)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_bi_wkv_dispatches_by_layout(fused_cpu_scan):
    """bi_wkv with the fused scans: token-major k, v without autograd -> token-major y; channel-major views, or
    autograd -> the channel-major kernels (y a view of [C, B, T] storage), as before."""
    k, v, w, u = (x.float() for x in random_inputs(2, 64, 12, seed=5))
    with torch.no_grad():
        y = bi_wkv(k, v, w, u, "official")
        rows = bi_wkv(channel_major(k), channel_major(v), w, u, "official")
    assert y.is_contiguous() and rows.permute(2, 0, 1).is_contiguous() and rel_err(y, rows) < 3e-7
    trained = bi_wkv(k.requires_grad_(), v, w, u, "official")
    assert "Fused" in type(trained.grad_fn).__name__ and trained.permute(2, 0, 1).is_contiguous()
    assert torch.equal(trained.detach(), rows)
