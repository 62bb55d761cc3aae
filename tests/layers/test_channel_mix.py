"""ChannelMix: fancy init, parameter layout and the forward formula (spec §1.5)."""
import torch

from conftest import rel_err
from vrwkv.layers import ChannelMix, q_shift
from vrwkv.layers.channel_mix import squared_relu


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
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
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
