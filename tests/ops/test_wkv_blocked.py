"""The block-matrix Bi-WKV (``ops/wkv/blocked.py``) against the float64 references, in both of its layouts."""
import pytest
import torch

import wkv_cases
from conftest import DEVICE, rel_err
from vrwkv.ops import bi_wkv
from vrwkv.ops.wkv import api, blocked
from vrwkv.ops.wkv.blocked import blocked_bi_wkv, blocked_supports, plan_blocks
from vrwkv.ops.wkv.reference import naive_official_bi_wkv, naive_paper_bi_wkv
from wkv_cases import extreme_inputs, reference

pytestmark = pytest.mark.usefixtures("one_thread")

# the official kernel adds EPS·e^{m_t} (m_t its running max); the block path takes e^{m_t} ~ den_t + e^{k_t}, which
# differs by about EPS = 1e-6 relative (module docstring); the paper formula has no EPS
TOL64 = {"paper": 1e-12, "official": 3e-6}
TOL32 = {"paper": 2e-6, "official": 4e-6}


def random_inputs(*args, **kwargs):
    return [x.to(DEVICE) for x in wkv_cases.random_inputs(*args, **kwargs)]


@pytest.mark.parametrize("semantics", ["paper", "official"])
@pytest.mark.parametrize("T", [1, 2, 5, 32, 33, 65, 197, 300])
def test_blocked_matches_reference(semantics, T):
    k, v, w, u = random_inputs(2, T, 5, seed=T)
    ref = reference(semantics, k, v, w, u)
    assert rel_err(blocked_bi_wkv(k, v, w, u, semantics), ref) < TOL64[semantics]
    y32 = blocked_bi_wkv(*(x.float() for x in (k, v, w, u)), semantics=semantics)
    assert y32.dtype == torch.float32 and y32.shape == k.shape
    assert rel_err(y32, ref) < TOL32[semantics]


@pytest.mark.parametrize("T, chunks", [(1100, 32), (40, 2), (23, 3)])
def test_blocked_subdivided_kernel_chunks(T, chunks):
    """Kernel chunks longer than a block are split into blocks (each chunk padded to whole blocks); the chunk-local
    sums and the chunk start's exclusion from the own-chunk term then travel through the carries."""
    assert plan_blocks(T, "official", chunks).per_chunk > 1
    k, v, w, u = random_inputs(1, T, 4, seed=T)
    ref = reference("official", k, v, w, u, chunks=chunks)
    assert rel_err(blocked_bi_wkv(k, v, w, u, "official", chunks=chunks), ref) < TOL64["official"]
    y32 = blocked_bi_wkv(*(x.float() for x in (k, v, w, u)), semantics="official", chunks=chunks)
    assert rel_err(y32, ref) < TOL32["official"]


@pytest.mark.parametrize("semantics", ["paper", "official"])
@pytest.mark.parametrize("T", [20, 64, 197])
def test_blocked_extremes_in_its_range(semantics, T):
    """The extremes of the block path's range (``wkv_cases.extreme_inputs``)."""
    k, v, w, u = extreme_inputs(T, semantics)
    assert blocked_supports(T, semantics, float(w.abs().max()), float(u.abs().max()))
    ref = reference(semantics, k, v, w, u)
    y = blocked_bi_wkv(*(x.float().to(DEVICE) for x in (k, v, w, u)), semantics=semantics)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) < 1e-5


def test_blocked_supports_small_sequences_only_for_moderate_decays():
    # a block cannot be shorter than one token: at T = 3 a decay of 66 per token spans more than 15 in one block
    assert not blocked_supports(3, "paper", 200 / 3, 0.0)
    assert blocked_supports(3, "paper", 10 / 3, 0.0)
    assert blocked_supports(196, "official", 200 / 196, 100 / 196)
    assert not blocked_supports(196, "official", 0.1, 61.0)


@pytest.mark.parametrize("semantics", ["paper", "official"])
def test_channel_major_input_and_inference_path(semantics):
    """A transposed view of [B, C, T] storage is read in place; the no-grad path equals the differentiable one (which
    multiplies by 1 / den', kept for its backward, instead of dividing); the output is a [B, T, C] view of
    channel-major [C, B, T] storage either way."""
    k, v, w, u = (x.float() for x in random_inputs(2, 61, 7, seed=3))
    kT, vT = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [B, C, T]
    with torch.no_grad():
        y_inference = blocked_bi_wkv(kT.transpose(1, 2), vT.transpose(1, 2), w, u, semantics)
    y_grad = blocked_bi_wkv(k, v, w.requires_grad_(), u, semantics)
    assert y_grad.requires_grad
    assert rel_err(y_grad.detach(), y_inference) < 1e-6
    assert y_inference.permute(2, 0, 1).is_contiguous() and y_grad.permute(2, 0, 1).is_contiguous()  # [C, B, T]


@pytest.mark.parametrize("semantics", ["paper", "official"])
def test_inference_by_channel_groups(monkeypatch, semantics):
    """Without autograd the op runs groups of channels (``GROUP_ELEMENTS`` elements, at least
    ``MIN_GROUP_CHANNELS``) into one y: 7 channels as 3 + 3 + 1 equal the reference and the op in one group."""
    k, v, w, u = random_inputs(2, 61, 7, seed=5)
    ref = reference(semantics, k, v, w, u)
    k, v, w, u = (x.float() for x in (k, v, w, u))
    with torch.no_grad():
        whole = blocked_bi_wkv(k, v, w, u, semantics)
        monkeypatch.setattr(blocked, "GROUP_ELEMENTS", 2 * 61 * 3)
        monkeypatch.setattr(blocked, "MIN_GROUP_CHANNELS", 2)
        groups = []
        forward = blocked._forward
        monkeypatch.setattr(blocked, "_forward", lambda k, *a, **kw: groups.append(k.shape[2]) or forward(k, *a, **kw))
        grouped = blocked_bi_wkv(k, v, w, u, semantics)
    assert groups == [3, 3, 1]
    assert grouped.permute(2, 0, 1).is_contiguous()  # [B, T, C] view of [C, B, T], as in one group
    assert rel_err(grouped, whole) < 1e-6 and rel_err(grouped, ref) < TOL32[semantics]


@pytest.mark.parametrize("semantics, T, chunks", [("paper", 2, 32), ("paper", 29, 32), ("official", 9, 32),
                                                   ("official", 40, 32), ("official", 19, 3)])
def test_blocked_gradcheck(semantics, T, chunks):
    """Gradients of every input in float64 (T = 40: whole kernel chunks per block; chunks = 3: subdivided chunks)."""
    k, v, w, u = (x.requires_grad_() for x in random_inputs(1, T, 3, decay=2.0, first=1.0, seed=T))
    assert torch.autograd.gradcheck(lambda *a: blocked_bi_wkv(*a, semantics=semantics, chunks=chunks),
                                    (k, v, w, u), fast_mode=T > 10)


def test_bi_wkv_dispatch():
    """float32 within range -> blocks; float64, huge decays or the causal ablation -> the chunked scan."""
    k, v, w, u = (x.float() for x in random_inputs(1, 50, 4, seed=1))
    assert api._blocked_applies(k, w, u, "official")
    assert not api._blocked_applies(k.double(), w.double(), u.double(), "official")
    assert not api._blocked_applies(k, w * 100, u, "paper")
    assert not api._blocked_applies(k, w, u, "causal")
    # outside its range the public op still computes the exact function, through the chunked scan: at T = 5 a block
    # is one token, so |w| = 30 per token (|spatial_decay| = 150) is beyond the block path
    k, v, w, u = (x.float() for x in random_inputs(1, 5, 4, seed=2))
    w = torch.tensor([30.0, -30.0, 20.0, 1.0])
    assert not api._blocked_applies(k, w, u, "paper")
    assert rel_err(bi_wkv(k, v, w, u, "paper"), naive_paper_bi_wkv(k, v, w, u)) < 1e-5


def test_inference_follows_parameter_updates():
    """In-place updates of w and u (an optimizer step, load_state_dict) change the next no-grad result: nothing kept
    between calls (index tables) may serve stale matrices."""
    k, v, w, u = (x.float() for x in random_inputs(1, 40, 4, seed=5))
    w, u = torch.nn.Parameter(w), torch.nn.Parameter(u)
    with torch.no_grad():
        first = blocked_bi_wkv(k, v, w, u, "official")
        assert torch.equal(blocked_bi_wkv(k, v, w, u, "official"), first)
        w.mul_(1.5)
        u.add_(0.1)
        updated = blocked_bi_wkv(k, v, w, u, "official")
    ref = naive_official_bi_wkv(k.double(), v.double(), w.detach().double(), u.detach().double())
    assert rel_err(updated, ref) < TOL32["official"]


def _grads_both_ways(k, v, w, u, semantics, chunks=32, g=None):
    """Gradients of every input through the hand-written backward and through autograd of the traceable forward."""
    from vrwkv.ops.wkv import blocked

    plan = plan_blocks(k.shape[1], semantics, chunks)
    eps = 1e-6 if semantics == "official" else None
    g = torch.randn_like(k) if g is None else g
    out = []
    for fn in (blocked._BlockedBiWKV.apply, blocked._traceable_forward):
        inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in (k, v, w, u)]
        y = fn(*inputs, plan, eps)
        wanted = [t for t in inputs if t.requires_grad]
        out.append((y, torch.autograd.grad(y, wanted, g)))
    return out


@pytest.mark.parametrize("semantics, B, T, chunks", [("paper", 2, 197, 32), ("official", 2, 197, 32),
                                                      ("official", 1, 1100, 32), ("official", 2, 40, 2)])
def test_hand_written_backward_equals_autograd_of_the_forward(semantics, B, T, chunks):
    """float64 to 1e-12 on blocks with padding at the end (T = 197) and inside every subdivided kernel chunk
    (T = 1100: chunks of 35 in blocks of 18; chunks = 2: chunks of 20 in blocks of 3), batch > 1."""
    k, v, w, u = (x.requires_grad_() for x in random_inputs(B, T, 3, seed=T))
    (y_hand, g_hand), (y_auto, g_auto) = _grads_both_ways(k, v, w, u, semantics, chunks)
    assert rel_err(y_hand, y_auto) < 1e-14
    for name, a, b in zip("kvwu", g_hand, g_auto):
        assert rel_err(a, b) < 1e-12, name


def test_hand_written_backward_float32_extremes_and_frozen_decay():
    """float32 with keys over ±60 and |spatial_decay| = 200 (the path's range): finite, equal to autograd of the
    same forward to float32 rounding; with w, u frozen only k and v get gradients."""
    g = torch.Generator().manual_seed(0)
    B, T, C = 2, 300, 6
    k = ((torch.rand(B, T, C, generator=g) * 2 - 1) * 60).requires_grad_()
    v = torch.randn(B, T, C, generator=g).requires_grad_()
    w = (torch.tensor([200.0, -200.0, 50.0, -50.0, 1.0, -1.0]) / T).requires_grad_()
    u = (torch.randn(C, generator=g) * 30 / T).requires_grad_()
    (y_hand, g_hand), (y_auto, g_auto) = _grads_both_ways(k, v, w, u, "paper")
    assert all(torch.isfinite(t).all() for t in g_hand)
    for name, a, b in zip("kvwu", g_hand, g_auto):
        assert rel_err(a, b) < 2e-5, name
    (_, frozen), (_, frozen_auto) = _grads_both_ways(k, v, -w.detach().abs(), u.detach(), "official")
    assert len(frozen) == 2
    for a, b in zip(frozen, frozen_auto):
        assert rel_err(a, b) < 2e-5


def test_differentiable_call_after_inference_mode_call():
    """State kept between calls (index tables) must not be inference tensors: training after an inference-mode
    forward of the same size saves them for backward."""
    k, v, w, u = (x.float() for x in random_inputs(1, 77, 3, seed=7))
    with torch.inference_mode():
        blocked_bi_wkv(k, v, w, u, "official")
    w.requires_grad_()
    blocked_bi_wkv(k, v, w, u, "official").sum().backward()
    assert torch.isfinite(w.grad).all()


def test_inference_temporaries_are_three_streams():
    """Without autograd the op's temporaries peak at X, X v and den (num's product is written over X, y over den):
    with y and the block matrices of one half, below four ``[B, T, C]``."""
    from vrwkv.bench.measure import _tensor_peak_mb

    B, T, C = 1, 4096, 64  # one channel group, no padding
    k, v, w, u = (x.float() for x in wkv_cases.random_inputs(B, T, C, seed=6))
    plan = plan_blocks(T, "paper", blocked.KERNEL_CHUNKS)
    rhs = C * (plan.L + 2) * plan.L * 4 / 2**20  # MB: one half's block matrices
    assert plan.N * plan.L == T and B * T * C <= blocked.GROUP_ELEMENTS
    with torch.no_grad():
        y = blocked_bi_wkv(k, v, w, u)
        four_streams = _tensor_peak_mb(lambda: torch.empty(4 * B * T * C))  # (the same baseline as the op's)
        peak = _tensor_peak_mb(lambda: blocked_bi_wkv(k, v, w, u))
    assert peak < four_streams + rhs  # (before this layout: 4.75 units, X, X v and both products)
    assert rel_err(y, reference("paper", *(x.double() for x in (k, v, w, u)))) < TOL32["paper"]


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("semantics, T", [("paper", 64), ("official", 61)])
def test_inference_writes_a_channel_major_out_in_place(monkeypatch, semantics, T, groups):
    """``bi_wkv(out=)`` on the block path without autograd: an ``out`` laid out as its result (a [B, T, C] view of
    [C, B, T] storage) is written in place, by every channel group, and returned; a token-major ``out`` gets a copy.
    The values are those without ``out`` (T = 64 without padding: den is made in ``out``; T = 61 with padding)."""
    k, v, w, u = (x.float() for x in random_inputs(2, T, 9, seed=T))
    if groups > 1:
        monkeypatch.setattr(blocked, "GROUP_ELEMENTS", 2 * T * 3)
        monkeypatch.setattr(blocked, "MIN_GROUP_CHANNELS", 2)
    with torch.no_grad():
        expected = bi_wkv(k, v, w, u, semantics)
        own = torch.full((9, 2, T), float("nan")).permute(1, 2, 0)  # [B, T, C] view of [C, B, T]
        other = torch.full((2, T, 9), float("nan"))
        assert blocked.writes_out(own, k) and not blocked.writes_out(other, k)
        assert blocked_bi_wkv(k, v, w, u, semantics, out=own) is own  # the op itself: no copy afterwards
        assert blocked_bi_wkv(k, v, w, u, semantics, out=other) is not other
        for out in (own, other):
            assert bi_wkv(k, v, w, u, semantics, out=out) is out
            assert rel_err(out, expected) < 1e-6


def _memory_events(fn) -> list[dict]:
    """The CPU allocations and frees ``fn()`` makes, in time order (torch.profiler's memory events: ``Bytes``,
    negative for a free, and the allocator's ``Total Allocated`` after it)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        with open(f"{tmp}/trace.json") as f:
            events = json.load(f)["traceEvents"]
    return sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0),
                  key=lambda e: e["ts"])


def _large_allocations(fn, unit: int) -> list[float]:
    """The sizes, in units of ``unit`` bytes, of the CPU allocations of at least 0.9 units that ``fn()`` makes."""
    sizes = [e["args"]["Bytes"] / unit for e in _memory_events(fn)]
    return sorted(round(s, 2) for s in sizes if s >= 0.9)


def _allocated_peak(fn) -> int:
    """Bytes that ``fn()`` has allocated on top of what was allocated when it started, at its fullest: independent
    of other tests' garbage, which a count of live tensors sees."""
    memory = _memory_events(fn)
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - start


def test_inference_into_out_makes_x_in_it():
    """With ``out`` (no padding, one channel group) X is made in ``out`` and y over num there: the op allocates X v
    and den (one ``[B, T, C]`` each; den only after the carries) instead of X, X v (one allocation) and den, and its
    peak is one ``[B, T, C]`` lower."""
    from vrwkv.bench.measure import _tensor_peak_mb

    B, T, C = 1, 4096, 64
    k, v, w, u = (x.float() for x in wkv_cases.random_inputs(B, T, C, seed=7))
    plan = plan_blocks(T, "paper", blocked.KERNEL_CHUNKS)
    assert plan.N * plan.L == T and B * T * C <= blocked.GROUP_ELEMENTS
    out = torch.empty(C, B, T).permute(1, 2, 0)
    unit = B * T * C * 4
    with torch.no_grad():
        assert _large_allocations(lambda: blocked_bi_wkv(k, v, w, u, out=out), unit) == [1.0, 1.0]
        assert _large_allocations(lambda: blocked_bi_wkv(k, v, w, u), unit) == [1.0, 2.0]
        peak_into_out = _tensor_peak_mb(lambda: blocked_bi_wkv(k, v, w, u, out=out))
        peak = _tensor_peak_mb(lambda: blocked_bi_wkv(k, v, w, u))
    assert peak_into_out < peak - 0.9 * unit / 2**20
    assert rel_err(out, reference("paper", *(x.double() for x in (k, v, w, u)))) < TOL32["paper"]


@pytest.mark.parametrize("B, T, bound", [(8, 196, 6.6), (1, 4096, 9.6)])
def test_carry_scan_frees_its_float64_temporaries(B, T, bound):
    """The carry scan without autograd (224 px batch 8, where the float64 carries are largest next to the data, and
    1024 px, kernel chunks subdivided: one more float64 scan): its temporaries peak below ``bound`` times the block
    summaries' bytes (6.2 and 9.1: the float64 products are freed as they are read; out of place they reached 11.8
    at 224 px batch 8, 12.0 with subdivided chunks), and it gives the carries of the out-of-place path that autograd
    runs through."""
    C = 192
    k, v, w, u = (x.float() for x in wkv_cases.random_inputs(B, T, C, seed=8))
    plan = plan_blocks(T, "official", blocked.KERNEL_CHUNKS)
    with torch.no_grad():
        kb = blocked._to_blocks(k.transpose(1, 2), plan, float("-inf"))
        vb = blocked._to_blocks(v.transpose(1, 2), plan, 0.0)
        m, M = blocked._frames(kb)
        x, xv = blocked._input_halves(kb, vb, m)
        _, summaries_t = blocked._gemm_table(w, u, plan, 1e-6)
        sums, m_rel = blocked._block_summaries((x, xv), summaries_t, m, M)
        starts = blocked._chunk_starts(k, v, M, plan)
        carries = blocked._framed_carries(sums, m_rel, *starts, w, plan, torch.float32, in_place=True)
        peak = _allocated_peak(lambda: blocked._framed_carries(sums, m_rel, *starts, w, plan, torch.float32,
                                                               in_place=True))
    assert peak < bound * sums.numel() * sums.element_size()
    with torch.enable_grad():  # the out-of-place path (autograd through the scan, as in the backward)
        traced = blocked._framed_carries(sums.clone().requires_grad_(), m_rel, *starts, w, plan, torch.float32)
    assert torch.equal(traced.detach(), carries)
