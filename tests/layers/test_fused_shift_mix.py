"""The mixers with the fused Q-Shift-and-mix kernel (``ops/shift_mix``, numba) against Q-Shift + lerp: bit-identical
in the model, and used only for the plain Q-Shift."""
import pytest
import torch

pytest.importorskip("numba")

import vrwkv  # noqa: E402
from vrwkv.layers import make_shift  # noqa: E402
from vrwkv.layers.q_shift import q_shift_parameters  # noqa: E402
from vrwkv.ops.shift_mix import fused_cpu  # noqa: E402
from vrwkv.ops.wkv.fused_cpu import numba_scans  # noqa: E402


def test_only_the_plain_q_shift_is_recognised():
    assert q_shift_parameters(make_shift("q_shift")) == (1, 0.25)
    assert q_shift_parameters(make_shift("q_shift", 2, 0.125)) == (2, 0.125)
    assert q_shift_parameters(make_shift("q_shift_multihead")) is None
    assert q_shift_parameters(make_shift("q_shift", num_suffix_tokens=1)) is None
    assert q_shift_parameters(make_shift("token_shift")) is None
    assert q_shift_parameters(None) is None


@pytest.mark.parametrize("threads", [1, 2])
def test_model_outputs_equal_with_and_without_the_fused_mixes(threads, monkeypatch):
    """VRWKV-T in inference: the fused kernel (spatial and channel mixes, channel-mix chunks across grid rows) gives
    the same features as Q-Shift + lerp (both with numba's Bi-WKV)."""
    from vrwkv.layers import channel_mix

    monkeypatch.setattr(channel_mix, "INFERENCE_CHUNK_TOKENS", 50)  # 4 chunks, ending inside grid rows (14 per row)
    torch.manual_seed(0)
    model = vrwkv.create_model("vrwkv_tiny", num_classes=0).eval()
    images = torch.randn(1, 3, 224, 224)
    calls = []
    kernel = fused_cpu._run
    monkeypatch.setattr(fused_cpu, "_run", lambda *a: calls.append(1) or kernel(*a))
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
