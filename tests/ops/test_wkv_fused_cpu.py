"""The fused CPU Bi-WKV scan (``ops/wkv/fused_cpu.py``, numba) against the float64 references, and its dispatch."""
import pytest
import torch

from conftest import rel_err
from vrwkv.ops import bi_wkv
from vrwkv.ops.wkv import api
from vrwkv.ops.wkv.blocked import blocked_bi_wkv
from vrwkv.ops.wkv.fused_cpu import fused_cpu_bi_wkv, numba_scans
from vrwkv.ops.wkv.reference import KERNEL_CHUNKS, KERNEL_EPS
from wkv_cases import extreme_inputs, random_inputs, reference

pytestmark = pytest.mark.usefixtures("one_thread", "row_lanes")

# as the block path: the official kernel's EPS·e^{m_t} is taken as EPS·(den_t + e^{k_t}) (~1e-6 relative)
TOL64 = {"paper": 1e-12, "official": 3e-6}
TOL32 = {"paper": 1e-6, "official": 4e-6}


def fused(k, v, w, u, semantics, chunks=KERNEL_CHUNKS):
    return fused_cpu_bi_wkv(k, v, w, u, semantics, chunks, KERNEL_EPS)


def channel_major(x):
    """x [B, T, C] as a view of channel-major [C, B, T] storage."""
    return x.permute(2, 0, 1).contiguous().permute(1, 2, 0)


@pytest.mark.parametrize("layout", ["token_major", "channel_major"])
@pytest.mark.parametrize("semantics", ["paper", "official"])
@pytest.mark.parametrize("T", [2, 3, 5, 32, 33, 65, 197, 300])
def test_fused_matches_reference(semantics, T, layout):
    """Both kernels (token-major inputs: the token-major one, y token-major; channel-major views: the rows of their
    storage, y a view of [C, B, T] storage)."""
    k, v, w, u = random_inputs(2, T, 5, seed=T)
    ref = reference(semantics, k, v, w, u)
    if layout == "channel_major":
        k, v = channel_major(k), channel_major(v)
    y64 = fused(k, v, w, u, semantics)
    assert y64.dtype == torch.float64 and y64.shape == k.shape
    assert rel_err(y64, ref) < TOL64[semantics]
    y32 = fused(*(x.float() for x in (k, v, w, u)), semantics=semantics)
    assert y32.dtype == torch.float32 and y32.shape == k.shape
    assert (y32.is_contiguous() if layout == "token_major" else y32.permute(2, 0, 1).is_contiguous())
    assert rel_err(y32, ref) < TOL32[semantics]


@pytest.mark.parametrize("layout", ["token_major", "channel_major"])
@pytest.mark.parametrize("semantics", ["paper", "official"])
@pytest.mark.parametrize("T", [300, 4100])
def test_float32_inputs_keep_float32_precision(semantics, T, layout):
    """float32 inputs take a shorter exponential (degree 7, ~5e-9 relative): y stays within float32 rounding of the
    same kernels' float64 result for the same inputs (2e-7 of the largest |y|; the float64 exponential's polynomial
    cut at degree 5 would be ~2e-6 off). T = 4,100: beyond the token-major kernel's kept exponentials."""
    k, v, w, u = (x.float() for x in random_inputs(1, T, 16, seed=T))
    if layout == "channel_major":
        k, v = channel_major(k), channel_major(v)
    y32 = fused(k, v, w, u, semantics)
    y64 = fused(*(x.double() for x in (k, v, w, u)), semantics=semantics)
    assert y32.dtype == torch.float32 and rel_err(y32, y64) < 2e-7


@pytest.mark.parametrize("layout", ["token_major", "channel_major"])
def test_fused_writes_out_in_place(layout):
    """bi_wkv(out=) with the fused scans on: the kernel writes into out (its storage, no copy afterwards) when out has
    the kernel's own output layout (C-contiguous for token-major inputs, a view of [C, B, T] storage for channel-major
    ones); another layout of out gets a copy; the values are those without out."""
    k, v, w, u = (x.float() for x in random_inputs(2, 70, 24, seed=3))
    if layout == "channel_major":
        k, v = channel_major(k), channel_major(v)
    with numba_scans():
        expected = bi_wkv(k, v, w, u, "official")
        token_major_out, channel_major_out = torch.empty(k.shape), channel_major(torch.empty(k.shape))
        own, other = ((token_major_out, channel_major_out) if layout == "token_major"
                      else (channel_major_out, token_major_out))
        for out in (own, other):
            storage = out.data_ptr()
            with torch.no_grad():
                assert bi_wkv(k, v, w, u, "official", out=out) is out
            assert out.data_ptr() == storage and torch.equal(out, expected)
        with torch.no_grad():  # the kernel itself returns own (written in place) and leaves the other layout alone
            assert fused_cpu_bi_wkv(k, v, w, u, "official", KERNEL_CHUNKS, KERNEL_EPS, out=own) is own
            assert fused_cpu_bi_wkv(k, v, w, u, "official", KERNEL_CHUNKS, KERNEL_EPS, out=other) is not other


@pytest.mark.parametrize("T, chunks", [(1100, 32), (40, 2), (23, 3)])
def test_fused_kernel_chunks_of_many_tokens(T, chunks):
    k, v, w, u = random_inputs(1, T, 4, seed=T)
    assert rel_err(fused(k, v, w, u, "official", chunks), reference("official", k, v, w, u, chunks)) < 3e-6


@pytest.mark.parametrize("semantics", ["paper", "official"])
@pytest.mark.parametrize("T", [20, 197])
def test_fused_extremes(semantics, T):
    """The extremes of the block path's range (``wkv_cases.extreme_inputs``)."""
    k, v, w, u = extreme_inputs(T, semantics)
    y = fused(*(x.float() for x in (k, v, w, u)), semantics=semantics)
    assert torch.isfinite(y).all()
    assert rel_err(y, reference(semantics, k, v, w, u)) < 1e-5


def test_rows_beyond_the_float64_range_are_reported_and_bi_wkv_falls_back(fused_cpu_scan):
    """A row whose key range + |w|·T exceeds e^{±600} gets no fused result; bi_wkv then runs the block path."""
    k, v, w, u = (x.float() for x in random_inputs(1, 50, 4, seed=2))
    k[0, 10, 1] = 650.0  # one huge key: its token dominates every weighted average it reaches
    assert fused(k, v, w, u, "official") is None
    with torch.inference_mode():
        y = bi_wkv(k, v, w, u, "official")
    assert rel_err(y, blocked_bi_wkv(k, v, w, u, "official")) < 1e-6
    assert rel_err(y, reference("official", k.double(), v.double(), w.double(), u.double())) < 4e-6
    k[0, 10, 1] = float("inf")
    assert fused(k, v, w, u, "official") is None
    k[0, 10, 1] = float("nan")  # propagates to the outputs of its channel, as in the block path; the others stay exact
    y = fused(k, v, w, u, "official")
    assert torch.equal(y.isnan(), blocked_bi_wkv(k, v, w, u, "official").isnan()) and y[..., 1].isnan().all()
    assert rel_err(y[..., [0, 2, 3]], blocked_bi_wkv(k, v, w, u, "official")[..., [0, 2, 3]]) < 1e-6


def test_rows_split_over_threads_give_the_same_result():
    k, v, w, u = (x.float() for x in random_inputs(3, 77, 40, seed=4))  # 120 rows: pieces of 7 on two threads
    one = fused(k, v, w, u, "official")
    torch.set_num_threads(2)
    assert torch.equal(fused(k, v, w, u, "official"), one)



@pytest.mark.parametrize("official", [False, True])
def test_kernel_rows_in_any_pieces_give_the_same_result(official, row_lanes):
    """The forward kernel runs four or eight rows in lockstep: pieces of any length from any row (groups of fewer rows, a row
    out of range inside a group) give the rows of one call, bit for bit, and count the out-of-range rows."""
    import numpy as np
    from vrwkv.ops.wkv.fused_cpu_kernels import rows_kernel

    k, v, w, u = random_inputs(3, 37, 5, seed=6)  # 15 rows, T odd
    k[1, 4, 2] = 700.0  # row c·B + b = 2·3 + 1 = 7 out of range
    kc, vc = (x.permute(2, 0, 1).contiguous().numpy() for x in (k, v))
    args = (kc, vc, w.numpy(), u.numpy())
    whole, pieces = np.full_like(kc, 7.0), np.full_like(kc, 7.0)
    assert rows_kernel(*args, whole, 5, 1e-6, official, 0, 15, row_lanes) == 1
    assert sum(rows_kernel(*args, pieces, 5, 1e-6, official, r0, r1, row_lanes)
               for r0, r1 in [(0, 1), (1, 4), (4, 9), (9, 10), (10, 15)]) == 1
    assert np.array_equal(whole, pieces) and (whole[2, 1] == 7.0).all()  # the out-of-range row left unwritten

def test_rows_per_vector_and_pieces(monkeypatch):
    """Four or eight rows per vector, nothing else; threads take whole groups of rows."""
    from vrwkv.ops.wkv import fused_cpu

    monkeypatch.setattr(fused_cpu, "rows_per_vector", None)
    assert fused_cpu.row_lanes() in (4, 8)
    assert fused_cpu.row_lanes(fused_cpu.TOKENS) in (4, 8)
    # the host rule as measured: rows eight on AMD cores with AVX-512, four on Intel ones and on AVX2; the
    # token-major sweep eight wherever there is AVX-512
    assert fused_cpu.lanes_for("znver5", True) == 8
    assert [fused_cpu.lanes_for(*host) for host in [("znver5", False), ("znver3", False), ("sapphirerapids", True),
                                                    ("rocketlake", True), ("haswell", False), ("generic", True)]] == [4] * 6
    assert [fused_cpu.lanes_for(name, avx512, token_major=True) for name, avx512 in
            [("znver5", True), ("sapphirerapids", True), ("generic", True), ("znver3", False), ("haswell", False)]] \
        == [8, 8, 8, 4, 4]
    monkeypatch.setattr(fused_cpu, "rows_per_vector", 6)
    with pytest.raises(ValueError, match="rows_per_vector must be 4 or 8"):
        fused_cpu.row_lanes()
    assert [fused_cpu.piece_size(rows, 2, 8) for rows in (1, 120, 192, 1000)] == [8, 8, 16, 64]
    assert [fused_cpu.piece_size(rows, 2, 1) for rows in (1, 120, 192)] == [1, 7, 12]


def blocked_rows(k, v, w, u, semantics, chunks, block):
    """y [B, T, C] of rows_blocked_kernel on the rows of channel-major copies of k, v, by blocks of ``block``."""
    import numpy as np
    from vrwkv.ops.wkv.fused_cpu import row_lanes
    from vrwkv.ops.wkv.fused_cpu_kernels import rows_blocked_kernel

    kc, vc = (x.permute(2, 0, 1).contiguous().numpy() for x in (k, v))
    y = np.full_like(kc, 7.0)
    official = semantics == "official"
    chunk = -(-k.shape[1] // chunks) if official else k.shape[1]
    assert rows_blocked_kernel(kc, vc, w.double().numpy(), u.double().numpy(), y, chunk, KERNEL_EPS if official
                               else 0.0, official, 0, kc.shape[0] * kc.shape[1], block, (0,) * row_lanes()) == 0
    return torch.from_numpy(y).permute(1, 2, 0)


@pytest.mark.parametrize("semantics", ["paper", "official"])
@pytest.mark.parametrize("T, chunks, block", [(1, 32, 8), (7, 3, 4), (8, 32, 8), (9, 32, 8), (37, 5, 8), (203, 32, 8),
                                              (203, 7, 12), (40, 2, 8), (300, 32, 64), (129, 32, 128)])
def test_blocked_rows_match_reference(semantics, T, chunks, block):
    """The channel-major forward by blocks (long rows): T shorter than a block, whole blocks, a last block with a
    tail of fewer than four tokens, kernel chunks that start and end inside blocks; float64 and float32 inputs,
    C = 5 (a last group of one row)."""
    k, v, w, u = random_inputs(2, T, 5, seed=T + block)
    ref = reference(semantics, k, v, w, u, chunks)
    assert rel_err(blocked_rows(k, v, w, u, semantics, chunks, block), ref) < TOL64[semantics]
    y32 = blocked_rows(*(x.float() for x in (k, v, w, u)), semantics=semantics, chunks=chunks, block=block)
    assert y32.dtype == torch.float32 and rel_err(y32, ref) < TOL32[semantics]


def test_blocked_rows_extremes():
    """The block path's extreme inputs (largest key ranges and decays it takes) by blocks of 8."""
    for semantics in ("paper", "official"):
        k, v, w, u = extreme_inputs(197, semantics)
        y = blocked_rows(*(x.float() for x in (k, v, w, u)), semantics=semantics, chunks=KERNEL_CHUNKS, block=8)
        assert torch.isfinite(y).all() and rel_err(y, reference(semantics, k, v, w, u)) < 1e-5


@pytest.mark.parametrize("official", [False, True])
def test_blocked_rows_in_any_pieces_report_rows_out_of_range(official, row_lanes):
    """As the whole-row kernel: pieces of any length give the rows of one call bit for bit, rows out of range are
    counted and left unwritten, the rows grouped with them are written; a NaN key gives NaN in its row only."""
    import numpy as np
    from vrwkv.ops.wkv.fused_cpu_kernels import rows_blocked_kernel, rows_kernel

    k, v, w, u = random_inputs(3, 37, 5, seed=6)  # 15 rows, T odd
    k[1, 4, 2] = 700.0  # row c·B + b = 2·3 + 1 = 7 out of range
    k[0, 30, 3] = float("inf")  # row 9
    k[2, 36, 4] = float("nan")  # row 14: the frame of its last block
    kc, vc = (x.permute(2, 0, 1).contiguous().numpy() for x in (k, v))
    args = (kc, vc, w.numpy(), u.numpy())
    whole, pieces, rows = (np.full_like(kc, 7.0) for _ in range(3))
    assert rows_blocked_kernel(*args, whole, 5, 1e-6, official, 0, 15, 8, row_lanes) == 2
    assert sum(rows_blocked_kernel(*args, pieces, 5, 1e-6, official, r0, r1, 8, row_lanes)
               for r0, r1 in [(0, 1), (1, 4), (4, 9), (9, 10), (10, 15)]) == 2
    assert rows_kernel(*args, rows, 5, 1e-6, official, 0, 15, row_lanes) == 2
    assert np.array_equal(whole, pieces, equal_nan=True)
    flat = whole.reshape(15, 37)
    assert (flat[[7, 9]] == 7.0).all() and np.isnan(flat[14]).all() and np.isfinite(np.delete(flat, [7, 9, 14], 0)).all()
    assert np.abs(np.delete(flat - rows.reshape(15, 37), [7, 9, 14], 0)).max() < 1e-13


def test_long_rows_take_the_blocked_kernel(row_lanes):
    """Rows of ROWS_BLOCKED_FROM tokens: rows_kernel runs them by blocks of ROW_BLOCK (bit for bit the blocked
    kernel), within float32 rounding of the exact float64 scan (bi_wkv of float64 inputs, the numba scans off)."""
    import numpy as np
    from vrwkv.ops.wkv import fused_cpu
    from vrwkv.ops.wkv.fused_cpu_kernels import rows_kernel

    T = fused_cpu.ROWS_BLOCKED_FROM
    k, v, w, u = random_inputs(1, T, 3, seed=1, decay=8.0)
    with torch.no_grad():
        exact = bi_wkv(k, v, w, u, "official")
    k32, v32 = channel_major(k.float()), channel_major(v.float())
    y = fused(k32, v32, w.float(), u.float(), "official")
    assert rel_err(y, exact) < TOL32["official"]
    kc, vc = (x.permute(2, 0, 1).contiguous().numpy() for x in (k32, v32))
    whole = np.empty_like(kc)
    assert rows_kernel(kc, vc, w.numpy(), u.numpy(), whole, -(-T // KERNEL_CHUNKS), KERNEL_EPS, True, 0, 3, row_lanes) == 0
    assert torch.equal(torch.from_numpy(whole).permute(1, 2, 0),
                       blocked_rows(k32, v32, w, u, "official", KERNEL_CHUNKS, fused_cpu.ROW_BLOCK))


def test_dispatch(fused_cpu_scan):
    """With the fused scan on: CPU float32 in the block path's range -> the fused scans (the same numbers as calling
    them; gradients through their backward); float64 or a single token -> the other paths."""
    k, v, w, u = (x.float() for x in random_inputs(2, 64, 6, seed=5))
    assert api.fused_cpu_applies(k)
    with torch.no_grad():
        assert torch.equal(bi_wkv(k, v, w, u, "official"), fused(k, v, w, u, "official"))
    y = bi_wkv(k.requires_grad_(), v, w, u, "official")
    assert y.grad_fn is not None and "Fused" in type(y.grad_fn).__name__
    assert not api.fused_cpu_applies(k[:, :1].detach())
    assert not api._blocked_applies(k.double(), w.double(), u.double(), "official")  # float64: the chunked scan


def test_off_by_default(monkeypatch):
    from vrwkv.ops import use_numba
    from vrwkv.ops.wkv import fused_cpu

    monkeypatch.setattr(fused_cpu, "_enabled", None)
    monkeypatch.delenv("VRWKV_NUMBA", raising=False)
    k, v, w, u = (x.float() for x in random_inputs(1, 16, 4))
    assert not api.fused_cpu_applies(k)
    monkeypatch.setenv("VRWKV_NUMBA", "1")
    assert api.fused_cpu_applies(k)
    use_numba(False)  # the call wins over the environment
    assert not api.fused_cpu_applies(k)


def grad_err(g, ref) -> float:
    """max|g - ref| / max(max|ref|, 1): relative, but absolute for gradients far below the O(1) scale of the inputs
    (e.g. w's gradient at T = 2 in the paper formula, exactly 0, which the block path gives as ~1e-16)."""
    return ((g.detach().double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1.0)).item()


def blocked_grads(k, v, w, u, gy, semantics, chunks=KERNEL_CHUNKS):
    leaves = [x.detach().clone().requires_grad_() for x in (k, v, w, u)]
    return torch.autograd.grad(blocked_bi_wkv(*leaves, semantics=semantics, chunks=chunks), leaves, gy)


def fused_grads(k, v, w, u, gy, semantics, chunks=KERNEL_CHUNKS):
    leaves = [x.detach().clone().requires_grad_() for x in (k, v, w, u)]
    return torch.autograd.grad(fused(*leaves, semantics=semantics, chunks=chunks), leaves, gy)


@pytest.mark.parametrize("semantics", ["paper", "official"])
@pytest.mark.parametrize("T, chunks", [(2, 32), (7, 32), (33, 32), (197, 32), (1025, 32), (40, 3)])
def test_fused_gradients_match_the_block_path(semantics, T, chunks):
    """Every input's gradient in float64 against the block path's (its hand-written backward equals autograd of its
    forward to 1e-12; both take the same EPS form), both signs of the decay, batch 2; float32 within 1e-5."""
    k, v, w, u = random_inputs(2, T, 5, decay=5.0, k_scale=5.0, seed=T)
    gy = torch.randn(2, T, 5, dtype=torch.float64)
    for g, ref in zip(fused_grads(k, v, w, u, gy, semantics, chunks), blocked_grads(k, v, w, u, gy, semantics, chunks)):
        assert grad_err(g, ref) < 1e-10
    for g, ref in zip(fused_grads(*(x.float() for x in (k, v, w, u, gy)), semantics=semantics, chunks=chunks),
                      blocked_grads(k, v, w, u, gy, semantics, chunks)):
        assert g.dtype == torch.float32 and grad_err(g, ref) < 1e-5


@pytest.mark.parametrize("semantics, T", [("paper", 2), ("paper", 29), ("official", 9), ("official", 40)])
def test_fused_gradcheck(semantics, T):
    k, v, w, u = (x.requires_grad_() for x in random_inputs(1, T, 3, decay=2.0, first=1.0, seed=T))
    assert torch.autograd.gradcheck(lambda *a: fused(*a, semantics=semantics), (k, v, w, u), fast_mode=T > 10)


def test_fused_gradients_at_extremes():
    """Keys over ±60, |spatial_decay| 200 (official: w <= 0), a zero decay: finite and equal to the block path's."""
    g = torch.Generator().manual_seed(0)
    B, T, C = 2, 197, 6
    k = (torch.rand(B, T, C, generator=g, dtype=torch.float64) * 2 - 1) * 60
    v, gy = torch.randn(B, T, C, generator=g, dtype=torch.float64), torch.randn(B, T, C, generator=g, dtype=torch.float64)
    w = -torch.tensor([200.0, 50.0, 0.0, 1.0, 120.0, 3.0], dtype=torch.float64) / T
    u = torch.tensor([100.0, -100.0, 0.0, 5.0, -30.0, 1.0], dtype=torch.float64) / T
    for semantics in ("paper", "official"):
        for gf, gb in zip(fused_grads(k, v, w, u, gy, semantics), blocked_grads(k, v, w, u, gy, semantics)):
            assert torch.isfinite(gf).all() and grad_err(gf, gb) < 1e-8


def test_out_of_range_rows_fall_back_with_gradients(fused_cpu_scan):
    k, v, w, u = (x.float().requires_grad_() for x in random_inputs(1, 50, 4, seed=2))
    with torch.no_grad():
        k[0, 10, 1] = 650.0
    assert fused(k, v, w, u, "official") is None
    y = bi_wkv(k, v, w, u, "official")
    gy = torch.randn_like(y)
    for g, ref in zip(torch.autograd.grad(y, (k, v, w, u), gy), blocked_grads(k, v, w, u, gy, "official")):
        assert grad_err(g, ref) < 1e-6


def test_model_training_step_with_the_fused_scans():
    """A VRWKV's loss and every parameter gradient with the fused scans equal those of the default path."""
    import vrwkv
    from conftest import perturb_
    from vrwkv.ops.wkv.fused_cpu import numba_scans

    torch.manual_seed(0)
    model = perturb_(vrwkv.create_model("test_vrwkv", num_classes=5, img_size=32, patch_size=4), 0.1).train()
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    results = []
    for enabled in (False, True):
        with numba_scans(enabled):
            loss = torch.nn.functional.cross_entropy(model(x), target)
            results.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert rel_err(loss_b, loss_a) < 1e-6
    for (name, _), ga, gb in zip(model.named_parameters(), grads_a, grads_b):
        assert rel_err(gb, ga) < 1e-5, name
