"""The mixers with the fused Q-Shift-and-mix kernel (``ops/shift_mix``, numba) against Q-Shift + lerp: bit-identical
in shift_mix, its projections and the model; used only for the plain Q-Shift, not when tracing."""
import pytest
import torch

import vrwkv
from vrwkv.layers import make_shift
from vrwkv.layers import q_shift
from vrwkv.layers.q_shift import q_shift_parameters
from vrwkv.layers.shift_mix import shift_mix, shift_mix_linear
from vrwkv.ops.linear import linear
from vrwkv.ops.shift_mix import fused_cpu
from vrwkv.ops.wkv.fused_cpu import numba_scans


def test_only_the_plain_q_shift_is_recognised():
    assert q_shift_parameters(make_shift("q_shift")) == (1, 0.25)
    assert q_shift_parameters(make_shift("q_shift", 2, 0.125)) == (2, 0.125)
    assert q_shift_parameters(make_shift("q_shift_multihead")) is None
    assert q_shift_parameters(make_shift("q_shift", num_suffix_tokens=1)) is None
    assert q_shift_parameters(make_shift("token_shift")) is None
    assert q_shift_parameters(None) is None


@pytest.fixture
def kernel_calls(monkeypatch):
    """The calls of the fused kernel (the real one runs)."""
    calls = []
    kernel = fused_cpu._run
    monkeypatch.setattr(fused_cpu, "_run", lambda *a: calls.append(1) or kernel(*a))
    return calls


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_shift_mix_and_its_projections_use_the_kernel_in_inference(kernel_calls):
    B, H, W, C = 2, 5, 6, 20
    x = torch.randn(B, H * W, C)
    mix = torch.rand(3, 1, 1, C) * 2 - 0.5
    weights = [torch.randn(8, C) for _ in range(3)]
    shift = make_shift("q_shift", 1, 0.2)
    expected = torch.lerp(q_shift(x, (H, W), 1, 0.2), x, mix)  # [3, B, T, C]
    with numba_scans(True), torch.no_grad():
        assert torch.equal(shift_mix(x, (H, W), shift, mix), expected)
        assert len(kernel_calls) == 3
        for m, w, p in zip(expected, weights, shift_mix_linear(x, (H, W), shift, mix, weights)):
            assert torch.equal(p, linear(m, w))  # (the product the layers use: oneDNN's on the CPU)
        assert len(kernel_calls) == 6
        projections = shift_mix_linear(x, (H, W), shift, mix, weights, channel_major=True)
        for m, w, p in zip(expected, weights, projections):
            assert torch.equal(p, linear(w, m.reshape(-1, C)).view(-1, B, H * W))  # w @ m^T
        traced = torch.jit.trace(lambda t: shift_mix(t, (H, W), shift, mix), x)  # tracing keeps plain ops
        calls = len(kernel_calls)
        assert torch.equal(traced(x), expected) and len(kernel_calls) == calls
    with numba_scans(False), torch.no_grad():
        assert torch.equal(shift_mix(x, (H, W), shift, mix), expected) and len(kernel_calls) == calls


@pytest.mark.parametrize("threads", [1, 2])
def test_model_outputs_equal_with_and_without_the_fused_mixes(threads, monkeypatch, kernel_calls):
    """VRWKV-T in inference: the fused kernel (spatial and channel mixes, channel-mix chunks across grid rows) gives
    the same features as Q-Shift + lerp (both with numba's Bi-WKV)."""
    from vrwkv.layers import channel_mix

    monkeypatch.setattr(channel_mix, "INFERENCE_CHUNK_TOKENS", 50)  # 4 chunks, ending inside grid rows (14 per row)
    torch.manual_seed(0)
    model = vrwkv.create_model("vrwkv_tiny", num_classes=0).eval()
    images = torch.randn(1, 3, 224, 224)
    calls = kernel_calls
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with numba_scans(True), torch.inference_mode():
            fused = model.forward_features(images)
            assert len(calls) == 12 * (3 + 2 * 4)  # per block: three spatial mixes, two per channel-mix chunk
            monkeypatch.setattr(fused_cpu, "enabled", False)
            plain = model.forward_features(images)
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 12 * (3 + 2 * 4)
    assert torch.equal(fused, plain)
