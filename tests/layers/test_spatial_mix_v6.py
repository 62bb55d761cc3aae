"""SpatialMixV6 (spec §4.2, §4.4): fancy init, parameter layout, the forward against a direct float64 restatement,
and the cls-token passthrough of the V6 shifts."""
import pytest
import torch

from conftest import perturb_, rel_err
from vrwkv.layers import ChannelMix, make_shift, q_shift
from vrwkv.layers.spatial_mix_v6 import SpatialMixV6
from vrwkv.ops.wkv6.reference import naive_recurrent_bi_wkv6


def perturbed(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Float64 copy with every parameter moved off its init (the LoRA matrices start at ~1e-4)."""
    torch.manual_seed(seed)
    module = module.double()
    perturb_(module, std)
    return module


def test_fancy_init_formulas():
    C, H, depth, layer = 128, 2, 3, 1
    m = SpatialMixV6(C, layer, depth, num_heads=H)
    r0, r1 = layer / (depth - 1), 1 - layer / depth
    x = torch.arange(C, dtype=torch.float64) / C
    for name in ("x", "w", "k"):
        assert torch.allclose(getattr(m, f"time_maa_{name}").double().flatten(), 1 - x**r1, atol=1e-6)
    assert torch.allclose(m.time_maa_v.double().flatten(), 1 - (x**r1 + 0.3 * r0), atol=1e-6)
    for name in ("r", "g"):
        assert torch.allclose(getattr(m, f"time_maa_{name}").double().flatten(), 1 - x ** (0.5 * r1), atol=1e-6)
    n = torch.arange(C, dtype=torch.float64)
    decay = -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r0)
    assert torch.allclose(m.time_decay.double().flatten(), decay, atol=1e-5)
    assert m.time_decay.flatten()[0].item() == -6 and abs(m.time_decay.flatten()[-1].item() + 1) < 1e-6
    faaaa = r0 * (1 - n / (C - 1)) + 0.1 * (((n + 1) % 3) - 1)
    assert m.time_faaaa.shape == (H, 64) and torch.allclose(m.time_faaaa.double().flatten(), faaaa, atol=1e-6)
    for p in (m.time_maa_w1, m.time_maa_w2, m.time_decay_w1, m.time_decay_w2):
        assert p.abs().max() <= 1e-4 and p.std() > 3e-5  # U(-1e-4, 1e-4)
    assert torch.all(m.ln_x.weight == 1) and torch.all(m.ln_x.bias == 0)


def test_parameter_layout_and_errors():
    names = {n: tuple(p.shape) for n, p in SpatialMixV6(192, 0, 4, num_heads=3, key_norm=True).named_parameters()}
    assert list(names) == [
        "time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g", "time_maa_w1",
        "time_maa_w2", "time_decay", "time_decay_w1", "time_decay_w2", "time_faaaa", "key.weight", "value.weight",
        "receptance.weight", "gate.weight", "key_norm.weight", "key_norm.bias", "output.weight", "ln_x.weight",
        "ln_x.bias",
    ]  # fmt: skip
    assert names["time_maa_w1"] == (192, 160) and names["time_maa_w2"] == (5, 32, 192)
    assert names["time_decay"] == (1, 1, 192) and names["time_decay_w1"] == (192, 64)
    assert names["time_decay_w2"] == (64, 192) and names["time_faaaa"] == (3, 64)
    with pytest.raises(ValueError, match="num_heads \\* 64"):
        SpatialMixV6(100, 0, 2, num_heads=2)
    with pytest.raises(ValueError, match="init_mode"):
        SpatialMixV6(64, 0, 2, num_heads=1, init_mode="local")


def restated_forward(m: SpatialMixV6, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Spec §4.2 step by step, one LoRA branch at a time, GroupNorm written out, the float64 reference WKV6."""
    B, T, C = x.shape
    n = hw[0] * hw[1]
    delta = torch.zeros_like(x)  # a trailing cls token (T = n + 1) is its own "shifted" value
    delta[:, :n] = q_shift(x[:, :n], hw, head_size=64) - x[:, :n]
    hidden = torch.tanh((x + delta * m.time_maa_x) @ m.time_maa_w1)  # [B, T, 160]
    mixed = {}
    for b, name in enumerate("wkvrg"):
        lora = hidden[..., 32 * b : 32 * (b + 1)] @ m.time_maa_w2[b]  # [B, T, C]
        mixed[name] = x + delta * (getattr(m, f"time_maa_{name}") + lora)
    r, k, v = mixed["r"] @ m.receptance.weight.T, mixed["k"] @ m.key.weight.T, mixed["v"] @ m.value.weight.T
    gate = mixed["g"] @ m.gate.weight.T
    g = gate * torch.sigmoid(gate)
    w = m.time_decay + torch.tanh(mixed["w"] @ m.time_decay_w1) @ m.time_decay_w2
    y = naive_recurrent_bi_wkv6(r, k, v, w, m.time_faaaa, m.num_heads)
    heads = y.view(B, T, m.num_heads, 64)
    heads = (heads - heads.mean(-1, keepdim=True)) / torch.sqrt(heads.var(-1, unbiased=False, keepdim=True) + 1e-5)
    y = heads.reshape(B, T, C) * m.ln_x.weight + m.ln_x.bias
    return (y * g) @ m.output.weight.T


@pytest.mark.parametrize("cls_token", [False, True], ids=["patches", "with-cls"])
def test_forward_matches_restatement(cls_token):
    m = perturbed(SpatialMixV6(128, 1, 3, num_heads=2, num_suffix_tokens=int(cls_token)))
    hw = (3, 5)
    x = torch.randn(2, 15 + cls_token, 128, dtype=torch.float64)
    assert rel_err(m(x, hw), restated_forward(m, x, hw)) < 1e-12


def test_key_norm_and_no_shift():
    torch.manual_seed(0)
    x = torch.randn(1, 12, 64, dtype=torch.float64)
    plain = perturbed(SpatialMixV6(64, 0, 2, num_heads=1))
    normed = perturbed(SpatialMixV6(64, 0, 2, num_heads=1, key_norm=True))
    assert rel_err(normed(x, (3, 4)), plain(x, (3, 4))) > 1e-3  # the extra LayerNorm is applied
    no_shift = perturbed(SpatialMixV6(64, 0, 2, num_heads=1, shift_pixel=0))
    before = no_shift(x, (3, 4))
    with torch.no_grad():
        for name in "xwkvrg":
            getattr(no_shift, f"time_maa_{name}").add_(1.0)
    assert torch.equal(no_shift(x, (3, 4)), before)  # without a shift the mixes see a zero difference


def test_shifts_pass_the_trailing_cls_token_through():
    torch.manual_seed(0)
    H, W, C = 3, 4, 128
    x = torch.randn(2, H * W + 1, C)
    shift = make_shift("q_shift_multihead", head_size=64, num_suffix_tokens=1)
    expected = torch.cat([q_shift(x[:, :-1], (H, W), head_size=64), x[:, -1:]], dim=1)
    assert torch.equal(shift(x, (H, W)), expected)

    # ChannelMix is per token apart from its shift: the patch tokens are unchanged by the cls token, and the cls
    # token sees a "shift" equal to itself, so every mix weight drops out for it
    ffn = perturbed(ChannelMix(C, 0, 2, shift_mode="q_shift_multihead", num_suffix_tokens=1)).float()
    ffn_patches = ChannelMix(C, 0, 2, shift_mode="q_shift_multihead")
    ffn_patches.load_state_dict(ffn.state_dict())
    out = ffn(x, (H, W))
    assert rel_err(out[:, :-1], ffn_patches(x[:, :-1], (H, W))) < 1e-6
    cls = x[:, -1]
    cls_out = torch.sigmoid(ffn.receptance(cls)) * ffn.value(torch.relu(ffn.key(cls)) ** 2)
    assert rel_err(out[:, -1], cls_out) < 1e-6



def test_gradients_match_restatement():
    """The fused mixes (baddbmm, addcmul) have the gradients of the step-by-step formula, for x and every
    parameter, float64 (restatement with the differentiable reference WKV6)."""
    torch.manual_seed(3)
    m = perturbed(SpatialMixV6(64, 1, 3, num_heads=1))
    hw = (3, 4)
    x = torch.randn(1, 12, 64, dtype=torch.float64, requires_grad=True)
    out = m(x, hw)
    g = torch.randn_like(out)
    params = [x, *m.parameters()]
    grads = torch.autograd.grad(out, params, g)
    ref = torch.autograd.grad(restated_forward(m, x, hw), params, g)
    assert all(rel_err(a, b) < 1e-10 for a, b in zip(grads, ref))
