"""ChannelMix: fancy init, parameter layout and the forward formula (spec §1.5)."""
import torch

from conftest import rel_err
from vrwkv.layers import ChannelMix, q_shift


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
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, H * W, C, dtype=torch.float64)
    xx = q_shift(x, (H, W))
    xk = x * m.spatial_mix_k + xx * (1 - m.spatial_mix_k)
    xr = x * m.spatial_mix_r + xx * (1 - m.spatial_mix_r)
    k = torch.relu(xk @ m.key.weight.T) ** 2
    k = torch.nn.functional.layer_norm(k, (4 * C,), m.key_norm.weight, m.key_norm.bias)
    expected = torch.sigmoid(xr @ m.receptance.weight.T) * (k @ m.value.weight.T)
    assert rel_err(m(x, (H, W)), expected) < 1e-13
