"""SpatialMix: fancy/local/global init (spec §1.7), parameter layout, composition, and the WKV-mode ablations."""
import math

import pytest
import torch

from conftest import rel_err
from vrwkv.layers import SpatialMix, q_shift
from vrwkv.ops import bi_wkv
from vrwkv.ops.wkv.reference import naive_official_bi_wkv


def test_fancy_init_formulas():
    C, depth, layer = 12, 3, 1
    m = SpatialMix(C, layer, depth)
    r0, r1 = layer / (depth - 1), 1 - layer / depth
    c = torch.arange(C, dtype=torch.float64)
    decay = -5 + 8 * (c / (C - 1)) ** (0.7 + 1.3 * r0)
    assert torch.allclose(m.spatial_decay.double(), decay, atol=1e-6)
    assert m.spatial_decay[0].item() == -5 and abs(m.spatial_decay[-1].item() - 3) < 1e-6
    first = torch.tensor([math.log(0.3) + 0.5 * (((i + 1) % 3) - 1) for i in range(C)], dtype=torch.float64)
    assert torch.allclose(m.spatial_first.double(), first, atol=1e-6)
    x = c / C
    assert torch.allclose(m.spatial_mix_k.double().flatten(), x**r1, atol=1e-6)
    assert torch.allclose(m.spatial_mix_v.double().flatten(), x**r1 + 0.3 * r0, atol=1e-6)
    assert torch.allclose(m.spatial_mix_r.double().flatten(), x ** (0.5 * r1), atol=1e-6)
    assert m.spatial_mix_k.shape == (1, 1, C) and m.spatial_decay.shape == (C,)


def test_other_init_modes_and_layout():
    local, glob = SpatialMix(8, 0, 2, init_mode="local"), SpatialMix(8, 0, 2, init_mode="global")
    assert torch.all(local.spatial_decay == 1) and torch.all(local.spatial_mix_v == 1)
    assert torch.all(glob.spatial_first == 0) and torch.all(glob.spatial_mix_r == 0.5)
    names = [n for n, _ in SpatialMix(8, 0, 2, key_norm=True).named_parameters()]
    assert names == ["spatial_decay", "spatial_first", "spatial_mix_k", "spatial_mix_v", "spatial_mix_r",
                     "key.weight", "value.weight", "receptance.weight", "key_norm.weight", "key_norm.bias",
                     "output.weight"]
    no_shift = [n for n, _ in SpatialMix(8, 0, 2, shift_mode="none").named_parameters()]
    assert not any(n.startswith("spatial_mix") for n in no_shift)
    with pytest.raises(ValueError, match="wkv_semantics"):
        SpatialMix(8, 0, 2, wkv_semantics="kernel")
    with pytest.raises(ValueError, match="wkv_mode"):
        SpatialMix(8, 0, 2, wkv_mode="forward")
    with pytest.raises(ValueError, match="init_mode"):
        SpatialMix(8, 0, 2, init_mode="xavier")


def test_forward_is_the_spec_composition():
    """Shift-mix of the unshifted token, w/T and u/T, sigmoid receptance gate (spec §1.4), in float64."""
    torch.manual_seed(0)
    H, W, C = 5, 7, 8  # T = 35 > 32 tokens: the official semantics differ from the paper formula here
    m = SpatialMix(C, 1, 3, key_norm=True).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, H * W, C, dtype=torch.float64)
    xx = q_shift(x, (H, W))
    mix = lambda mu: x * mu + xx * (1 - mu)  # noqa: E731
    k, v = mix(m.spatial_mix_k) @ m.key.weight.T, mix(m.spatial_mix_v) @ m.value.weight.T
    r = torch.sigmoid(mix(m.spatial_mix_r) @ m.receptance.weight.T)
    y = naive_official_bi_wkv(k, v, m.spatial_decay / (H * W), m.spatial_first / (H * W))
    y = torch.nn.functional.layer_norm(y, (C,), m.key_norm.weight, m.key_norm.bias)
    expected = (r * y) @ m.output.weight.T
    assert rel_err(m(x, (H, W)), expected) < 1e-12
    m.wkv_semantics = "paper"
    assert rel_err(m(x, (H, W)), expected) > 1e-4  # the two semantics really differ at T = 35


@pytest.mark.parametrize("wkv_mode", ["causal", "bidirectional"])
def test_causal_mode_with_token_shift_sees_only_the_past(wkv_mode):
    """The paper's uni-directional ablation: with the 1-D token shift and causal WKV, output t ignores tokens > t."""
    torch.manual_seed(0)
    m = SpatialMix(8, 0, 2, shift_mode="token_shift", wkv_mode=wkv_mode).double()
    x = torch.randn(1, 12, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 8:] += 1.0
    y, y2 = m(x, (3, 4)), m(x2, (3, 4))
    past_change = rel_err(y2[:, :8], y[:, :8])
    assert (past_change < 1e-12) if wkv_mode == "causal" else (past_change > 1e-3)


def test_inference_path_channel_slices_and_gradients_match_the_formula():
    """The no-autograd path (gate in place), the WKV of a channel slice, and the gradients of every input and
    parameter against the plain formula (old implementation: three separate mixes and projections), float64."""
    torch.manual_seed(2)
    H, W, C = 3, 5, 8
    m = SpatialMix(C, 1, 3, key_norm=True).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, H * W, C, dtype=torch.float64, requires_grad=True)
    out = m(x, (H, W))
    with torch.inference_mode():
        assert rel_err(m(x.detach(), (H, W)), out) < 1e-14
        k, v, _ = m.project(m.token_mix(x.detach(), (H, W)))
        full = m.wkv(k, v, H * W)
        part = m.wkv(k[..., 2:5].contiguous(), v[..., 2:5].contiguous(), H * W, slice(2, 5))
        assert rel_err(part, full[..., 2:5]) < 1e-14
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *m.parameters()], g)

    def formula(x):
        xx = q_shift(x, (H, W))
        mix = lambda mu: x * mu + xx * (1 - mu)  # noqa: E731
        k, v = m.key(mix(m.spatial_mix_k)), m.value(mix(m.spatial_mix_v))
        y = bi_wkv(k, v, m.spatial_decay / (H * W), m.spatial_first / (H * W), semantics="official")
        return m.output(torch.sigmoid(m.receptance(mix(m.spatial_mix_r))) * m.key_norm(y))

    ref = torch.autograd.grad(formula(x), [x, *m.parameters()], g)
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(grads, ref))
