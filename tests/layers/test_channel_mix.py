"""ChannelMix: fancy init, parameter layout and the forward formula (spec §1.5)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import perturb_, rel_err, saved_bytes
from vrwkv.layers import ChannelMix, q_shift
from vrwkv.layers.channel_mix import squared_relu, squared_relu_linear


def test_fancy_init_and_layout():
    C, depth, layer = 8, 4, 3
    m = ChannelMix(C, layer, depth, hidden_rate=2, key_norm=True)
    x = torch.arange(C, dtype=torch.float64) / C
    r1 = 1 - layer / depth
    assert torch.allclose(m.spatial_mix_k.double().flatten(), x**r1, atol=1e-7)
    assert torch.allclose(m.spatial_mix_r.double().flatten(), x**r1, atol=1e-7)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {"spatial_mix_k": (1, 1, 8), "spatial_mix_r": (1, 1, 8), "key.weight": (16, 8),
                      "key_norm.weight": (16,), "key_norm.bias": (16,), "receptance.weight": (8, 8),
                      "value.weight": (8, 16)}
    assert torch.all(ChannelMix(C, 0, 2, init_mode="global").spatial_mix_k == 0.5)


def test_forward_formula():
    torch.manual_seed(0)
    H, W, C = 3, 5, 8
    m = ChannelMix(C, 1, 3, key_norm=True).double()
    perturb_(m)
    x = torch.randn(2, H * W, C, dtype=torch.float64)
    xx = q_shift(x, (H, W))
    xk = x * m.spatial_mix_k + xx * (1 - m.spatial_mix_k)
    xr = x * m.spatial_mix_r + xx * (1 - m.spatial_mix_r)
    k = torch.relu(xk @ m.key.weight.T) ** 2
    k = torch.nn.functional.layer_norm(k, (4 * C,), m.key_norm.weight, m.key_norm.bias)
    expected = torch.sigmoid(xr @ m.receptance.weight.T) * (k @ m.value.weight.T)
    assert rel_err(m(x, (H, W)), expected) < 1e-13


def test_squared_relu_matches_autograd_reference():
    """The hand-written backward against ``relu(x) ** 2`` through autograd (incl. exact zeros and large values) and
    gradcheck, in float64."""
    x = torch.tensor([-1e6, -2.0, -1e-300, 0.0, 1e-300, 0.5, 3.0, 1e6], dtype=torch.float64, requires_grad=True)
    g = torch.linspace(-2, 2, 8, dtype=torch.float64)
    (squared_relu(x) * g).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    ref = torch.relu(x_ref) ** 2
    (ref * g).sum().backward()
    assert torch.equal(squared_relu(x), ref) and torch.equal(x.grad, x_ref.grad)
    y = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(squared_relu, (y,))


def test_inference_path_and_gradients_match_the_formula():
    """Without autograd the activations run in place; with it the gradients equal those of the plain formula
    (old implementation: separate mixes, ``square(relu(.))``), float64."""
    torch.manual_seed(1)
    H, W, C = 3, 4, 8
    m = ChannelMix(C, 1, 3, key_norm=True).double()
    perturb_(m)
    x = torch.randn(2, H * W, C, dtype=torch.float64, requires_grad=True)
    out = m(x, (H, W))
    with torch.inference_mode():
        assert rel_err(m(x.detach(), (H, W)), out) < 1e-14
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *m.parameters()], g)

    def formula(x):
        xx = q_shift(x, (H, W))
        xk = x * m.spatial_mix_k + xx * (1 - m.spatial_mix_k)
        xr = x * m.spatial_mix_r + xx * (1 - m.spatial_mix_r)
        k = m.key_norm(torch.square(torch.relu(m.key(xk))))
        return torch.sigmoid(m.receptance(xr)) * m.value(k)

    ref = torch.autograd.grad(formula(x), [x, *m.parameters()], g)
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(grads, ref))


def test_squared_relu_linear_matches_the_formula():
    """``F.linear(relu(x) ** 2, w)`` through autograd: values and both gradients (incl. exact zeros and 1e60-sized
    inputs, odd sizes), float64; gradcheck; frozen weight."""
    torch.manual_seed(2)
    x = torch.randn(2, 7, 11, dtype=torch.float64)
    x[0, 0, :6] = torch.tensor([-1e60, -1e-300, 0.0, 1e-300, 1e60, -3.0], dtype=torch.float64)
    x.requires_grad_()
    w = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    out, ref = squared_relu_linear(x, w), F.linear(torch.relu(x) ** 2, w)
    assert rel_err(out, ref) < 1e-12
    g = torch.randn_like(out)
    ref_grads = torch.autograd.grad(ref, (x, w), g)
    for a, b in zip(torch.autograd.grad(out, (x, w), g), ref_grads):
        assert rel_err(a, b) < 1e-12
    (gx,) = torch.autograd.grad(squared_relu_linear(x, w.detach()), x, g)
    assert rel_err(gx, ref_grads[0]) < 1e-12
    small = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(squared_relu_linear, (small, w[:, :6].detach().clone().requires_grad_()))
    with pytest.raises(ValueError, match="weight must be"):
        squared_relu_linear(x, w.t())


def _perturbed(m):
    perturb_(m)
    return m


@pytest.mark.parametrize("shift_mode,suffix,key_norm", [("q_shift", 0, False), ("q_shift_multihead", 1, False),
                                                        ("token_shift", 0, False), ("none", 0, False),
                                                        ("none", 0, True)])
def test_training_path_matches_the_formula(shift_mode, suffix, key_norm):
    """The autograd path (shift_mix_linear, squared_relu_linear) for every shift (VRWKV6's per-head Q-Shift with a
    trailing cls token, none: x used directly) against the plain formula: values and all gradients, float64; and the
    same values as the inference path."""
    torch.manual_seed(3)
    H, W, C = 3, 5, 16
    m = _perturbed(ChannelMix(C, 1, 3, shift_mode=shift_mode, key_norm=key_norm, shift_head_size=8,
                              num_suffix_tokens=suffix)).double()
    x = torch.randn(2, H * W + suffix, C, dtype=torch.float64, requires_grad=True)
    out = m(x, (H, W))
    with torch.inference_mode():
        assert rel_err(m(x.detach(), (H, W)), out) < 1e-14

    def formula(x):
        if m.shift is None:
            xk = xr = x
        else:
            xx = m.shift(x, (H, W))
            xk = x * m.spatial_mix_k + xx * (1 - m.spatial_mix_k)
            xr = x * m.spatial_mix_r + xx * (1 - m.spatial_mix_r)
        k = torch.square(torch.relu(xk @ m.key.weight.T))
        if key_norm:
            k = m.key_norm(k)
        return torch.sigmoid(xr @ m.receptance.weight.T) * (k @ m.value.weight.T)

    ref = formula(x)
    assert rel_err(out, ref) < 1e-13
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *m.parameters()], g)
    ref_grads = torch.autograd.grad(ref, [x, *m.parameters()], g)
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(grads, ref_grads))


def test_training_graph_keeps_seven_token_tensors():
    """With a shift and no key_norm, autograd keeps x, relu(k) (hidden = 4 C: 4 units), sigmoid(r) and value(.)
    (+ the [2, 1, 1, C] mix weights): 7 [B, T, C] units; autograd through the plain formula keeps 14."""
    torch.manual_seed(4)
    H, W, C = 3, 5, 16
    m = ChannelMix(C, 1, 3)
    x = torch.randn(2, H * W, C, requires_grad=True)
    saved, _ = saved_bytes(lambda: m(x, (H, W)), m.parameters())
    assert saved == 7 * x.numel() * 4 + 2 * C * 4


def test_training_path_under_autocast():
    """CPU bfloat16 autocast: the same output as the formula through autocast, float32 gradients that agree with
    autograd's up to bfloat16 rounding."""
    torch.manual_seed(5)
    H, W, C = 3, 5, 16
    m = _perturbed(ChannelMix(C, 1, 3))
    x = torch.randn(2, H * W, C, requires_grad=True)

    def formula(x):
        xkr = torch.lerp(m.shift(x, (H, W)), x, torch.stack([m.spatial_mix_k, m.spatial_mix_r]))
        return torch.sigmoid(m.receptance(xkr[1])) * m.value(torch.relu(m.key(xkr[0])) ** 2)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = m(x, (H, W)), formula(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *m.parameters()], g)
    ref_grads = torch.autograd.grad(ref, [x, *m.parameters()], g)
    assert all(a.dtype == torch.float32 and rel_err(a, b) < 2e-2 for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("shift_mode, key_norm", [("q_shift", False), ("q_shift", True), ("none", False)])
def test_inference_in_token_chunks_matches_the_formula(monkeypatch, shift_mode, key_norm):
    """Without autograd the FFN runs over chunks of B·T tokens (here 5 of 24, the last one short): equal to the plain
    formula (float64), with and without a shift, with key_norm."""
    from vrwkv.layers import channel_mix

    monkeypatch.setattr(channel_mix, "INFERENCE_CHUNK_TOKENS", 5)
    torch.manual_seed(2)
    H, W, C = 3, 4, 8
    m = ChannelMix(C, 1, 3, key_norm=key_norm, shift_mode=shift_mode).double()
    perturb_(m)
    x = torch.randn(2, H * W, C, dtype=torch.float64)
    with torch.no_grad():
        out = m(x, (H, W))
        plain = m.mlp(m.token_mix(x, (H, W)))
    assert out.shape == x.shape and rel_err(out, plain) < 1e-14


def test_inference_in_token_chunks_under_autocast(monkeypatch):
    """bf16 autocast (CPU) through several chunks: the output takes the matmuls' dtype and matches float32."""
    from vrwkv.layers import channel_mix

    monkeypatch.setattr(channel_mix, "INFERENCE_CHUNK_TOKENS", 5)
    torch.manual_seed(3)
    m = perturb_(ChannelMix(8, 1, 3))
    x = torch.randn(2, 12, 8)
    with torch.no_grad():
        ref = m(x, (3, 4))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, (3, 4))
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 3e-2


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("chunk", [5, 2048])
def test_add_to_takes_the_norm_and_may_add_into_its_input(monkeypatch, fused, chunk):
    """``add_to(residual, x, hw, gamma, norm=ln)``: the bits of ``add_to(residual, ln(x), hw, gamma)``, also with x
    the residual itself (the block's call: ln(x) is made before any row is written); without a norm an input that
    shares the residual's memory is refused."""
    from vrwkv.layers import channel_mix
    from vrwkv.ops.wkv.fused_cpu import numba_scans

    monkeypatch.setattr(channel_mix, "INFERENCE_CHUNK_TOKENS", chunk)  # several chunks, or one
    torch.manual_seed(4)
    ffn, ln = perturb_(ChannelMix(16, 1, 4)), perturb_(torch.nn.LayerNorm(16))
    x, gamma = torch.randn(2, 12, 16), torch.randn(16)
    with torch.no_grad(), numba_scans(fused):
        expected = ffn.add_to(x.clone(), ln(x), (3, 4), gamma)
        assert torch.equal(ffn.add_to(x.clone(), x, (3, 4), gamma, norm=ln), expected)
        stream = x.clone()
        assert ffn.add_to(stream, stream, (3, 4), gamma, norm=ln) is stream
        assert torch.equal(stream, expected)
        with pytest.raises(ValueError, match="shares memory"):
            ffn.add_to(stream, stream, (3, 4))


@pytest.mark.parametrize("fused", [False, True])
def test_add_to_frees_the_normalised_tokens_and_the_shift_before_the_products(monkeypatch, fused):
    """The tensor peak of ``add_to(..., norm=ln)`` is one ``[B, T, C]`` below that of ``add_to`` given ``ln(x)``
    (which its caller holds through the products); the plain mixer's ``shift(x)`` is dropped too: kept alive to the
    end, it raises the peak by one ``[B, T, C]``."""
    from vrwkv.bench.measure import _tensor_peak_mb
    from vrwkv.layers import channel_mix, shift_mix
    from vrwkv.ops.wkv.fused_cpu import numba_scans

    torch.manual_seed(5)
    ffn, ln = perturb_(ChannelMix(64, 1, 4)), perturb_(torch.nn.LayerNorm(64))
    x = torch.randn(1, 32 * 32, 64)
    unit = x.numel() * 4 / 2**20
    with torch.no_grad(), numba_scans(fused):
        ffn.add_to(x.clone(), x, (32, 32), norm=ln)  # (the block buffer exists before the measurements)
        fused_in = _tensor_peak_mb(lambda: ffn.add_to(x.clone(), x, (32, 32), norm=ln))
        held = _tensor_peak_mb(lambda: ffn.add_to(x.clone(), ln(x), (32, 32)))
        assert fused_in <= held - 0.9 * unit
        if not fused:  # the plain mixer made shift(x): keep it alive to the end
            kept, plain = [], shift_mix.lerp_mixer
            monkeypatch.setattr(channel_mix, "lerp_mixer", lambda x, shifted, mus: kept.append(shifted) or
                                plain(x, shifted, mus))
            shift_kept = _tensor_peak_mb(lambda: ffn.add_to(x.clone(), x, (32, 32), norm=ln))
            assert shift_kept >= fused_in + 0.9 * unit


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("tokens, room_rows, expected_rows", [
    (24, 30, 21),  # room for 30 rows of hidden + mix (80 floats each), 21 with value and gate rows (112): chunks of 21
    (24, 40, 24),  # room for everything: one chunk
    (24, 17, 24),  # the 24-row chunk does not fit even without value and gate rows: the buffer grows, no shrinking
    (1, 1, 1),  # one token, room for it without value and gate rows only: one chunk of 1, value and gate apart
])
def test_add_to_takes_its_chunk_rows_from_the_shared_buffer(monkeypatch, fused, tokens, room_rows, expected_rows):
    """Inside a workspace whose block buffer another layer sized, ``add_to`` takes fewer rows per chunk where that
    puts its value and gate rows in the buffer too (never zero), and computes the same result (to rounding: products
    of other row counts)."""
    from vrwkv.layers import channel_mix
    from vrwkv.layers.workspace import BLOCK_LARGEST, inference_workspace, room, scratch
    from vrwkv.ops.linear import onednn_linears
    from vrwkv.ops.wkv.fused_cpu import numba_scans

    torch.manual_seed(6)
    ffn, ln = perturb_(ChannelMix(16, 1, 4)), perturb_(torch.nn.LayerNorm(16))  # hidden 64: 80 per row, 112 with
    x, gamma = torch.randn(1, tokens, 16), torch.randn(16)  # value and gate rows
    chunks = []
    real_linear = channel_mix.linear_activated
    monkeypatch.setattr(channel_mix, "linear_activated", lambda m, xk, act, into=None: chunks.append(xk.shape[0])
                        or real_linear(m, xk, act, into=into))
    with torch.no_grad(), numba_scans(fused), onednn_linears(False):
        expected = ffn.add_to(x.clone(), x, (1, tokens), gamma, norm=ln)
        chunks.clear()
        with inference_workspace():
            scratch(BLOCK_LARGEST, (room_rows * 80,), x)  # another layer's use of the buffer
            out = ffn.add_to(x.clone(), x, (1, tokens), gamma, norm=ln)
            assert room(BLOCK_LARGEST, x) >= room_rows * 80
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert chunks[0] == expected_rows and max(chunks) == expected_rows
